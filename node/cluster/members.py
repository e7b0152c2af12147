"""Who is in the cluster: members learned from any source, kept alive by their heartbeats.

Sources are mDNS (`discovery/mdns.py`), `--peer` addresses, peers that contact us, and
peers' own member lists (gossip). A member is whoever sent a valid HELLO recently.

Two processes that claim one id (a copied data dir) are told apart from a restart by their
boot nonces: a restarted process's old nonce goes silent before the new one speaks, while
two live processes keep interleaving. Such an id is reported and kept out of plans.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from statistics import median
from typing import Any

from discovery.capabilities import Capabilities


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
    caps: Capabilities = field(default_factory=lambda: Capabilities.from_json({}))
    quant: str = ""  # the formats its stage holds weights in (int4, int8+float32...)
    rtts: dict[str, float] = field(default_factory=dict)  # its round trips to others, seconds
    load: dict[str, float] = field(default_factory=dict)  # batch, tokens/s, waiting, queued
    transfer: int = 0  # the port of its transfer socket (node/cluster/transfer.py)
    holds: list[str] = field(default_factory=list)  # tensor groups it serves; ["*"]: all
    last_seen: float = field(default_factory=time.monotonic)
    samples: list[float] = field(default_factory=list)  # our round trips to it, newest last

    @property
    def rtt(self) -> float | None:
        """Median of our last round trips to it over the ring connection."""
        return median(self.samples) if self.samples else None

    @classmethod
    def from_hello(cls, body: dict[str, Any], host: str) -> Member:
        """A member from a HELLO body (already type-checked), reached at `host`."""
        pin, load, holds = body.get("pin"), body.get("load"), body.get("holds")
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
            quant=str(body.get("quant", ""))[:32],
            caps=Capabilities.from_json(body["caps"]),
            rtts={
                str(k)[:64]: float(v)
                for k, v in list(body["rtt"].items())[:256]
                if type(v) in (int, float) and 0 < v < 60
            },
            load={
                str(k)[:32]: float(v)
                for k, v in list(load.items() if isinstance(load, dict) else ())[:16]
                if type(v) in (int, float) and 0 <= v < 1e9
            },
            transfer=port if 0 < (port := _int(body, "transfer")) < 65536 else 0,
            holds=[h for h in (holds if isinstance(holds, list) else [])[:65536]
                   if isinstance(h, str) and len(h) <= 256],  # fmt: skip
        )


def _int(body: dict[str, Any], key: str) -> int:
    value = body.get(key)
    return value if type(value) is int and value >= 0 else 0


RTT_SAMPLES = 5


class Members:
    """The members other than this node, by id."""

    def __init__(self, dead_after_s: float = 6.0) -> None:
        self.by_id: dict[str, Member] = {}
        self.dead_after_s = dead_after_s
        # id -> boot -> (first heard, last heard, address): to tell duplicates from restarts
        self.boots: dict[str, dict[str, tuple[float, float, str]]] = {}

    def update(self, member: Member) -> bool:
        """Record a heartbeat; True when the member is new, restarted, moved, re-pinned, or
        found to share its id with another process (it is then dropped until one stops)."""
        now = member.last_seen
        boots = self.boots.setdefault(member.id, {})
        first, _, _ = boots.get(member.boot, (now, now, ""))
        boots[member.boot] = (first, now, member.address)
        for boot, (_, last, _) in list(boots.items()):
            if now - last > self.dead_after_s:
                del boots[boot]
        if self.clashing(member.id):
            return self.by_id.pop(member.id, None) is not None
        old = self.by_id.get(member.id)
        if old is not None:
            member.samples = old.samples
        self.by_id[member.id] = member
        if old is None:
            return True
        return (old.address, old.pin, old.boot) != (member.address, member.pin, member.boot)

    def clashing(self, node_id: str) -> bool:
        """Two live processes with this id: their heartbeats interleave."""
        spans = list(self.boots.get(node_id, {}).values())
        return any(
            a[0] <= b[1] and b[0] <= a[1] for i, a in enumerate(spans) for b in spans[i + 1 :]
        )

    def clashes(self) -> dict[str, list[str]]:
        """Ids claimed by several live processes, with their addresses."""
        return {
            node_id: sorted(address for _, _, address in boots.values())
            for node_id, boots in self.boots.items()
            if self.clashing(node_id)
        }

    def rtt_sample(self, node_id: str, seconds: float) -> None:
        member = self.by_id.get(node_id)
        if member is not None:
            member.samples = [*member.samples, seconds][-RTT_SAMPLES:]

    def remove(self, node_id: str) -> Member | None:
        return self.by_id.pop(node_id, None)

    def expired(self, timeout_s: float) -> list[Member]:
        now = time.monotonic()
        return [m for m in self.by_id.values() if now - m.last_seen > timeout_s]

    def same_model(self, fingerprint: str) -> list[Member]:
        return [m for m in self.by_id.values() if m.fingerprint == fingerprint]

    def __iter__(self):  # noqa: ANN204
        return iter(list(self.by_id.values()))
