"""Capture every Ethernet frame on a network namespace's interfaces to a file, until
SIGTERM: tcpdump's job, with a raw AF_PACKET socket (tcpdump is not installed everywhere the
tests run). Frames bridged between two ports never reach the bridge interface itself, so
the socket is bound to no interface: it sees each frame as it enters one port and leaves
another.

Usage: python tests/capture.py OUT_FILE, inside the namespace. Frames are written as a
4-byte big-endian length, then the frame.
"""

from __future__ import annotations

import signal
import socket
import struct
import sys

ETH_P_ALL = 0x0003


def main(out: str) -> None:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.settimeout(0.2)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    with open(out, "wb") as f:
        print("capturing", flush=True)
        while not stop:
            try:
                frame = sock.recv(65535)
            except TimeoutError:
                continue
            f.write(struct.pack(">I", len(frame)) + frame)


if __name__ == "__main__":
    main(sys.argv[1])
