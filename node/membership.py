"""Who is in the cluster: members learned from any source, kept alive by their heartbeats.

Sources today are `--peer` addresses, peers that contact us, and peers' own member lists
(gossip); mDNS will be one more. A member is whoever sent a valid HELLO recently.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Member:
    id: str
    name: str
    address: str  # host:port where its daemon listens, as this node reaches it
    model: str
    fingerprint: str  # model identity: nodes of one plan must load the same weights
    memory: int  # bytes it can give to weights
    state: str
    pin: tuple[int, int] | None = None
    epoch: int = 0  # its live plan epoch
    seen: int = 0  # the newest plan epoch it accepted
    requests: int = 0  # requests open on its stage
    version: str = ""
    boot: str = ""  # changes when its process restarts
    last_seen: float = field(default_factory=time.monotonic)

    @classmethod
    def from_hello(cls, body: dict[str, Any], host: str) -> Member:
        """A member from a HELLO body (already type-checked), reached at `host`."""
        pin = body.get("pin")
        pin_ok = isinstance(pin, list) and len(pin) == 2 and all(type(p) is int for p in pin)
        return cls(
            id=body["id"][:64],
            name=body["name"][:64],
            address=f"{host}:{body['port']}",
            model=body["model"][:256],
            fingerprint=body["fingerprint"][:256],
            memory=body["memory"],
            state=body["state"][:64],
            pin=(pin[0], pin[1]) if pin_ok else None,
            epoch=_int(body, "epoch"),
            seen=_int(body, "seen"),
            requests=_int(body, "requests"),
            version=str(body.get("version", ""))[:32],
            boot=str(body.get("boot", ""))[:32],
        )


def _int(body: dict[str, Any], key: str) -> int:
    value = body.get(key)
    return value if type(value) is int and value >= 0 else 0


class Members:
    """The members other than this node, by id."""

    def __init__(self) -> None:
        self.by_id: dict[str, Member] = {}

    def update(self, member: Member) -> bool:
        """Record a heartbeat; True when the member is new, restarted, moved or re-pinned."""
        old = self.by_id.get(member.id)
        self.by_id[member.id] = member
        if old is None:
            return True
        return (old.address, old.pin, old.boot) != (member.address, member.pin, member.boot)

    def remove(self, node_id: str) -> Member | None:
        return self.by_id.pop(node_id, None)

    def expired(self, timeout_s: float) -> list[Member]:
        now = time.monotonic()
        return [m for m in self.by_id.values() if now - m.last_seen > timeout_s]

    def same_model(self, fingerprint: str) -> list[Member]:
        return [m for m in self.by_id.values() if m.fingerprint == fingerprint]

    def __iter__(self):  # noqa: ANN204
        return iter(list(self.by_id.values()))
