"""The cluster secret, and the CurveZMQ keys every node and client derives from it.

One secret per cluster, shared by its machines (`ringinfer secret > cluster.key`). From it
come two Curve25519 key pairs: the daemons' server pair and the holders' client pair. A
daemon's ROUTER is a CURVE server whose ZAP handler admits only the client key; links and
clients are CURVE clients of the server key. So only a holder of the secret completes a
handshake, and every frame after it is encrypted. The secret never leaves the machine; mDNS
carries only a fingerprint of the server's public key, which tells "another secret" from
"another cluster" without helping anyone to connect.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85

from node.errors import RinginferError

ENV = "RINGINFER_SECRET_FILE"
FILE_NAME = "cluster.key"  # where a daemon's data dir keeps one
MIN_LENGTH = 32
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = "ringinfer"


def new_secret() -> str:
    """256 random bits as hex: what `ringinfer secret` prints."""
    return secrets.token_hex(32)


@dataclass(frozen=True)
class ClusterKeys:
    server_public: bytes  # z85, as pyzmq's socket options take keys
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def of(cls, secret: str) -> ClusterKeys:
        def pair(role: bytes) -> tuple[bytes, bytes]:
            private = z85.encode(hashlib.sha256(b"ringinfer " + role + secret.encode()).digest())
            return zmq.curve_public(private), private

        server_public, server_secret = pair(b"server")
        client_public, client_secret = pair(b"client")
        return cls(server_public, server_secret, client_public, client_secret)

    @property
    def fingerprint(self) -> str:
        """A short public name of the cluster's key, for mDNS and status."""
        return hashlib.sha256(self.server_public).hexdigest()[:12]

    def serve(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE server whose peers the ZAP handler checks."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.server_secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no handler, no connection

    def connect_as_client(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.client_public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.client_secret)


def read_secret(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise RinginferError(f"cannot read the cluster secret {path}: {e.strerror}") from None
    if len(text) < MIN_LENGTH:
        raise RinginferError(
            f"the cluster secret {path} has {len(text)} characters; it needs {MIN_LENGTH} or "
            "more (make one with `ringinfer secret > cluster.key`)"
        )
    return text


def find_keys(flag: Path | None, data_dir: Path | None) -> ClusterKeys | None:
    """The cluster's keys: from --secret-file, else $RINGINFER_SECRET_FILE, else the data
    dir's cluster.key; None where there is none."""
    path = flag or (Path(os.environ[ENV]) if os.environ.get(ENV) else None)
    if path is None and data_dir is not None and (data_dir / FILE_NAME).is_file():
        path = data_dir / FILE_NAME
    return ClusterKeys.of(read_secret(path)) if path else None


def zap_reply(frames: list[bytes], keys: ClusterKeys) -> tuple[list[bytes], bool, str]:
    """ZAP (RFC 27) for one handshake: (the reply frames, admitted, the peer's address).

    Admits CURVE peers that hold the cluster's client key; everything else is refused.
    """
    if len(frames) < 6 or frames[0] != b"1.0":
        return [b"1.0", frames[1] if len(frames) > 1 else b"", b"500", b"bad ZAP request",
                b"", b""], False, ""  # fmt: skip
    request_id, address, mechanism = frames[1], frames[3].decode(errors="replace"), frames[5]
    key = frames[6] if len(frames) > 6 else b""
    admitted = mechanism == b"CURVE" and key == z85.decode(keys.client_public)
    status = [b"200", b"OK"] if admitted else [b"400", b"not this cluster's key"]
    return [b"1.0", request_id, *status, b"member" if admitted else b"", b""], admitted, address
