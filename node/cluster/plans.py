"""Plan agreement: one plan epoch at a time for the whole cluster.

The member with the smallest id coordinates: when the members change it makes a plan
(node/cluster/planner.py, pure) and walks every member through four phases, each acked:
`fetch` (a node given layers it does not hold fetches their tensors from the members that
do, while the old plan keeps serving), `prepare` (requesters finish the requests on the old
plan), `load` (each node loads its layers) and `live`. Nobody swaps layers under a running
request, and a proposal that a member cannot follow (it left, failed to fetch or load, or
saw a newer epoch) is abandoned.

Prepare has a deadline (--plan-deadline): a requester whose requests run longer (a long
generation, or a client stopped with Ctrl-Z that holds its request open) acks anyway, and
those requests are replayed into the new plan once their old stages refuse them. A member
that still has not acked some seconds later is silent: the coordinator plans without it for
a while (BENCH_S), so no one member can hold every new plan back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from node.cluster.planner import (
    DEFAULT_BANDWIDTH,
    DEFAULT_CONTEXT,
    DEFAULT_FLOPS,
    LAYER_OVERHEAD_S,
    NodeSpec,
    Plan,
    make_plan,
)
from node.cluster.transfer import Arriving, plan_holds
from node.engine.shard import Shard
from node.errors import RinginferError
from protocol.wire import Kind, Message, ProtocolError, message

if TYPE_CHECKING:
    from discovery.capabilities import Capabilities
    from node.cluster.daemon import Daemon
    from node.engine.weights import Checkpoint

log = logging.getLogger("ringinfer")

PHASES = ("fetch", "prepare", "load", "failed", "stale")  # what a PLAN_ACK may say
SILENT_AFTER_S = 10.0  # past the deadline: a member that has not acked prepare by then is silent
BENCH_S = 60.0  # how long the coordinator plans without a silent member
HEAR_S = 3.0  # how long a joining node waits to hear from the plan's members before fetching


class Acks:
    """Who acked which phase, for the proposals under way only: a proposal's acks go when it
    ends (live or abandoned), and acks for any other epoch are dropped as they come."""

    def __init__(self) -> None:
        self.open: dict[int, dict[str, set[str]]] = {}

    def propose(self, epoch: int) -> None:
        self.open[epoch] = {}

    def end(self, epoch: int) -> None:
        self.open.pop(epoch, None)

    def add(self, epoch: int, phase: str, node: str) -> bool:
        """Record an ack; False when no proposal of that epoch is under way."""
        phases = self.open.get(epoch)
        if phases is None or phase not in PHASES:
            return False
        phases.setdefault(phase, set()).add(node)
        return True

    def of(self, epoch: int, phase: str) -> set[str]:
        return self.open.get(epoch, {}).get(phase, set())


def node_spec(
    node_id: str, memory: int, pin: tuple[int, int] | None, caps: Capabilities,
    holds: frozenset[str] | None,
) -> NodeSpec:  # fmt: skip
    """What the planner knows of a node; a peer that measured nothing gets the defaults."""
    return NodeSpec(
        node_id, memory, pin, caps.flops or DEFAULT_FLOPS, caps.bandwidth or DEFAULT_BANDWIDTH,
        caps.layer_overhead_s or LAYER_OVERHEAD_S, caps.layer_s, holds,
    )  # fmt: skip


class Plans:
    def __init__(self, node: Daemon) -> None:
        self.node = node
        self.plan: Plan | None = None  # the live plan
        self.live = asyncio.Event()
        self.pending: Plan | None = None  # a proposal being prepared or loaded
        self.seen_epoch = 0  # the newest proposal this node accepted
        self.highest_epoch = 0  # the newest epoch this node heard of, as coordinator
        self.error = ""  # why the last plan could not be made or loaded
        self.planned_members: frozenset[tuple[str, Any]] = frozenset()
        self.acks = Acks()
        self.benched: dict[str, float] = {}  # silent members planned without, until when
        self.ack_event = asyncio.Event()
        self.replan = asyncio.Event()
        self.fetch_text = ""  # the fetch's progress, shown first while it runs
        self.load_text = ""  # the stage build's progress
        self.fetching: asyncio.Task | None = None  # tensors for a proposed plan's layers
        self.ready: Shard | None = None  # a stage built while its tensors were fetched

    def state(self) -> str:
        """This node's state as members and `status` see it."""
        node = self.node
        if node.leaving.is_set():
            return "leaving"
        if node.membership.impostor_seen():
            return "duplicate id"
        if self.fetch_text or self.load_text:
            return self.fetch_text or self.load_text
        if self.pending:
            return "replanning"
        if self.plan is None:
            return "waiting for a plan" if not self.error else "no plan"
        return "ready" if self.plan.stage_of(node.id) else "idle"

    def members_changed(self) -> None:
        """Plan again, even for the same ids: a restarted node lost its layers."""
        self.planned_members = frozenset()
        self.replan.set()

    def _is_coordinator(self) -> bool:
        node = self.node
        if node.membership.impostor_seen():
            return False  # our id is not ours alone: others keep it out of plans
        return all(node.id < m.id for m in node.membership.members.same_model(node.fingerprint))

    def candidates(self) -> list[NodeSpec]:
        """Nodes that may hold layers: ours and same-model members, except leaving ones."""
        node, cfg = self.node, self.node.cfg
        ends = node.transfers.ends
        mine = plan_holds(node.transfers.files.holds(), ends)
        me = [] if node.leaving.is_set() else [
            node_spec(node.id, cfg.memory, cfg.pin, cfg.caps, mine)
        ]  # fmt: skip
        benched = self._benched()
        others = [
            node_spec(m.id, m.memory, m.pin, m.caps, plan_holds(m.holds, ends))
            for m in node.membership.members.same_model(node.fingerprint)
            if m.state != "leaving" and m.id not in benched
        ]
        return [*me, *others]

    def _benched(self) -> set[str]:
        now = time.monotonic()
        self.benched = {n: until for n, until in self.benched.items() if until > now}
        return set(self.benched)

    def links(self) -> dict[tuple[str, str], float]:
        """Round trips we measured, and those our members measured and told us."""
        members = self.node.membership.members
        links = {(self.node.id, m.id): m.rtt for m in members if m.rtt is not None}
        for m in members:
            links.update({(m.id, other): rtt for other, rtt in m.rtts.items()})
        return links

    def _members(self) -> list[str]:
        """Who hears the proposal: every same-model member, the benched too (they follow the
        live plan), though no ack of theirs is waited for."""
        node = self.node
        return [node.id, *(m.id for m in node.membership.members.same_model(node.fingerprint))]

    async def loop(self) -> None:
        """On the coordinator (smallest id): a new plan epoch whenever membership changes."""
        node = self.node
        while True:
            await self.replan.wait()
            await asyncio.sleep(0.3)  # joins come in bursts: plan once for all of them
            self.replan.clear()
            if not self._is_coordinator():
                continue
            nodes = self.candidates()
            key = frozenset((n.id, n.pin) for n in nodes)
            if key == self.planned_members:
                continue  # planned already (or failed: wait for the membership to change)
            seen = [self.seen_epoch, self.highest_epoch, *(m.seen for m in node.membership.members)]
            epoch = max(seen) + 1
            self.highest_epoch = epoch
            context = min(DEFAULT_CONTEXT, node.ckpt.config.max_seq_len)
            try:
                plan = make_plan(node.ckpt.name, epoch, node.shape, nodes, node.cfg.objective,
                                 self.links(), context)  # fmt: skip
            except RinginferError as e:
                if str(e) != self.error:
                    log.error("cannot plan: %s", e)
                self.error = str(e)
                continue
            self.error = ""
            self.planned_members = key
            node.spawn(self._propose(plan, key))

    async def _propose(self, plan: Plan, key: frozenset) -> None:
        """Prepare (requesters drain), load, live: nobody swaps layers under a request."""
        members = self._members()
        benched = self._benched()
        waited = [m for m in members if m not in benched]
        ranges = ", ".join(f"{self.node.name(s.node)} {s.start}-{s.end}" for s in plan.stages)
        log.info("proposing plan epoch %d: %s", plan.epoch, ranges)
        self.acks.propose(plan.epoch)
        try:
            for phase in ("fetch", "prepare", "load"):
                for member in members:
                    self._send_plan(member, plan, phase)
                why = await self._acked(plan.epoch, phase, waited)
                if why:
                    log.info("plan epoch %d abandoned during %s: %s", plan.epoch, phase, why)
                    if self.planned_members == key and not self.acks.of(plan.epoch, "failed"):
                        self.members_changed()  # a member left or was silent: plan again
                    return
            for member in members:
                self._send_plan(member, plan, "live")
        finally:
            self.acks.end(plan.epoch)

    def _send_plan(self, member: str, plan: Plan, phase: str) -> None:
        body = {"plan": plan.to_json(), "phase": phase, "from": self.node.id}
        self.node.send_node(member, message(Kind.PLAN, epoch=plan.epoch, body=body))

    async def _acked(self, epoch: int, phase: str, members: list[str]) -> str:
        """'' once every member reached `phase`, else why the proposal is abandoned. Prepare
        has a deadline: members silent past it are benched, and planned without."""
        node = self.node
        silent_at = time.monotonic() + node.cfg.plan_deadline_s + SILENT_AFTER_S
        while True:
            acked = self.acks.of(epoch, phase)
            if acked >= set(members):
                return ""
            by_id = node.membership.members.by_id
            gone = [node.name(n) for n in members if n != node.id and n not in by_id]
            silent = []
            if phase == "prepare" and time.monotonic() > silent_at:
                silent = [n for n in members if n not in acked and n != node.id]
            reasons = {
                f"{', '.join(gone)} left": gone,
                f"a member failed: {self.error}": self.acks.of(epoch, "failed"),
                "a member had seen a newer epoch": self.acks.of(epoch, "stale"),
                "superseded": self.seen_epoch > epoch or not self._is_coordinator(),
                "stopping": node.stopping.is_set(),
                f"{', '.join(map(node.name, silent))} silent: planned without for "
                f"{BENCH_S:.0f}s": silent,
            }
            for reason, happened in reasons.items():
                if happened:
                    self._bench(silent)
                    return reason
            self.ack_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ack_event.wait(), 1.0)

    def _bench(self, silent: list[str]) -> None:
        """Plan without these members for BENCH_S, then try them again."""
        if silent:
            until = time.monotonic() + BENCH_S
            self.benched.update(dict.fromkeys(silent, until))
            asyncio.get_running_loop().call_later(BENCH_S, self.replan.set)

    async def on_plan(self, identity: bytes, msg: Message, host: str) -> None:
        node = self.node
        try:
            plan = Plan.from_json(msg.body["plan"], node.ckpt.n_layers)
        except RinginferError as e:
            raise ProtocolError("bad-plan", str(e)) from None
        phase, source = msg.body["phase"], str(msg.body.get("from", ""))
        if phase == "fetch" and plan.epoch <= self.seen_epoch:
            # Another coordinator used this epoch (a race while members joined): tell this
            # one to propose again above what we have seen.
            self._ack(source, plan.epoch, "stale", seen=self.seen_epoch)
            return
        if plan.epoch < self.seen_epoch:
            return  # superseded
        if phase == "fetch":
            self.seen_epoch = plan.epoch
            if self.fetching:  # an older proposal's: what it verified stays in the cache
                self.fetching.cancel()
            self.fetching = node.spawn(self._fetch(plan, source))
        elif phase == "prepare":
            self.seen_epoch, self.pending = plan.epoch, plan
            self.live.clear()
            node.spawn(self._prepare(plan, source))
        elif phase == "load" and self.pending and self.pending.epoch == plan.epoch:
            node.spawn(self._load(plan, source))
        elif phase == "live" and self.pending and self.pending.epoch == plan.epoch:
            self.plan, self.pending = plan, None
            self.error = ""  # whoever failed to plan before, this one worked
            self.live.set()
            mine = plan.stage_of(node.id)
            role = f"layers {mine.start}-{mine.end}" if mine else "no layers"
            log.info("plan epoch %d live: %s", plan.epoch, role)

    async def _fetch(self, plan: Plan, source: str) -> None:
        """The tensors of this node's layers in the plan that it lacks, from the members
        that hold them; the live plan goes on serving meanwhile. A node serving no layers
        builds its new stage as they land, so the load phase (the ring's pause) finds it
        ready."""
        node = self.node
        mine = plan.stage_of(node.id)
        if mine is not None:
            await self._hear_from(plan.nodes)
            stop = threading.Event()  # tells a stage still waiting for tensors to give up
            fetch = asyncio.ensure_future(node.transfers.ensure(mine.start, mine.end, self._show))

            def failed(f: asyncio.Future) -> None:
                if f.cancelled() or f.exception():
                    stop.set()

            fetch.add_done_callback(failed)
            try:
                if node.stage.shard is None:
                    await self._preload(mine.start, mine.end, stop)
                await fetch
            except RinginferError as e:
                log.error("could not fetch layers %d-%d: %s", mine.start, mine.end, e)
                self._ack(source, plan.epoch, "failed", f"{node.cfg.name}: {e}")
                return
            finally:
                stop.set()
                fetch.cancel()
                self.fetch_text = self.load_text = ""
        self._ack(source, plan.epoch, "fetch")

    async def _hear_from(self, nodes: list[str]) -> None:
        """Wait (a few heartbeats at most) until the plan's members have said hello: a node
        that joins hears from the coordinator first, and would fetch from it alone."""
        known = self.node.membership.members.by_id
        deadline = time.monotonic() + HEAR_S
        while time.monotonic() < deadline and not all(
            n in known or n == self.node.id for n in nodes
        ):
            await asyncio.sleep(0.05)

    async def _preload(self, start: int, end: int, stop: threading.Event) -> None:
        """Build layers [start, end) as their tensors land: kept for the load phase."""
        ready = self.ready
        if ready is not None and (ready.start, ready.end) == (start, end):
            return
        self.ready = None  # another range's: its memory goes before this one's is taken
        node = self.node
        ckpt = Arriving(node.ckpt, node.transfers.files, stop)
        began = time.monotonic()
        try:
            self.ready = await asyncio.get_running_loop().run_in_executor(
                node.compute, lambda: self._shard(ckpt, start, end)
            )
        except Exception as e:  # the fetch says its own error; the load phase tries again
            log.info("layers %d-%d not built during the fetch: %s", start, end, e)
            return
        log.info("layers %d-%d built as their tensors came, in %.1fs", start, end,
                 time.monotonic() - began)  # fmt: skip

    def _shard(self, ckpt: Checkpoint | Arriving, start: int, end: int) -> Shard:
        """Layers [start, end) built on this thread, their progress shown and logged."""
        cfg, label = self.node.cfg, f"layers {start}-{end}"
        last = [0.0]

        def progress(done: int, total: int) -> None:
            self.load_text = f"loading {100 * done // total}%"
            if time.monotonic() - last[0] > 1.0 or done == total:
                last[0] = time.monotonic()
                log.info("loading %s: %d/%d tensors", label, done, total)

        return Shard(ckpt, start, end, cfg.device, cfg.dtype, progress, cfg.quantize)

    def _show(self, text: str) -> None:
        self.fetch_text = text

    async def _prepare(self, plan: Plan, source: str) -> None:
        """Ack once no request of ours runs on the old plan, or at the deadline: those still
        running then are replayed into the new one when the old stages refuse them."""
        requester, deadline = self.node.requester, self.node.cfg.plan_deadline_s
        if requester.requests:
            log.info("plan epoch %d waits for %d request(s) to finish (up to %.0fs)", plan.epoch,
                     len(requester.requests), deadline)  # fmt: skip
        try:
            await asyncio.wait_for(requester.drained.wait(), deadline)
        except TimeoutError:
            log.info("plan epoch %d: %d request(s) still running after %.0fs go on in it, "
                     "replayed", plan.epoch, len(requester.requests), deadline)  # fmt: skip
        if self.pending is plan:
            self._ack(source, plan.epoch, "prepare")

    async def _load(self, plan: Plan, source: str) -> None:
        node, stage = self.node, self.node.stage
        self.plan = None
        mine = plan.stage_of(node.id)
        have = (stage.shard.start, stage.shard.end) if stage.shard else None
        ready, self.ready = self.ready, None  # built while the fetch ran, if it was
        if mine is None:
            stage.shard = None
        elif have != (mine.start, mine.end):
            stage.shard = None
            label = f"layers {mine.start}-{mine.end}"
            if ready is not None and (ready.start, ready.end) == (mine.start, mine.end):
                stage.shard = ready
            else:
                del ready  # another range's: free it before loading
                began = time.monotonic()
                try:
                    await node.transfers.ensure(mine.start, mine.end, self._show)  # evicted?
                    self.fetch_text = ""
                    stage.shard = await asyncio.get_running_loop().run_in_executor(
                        node.compute, lambda: self._shard(node.ckpt, mine.start, mine.end)
                    )
                except Exception as e:
                    log.error("could not load %s: %s", label, e)
                    self._ack(source, plan.epoch, "failed",
                              f"{node.cfg.name} could not load: {e}")  # fmt: skip
                    return
                finally:
                    self.fetch_text = self.load_text = ""
                log.info("loaded %s in %.1fs", label, time.monotonic() - began)
        if self.pending and self.pending.epoch == plan.epoch:
            self._ack(source, plan.epoch, "load")

    def _ack(self, coordinator: str, epoch: int, phase: str, why: str = "", seen: int = 0) -> None:
        body = {"id": self.node.id, "phase": phase, "error": why, "seen": seen}
        self.node.send_node(coordinator, message(Kind.PLAN_ACK, epoch=epoch, body=body))

    async def on_plan_ack(self, identity: bytes, msg: Message, host: str) -> None:
        seen = msg.body.get("seen")
        if type(seen) is int and seen > self.highest_epoch:
            self.highest_epoch = seen
        if not self.acks.add(msg.epoch, msg.body["phase"], msg.body["id"]):
            return  # no proposal of that epoch is under way here
        if msg.body["phase"] == "failed":
            self.error = str(msg.body.get("error", ""))[:500]
        self.ack_event.set()
