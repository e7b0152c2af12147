"""Talking to a daemon from the command line: requests, streamed replies, one-line errors."""

from __future__ import annotations

from collections.abc import Iterator

import zmq

from node.cluster.secret import ClusterKeys
from node.errors import RinginferError
from protocol.wire import Kind, Message, ProtocolError, decode, encode, frame_bound, message

DEFAULT_PORT = 7710
DEFAULT_API = "127.0.0.1:7700"  # the HTTP API and web page (node/cluster/api.py)
SEND_S = 5.0  # how long a request may wait for a connection to take it


class Client:
    """A DEALER connected to one daemon. Replies that are errors raise RinginferError."""

    def __init__(self, address: str, keys: ClusterKeys | None = None) -> None:
        self.address, self.secured = address, keys is not None
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, frame_bound())  # replies to clients: headers
        # A handshake that failed for good (a daemon with a secret, a client without) leaves
        # no pipe to queue on: without a bound a send would wait forever.
        self.sock.setsockopt(zmq.SNDTIMEO, int(SEND_S * 1000))
        if keys:
            keys.connect_as_client(self.sock)
        self.sock.connect(f"tcp://{address}")

    def close(self) -> None:
        self.ctx.destroy(linger=0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, kind: Kind, **body: object) -> None:
        try:
            self.sock.send_multipart(encode(message(kind, body=dict(body))))
        except zmq.Again:
            raise self._silent(SEND_S, f"it to take a {kind.value} request") from None

    def _silent(self, timeout_s: float, waiting_for: str) -> RinginferError:
        hint = (" with this cluster secret?)" if self.secured
                else "? If it has a cluster secret, pass --secret-file)")  # fmt: skip
        return RinginferError(
            f"no answer from the daemon at {self.address} for {timeout_s:.0f}s while waiting "
            f"for {waiting_for} (is `ringinfer daemon` running there{hint}"
        )

    def receive(self, timeout_s: float, waiting_for: str) -> Message:
        if not self.sock.poll(int(timeout_s * 1000)):
            raise self._silent(timeout_s, waiting_for)
        try:
            msg = decode(self.sock.recv_multipart())
        except ProtocolError as e:
            raise RinginferError(f"the daemon at {self.address} sent a bad reply: {e}") from None
        if msg.kind == Kind.ERROR:
            raise RinginferError(f"{msg.body['message']} [{msg.body['code']}]")
        return msg

    def status(self, timeout_s: float = 5.0) -> dict:
        self.send(Kind.STATUS)
        return self.receive(timeout_s, "its status").body["status"]

    def generate(self, timeout_s: float, **body: object) -> Iterator[Message]:
        """ACCEPTED, then TOKENs, then DONE; `timeout_s` bounds each wait."""
        return self.request(Kind.GENERATE, timeout_s, "the next token", **body)

    def request(
        self, kind: Kind, timeout_s: float, waiting_for: str, **body: object
    ) -> Iterator[Message]:
        """Replies to one request up to its DONE; `timeout_s` bounds each wait."""
        self.send(kind, **body)
        while True:
            msg = self.receive(timeout_s, waiting_for)
            yield msg
            if msg.kind == Kind.DONE:
                return


def parse_address(text: str) -> str:
    """HOST:PORT, or HOST alone for the default port."""
    host, _, port = text.rpartition(":") if ":" in text else (text, "", str(DEFAULT_PORT))
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise RinginferError(f"expected HOST:PORT, got '{text}'")
    return f"{host}:{port}"
