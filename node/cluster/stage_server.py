"""The stage side: this node's layers under the live plan (a Shard) serving FORWARDs.

A FORWARD's first step opens the request (its KV caches, admitted only within the memory
this node offered); each step runs on the compute thread and goes on to the next stage, or
back to the requester as a RESULT from the last one. A step that fails here is reported to
the requester, which replays the request (node/cluster/requester.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import torch

from node.cluster.planner import HEADROOM, Plan, stage_bytes
from node.engine.perplexity import Scores
from node.engine.sampling import Candidates, SamplingParams
from node.engine.shard import Shard
from node.errors import RinginferError
from protocol.wire import Kind, Message, ProtocolError, error, message

if TYPE_CHECKING:
    from node.cluster.daemon import Daemon

log = logging.getLogger("ringinfer")


class StageServer:
    def __init__(self, node: Daemon) -> None:
        self.node = node
        self.shard: Shard | None = None  # loaded by the plan agreement (node/cluster/plans.py)

    async def on_forward(self, identity: bytes, msg: Message, host: str) -> None:
        node = self.node
        plan, shard = node.plans.plan, self.shard
        if plan is None or msg.epoch != plan.epoch:
            live = plan.epoch if plan else "none"
            raise ProtocolError("wrong-epoch", f"epoch {msg.epoch} is not the live plan ({live})")
        if shard is None or len(msg.specs) != 1:
            raise ProtocolError("not-a-stage", "this node holds no layers in the live plan")
        x = msg.tensor()
        opened = False
        if msg.step == 0:
            self._open(shard, msg)
            opened = True
        try:
            shard.check_input(msg.req, msg.start, msg.count, x)
            began = time.perf_counter()
            target, out = await asyncio.get_running_loop().run_in_executor(
                node.compute, self._step, shard, plan, msg, x
            )
        except ProtocolError:
            if opened:
                shard.close(msg.req)
            raise
        took = time.perf_counter() - began
        stats = node.stats
        stats.compute_s += took
        stats.steps += 1
        if msg.count == 1:
            stats.decode_compute_s += took
            stats.decode_steps += 1
        if target is None:
            self.fail_upstream(msg, "node-gone", "the plan has no next stage")
        elif not node.send_node(target, out):
            self.fail_upstream(msg, "node-gone", "the plan's next stage is no longer a member")

    def _step(
        self, shard: Shard, plan: Plan, msg: Message, x: torch.Tensor
    ) -> tuple[str | None, Message]:
        """On the compute thread: run the stage, and build what goes next and where.

        The event loop then only sends: the wire conversion and tensor bytes are made here,
        while the loop thread would otherwise wait for a core right after the compute.
        """
        out = shard.forward(msg.req, msg.start, x)
        if isinstance(out, Candidates | Scores):
            tensors = out.tensors()
            reply = message(Kind.RESULT, tensors, req=msg.req, epoch=msg.epoch, step=msg.step)
            return msg.body["requester"], reply
        sent = out.to(getattr(torch, self.node.cfg.wire_dtype))
        if sent.dtype != out.dtype and not bool(torch.isfinite(sent).all()):
            sent = out.float()  # out of float16's range: this step goes at full precision
        forward = message(
            Kind.FORWARD, (sent,), req=msg.req, epoch=msg.epoch, step=msg.step,
            start=msg.start, count=msg.count, body=msg.body,
        )  # fmt: skip
        return plan.next_node(self.node.id), forward

    def _open(self, shard: Shard, msg: Message) -> None:
        body = msg.body
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
            isinstance(score, list) and 0 < len(score) < msg.count
            and all(type(t) is int and 0 <= t < vocab for t in score)
        ):  # fmt: skip
            raise ProtocolError("bad-body", "score: token ids to score, fewer than the positions")
        self._admit(shard, capacity)
        shard.open(msg.req, capacity, body["requester"], params, msg.epoch, score)

    def _admit(self, shard: Shard, capacity: int) -> None:
        """A request's caches only within the memory this node offered: beyond it, `busy`
        (the requester queues the request or refuses it), never an out-of-memory."""
        node = self.node
        plan = node.plans.plan
        plan_stage = plan.stage_of(node.id) if plan else None
        if plan_stage is None:
            return
        room = node.cfg.memory * HEADROOM - stage_bytes(plan_stage, node.shape)
        held = sum(e.cache.k.nbytes + e.cache.v.nbytes for e in shard.requests.values())
        need = node.shape.kv_bytes * (shard.end - shard.start) * capacity
        if held + need > room:
            raise ProtocolError(
                "busy", f"{node.cfg.name} is full: {len(shard.requests)} request(s) hold "
                f"{held / 2**20:.0f} MiB of caches, this one needs {need / 2**20:.0f} MiB more "
                f"of the {max(0, room) / 2**20:.0f} MiB offered; try again when one ends",
            )  # fmt: skip

    def refused(self, msg: Message, code: str, text: str) -> None:
        """A message the transport refused: a FORWARD's requester hears of it."""
        if msg.kind == Kind.FORWARD:
            self.fail_upstream(msg, code, text)

    def fail_upstream(self, msg: Message, code: str, text: str) -> None:
        """Tell the request's requester its request failed here (it may be us)."""
        node = self.node
        requester = msg.body.get("requester")
        if isinstance(requester, str):
            node.send_node(requester, error(code, f"{node.cfg.name}: {text}", msg.req, msg.epoch))
        if self.shard:
            self.shard.close(msg.req)

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
