"""The cluster: the daemon and its parts (transport, membership, plan agreement, stage
server, requester, status), the planner, the clients and the HTTP API."""
