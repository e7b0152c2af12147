"""The cluster secret, the client credential derived from it, and each daemon's own key.

One secret per cluster, shared by its daemons (`ringinfer secret --out cluster.key`). From
it come:

- the daemons' CURVE server pair: a connection completes only for a peer that knows the
  server's public key, which nobody outside the cluster and its clients has;
- the member MAC key: a daemon's own CURVE key pair (random, kept 0600 in its data dir) is
  accepted as a member's when the daemon shows HMAC(member key, its public key) in its first
  HELLO (or MANIFEST); from then on every member message on that connection is tied, through
  the User-Id the ZAP handler gives it, to that key, and the key to the node id it first
  spoke for (node/cluster/identities.py);
- the client credential (`ringinfer secret --client`): a key derived one way from the
  secret, with the server's public key beside it. It generates, scores and reads status,
  and can neither derive the secret, the server key nor a member proof.

mDNS adverts carry nothing derived from the secret: only whether the node uses one ("curve").
Any tag that is a function of the secret (even salted with a published nonce) lets whoever
hears it test guessed secrets offline; telling a member from a stranger is the handshake's
and the HELLO proof's work, which gives nothing away to a wrong guess.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import secrets
import stat
from collections.abc import Container
from dataclasses import dataclass, replace
from pathlib import Path

import zmq
from zmq.utils import z85

from node.errors import RinginferError

ENV = "RINGINFER_SECRET_FILE"
FILE_NAME = "cluster.key"  # where a daemon's data dir keeps one
MIN_BITS = 128
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = "ringinfer"  # the ring's ROUTER: any CURVE key that knows the server key
TRANSFER_DOMAIN = "ringinfer-transfer"  # weights: proven members' keys only
CLIENT_PREFIX = "ringinfer-client"
TAG = "curve"  # what an advert says of a node with a secret

log = logging.getLogger("ringinfer")


def new_secret() -> str:
    """256 random bits as hex: what `ringinfer secret` prints."""
    return secrets.token_hex(32)


def key_bits(text: str) -> float:
    """A generous estimate of the key material in a secret: hex (what `ringinfer secret`
    makes) counts 4 bits a digit, other text log2 of its distinct characters (at most 6) a
    character; a hex string of fewer than 8 distinct digits ('0000…') is no random one."""
    if not text:
        return 0.0
    distinct = len(set(text.lower()))
    if all(c in "0123456789abcdefABCDEF" for c in text):
        return 4.0 * len(text) if distinct >= 8 else 0.0
    return len(text) * min(6.0, math.log2(distinct)) if distinct > 1 else 0.0


def _derive(label: bytes, key: bytes) -> bytes:
    return hmac.new(key, b"ringinfer " + label, hashlib.sha256).digest()


def _pair(seed: bytes) -> tuple[bytes, bytes]:
    private = z85.encode(seed)
    return zmq.curve_public(private), private


@dataclass(frozen=True)
class ClusterKeys:
    """The CURVE keys (z85, as pyzmq's socket options take them) of one holder: a daemon
    (`member`), a holder of the cluster secret that is no daemon, or a client credential."""

    server_public: bytes
    server_secret: bytes  # b'' in a client credential
    public: bytes  # the pair this holder connects with
    secret: bytes
    client_public: bytes  # the client credential's, admitted as a client
    member_mac: bytes  # b'' in a client credential: it proves no key
    credential: bytes = b""  # the client credential itself (what `secret --client` writes)

    @classmethod
    def of(cls, secret: str) -> ClusterKeys:
        """A holder of the cluster secret; it connects as a client until `member()` gives it
        a daemon's own pair."""
        raw = secret.encode()
        server_public, server_secret = _pair(_derive(b"server", raw))
        client = cls.client(_derive(b"client credential", raw), server_public)
        return replace(client, server_secret=server_secret, member_mac=_derive(b"member", raw))

    @classmethod
    def client(cls, credential: bytes, server_public: bytes) -> ClusterKeys:
        public, private = _pair(_derive(b"client key", credential))
        return cls(server_public, b"", public, private, public, b"", credential)

    def member(self, public: bytes, secret: bytes) -> ClusterKeys:
        """These keys with a daemon's own pair to connect with."""
        return replace(self, public=public, secret=secret)

    @property
    def holds_secret(self) -> bool:
        return bool(self.member_mac)

    @property
    def fingerprint(self) -> str:
        """A short name of the cluster's server key, for `status` (never mDNS)."""
        return hashlib.sha256(self.server_public).hexdigest()[:12]

    def proof(self) -> str:
        """HMAC of this holder's public key under the member key: what makes it a member's."""
        return self.proves(self.public.decode())

    def proves(self, public: str) -> str:
        return hmac.new(self.member_mac, public.encode(), hashlib.sha256).hexdigest()

    def verify(self, public: str, proof: object) -> bool:
        return (
            self.holds_secret
            and isinstance(proof, str)
            and hmac.compare_digest(self.proves(public), proof)
        )

    def client_file(self) -> str:
        """The text of a client credential file for this cluster."""
        return f"{CLIENT_PREFIX} {self.credential.hex()} {self.server_public.decode()}\n"

    def serve(self, sock: zmq.Socket, domain: str = ZAP_DOMAIN) -> None:
        """Make `sock` a CURVE server whose peers the ZAP handler checks."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.server_secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, domain.encode())
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no handler, no connection

    def connect_as_client(self, sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)


def parse_keys(text: str, path: Path) -> ClusterKeys:
    """A secret file's keys: a client credential, or a cluster secret of enough key material."""
    words = text.split()
    if words and words[0] == CLIENT_PREFIX:
        try:
            credential, server_public = bytes.fromhex(words[1]), words[2].encode()
            z85.decode(server_public)
        except (IndexError, ValueError):
            raise RinginferError(f"{path} is a malformed client credential") from None
        if len(credential) != 32 or len(server_public) != 40:
            raise RinginferError(f"{path} is a malformed client credential")
        return ClusterKeys.client(credential, server_public)
    bits = key_bits(text)
    if bits < MIN_BITS:
        raise RinginferError(
            f"the cluster secret {path} holds about {bits:.0f} bits of key material; it needs "
            f"{MIN_BITS} or more (make one with `ringinfer secret --out cluster.key`)"
        )
    return ClusterKeys.of(text)


def read_keys(path: Path) -> ClusterKeys:
    try:
        text = path.read_text().strip()
    except OSError as e:
        raise RinginferError(f"cannot read the cluster secret {path}: {e.strerror}") from None
    return parse_keys(text, path)


def secret_path(flag: Path | None, data_dir: Path | None) -> Path | None:
    """--secret-file, else $RINGINFER_SECRET_FILE, else the data dir's cluster.key."""
    path = flag or (Path(os.environ[ENV]) if os.environ.get(ENV) else None)
    if path is None and data_dir is not None and (data_dir / FILE_NAME).is_file():
        path = data_dir / FILE_NAME
    return path


def find_keys(flag: Path | None, data_dir: Path | None) -> ClusterKeys | None:
    """The keys of --secret-file, $RINGINFER_SECRET_FILE or the data dir's cluster.key."""
    path = secret_path(flag, data_dir)
    return read_keys(path) if path else None


def readable_by_others(path: Path) -> bool:
    """Whether group or others may read a key file (a warning: it should be 0600)."""
    try:
        return bool(path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH))
    except OSError:
        return False


def write_private(path: Path, text: str) -> None:
    """Create `path` readable by its owner alone (0600), refusing to overwrite one."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as e:
        raise RinginferError(f"cannot create {path}: {e.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)


def own_pair(data_dir: Path) -> tuple[bytes, bytes]:
    """This daemon's own CURVE pair, made on first use and kept 0600 in its data dir: its
    identity among the members, as node_id is its name."""
    path = data_dir / "node.key"
    if not path.exists():
        write_private(path, zmq.curve_keypair()[1].decode() + "\n")
    private = path.read_text().strip().encode()
    try:
        return zmq.curve_public(private), private
    except (ValueError, zmq.ZMQError):
        raise RinginferError(f"{path} is not a CURVE key: delete it to make a new one") from None


def zap_reply(
    frames: list[bytes], keys: ClusterKeys, members: Container[str] = frozenset()
) -> tuple[list[bytes], bool, str]:
    """ZAP (RFC 27) for one handshake: (the reply frames, admitted, the peer's address).

    Getting here takes the server's public key. The ring's socket admits any CURVE key
    (transport.py then takes only client kinds from the client credential, and nothing
    but a proving HELLO or MANIFEST from a key not yet proven); the transfer socket admits
    proven members' keys only. The User-Id is the peer's public key, in z85.
    """
    if len(frames) < 6 or frames[0] != b"1.0":
        return [b"1.0", frames[1] if len(frames) > 1 else b"", b"500", b"bad ZAP request",
                b"", b""], False, ""  # fmt: skip
    request_id, domain, mechanism = frames[1], frames[2], frames[5]
    address = frames[3].decode(errors="replace")
    key = frames[6] if len(frames) > 6 else b""
    public = z85.encode(key).decode() if mechanism == b"CURVE" and len(key) == 32 else ""
    admitted = bool(public) and (
        domain == ZAP_DOMAIN.encode()
        or (domain == TRANSFER_DOMAIN.encode() and public in members)
    )
    status = [b"200", b"OK"] if admitted else [b"400", b"not this cluster's key"]
    user = public.encode() if admitted else b""
    return [b"1.0", request_id, *status, user, b""], admitted, address
