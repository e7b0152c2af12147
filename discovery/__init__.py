"""mDNS discovery and node capabilities (arrives with the discovery issue)."""
