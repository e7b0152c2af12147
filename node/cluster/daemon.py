"""`ringinfer daemon`: one asyncio process that serves a slice of the model and the clients.

The daemon is the composition of its parts, each in a module named after it:

- transport.py: the sockets, CurveZMQ with its ZAP handler, decoding and dispatch;
- membership.py: mDNS, HELLO gossip, heartbeats, members lost;
- plans.py: the plan agreement (prepare, load, live), and loading this node's layers;
- stage_server.py: this node's layers serving FORWARDs;
- requester.py: the requests this node was asked for, replayed when a stage is lost;
- transfer.py: tensors served to peers, and fetched from them for this node's layers;
- status.py: what `status`, the API and the page show.

This file starts and stops them. Model compute runs on one worker thread so the event loop
keeps answering status, heartbeats and new connections during a long prefill.

A daemon serving the embedded default for want of another (no --model, and no member
answered when it started) gives way once it hears a member serve another model: it leaves
the cluster as on SIGTERM, and `run` returns that model for the caller to start again on.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from discovery.capabilities import Capabilities
from discovery.interfaces import Interface, primary_address
from node.cluster import cluster_model
from node.cluster.api import API, Listener
from node.cluster.cluster_model import Found
from node.cluster.membership import Membership
from node.cluster.plans import Plans
from node.cluster.requester import Requester
from node.cluster.secret import ClusterKeys
from node.cluster.stage_server import StageServer
from node.cluster.status import Stats, status
from node.cluster.transfer import ModelFiles, Transfers
from node.cluster.transport import Listening, Transport
from node.engine.batching import PREFILL_CHUNK
from node.engine.shapes import shape_of
from node.engine.tokenizer import Tokenizer
from node.engine.weights import Checkpoint, formats_of
from protocol.wire import Kind, Message, message

log = logging.getLogger("ringinfer")


@dataclass
class DaemonConfig:
    host: str
    port: int
    name: str
    peers: list[str]
    device: torch.device
    dtype: torch.dtype
    wire_dtype: str  # activations between stages: float32, float16 or bfloat16
    memory: int  # bytes offered to weights
    caps: Capabilities
    cluster: str = "default"
    objective: str = "latency"
    mdns: list[Interface] | None = None  # interfaces to advertise on; None: no mDNS
    pin: tuple[int, int] | None = None
    heartbeat_s: float = 1.0
    dead_after_s: float = 6.0
    request_timeout_s: float = 120.0
    step_timeout_s: float = 30.0  # a decode step unanswered this long was lost: replayed
    max_queue: int = 32  # requests waiting here for cache room on the stages; beyond: busy
    prefill_chunk: int = PREFILL_CHUNK  # prompt positions a stage computes per pass
    plan_wait_s: float = 600.0
    plan_deadline_s: float = 30.0  # a new plan waits this long for running requests (plans.py)
    leave_timeout_s: float = 30.0  # SIGTERM: wait this long for a plan without this node
    threads: int | None = None
    quantize: str = "auto"  # how weights are kept in memory (node/engine/models/quantized.py)
    layer_format: str = "none"  # what that makes of the layers' weights: none, int8, int4
    keys: ClusterKeys | None = None  # the cluster secret's keys; None: plain ZeroMQ
    transfer_rate: float = 32e6  # bytes/s this node serves to peers while its stage is busy
    fallback: bool = False  # the embedded default for want of another: a member's model wins


class Daemon:
    def __init__(
        self,
        cfg: DaemonConfig,
        node_id: str,
        ckpt: Checkpoint,
        tokenizer: Tokenizer,
        listening: Listening,
        files: ModelFiles,
        api: Listener | None = None,
    ) -> None:
        self.cfg, self.id, self.ckpt, self.tokenizer = cfg, node_id, ckpt, tokenizer
        self.shape = shape_of(
            ckpt.family, ckpt.config, cfg.dtype, getattr(torch, cfg.wire_dtype), cfg.layer_format,
            ckpt.architecture, formats_of(ckpt, cfg.quantize, cfg.device),
        )  # fmt: skip
        c = ckpt.config
        self.fingerprint = files.manifest.fingerprint  # the content's
        self.transfer_port = listening.transfer_port
        self.key = cfg.keys.fingerprint if cfg.keys else ""
        self.boot = uuid.uuid4().hex[:8]  # tells peers this process restarted
        wildcard = cfg.host in ("0.0.0.0", "", "*")
        self.address = f"{primary_address() if wildcard else cfg.host}:{cfg.port}"
        self.stats = Stats()
        self.compute = ThreadPoolExecutor(1, "compute", initializer=self._compute_thread_init)
        self.stopping = asyncio.Event()
        self.leaving = asyncio.Event()
        self.switch: Found | None = None  # the model this node leaves to serve instead
        self.tasks: set[asyncio.Task] = set()

        self.membership = Membership(self)
        self.plans = Plans(self)
        self.stage = StageServer(self)
        self.requester = Requester(self)
        handlers = {
            Kind.HELLO: self.membership.on_hello,
            Kind.BYE: self.membership.on_bye,
            Kind.PING: self.membership.on_ping,
            Kind.PONG: self.membership.on_pong,
            Kind.PLAN: self.plans.on_plan,
            Kind.PLAN_ACK: self.plans.on_plan_ack,
            Kind.FORWARD: self.stage.on_forward,
            Kind.END: self.stage.on_end,
            Kind.RESULT: self.requester.on_result,
            Kind.ERROR: self.requester.on_error,
            Kind.GENERATE: self.requester.on_generate,
            Kind.SCORE: self.requester.on_score,
            Kind.STATUS: self.on_status,
        }
        max_tensor_bytes = max(c.max_seq_len * c.dim * 4, c.vocab_size * 12, 1 << 20)
        self.transport = Transport(
            listening, cfg.keys, handlers, self.stats, max_tensor_bytes, self.stage.refused
        )
        self.transfers = Transfers(self, listening.transfer, files)
        handlers[Kind.MANIFEST] = self.transfers.on_manifest
        self.api = API(self, api) if api else None

    def _compute_thread_init(self) -> None:
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)

    async def run(self) -> Found | None:
        """Serve until signalled; the model to serve instead when this node gave way to it."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._signalled)
        log.info(
            "node %s (%s) listening on %s:%d, model %s, %d layers, %.0f MiB offered",
            self.id, self.cfg.name, self.cfg.host, self.cfg.port, self.ckpt.name,
            self.ckpt.n_layers, self.cfg.memory / 2**20,
        )  # fmt: skip
        self.transport.start()
        background = [
            self.spawn(self.membership.heartbeat()),
            self.spawn(self.plans.loop()),
            self.spawn(self.stage.expire_requests()),
            self.spawn(self.stage.run_batches()),
            self.spawn(self.transfers.serve()),
        ]
        if self.cfg.fallback:
            background.append(self.spawn(self._follow()))
        self.plans.replan.set()
        if self.api:
            await self.api.start()
        await self.membership.start_discovery()
        await self.leaving.wait()
        await self._leave()
        await self.membership.close()
        log.info("stopping: %d open request(s) get an error", len(self.requester.requests))
        await self.requester.stop()
        for m in self.membership.members:
            self.transport.send_to(m.address, message(Kind.BYE, body={"id": self.id}))
        await asyncio.sleep(0.1)  # let the BYEs and errors leave
        if self.api:
            await self.api.stop()
        for task in [*background, *self.tasks]:
            task.cancel()
        await asyncio.gather(*background, *self.tasks, return_exceptions=True)
        self.compute.shutdown(wait=True, cancel_futures=True)
        await self.transport.close()
        log.info("stopped")
        return self.switch

    async def _follow(self) -> None:
        """Serving the default for want of another: once a member serves another model (one
        given with --model), leave to serve that one, its layers fetched as a plan asks."""
        tried = ""
        while not self.leaving.is_set():
            await asyncio.sleep(self.cfg.heartbeat_s)
            member = cluster_model.to_follow(self.fingerprint, list(self.membership.members))
            if member is None:
                continue
            found = await cluster_model.ask(member.address, self.cfg.keys)
            if found is None or found.manifest.fingerprint != member.fingerprint:
                if tried != member.id:
                    log.info("%s serves model %s but did not send its manifest: asking again",
                             member.name, member.model)  # fmt: skip
                tried = member.id
                continue
            if self.leaving.is_set():
                return
            log.info(
                "switching to model %s (fingerprint %s), which %s serves: this node serves the "
                "embedded default only because no member answered when it started",
                found.manifest.name, found.manifest.fingerprint, member.name,
            )  # fmt: skip
            self.switch = found
            self.leaving.set()

    def _signalled(self) -> None:
        """First signal: leave gracefully (and stop, even if switching models); a second
        one: stop now."""
        self.switch = None
        if self.leaving.is_set():
            log.info("second signal: stopping now")
            self.stopping.set()
        self.leaving.set()

    async def _leave(self) -> None:
        """Let the cluster re-plan without this node and finish its requests, then stop.

        Requests passing through this node's layers finish first: a new plan waits for the
        requests on the old one. Bounded by --leave-timeout, or cut short by a second signal.
        """
        plan = self.plans.plan
        stage = plan.stage_of(self.id) if plan else None
        others = self._others()
        if stage or self.requester.requests:
            log.info(
                "leaving: waiting up to %.0fs for %s (signal again to stop now)",
                self.cfg.leave_timeout_s,
                "a plan without this node" if stage and others else "open requests",
            )
        self.membership.broadcast_hello()  # state "leaving": the coordinator plans without us
        self.plans.replan.set()  # ... which may be us
        deadline = time.monotonic() + self.cfg.leave_timeout_s
        while time.monotonic() < deadline and not self.stopping.is_set():
            if self._may_stop():
                break
            await asyncio.sleep(0.2)
        self.stopping.set()

    def _others(self) -> list[Any]:
        """Members that serve our model and are not leaving."""
        same = self.membership.members.same_model(self.fingerprint)
        return [m for m in same if m.state != "leaving"]

    def _may_stop(self) -> bool:
        """Nothing left to finish: no open request of our own, and no plan that others
        use gives us layers (or nobody is left to take them)."""
        if self.requester.requests:
            return False
        if not self._others():
            return True
        plan = self.plans.plan
        return self.plans.pending is None and (plan is None or not plan.stage_of(self.id))

    def spawn(self, coro: Any) -> asyncio.Task:
        """A background task, cancelled when the daemon stops."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def send_node(self, node_id: str, msg: Message) -> bool:
        """To a member by id, to ourselves without a socket; False if it is no member."""
        if node_id == self.id:
            self.transport.deliver(msg)
            return True
        member = self.membership.members.by_id.get(node_id)
        if member is None:
            return False
        self.transport.send_to(member.address, msg)
        return True

    def name(self, node_id: str) -> str:
        if node_id == self.id:
            return self.cfg.name
        member = self.membership.members.by_id.get(node_id)
        return member.name if member else node_id

    @property
    def quantization(self) -> str:
        """The formats this node's stage holds its weights in, or its --quantize setting."""
        shard = self.stage.shard
        return shard.quantization if shard else self.cfg.quantize

    def quantization_of(self, node_id: str) -> str:
        if node_id == self.id:
            return self.quantization
        member = self.membership.members.by_id.get(node_id)
        return member.quant if member else "?"

    async def on_status(self, identity: bytes, msg: Message, host: str) -> None:
        reply = message(Kind.STATUS_REPLY, body={"status": status(self)})
        await self.transport.reply(identity, reply)
