"""Ports for daemons on one machine (tests and benches): no torch, so benches import it."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_handed_out: set[int] = set()


def free_port() -> int:
    """A port nobody listens on, below the kernel's ephemeral range: a port 0 bind (a
    daemon's transfer socket) or an outgoing connection can't take it before its daemon
    binds it, as one from that range could."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(max(1024, low - 12000), low)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
