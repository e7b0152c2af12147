"""The stage side: this node's layers under the live plan (a Shard) serving FORWARDs.

A FORWARD brings the positions of one or more requests. A request's first positions open it
here (its KV caches, admitted only within the memory this node offered); each piece waits as
Work until the batch loop runs it with everything else that is waiting, in one forward pass
on the compute thread (node/engine/batching.py decides what goes together). The pass's
hidden states go on to the next stage as one FORWARD; the last stage answers each request's
requester with a RESULT. A piece that fails here is reported to its requester alone, which
replays the request (node/cluster/requester.py); the others go on. A pass that raises (out of
memory, say) fails each of its requests with `stage-failed`, which their requesters replay.

`RINGINFER_FAULT=pass:R:N` (for tests) makes this stage's N-th pass of at least R requests
raise once, after it ran: what a pass that fails half way leaves behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from typing import TYPE_CHECKING

import torch
import zmq

from node.cluster.planner import HEADROOM, Plan, stage_bytes
from node.cluster.transport import ClientGone
from node.engine.batching import Work, next_batch
from node.engine.sampling import SamplingParams
from node.engine.shard import Entry, Shard
from node.errors import RinginferError
from protocol.wire import Kind, Message, Piece, ProtocolError, error, forwards, message, pieces

if TYPE_CHECKING:
    from node.cluster.daemon import Daemon

log = logging.getLogger("ringinfer")

LOAD_WINDOW_S = 10.0  # status's batch size and tokens/s are over this many recent seconds
GATHER_MAX_S = 0.1  # the longest a pass waits for steps on their way (see _gather)
ACTIVE_S = 1.0  # a request with no step here for this long is not waited for
FAULT_ENV = "RINGINFER_FAULT"


class Fault:
    """`pass:R:N` from RINGINFER_FAULT: the N-th pass of at least R requests raises, once."""

    def __init__(self, spec: str) -> None:
        kind, _, rest = spec.partition(":")
        rows, _, nth = rest.partition(":")
        if kind != "pass" or not rows.isdigit() or not nth.isdigit():
            raise RinginferError(f"{FAULT_ENV}={spec}: expected pass:REQUESTS:NTH")
        self.rows, self.left = int(rows), int(nth)

    def check(self, requests: int) -> None:
        if requests >= self.rows and self.left > 0:
            self.left -= 1
            if self.left == 0:
                raise RuntimeError(f"{FAULT_ENV}: this pass of {requests} requests fails")


class Load:
    """The stage's recent passes: mean decode batch and decode tokens per second."""

    def __init__(self) -> None:
        self.passes: deque[tuple[float, int]] = deque()  # (when, decode rows)

    def add(self, rows: int) -> None:
        now = time.monotonic()
        self.passes.append((now, rows))
        while self.passes and now - self.passes[0][0] > LOAD_WINDOW_S:
            self.passes.popleft()

    def to_json(self) -> dict[str, float]:
        now = time.monotonic()
        recent = [rows for t, rows in self.passes if now - t <= LOAD_WINDOW_S and rows]
        batch = sum(recent) / len(recent) if recent else 0.0
        return {"batch": round(batch, 2), "tokens_per_s": round(sum(recent) / LOAD_WINDOW_S, 2)}


class StageServer:
    def __init__(self, node: Daemon) -> None:
        self.node = node
        self.shard: Shard | None = None  # loaded by the plan agreement (node/cluster/plans.py)
        self.waiting: list[Work] = []
        self.arrived = asyncio.Event()
        self.load = Load()
        self.pass_s = 0.01  # recent passes' duration, a running mean
        spec = os.environ.get(FAULT_ENV)
        self.fault = Fault(spec) if spec else None

    async def on_forward(self, identity: bytes, msg: Message, host: str) -> None:
        node = self.node
        plan, shard = node.plans.plan, self.shard
        if plan is None or msg.epoch != plan.epoch:
            live = plan.epoch if plan else "none"
            raise ProtocolError("wrong-epoch", f"epoch {msg.epoch} is not the live plan ({live})")
        if shard is None:
            raise ProtocolError("not-a-stage", "this node holds no layers in the live plan")
        parts, x, at = pieces(msg), msg.tensor(), 0
        refusal = None
        for piece in parts:
            rows, at = x[at : at + piece.count], at + piece.count
            try:
                self.waiting.append(self._accept(shard, msg.epoch, piece, rows))
            except ProtocolError as e:
                node.stats.errors[e.code] += 1
                if node.transport.may_log(node.transport.refusals):
                    log.warning("refused request %s from %s: %s: %s", piece.req, host or "self",
                                e.code, e)  # fmt: skip
                self.fail(piece.requester, piece.req, msg.epoch, e.code, str(e))
                refusal = refusal or error(e.code, str(e), piece.req, msg.epoch)
        self.arrived.set()
        if refusal:  # the sender hears of the first, as of a message refused whole
            with contextlib.suppress(ClientGone, zmq.ZMQError):
                await node.transport.reply(identity, refusal)

    def _accept(self, shard: Shard, epoch: int, piece: Piece, x: torch.Tensor) -> Work:
        opened = piece.step == 0 and piece.start == 0
        if opened:
            self._open(shard, piece, epoch)
        try:
            return shard.accept(piece, x, epoch)
        except ProtocolError:
            if opened:
                shard.close(piece.req)
            raise

    async def run_batches(self) -> None:
        """Forever: run what waits, in passes, until nothing does."""
        while True:
            if not self.waiting:  # idle: the next arrival starts a pass, with what follows it
                self.arrived.clear()
                await self.arrived.wait()
                await self._gather()
            batch, self.waiting = next_batch(self.waiting, self.node.cfg.prefill_chunk)
            try:
                await self._pass(batch)
            except Exception:  # a bug must not stop the loop that every request needs
                log.exception("a batch of %d failed", len(batch))
                for w in batch:
                    self.fail(w.piece.requester, w.req, w.epoch, "internal", "batch failed")

    async def _gather(self) -> None:
        """Wait a little for the steps that are on their way to join this pass.

        A batch's next steps come back to the first stage from its requesters one after
        another, a few milliseconds apart on a busy machine; a stage that ran each as it came
        would split the batch into passes that each read every weight again, and the pieces
        would travel the ring apart from then on. So while requests open here are expected
        (active lately, not waiting), the stage waits for them, up to one pass's time: the
        cost of waiting is bounded by the pass it saves. One request alone goes at once.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(GATHER_MAX_S, self.pass_s)
        while self._expected():
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), deadline - loop.time())
            except TimeoutError:
                return

    def _expected(self) -> bool:
        """Some request open here is active but has no step waiting."""
        shard = self.shard
        if shard is None:
            return False
        waiting = {w.req for w in self.waiting}
        recent = time.monotonic() - ACTIVE_S
        return any(r not in waiting and e.last_used > recent for r, e in shard.requests.items())

    async def _pass(self, batch: list[Work]) -> None:
        node, shard, plan = self.node, self.shard, self.node.plans.plan
        live, entries = [], []
        for w in batch:
            if plan is None or w.epoch != plan.epoch or shard is None:
                self.fail(w.piece.requester, w.req, w.epoch, "wrong-epoch", "the plan changed")
            elif w.req in shard.requests:
                live.append(w)
                entries.append(shard.requests[w.req])
            # else ended (END, a timeout, its requester lost) while it waited: dropped
        if not live:
            return
        began = time.perf_counter()
        try:
            sends = await asyncio.get_running_loop().run_in_executor(
                node.compute, self._compute, shard, plan, live, entries
            )
        except ProtocolError as e:
            for w in live:
                self.fail(w.piece.requester, w.req, w.epoch, e.code, str(e))
            return
        except Exception as e:  # out of memory, say: the requesters replay what it held
            why = f"a pass failed: {type(e).__name__}: {str(e)[:200]}"
            log.error("%s; its %d request(s) are replayed by their requesters", why, len(live))
            for w in live:
                self.fail(w.piece.requester, w.req, w.epoch, "stage-failed", why)
            return
        took = time.perf_counter() - began
        decodes = sum(1 for w in live if w.count == 1)
        stats = node.stats
        stats.compute_s += took
        stats.steps += 1
        stats.rows += sum(w.count for w in live)
        if decodes == len(live):
            stats.decode_compute_s += took
            stats.decode_steps += 1
        self.load.add(decodes)
        self.pass_s += 0.2 * (took - self.pass_s)
        for target, out, works in sends:
            if target is None:
                why = "the plan has no next stage"
            elif not node.send_node(target, out):
                why = "the plan's next stage is no longer a member"
            else:
                continue
            for w in works:
                self.fail(w.piece.requester, w.req, w.epoch, "node-gone", why)

    def _compute(
        self, shard: Shard, plan: Plan, batch: list[Work], entries: list[Entry]
    ) -> list[tuple[str | None, Message, list[Work]]]:
        """On the compute thread: run the pass, and build what goes where (for which works).

        The event loop then only sends: the wire conversion and tensor bytes are made here,
        while the loop thread would otherwise wait for a core right after the compute.
        """
        out = shard.run(batch, entries)
        if self.fault:
            self.fault.check(len(batch))
        if isinstance(out, list):
            return [
                (w.piece.requester, message(Kind.RESULT, answer.tensors(), req=w.req,
                                            epoch=w.epoch, step=w.piece.step), [w])
                for w, answer in zip(batch, out, strict=True)
                if answer is not None
            ]  # fmt: skip
        sent = out.to(getattr(torch, self.node.cfg.wire_dtype))
        if sent.dtype != out.dtype and not bool(torch.isfinite(sent).all()):
            sent = out.float()  # out of float16's range: this pass goes at full precision
        target = plan.next_node(self.node.id)
        parts = [w.piece.to_json() for w in batch]
        return [(target, msg, batch[s]) for msg, s in forwards(batch[0].epoch, parts, sent)]

    def _open(self, shard: Shard, piece: Piece, epoch: int) -> None:
        body = piece.body
        capacity, sampling = body.get("capacity"), body.get("sampling")
        if type(capacity) is not int or not isinstance(sampling, dict):
            raise ProtocolError("bad-body", "a request's first step needs capacity and sampling")
        try:
            params = SamplingParams.from_json(sampling)
        except RinginferError as e:
            raise ProtocolError("bad-body", f"sampling: {e}") from None
        score = body.get("score")
        vocab = self.node.ckpt.config.vocab_size
        if score is not None and not (
            isinstance(score, list) and 0 < len(score) < piece.end
            and all(type(t) is int and 0 <= t < vocab for t in score)
        ):  # fmt: skip
            raise ProtocolError("bad-body", "score: token ids to score, fewer than the positions")
        self._admit(shard, capacity)
        shard.open(piece.req, capacity, piece.requester, params, epoch, score)

    def _admit(self, shard: Shard, capacity: int) -> None:
        """A request's caches only within the memory this node offered: beyond it, `busy`
        (the requester queues the request or refuses it), never an out-of-memory."""
        node = self.node
        plan = node.plans.plan
        plan_stage = plan.stage_of(node.id) if plan else None
        if plan_stage is None:
            return
        room = node.cfg.memory * HEADROOM - stage_bytes(plan_stage, node.shape)
        held = sum(e.cache.nbytes for e in shard.requests.values())
        need = shard.stage.cache_bytes(capacity, shard.dtype)
        if held + need > room:
            raise ProtocolError(
                "busy", f"{node.cfg.name} is full: {len(shard.requests)} request(s) hold "
                f"{held / 2**20:.0f} MiB of caches, this one needs {need / 2**20:.0f} MiB more "
                f"of the {max(0, room) / 2**20:.0f} MiB offered; try again when one ends",
            )  # fmt: skip

    def refused(self, msg: Message, code: str, text: str) -> None:
        """A message the transport refused: the requester of each request in a FORWARD
        hears of it (when the FORWARD was whole enough to say who they are)."""
        if msg.kind != Kind.FORWARD:
            return
        try:
            parts = pieces(msg)
        except ProtocolError:
            return
        for piece in parts:
            self.fail(piece.requester, piece.req, msg.epoch, code, text)

    def fail(self, requester: str, req: str, epoch: int, code: str, text: str) -> None:
        """Tell a request's requester (it may be us) that it failed here, and free it."""
        node = self.node
        node.send_node(requester, error(code, f"{node.cfg.name}: {text}", req, epoch))
        if self.shard:
            self.shard.close(req)

    async def on_end(self, identity: bytes, msg: Message, host: str) -> None:
        if self.shard and self.shard.close(msg.req):
            log.debug("request %s finished: cache freed", msg.req)

    def requester_lost(self, member: str, why: str) -> None:
        """Free the caches of requests whose requester is gone: nobody will END them."""
        if self.shard:
            for rid, entry in list(self.shard.requests.items()):
                if entry.requester == member:
                    self.shard.close(rid)
                    log.info("freed request %s: its requester %s", rid, why)

    async def expire_requests(self) -> None:
        """Free caches idle for --request-timeout: their requester forgot them."""
        timeout = self.node.cfg.request_timeout_s
        while True:
            await asyncio.sleep(min(5.0, timeout / 2))
            if self.shard:
                for rid in self.shard.expired(timeout):
                    self.shard.close(rid)
                    log.info("request %s idle for %.0fs: cache freed", rid, timeout)
