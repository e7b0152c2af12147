"""Issue 23's bounds on what a peer may send: ZMQ_MAXMSGSIZE from the model, a cap on the
handler tasks one connection keeps in flight, and live frames with numbers and shapes out of
range."""

from __future__ import annotations

import asyncio

import zmq

from node.cluster.secret import ClusterKeys, new_secret
from node.cluster.transport import listen
from protocol.wire import Kind, encode, frame_bound, message
from tests.daemons import free_port
from tests.test_transport import Endpoint, hello, member, ping, run, until


def test_a_frame_over_the_models_largest_is_dropped_and_the_socket_survives():
    """ZMQ_MAXMSGSIZE from the model (here 1 MiB tensors): ZeroMQ drops the connection
    before buffering the frame, nothing is decoded, and the sender's reconnection (or any
    other peer) is served as before. The transfer socket takes headers only."""

    async def main() -> None:
        keys = ClusterKeys.of(new_secret())
        a, b_keys = Endpoint(member(keys)), member(keys)
        ctx = zmq.Context()
        try:
            assert a.transport.router.getsockopt(zmq.MAXMSGSIZE) == frame_bound(1 << 20)
            listening = listen("127.0.0.1", free_port(), None)
            assert listening.transfer.getsockopt(zmq.MAXMSGSIZE) == frame_bound()
            listening.ctx.destroy(linger=0)
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            b_keys.connect_as_client(sock)  # a member, its key proven by its HELLO
            sock.connect(f"tcp://{a.address}")
            sock.send_multipart(encode(hello(b_keys)))
            sock.send_multipart(encode(ping()))
            assert await until(lambda: len(a.got) == 2)
            head = encode(message(Kind.PING, body={"id": "b", "t": 1.0}))[0]
            sock.send_multipart([head, bytes(frame_bound(1 << 20) + 1)])
            await asyncio.sleep(1.0)
            assert len(a.got) == 2 and not a.transport.stats.errors, a.transport.stats.errors
            sock.send_multipart(encode(ping()))  # the same socket, reconnected
            assert await until(lambda: len(a.got) == 3)
        finally:
            ctx.destroy(linger=0)
            await a.transport.close()

    run(main())


def test_one_connection_keeps_at_most_its_cap_of_handlers_in_flight():
    """Handlers that never finish (a GENERATE's whole generation, say): past the cap, a
    connection's messages are dropped unread and counted (no task, no reply: a task per
    refusal would grow without end as well); other connections are served, and the first is
    again once its handlers end."""

    async def main() -> None:
        a = Endpoint(None)
        a.transport.in_flight.cap = 4
        release, running = asyncio.Event(), []

        async def slow(identity: bytes, msg, host: str) -> None:  # noqa: ANN001
            running.append(identity)
            await release.wait()

        a.transport.handlers[Kind.PING] = slow
        ctx = zmq.Context()
        try:
            flood, other = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
            for sock in (flood, other):
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(f"tcp://{a.address}")
            for _ in range(10):
                flood.send_multipart(encode(ping()))
            assert await until(lambda: a.transport.stats.errors["overloaded"] == 6)
            assert len(running) == 4 and len(a.transport.dispatching) == 4
            assert not flood.poll(200)
            other.send_multipart(encode(ping()))
            assert await until(lambda: len(running) == 5)
            release.set()
            assert await until(lambda: not a.transport.dispatching)
            assert not a.transport.in_flight.counts
            flood.send_multipart(encode(ping()))
            assert await until(lambda: len(running) == 6)
        finally:
            ctx.destroy(linger=0)
            await a.transport.close()

    run(main())


def test_a_link_takes_replies_only_and_the_router_no_pong():
    """Whoever holds the server key can answer on a link we dialled, so only replies (PONG,
    ERROR) are taken there: a BYE or PING coming back on a link is dropped and counted. A
    PONG on the ROUTER names no speaker: dropped too."""

    async def main() -> None:
        a = Endpoint(None)
        ctx = zmq.Context()
        server = ctx.socket(zmq.ROUTER)  # what a's link dials: it answers with anything
        server.setsockopt(zmq.LINGER, 0)
        port = free_port()
        server.bind(f"tcp://127.0.0.1:{port}")
        try:
            a.transport.send_to(f"127.0.0.1:{port}", ping())
            assert await until(lambda: server.poll(0))
            peer = server.recv_multipart()[0]
            server.send_multipart([peer, *encode(message(Kind.BYE, body={"id": "x"}))])
            server.send_multipart([peer, *encode(ping())])
            server.send_multipart([peer, *encode(message(Kind.PONG, body={"id": "x", "t": 1.0}))])
            assert await until(lambda: len(a.got) == 1)
            assert a.got[0][0].kind == Kind.PONG
            assert a.transport.stats.errors["misrouted"] == 2
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://{a.address}")
            sock.send_multipart(encode(message(Kind.PONG, body={"id": "x", "t": 1.0})))
            assert await until(lambda: a.transport.stats.errors["misrouted"] == 3)
            assert len(a.got) == 1
        finally:
            ctx.destroy(linger=0)
            await a.transport.close()

    run(main())
