"""A process that holds a cluster key and speaks in another member's name.

`python -m tests.rogue ADDRESS KEY_FILE VICTIM_ID [--member]`: with --member it is a daemon
of its own (a fresh CURVE pair, proven with the secret through a MANIFEST, as a joining daemon
does); without, it connects as whatever KEY_FILE makes of it (a client credential: the
client's key). It then sends, twice each, HELLO, BYE, PING, PLAN and PLAN_ACK in VICTIM_ID's
name and prints, as JSON, the kinds and error codes of the replies it got.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import zmq

from node.cluster.secret import read_keys
from protocol.wire import Kind, decode, encode, message


def forged(victim: str) -> list:
    """Member messages that each name `victim` as their sender."""
    hello = {
        "id": victim, "name": "rogue", "port": 1, "model": "m", "fingerprint": "f",
        "memory": 1 << 40, "state": "leaving", "members": [], "cluster": "default", "caps": {},
        "rtt": {},
    }  # fmt: skip
    return [
        message(Kind.HELLO, body=hello),
        message(Kind.BYE, body={"id": victim}),
        message(Kind.PING, body={"id": victim, "t": 0.0}),
        message(Kind.PLAN, epoch=999, body={"plan": {}, "phase": "prepare", "from": victim}),
        message(Kind.PLAN_ACK, epoch=999, body={"id": victim, "phase": "failed", "seen": 999}),
    ]


def main(address: str, key_file: str, victim: str, as_member: bool) -> None:
    keys = read_keys(Path(key_file))
    if as_member:
        keys = keys.member(*zmq.curve_keypair())
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    keys.connect_as_client(sock)
    sock.connect(f"tcp://{address}")
    if as_member:  # prove the key, as a daemon that asks which model the cluster serves
        sock.send_multipart(encode(message(Kind.MANIFEST, body={"proof": keys.proof()})))
    for msg in forged(victim) * 2:
        if as_member:
            msg.body["proof"] = keys.proof()
        sock.send_multipart(encode(msg))
    replies = []
    deadline = time.monotonic() + 2.0
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000)):
            reply = decode(sock.recv_multipart())
            replies.append([reply.kind.value, reply.body.get("code", "")])
    print(json.dumps(replies))
    ctx.destroy(linger=0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], "--member" in sys.argv[4:])
