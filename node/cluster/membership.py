"""Who is in the cluster: mDNS adverts and goodbyes, HELLO gossip, heartbeats and round
trips, members that leave or go silent, and the nodes heard of that are not ours (another
cluster, another secret, another version, or a process using our id). A change of members
asks the plan agreement (node/cluster/plans.py) for a new plan.

An advert is a claim anyone can make: its address is dialled on probation
(Transport.send_on_advert), and becomes a member only by answering with a proven HELLO.
Gossip comes from authenticated members and is dialled as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import zmq

from discovery.mdns import SERVICE, Advert, Discovery
from node import __version__
from node.cluster.log_budget import LogBudget
from node.cluster.members import Member, Members
from node.cluster.secret import TAG
from node.cluster.status import load
from node.cluster.transport import ClientGone
from protocol.wire import VERSION, Kind, Message, ProtocolError, message

if TYPE_CHECKING:
    from node.cluster.daemon import Daemon

log = logging.getLogger("ringinfer")

MAX_HEARD = 256  # adverts' names and other clusters' nodes remembered
UNPROVEN = "?"  # the key of a node that advertised our cluster and never proved our secret


class Membership:
    def __init__(self, node: Daemon) -> None:
        self.node = node
        self.members = Members(node.cfg.dead_after_s)
        self.discovery: Discovery | None = None
        self.mdns_names: dict[str, str] = {}  # mDNS instance -> node id
        self.foreign: dict[str, dict[str, Any]] = {}  # nodes heard of but not ours, by id
        self.impostors: dict[str, float] = {}  # address -> when a process there used our id
        self.unseen_epoch = 0  # the newest plan epoch a member ran that we never saw (logged)
        self.tag = TAG if node.cfg.keys else ""  # what our adverts say of our secret
        self.proof = node.cfg.keys.proof() if node.cfg.keys else ""  # our key is a member's
        self.foreign_log = LogBudget(burst=10, window_s=60.0)
        self.found_log = LogBudget(burst=10, window_s=60.0)
        self.advertised: dict[str, Advert] = {}  # address dialled on an advert -> the advert

    # ---------------------------------------------------------------- mDNS

    async def start_discovery(self) -> None:
        node, cfg = self.node, self.node.cfg
        if cfg.mdns is None:
            return
        caps = cfg.caps
        advert = Advert(
            id=node.id, name=cfg.name, version=__version__, protocol=VERSION,
            port=cfg.port, cluster=cfg.cluster, device=caps.device,
            memory_total=caps.memory_total, memory_available=cfg.memory,
            flops=caps.flops, bandwidth=caps.bandwidth, models=(node.ckpt.name,), key=self.tag,
        )  # fmt: skip
        self.discovery = Discovery(advert, cfg.mdns, self._found, self._gone)
        try:
            await self.discovery.start()
        except OSError as e:
            log.error("mDNS unavailable (%s): only --peer and gossip find members", e)
            self.discovery = None
            return
        names = ", ".join(f"{i.name} {i.address}" for i in cfg.mdns)
        log.info("mDNS: advertising %s in cluster '%s' on %s", SERVICE, cfg.cluster, names)

    async def close(self) -> None:
        if self.discovery:
            await self.discovery.close()  # peers hear the goodbye now

    def _found(self, advert: Advert) -> None:
        """An mDNS advert: say HELLO to nodes of our cluster; remember the rest for status."""
        node = self.node
        if advert.id != node.id:
            if len(self.mdns_names) >= MAX_HEARD:  # spoofed adverts must not crowd members out
                self.mdns_names = {i: n for i, n in self.mdns_names.items()
                                   if n in self.members.by_id}  # fmt: skip
            if len(self.mdns_names) < MAX_HEARD:
                self.mdns_names[advert.instance] = advert.id
        if advert.cluster != node.cfg.cluster or advert.protocol != VERSION or (
            advert.key != self.tag
        ):
            key = node.key if advert.key == self.tag else advert.key  # as status compares
            self._foreign(advert.id, advert.name, advert.endpoint, advert.cluster, advert.version,
                          advert.protocol, key)  # fmt: skip
            return
        if advert.id == node.id and advert.endpoint == node.address:
            return
        if advert.id in self.members.by_id:
            return  # heartbeats keep it; an advert proves nothing more
        if node.transport.may_log(self.found_log):
            log.info("mDNS: found %s at %s", advert.name, advert.endpoint)
        if len(self.advertised) < MAX_HEARD:
            self.advertised[advert.endpoint] = advert
        node.transport.send_on_advert(advert.endpoint, self.hello())

    def _gone(self, instance: str) -> None:
        """An mDNS goodbye: a member that also stopped talking is gone now, not in 6 s."""
        member = self.members.by_id.get(self.mdns_names.pop(instance, ""))
        if member and time.monotonic() - member.last_seen > 1.5 * self.node.cfg.heartbeat_s:
            self.lost(member, "left (mDNS goodbye)")

    def _foreign(
        self, node_id: str, name: str, address: str, cluster: str, version: str, protocol: int,
        key: str,
    ) -> None:  # fmt: skip
        ours, our_key = self.node.cfg.cluster, self.tag
        if node_id not in self.foreign and len(self.foreign) >= MAX_HEARD:
            return  # a flood of adverts: status shows the first ones
        if node_id not in self.foreign and self.node.transport.may_log(self.foreign_log):
            if cluster != ours:
                why = f"cluster '{cluster}'"
            elif protocol != VERSION:
                why = f"protocol {protocol} (we speak {VERSION})"
            elif not our_key:
                why = "a cluster secret (we have none)"
            elif key == UNPROVEN:
                why = "never answered as a member (another cluster secret?)"
            else:
                why = "another cluster secret" if key else "no cluster secret"
            log.warning("ignoring %s at %s: %s", name, address, why)
        self.foreign[node_id] = {
            "id": node_id, "name": name, "address": address, "cluster": cluster,
            "version": version, "protocol": protocol, "key": key, "seen": time.monotonic(),
        }  # fmt: skip

    # ---------------------------------------------------------------- gossip

    def hello(self) -> Message:
        node, cfg = self.node, self.node.cfg
        plans, shard = node.plans, node.stage.shard
        pin = list(cfg.pin) if cfg.pin else None
        members = [{"id": m.id, "address": m.address} for m in self.members]
        body = {
            "id": node.id, "name": cfg.name, "port": cfg.port,
            "model": node.ckpt.name, "fingerprint": node.fingerprint, "memory": cfg.memory,
            "state": plans.state(), "members": members, "pin": pin,
            "epoch": plans.plan.epoch if plans.plan else 0, "seen": plans.seen_epoch,
            "requests": len(shard.requests) if shard else 0, "version": __version__,
            "boot": node.boot, "cluster": cfg.cluster, "caps": cfg.caps.to_json(),
            "rtt": {m.id: m.rtt for m in self.members if m.rtt is not None},
            "quant": node.quantization, "load": load(node),
            "transfer": node.transfer_port, "holds": node.transfers.files.holds(),
        }  # fmt: skip
        if cfg.keys:
            body["proof"] = self.proof  # our key is a member's (node/cluster/identities.py)
        return message(Kind.HELLO, body=body)

    def broadcast_hello(self) -> None:
        hello = self.hello()
        # Impostors too: while both processes with our id run, each keeps seeing the other.
        targets = {m.address for m in self.members} | set(self.node.cfg.peers)
        for address in targets | set(self.impostors):
            if address != self.node.address:
                self.node.transport.send_to(address, hello)

    async def heartbeat(self) -> None:
        node, cfg = self.node, self.node.cfg
        while True:
            self.broadcast_hello()
            for m in self.members:  # round trips over the ring's own connections
                ping = message(Kind.PING, body={"id": node.id, "t": time.monotonic()})
                node.transport.send_to(m.address, ping)
            for m in self.members.expired(cfg.dead_after_s):
                self.lost(m, f"silent for over {cfg.dead_after_s:.0f}s")
            self._forget_strangers()
            await asyncio.sleep(cfg.heartbeat_s)

    def _forget_strangers(self, after_s: float = 60.0) -> None:
        """Impostors and other clusters' nodes not heard of for a minute are forgotten."""
        now = time.monotonic()
        self.impostors = {a: t for a, t in self.impostors.items() if now - t < after_s}
        # Reported while their adverts live (not heard again before their goodbye) or, for
        # those that never proved our secret, while they are not dialled again.
        advertised, given_up = set(self.mdns_names.values()), self.node.transport.given_up
        self.foreign = {i: f for i, f in self.foreign.items() if now - f["seen"] < after_s
                        or i in advertised or f["address"] in given_up}  # fmt: skip
        self.node.transport.forget_strangers(after_s)
        for address in self.node.transport.expire_unproven({m.address for m in self.members}):
            a = self.advertised.pop(address, None)
            if a is not None:  # an advert of our cluster whose node never proved our secret
                self._foreign(a.id, a.name, address, a.cluster, a.version, a.protocol, UNPROVEN)
        self.advertised = {a: v for a, v in self.advertised.items()
                           if a in self.node.transport.unproven}  # fmt: skip

    def impostor_seen(self) -> bool:
        now = time.monotonic()
        return any(now - t < self.node.cfg.dead_after_s for t in self.impostors.values())

    async def on_ping(self, identity: bytes, msg: Message, host: str) -> None:
        pong = message(Kind.PONG, body={"id": self.node.id, "t": msg.body["t"]})
        with contextlib.suppress(ClientGone, zmq.ZMQError):
            await self.node.transport.reply(identity, pong)

    async def on_pong(self, identity: bytes, msg: Message, host: str) -> None:
        rtt = time.monotonic() - msg.body["t"]
        if 0 <= rtt < 60:
            self.members.rtt_sample(msg.body["id"], rtt)

    async def on_hello(self, identity: bytes, msg: Message, host: str) -> None:
        node, body = self.node, msg.body
        if not host:
            raise ProtocolError("malformed", "HELLO over a connection without an address")
        if not 0 < body["port"] < 65536:
            raise ProtocolError("bad-body", f"port {body['port']} is not a TCP port")
        address = f"{host}:{body['port']}"
        if body["id"] == node.id:
            if body.get("boot") != node.boot:  # not our own --peer address: a copied data dir
                if address not in self.impostors:
                    log.error("%s at %s uses this node's id %s (a copied data dir?)",
                              body["name"], address, node.id)  # fmt: skip
                self.impostors[address] = time.monotonic()
            return
        if body["cluster"] != node.cfg.cluster:
            self._foreign(body["id"], body["name"], address, body["cluster"],
                          str(body.get("version", "")), VERSION, node.key)  # fmt: skip
            return
        member = Member.from_hello(body, host)
        old = self.members.by_id.get(member.id)
        was_leaving = old is not None and old.state == "leaving"
        changed = self.members.update(member)
        if self.members.clashing(member.id):
            if changed:
                log.error("two nodes use id %s (%s): left out of plans until one stops",
                          member.id, ", ".join(self.members.clashes()[member.id]))  # fmt: skip
                node.plans.members_changed()
            return
        if (member.state == "leaving") != was_leaving and old is not None:
            log.info("member %s (%s) is leaving", member.name, member.id)
            node.plans.replan.set()
        if changed:
            log.info(
                "member %s (%s) at %s: %s", member.name, member.id, member.address, member.state
            )
            if member.fingerprint != node.fingerprint:
                log.warning(
                    "%s runs model %s, not ours: left out of plans", member.name, member.model
                )
            node.transport.send_to(member.address, self.hello())
            node.plans.members_changed()  # even the same ids: a restarted node lost its layers
        elif member.fingerprint == node.fingerprint and member.epoch > node.plans.seen_epoch:
            # A plan this node never heard of is live there: the others planned without us
            # while a link was down one way. Plan again, all of us (a newer epoch).
            if member.epoch > self.unseen_epoch:  # said once an epoch
                log.info("member %s runs plan epoch %d, which this node never saw: planning "
                         "again", member.name, member.epoch)  # fmt: skip
                self.unseen_epoch = member.epoch
            node.plans.members_changed()
        # Gossip: only an authenticated member's list gets here (with a cluster secret).
        known = {m.address for m in self.members} | {node.address}
        for item in body["members"][:256]:
            if not isinstance(item, dict) or not isinstance(item.get("address"), str):
                continue
            if item.get("id") != node.id and item["address"] not in known:
                node.transport.send_to(item["address"], self.hello())

    async def on_bye(self, identity: bytes, msg: Message, host: str) -> None:
        member = self.members.by_id.get(msg.body["id"])
        if member:
            self.lost(member, "left")

    def lost(self, member: Member, why: str) -> None:
        """A member left or went silent: its requests' steps fail (and are replayed), the
        caches of requests it was the requester of are freed, and the cluster re-plans."""
        self.members.remove(member.id)
        if self.node.transport.identities is not None:
            self.node.transport.identities.forget(member.id)
        log.info("member %s (%s) %s", member.name, member.id, why)
        self.node.requester.stage_lost(member.id, f"node {member.name} {why} during the request")
        self.node.stage.requester_lost(member.id, why)
        self.node.plans.replan.set()
