"""`ringinfer daemon`: the asyncio process that serves a slice of the model and the clients.

One ROUTER socket takes everything in (peers' DEALERs and local clients); one DEALER per
peer sends out. Decisions live in pure modules (planner, sampling, wire codec); this file
moves messages between them, and runs model compute on one worker thread so the event loop
keeps answering status, heartbeats and new connections during a long prefill.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import signal
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
import zmq
import zmq.asyncio

from discovery.capabilities import Capabilities
from discovery.interfaces import Interface, is_loopback, primary_address
from discovery.mdns import SERVICE, Advert, Discovery
from node import __version__
from node.cluster.api import API, Listener
from node.cluster.log_budget import LogBudget
from node.cluster.members import Member, Members
from node.cluster.planner import (
    DEFAULT_BANDWIDTH,
    DEFAULT_CONTEXT,
    DEFAULT_FLOPS,
    HEADROOM,
    LAYER_OVERHEAD_S,
    NodeSpec,
    Plan,
    make_plan,
    predict,
    stage_bytes,
)
from node.cluster.secret import ZAP_ENDPOINT, ClusterKeys, zap_reply
from node.engine.local import Timings, TokenLoop, fit_request, generation_result
from node.engine.perplexity import Scores, Tally, Window, result, windows
from node.engine.sampling import Candidates, SamplingParams
from node.engine.shapes import shape_of
from node.engine.shard import Shard
from node.engine.stop_strings import StopStrings
from node.engine.tokenizer import TextStream, Tokenizer
from node.engine.weights import Checkpoint
from node.errors import RinginferError
from protocol.wire import (
    VERSION,
    Kind,
    Message,
    ProtocolError,
    TensorSpec,
    decode,
    encode,
    error,
    message,
)

log = logging.getLogger("ringinfer")

HARD_MAX_MESSAGE = 1 << 30  # ZeroMQ drops the connection above this; below, we answer errors


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
    plan_wait_s: float = 600.0
    leave_timeout_s: float = 30.0  # SIGTERM: wait this long for a plan without this node
    threads: int | None = None
    quantize: str = "auto"  # how weights are kept in memory (node/engine/models/quantized.py)
    layer_format: str = "none"  # what that makes of the layers' weights: none, int8, int4
    keys: ClusterKeys | None = None  # the cluster secret's keys; None: plain ZeroMQ


class RequestFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ClientGone(Exception):
    pass


# Failures of a stage, not of the request: replayed into the next plan (see _replay).
REPLAYABLE = ("node-gone", "wrong-epoch", "not-a-stage", "unknown-request", "bad-positions")
MAX_REPLAYS = 8  # per request: a failure that comes back every time is not a lost stage


Sink = Callable[[Message], Awaitable[None]]  # where a request's answers go: client or API


@dataclass
class Request:
    """A generation this node is the requester of."""

    id: str
    sink: Sink  # ACCEPTED, TOKENs, DONE or an ERROR, in that order
    prompt: list[int]
    capacity: int  # KV positions every stage allocates
    max_tokens: int
    params: SamplingParams
    stop_ids: frozenset[int]
    stop: list[str] = field(default_factory=list)  # stop strings
    replays: list[dict[str, Any]] = field(default_factory=list)  # recoveries from lost stages
    plan: Plan | None = None  # set once it runs on the ring
    task: asyncio.Task | None = None
    result: asyncio.Future | None = None  # the pending step's candidates
    step: int = 0
    scored: int = 0  # scoring a window: how many log-probabilities the last stage returns


@dataclass
class Stats:
    errors: Counter = field(default_factory=Counter)
    bytes_sent: Counter = field(default_factory=Counter)
    messages_sent: Counter = field(default_factory=Counter)
    compute_s: float = 0.0  # stage compute, as the event loop waits for it
    steps: int = 0
    decode_compute_s: float = 0.0  # the part spent on one-position steps
    decode_steps: int = 0

    def sent(self, kind: Kind, frames: list[bytes]) -> None:
        self.messages_sent[kind.value] += 1
        self.bytes_sent[kind.value] += sum(len(f) for f in frames)


class Daemon:
    def __init__(
        self,
        cfg: DaemonConfig,
        node_id: str,
        ckpt: Checkpoint,
        tokenizer: Tokenizer,
        listener: Listening,
        api: Listener | None = None,
    ) -> None:
        self.cfg, self.id, self.ckpt, self.tokenizer = cfg, node_id, ckpt, tokenizer
        self.api = API(self, api) if api else None
        self.shape = shape_of(
            ckpt.family, ckpt.config, cfg.dtype, getattr(torch, cfg.wire_dtype), cfg.layer_format
        )
        c = ckpt.config
        self.fingerprint = f"{ckpt.name}|{c.n_layers}|{c.dim}|{c.vocab_size}"
        self.max_tensor_bytes = max(c.max_seq_len * c.dim * 4, c.vocab_size * 12, 1 << 20)
        self.members = Members(cfg.dead_after_s)
        self.discovery: Discovery | None = None
        self.mdns_names: dict[str, str] = {}  # mDNS instance -> node id
        self.foreign: dict[str, dict[str, Any]] = {}  # nodes heard of but not ours, by id
        self.impostors: dict[str, float] = {}  # address -> when a process there used our id
        self.stats = Stats()
        self.refusals, self.internal_errors = LogBudget(), LogBudget(burst=5)
        self.ctx, self.router, self.zap = listener.ctx, listener.router, listener.zap
        self.key = cfg.keys.fingerprint if cfg.keys else ""
        self.strangers: dict[str, float] = {}  # address -> when it failed the handshake
        self.links: dict[str, zmq.asyncio.Socket] = {}
        self.link_tasks: list[asyncio.Task] = []
        self.compute = ThreadPoolExecutor(1, "compute", initializer=self._compute_thread_init)
        self.shard: Shard | None = None
        self.plan: Plan | None = None  # the live plan
        self.live = asyncio.Event()
        self.pending: Plan | None = None  # a proposal being prepared or loaded
        self.seen_epoch = 0  # the newest proposal this node accepted
        self.highest_epoch = 0  # the newest epoch this node heard of, as coordinator
        self.plan_error = ""
        self.planned_members: frozenset[tuple[str, Any]] = frozenset()
        self.acks: dict[tuple[int, str], set[str]] = {}
        self.ack_event = asyncio.Event()
        self.replan = asyncio.Event()
        self.requests: dict[str, Request] = {}
        self.ended: deque[str] = deque(maxlen=256)  # a cancelled request's last step may come
        self.drained = asyncio.Event()
        self.drained.set()
        self.loading = ""
        self.stopping = asyncio.Event()
        self.leaving = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self.boot = uuid.uuid4().hex[:8]  # tells peers this process restarted
        wildcard = cfg.host in ("0.0.0.0", "", "*")
        self.address = f"{primary_address() if wildcard else cfg.host}:{cfg.port}"
        self.handlers = {
            Kind.HELLO: self.on_hello,
            Kind.BYE: self.on_bye,
            Kind.PING: self.on_ping,
            Kind.PONG: self.on_pong,
            Kind.PLAN: self.on_plan,
            Kind.PLAN_ACK: self.on_plan_ack,
            Kind.FORWARD: self.on_forward,
            Kind.RESULT: self.on_result,
            Kind.END: self.on_end,
            Kind.ERROR: self.on_error,
            Kind.GENERATE: self.on_generate,
            Kind.SCORE: self.on_score,
            Kind.STATUS: self.on_status,
        }

    def _compute_thread_init(self) -> None:
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)

    # ---------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._signalled)
        log.info(
            "node %s (%s) listening on %s:%d, model %s, %d layers, %.0f MiB offered",
            self.id, self.cfg.name, self.cfg.host, self.cfg.port, self.ckpt.name,
            self.ckpt.n_layers, self.cfg.memory / 2**20,
        )  # fmt: skip
        background = [
            self._spawn(self._receive(self.router, from_router=True)),
            self._spawn(self._heartbeat()),
            self._spawn(self._plan_loop()),
            self._spawn(self._expire_requests()),
        ]
        if self.zap is not None:
            background.append(self._spawn(self._authenticate()))
        self.replan.set()
        if self.api:
            await self.api.start()
        await self._start_discovery()
        await self.leaving.wait()
        await self._leave()
        if self.discovery:
            await self.discovery.close()  # peers hear the goodbye now
        log.info("stopping: %d open request(s) get an error", len(self.requests))
        for req in list(self.requests.values()):
            if req.task:
                req.task.cancel()
        await asyncio.gather(
            *(r.task for r in list(self.requests.values()) if r.task), return_exceptions=True
        )
        for m in self.members:
            self._send_to(m.address, message(Kind.BYE, body={"id": self.id}))
        await asyncio.sleep(0.1)  # let the BYEs and errors leave
        if self.api:
            await self.api.stop()
        for task in [*background, *self.link_tasks, *self.tasks]:
            task.cancel()
        await asyncio.gather(*background, *self.link_tasks, *self.tasks, return_exceptions=True)
        self.compute.shutdown(wait=True, cancel_futures=True)
        self.ctx.destroy(linger=0)
        log.info("stopped")

    def _signalled(self) -> None:
        """First signal: leave gracefully; a second one: stop now."""
        if self.leaving.is_set():
            log.info("second signal: stopping now")
            self.stopping.set()
        self.leaving.set()

    async def _leave(self) -> None:
        """Let the cluster re-plan without this node and finish its requests, then stop.

        Requests passing through this node's layers finish first: a new plan waits for the
        requests on the old one. Bounded by --leave-timeout, or cut short by a second signal.
        """
        stage = self.plan.stage_of(self.id) if self.plan else None
        others = [m for m in self.members.same_model(self.fingerprint) if m.state != "leaving"]
        if stage or self.requests:
            log.info(
                "leaving: waiting up to %.0fs for %s (signal again to stop now)",
                self.cfg.leave_timeout_s,
                "a plan without this node" if stage and others else "open requests",
            )
        self._broadcast_hello()  # state "leaving": the coordinator plans without us
        self.replan.set()  # ... which may be us
        deadline = time.monotonic() + self.cfg.leave_timeout_s
        while time.monotonic() < deadline and not self.stopping.is_set():
            if self._may_stop():
                break
            await asyncio.sleep(0.2)
        self.stopping.set()

    def _may_stop(self) -> bool:
        """Nothing left to finish: no open request of our own, and no plan that others
        use gives us layers (or nobody is left to take them)."""
        if self.requests:
            return False
        if not any(m.state != "leaving" for m in self.members.same_model(self.fingerprint)):
            return True
        return self.pending is None and (self.plan is None or not self.plan.stage_of(self.id))

    async def _start_discovery(self) -> None:
        if self.cfg.mdns is None:
            return
        caps = self.cfg.caps
        advert = Advert(
            id=self.id, name=self.cfg.name, version=__version__, protocol=VERSION,
            port=self.cfg.port, cluster=self.cfg.cluster, device=caps.device,
            memory_total=caps.memory_total, memory_available=self.cfg.memory,
            flops=caps.flops, bandwidth=caps.bandwidth, models=(self.ckpt.name,), key=self.key,
        )  # fmt: skip
        self.discovery = Discovery(advert, self.cfg.mdns, self._found, self._gone)
        try:
            await self.discovery.start()
        except OSError as e:
            log.error("mDNS unavailable (%s): only --peer and gossip find members", e)
            self.discovery = None
            return
        names = ", ".join(f"{i.name} {i.address}" for i in self.cfg.mdns)
        log.info("mDNS: advertising %s in cluster '%s' on %s", SERVICE, self.cfg.cluster, names)

    def _found(self, advert: Advert) -> None:
        """An mDNS advert: say HELLO to nodes of our cluster; remember the rest for status."""
        if advert.id != self.id:
            self.mdns_names[advert.instance] = advert.id
        if advert.cluster != self.cfg.cluster or advert.protocol != VERSION or (
            advert.key != self.key
        ):
            self._foreign(advert.id, advert.name, advert.endpoint, advert.cluster, advert.version,
                          advert.protocol, advert.key)  # fmt: skip
            return
        if advert.id == self.id and advert.endpoint == self.address:
            return
        if advert.id not in self.members.by_id:
            log.info("mDNS: found %s at %s", advert.name, advert.endpoint)
        self._send_to(advert.endpoint, self._hello())

    def _gone(self, instance: str) -> None:
        """An mDNS goodbye: a member that also stopped talking is gone now, not in 6 s."""
        member = self.members.by_id.get(self.mdns_names.pop(instance, ""))
        if member and time.monotonic() - member.last_seen > 1.5 * self.cfg.heartbeat_s:
            self._lost(member, "left (mDNS goodbye)")

    def _foreign(
        self, node_id: str, name: str, address: str, cluster: str, version: str, protocol: int,
        key: str,
    ) -> None:  # fmt: skip
        if node_id not in self.foreign:
            if cluster != self.cfg.cluster:
                why = f"cluster '{cluster}'"
            elif protocol != VERSION:
                why = f"protocol {protocol} (we speak {VERSION})"
            elif not self.key:
                why = "a cluster secret (we have none)"
            else:
                why = "another cluster secret" if key else "no cluster secret"
            log.warning("ignoring %s at %s: %s", name, address, why)
        self.foreign[node_id] = {
            "id": node_id, "name": name, "address": address, "cluster": cluster,
            "version": version, "protocol": protocol, "key": key, "seen": time.monotonic(),
        }  # fmt: skip

    def _spawn(self, coro: Any) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # ---------------------------------------------------------------- sockets

    def _link(self, address: str) -> zmq.asyncio.Socket:
        sock = self.links.get(address)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 200)
            sock.setsockopt(zmq.MAXMSGSIZE, HARD_MAX_MESSAGE)
            if self.cfg.keys:
                self.cfg.keys.connect_as_client(sock)
            sock.connect(f"tcp://{address}")
            self.links[address] = sock
            # Replies on a link are errors about what we sent (a version mismatch, say).
            self.link_tasks.append(asyncio.ensure_future(self._receive(sock, from_router=False)))
        return sock

    def _send_to(self, address: str, msg: Message) -> None:
        frames = encode(msg)
        try:
            self._link(address).send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:
            log.warning("could not send %s to %s: %s", msg.kind.value, address, e.strerror)
            return
        self.stats.sent(msg.kind, frames)

    def _send_node(self, node_id: str, msg: Message) -> None:
        """To a member by id; to ourselves without a socket."""
        if node_id == self.id:
            self._spawn(self._dispatch(b"", encode(msg), "self"))
            return
        member = self.members.by_id.get(node_id)
        if member is None:
            raise RequestFailed("node-gone", f"node {node_id} is no longer a member")
        self._send_to(member.address, msg)

    async def _reply(self, identity: bytes, msg: Message) -> None:
        if not identity:
            return
        frames = encode(msg)
        try:
            await self.router.send_multipart([identity, *frames], copy=False)
        except zmq.ZMQError as e:
            if e.errno == errno.EHOSTUNREACH:
                raise ClientGone from None
            raise
        self.stats.sent(msg.kind, frames)

    async def _receive(self, sock: zmq.asyncio.Socket, from_router: bool) -> None:
        while True:
            frames = await sock.recv_multipart(copy=False)
            if from_router:
                identity, frames = frames[0].bytes, frames[1:]
            else:
                identity = b""
            try:
                host = frames[0].get("Peer-Address") if frames else ""
            except zmq.ZMQError:
                host = ""
            # Each message is its own task: a FORWARD waits for compute, and the socket must
            # keep being read meanwhile (status, heartbeats, other requests).
            self._spawn(self._dispatch(identity, [f.bytes for f in frames], host))

    async def _authenticate(self) -> None:
        """The ZAP handler: a handshake completes only with the cluster's client key."""
        assert self.zap is not None and self.cfg.keys is not None
        while True:
            frames = await self.zap.recv_multipart()
            reply, admitted, address = zap_reply(frames, self.cfg.keys)
            await self.zap.send_multipart(reply)
            if not admitted:
                self.stats.errors["unauthenticated"] += 1
                self.strangers[address] = time.monotonic()
                if self._may_log(self.refusals):
                    log.warning("refused a connection from %s: not this cluster's secret", address)

    async def _dispatch(self, identity: bytes, frames: list[bytes], host: str) -> None:
        """Decode, validate and handle one message; a bad one gets an error reply, never a crash."""
        msg: Message | None = None
        try:
            msg = decode(frames, self.max_tensor_bytes)
            handler = self.handlers.get(msg.kind)
            if handler is None:
                raise ProtocolError(
                    "unexpected", f"{msg.kind.value} is sent by daemons, not to them"
                )
            await handler(identity, msg, host)
        except ProtocolError as e:
            self.stats.errors[e.code] += 1
            what = msg.kind.value if msg else "frame"
            if self._may_log(self.refusals):
                log.warning("refused %s from %s: %s: %s", what, host or "self", e.code, e)
            with contextlib.suppress(ClientGone, zmq.ZMQError):
                await self._reply(identity, error(e.code, str(e), msg.req if msg else ""))
            if msg and msg.kind == Kind.FORWARD:
                self._fail_upstream(msg, e.code, str(e))
        except ClientGone:
            pass
        except Exception as e:  # a bug must not take the daemon down with everyone's requests
            self.stats.errors["internal"] += 1
            if self._may_log(self.internal_errors):
                log.exception("internal error handling %s", msg.kind.value if msg else "frame")
            with contextlib.suppress(ClientGone, zmq.ZMQError):
                await self._reply(identity, error("internal", f"{type(e).__name__}: {e}"))

    def _may_log(self, budget: LogBudget) -> bool:
        """Whether a refusal or an internal error may be logged now, saying what was held back."""
        ok, held = budget.take(time.monotonic())
        if held:
            log.warning("%d more like it in %.0fs not logged (status counts them: stats.errors)",
                        held, budget.window_s)  # fmt: skip
        return ok

    # ---------------------------------------------------------------- membership

    def _hello(self) -> Message:
        pin = list(self.cfg.pin) if self.cfg.pin else None
        members = [{"id": m.id, "address": m.address} for m in self.members]
        body = {
            "id": self.id, "name": self.cfg.name, "port": self.cfg.port,
            "model": self.ckpt.name, "fingerprint": self.fingerprint, "memory": self.cfg.memory,
            "state": self.state(), "members": members, "pin": pin,
            "epoch": self.plan.epoch if self.plan else 0, "seen": self.seen_epoch,
            "requests": len(self.shard.requests) if self.shard else 0, "version": __version__,
            "boot": self.boot, "cluster": self.cfg.cluster, "caps": self.cfg.caps.to_json(),
            "rtt": {m.id: m.rtt for m in self.members if m.rtt is not None},
            "quant": self.quantization,
        }  # fmt: skip
        return message(Kind.HELLO, body=body)

    @property
    def quantization(self) -> str:
        """The formats this node's stage holds its weights in, or its --quantize setting."""
        return self.shard.quantization if self.shard else self.cfg.quantize

    def _broadcast_hello(self) -> None:
        hello = self._hello()
        # Impostors too: while both processes with our id run, each keeps seeing the other.
        targets = {m.address for m in self.members} | set(self.cfg.peers) | set(self.impostors)
        for address in targets:
            if address != self.address:
                self._send_to(address, hello)

    async def _heartbeat(self) -> None:
        while True:
            self._broadcast_hello()
            for m in self.members:  # round trips over the ring's own connections
                self._send_to(
                    m.address, message(Kind.PING, body={"id": self.id, "t": time.monotonic()})
                )
            for m in self.members.expired(self.cfg.dead_after_s):
                self._lost(m, f"silent for over {self.cfg.dead_after_s:.0f}s")
            self._forget_strangers()
            await asyncio.sleep(self.cfg.heartbeat_s)

    def _forget_strangers(self, after_s: float = 60.0) -> None:
        """Impostors and other clusters' nodes not heard of for a minute are forgotten."""
        now = time.monotonic()
        self.impostors = {a: t for a, t in self.impostors.items() if now - t < after_s}
        self.foreign = {i: f for i, f in self.foreign.items() if now - f["seen"] < after_s}
        self.strangers = {a: t for a, t in self.strangers.items() if now - t < after_s}

    async def on_ping(self, identity: bytes, msg: Message, host: str) -> None:
        pong = message(Kind.PONG, body={"id": self.id, "t": msg.body["t"]})
        with contextlib.suppress(ClientGone, zmq.ZMQError):
            await self._reply(identity, pong)

    async def on_pong(self, identity: bytes, msg: Message, host: str) -> None:
        rtt = time.monotonic() - msg.body["t"]
        if 0 <= rtt < 60:
            self.members.rtt_sample(msg.body["id"], rtt)

    async def on_hello(self, identity: bytes, msg: Message, host: str) -> None:
        body = msg.body
        if not host:
            raise ProtocolError("malformed", "HELLO over a connection without an address")
        if not 0 < body["port"] < 65536:
            raise ProtocolError("bad-body", f"port {body['port']} is not a TCP port")
        address = f"{host}:{body['port']}"
        if body["id"] == self.id:
            if body.get("boot") != self.boot:  # not our own --peer address: a copied data dir
                if address not in self.impostors:
                    log.error("%s at %s uses this node's id %s (a copied data dir?)",
                              body["name"], address, self.id)  # fmt: skip
                self.impostors[address] = time.monotonic()
            return
        if body["cluster"] != self.cfg.cluster:
            self._foreign(body["id"], body["name"], address, body["cluster"],
                          str(body.get("version", "")), VERSION, self.key)  # fmt: skip
            return
        member = Member.from_hello(body, host)
        old = self.members.by_id.get(member.id)
        was_leaving = old is not None and old.state == "leaving"
        changed = self.members.update(member)
        if self.members.clashing(member.id):
            if changed:
                log.error("two nodes use id %s (%s): left out of plans until one stops",
                          member.id, ", ".join(self.members.clashes()[member.id]))  # fmt: skip
                self.planned_members = frozenset()
                self.replan.set()
            return
        if (member.state == "leaving") != was_leaving and old is not None:
            log.info("member %s (%s) is leaving", member.name, member.id)
            self.replan.set()
        if changed:
            log.info(
                "member %s (%s) at %s: %s", member.name, member.id, member.address, member.state
            )
            if member.fingerprint != self.fingerprint:
                log.warning(
                    "%s runs model %s, not ours: left out of plans", member.name, member.model
                )
            self._send_to(member.address, self._hello())
            self.planned_members = (
                frozenset()
            )  # even the same ids: a restarted node lost its layers
            self.replan.set()
        known = {m.address for m in self.members} | {self.address}
        for item in body["members"][:256]:
            if not isinstance(item, dict) or not isinstance(item.get("address"), str):
                continue
            if item.get("id") != self.id and item["address"] not in known:
                self._send_to(item["address"], self._hello())

    async def on_bye(self, identity: bytes, msg: Message, host: str) -> None:
        member = self.members.by_id.get(msg.body["id"])
        if member:
            self._lost(member, "left")

    def _lost(self, member: Member, why: str) -> None:
        self.members.remove(member.id)
        log.info("member %s (%s) %s", member.name, member.id, why)
        for req in list(self.requests.values()):
            if req.plan and member.id in req.plan.nodes and req.result and not req.result.done():
                req.result.set_exception(
                    RequestFailed("node-gone", f"node {member.name} {why} during the request")
                )
        if self.shard:
            for rid, entry in list(self.shard.requests.items()):
                if entry.requester == member.id:
                    self.shard.close(rid)
                    log.info("freed request %s: its requester %s", rid, why)
        self.replan.set()

    # ---------------------------------------------------------------- plans

    def state(self) -> str:
        if self.leaving.is_set():
            return "leaving"
        if self._impostor_seen():
            return "duplicate id"
        if self.loading:
            return self.loading
        if self.pending:
            return "replanning"
        if self.plan is None:
            return "waiting for a plan" if not self.plan_error else "no plan"
        return "ready" if self.plan.stage_of(self.id) else "idle"

    def _is_coordinator(self) -> bool:
        if self._impostor_seen():
            return False  # our id is not ours alone: others keep it out of plans
        return all(self.id < m.id for m in self.members.same_model(self.fingerprint))

    def _impostor_seen(self) -> bool:
        now = time.monotonic()
        return any(now - t < self.cfg.dead_after_s for t in self.impostors.values())

    def _candidates(self) -> list[NodeSpec]:
        """Nodes that may hold layers: ours and same-model members, except leaving ones."""
        me = (
            []
            if self.leaving.is_set()
            else [node_spec(self.id, self.cfg.memory, self.cfg.pin, self.cfg.caps)]
        )
        others = [
            node_spec(m.id, m.memory, m.pin, m.caps)
            for m in self.members.same_model(self.fingerprint)
            if m.state != "leaving"
        ]
        return [*me, *others]

    def _links(self) -> dict[tuple[str, str], float]:
        """Round trips we measured, and those our members measured and told us."""
        links = {(self.id, m.id): m.rtt for m in self.members if m.rtt is not None}
        for m in self.members:
            links.update({(m.id, other): rtt for other, rtt in m.rtts.items()})
        return links

    async def _plan_loop(self) -> None:
        """On the coordinator (smallest id): a new plan epoch whenever membership changes."""
        while True:
            await self.replan.wait()
            await asyncio.sleep(0.3)  # joins come in bursts: plan once for all of them
            self.replan.clear()
            if not self._is_coordinator():
                continue
            nodes = self._candidates()
            key = frozenset((n.id, n.pin) for n in nodes)
            if key == self.planned_members:
                continue  # planned already (or failed: wait for the membership to change)
            epoch = max([self.seen_epoch, self.highest_epoch, *(m.seen for m in self.members)]) + 1
            self.highest_epoch = epoch
            try:
                plan = make_plan(
                    self.ckpt.name,
                    epoch,
                    self.shape,
                    nodes,
                    self.cfg.objective,
                    self._links(),
                    min(DEFAULT_CONTEXT, self.ckpt.config.max_seq_len),
                )
            except RinginferError as e:
                if str(e) != self.plan_error:
                    log.error("cannot plan: %s", e)
                self.plan_error = str(e)
                continue
            self.plan_error = ""
            self.planned_members = key
            self._spawn(self._propose(plan, key))

    async def _propose(self, plan: Plan, key: frozenset) -> None:
        """Prepare (requesters drain), load, live: nobody swaps layers under a request."""
        members = [self.id, *(m.id for m in self.members.same_model(self.fingerprint))]
        ranges = ", ".join(f"{self._name(s.node)} {s.start}-{s.end}" for s in plan.stages)
        log.info("proposing plan epoch %d: %s", plan.epoch, ranges)
        for phase in ("prepare", "load"):
            for node in members:
                self._send_plan(node, plan, phase)
            why = await self._acked(plan.epoch, phase, members)
            if why:
                log.info("plan epoch %d abandoned during %s: %s", plan.epoch, phase, why)
                if self.planned_members == key and not self.acks.get((plan.epoch, "failed")):
                    self.planned_members = frozenset()  # a member left: plan again
                    self.replan.set()
                return
        for node in members:
            self._send_plan(node, plan, "live")

    def _send_plan(self, node: str, plan: Plan, phase: str) -> None:
        body = {"plan": plan.to_json(), "phase": phase, "from": self.id}
        with contextlib.suppress(RequestFailed):
            self._send_node(node, message(Kind.PLAN, epoch=plan.epoch, body=body))

    async def _acked(self, epoch: int, phase: str, members: list[str]) -> str:
        """'' once every member reached `phase`, else why the proposal is abandoned."""
        while True:
            if self.acks.get((epoch, phase), set()) >= set(members):
                return ""
            gone = [self._name(n) for n in members if n != self.id and n not in self.members.by_id]
            reasons = {
                f"{', '.join(gone)} left": gone,
                f"a member failed: {self.plan_error}": self.acks.get((epoch, "failed")),
                "a member had seen a newer epoch": self.acks.get((epoch, "stale")),
                "superseded": self.seen_epoch > epoch or not self._is_coordinator(),
                "stopping": self.stopping.is_set(),
            }
            for reason, happened in reasons.items():
                if happened:
                    return reason
            self.ack_event.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.ack_event.wait(), 1.0)

    async def on_plan(self, identity: bytes, msg: Message, host: str) -> None:
        try:
            plan = Plan.from_json(msg.body["plan"], self.ckpt.n_layers)
        except RinginferError as e:
            raise ProtocolError("bad-plan", str(e)) from None
        phase, source = msg.body["phase"], str(msg.body.get("from", ""))
        if phase == "prepare" and plan.epoch <= self.seen_epoch:
            # Another coordinator used this epoch (a race while members joined): tell this
            # one to propose again above what we have seen.
            self._ack(source, plan.epoch, "stale", seen=self.seen_epoch)
            return
        if plan.epoch < self.seen_epoch:
            return  # superseded
        if phase == "prepare":
            self.seen_epoch, self.pending = plan.epoch, plan
            self.live.clear()
            self._spawn(self._prepare(plan, source))
        elif phase == "load" and self.pending and self.pending.epoch == plan.epoch:
            self._spawn(self._load(plan, source))
        elif phase == "live" and self.pending and self.pending.epoch == plan.epoch:
            self.plan, self.pending = plan, None
            self.plan_error = ""  # whoever failed to plan before, this one worked
            self.live.set()
            mine = plan.stage_of(self.id)
            role = f"layers {mine.start}-{mine.end}" if mine else "no layers"
            log.info("plan epoch %d live: %s", plan.epoch, role)

    async def _prepare(self, plan: Plan, source: str) -> None:
        if self.requests:
            log.info(
                "plan epoch %d waits for %d request(s) to finish", plan.epoch, len(self.requests)
            )
        await self.drained.wait()
        if self.pending is plan:
            self._ack(source, plan.epoch, "prepare")

    async def _load(self, plan: Plan, source: str) -> None:
        self.plan = None
        mine = plan.stage_of(self.id)
        have = (self.shard.start, self.shard.end) if self.shard else None
        if mine is None:
            self.shard = None
        elif have != (mine.start, mine.end):
            self.shard = None
            label = f"layers {mine.start}-{mine.end}"
            began, last = time.monotonic(), [0.0]

            def progress(done: int, total: int) -> None:
                self.loading = f"loading {100 * done // total}%"
                if time.monotonic() - last[0] > 1.0 or done == total:
                    last[0] = time.monotonic()
                    log.info("loading %s: %d/%d tensors", label, done, total)

            cfg = self.cfg
            try:
                self.shard = await asyncio.get_running_loop().run_in_executor(
                    self.compute,
                    lambda: Shard(
                        self.ckpt, mine.start, mine.end, cfg.device, cfg.dtype, progress,
                        cfg.quantize,
                    ),
                )
            except Exception as e:
                log.error("could not load %s: %s", label, e)
                self._ack(source, plan.epoch, "failed", f"{self.cfg.name} could not load: {e}")
                return
            finally:
                self.loading = ""
            log.info("loaded %s in %.1fs", label, time.monotonic() - began)
        if self.pending and self.pending.epoch == plan.epoch:
            self._ack(source, plan.epoch, "load")

    def _ack(self, coordinator: str, epoch: int, phase: str, why: str = "", seen: int = 0) -> None:
        body = {"id": self.id, "phase": phase, "error": why, "seen": seen}
        with contextlib.suppress(RequestFailed):
            self._send_node(coordinator, message(Kind.PLAN_ACK, epoch=epoch, body=body))

    async def on_plan_ack(self, identity: bytes, msg: Message, host: str) -> None:
        self.acks.setdefault((msg.epoch, msg.body["phase"]), set()).add(msg.body["id"])
        if msg.body["phase"] == "failed":
            self.plan_error = str(msg.body.get("error", ""))[:500]
        seen = msg.body.get("seen")
        if type(seen) is int and seen > self.highest_epoch:
            self.highest_epoch = seen
        self.ack_event.set()

    def _name(self, node_id: str) -> str:
        if node_id == self.id:
            return self.cfg.name
        member = self.members.by_id.get(node_id)
        return member.name if member else node_id

    # ---------------------------------------------------------------- stage side

    async def on_forward(self, identity: bytes, msg: Message, host: str) -> None:
        plan, shard = self.plan, self.shard
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
            node, out = await asyncio.get_running_loop().run_in_executor(
                self.compute, self._step, shard, plan, msg, x
            )
        except ProtocolError:
            if opened:
                shard.close(msg.req)
            raise
        took = time.perf_counter() - began
        self.stats.compute_s += took
        self.stats.steps += 1
        if msg.count == 1:
            self.stats.decode_compute_s += took
            self.stats.decode_steps += 1
        self._send_or_fail(node, out, msg)

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
        sent = out.to(getattr(torch, self.cfg.wire_dtype))
        if sent.dtype != out.dtype and not bool(torch.isfinite(sent).all()):
            sent = out.float()  # out of float16's range: this step goes at full precision
        forward = message(
            Kind.FORWARD, (sent,), req=msg.req, epoch=msg.epoch, step=msg.step,
            start=msg.start, count=msg.count, body=msg.body,
        )  # fmt: skip
        return plan.next_node(self.id), forward

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
        vocab = self.ckpt.config.vocab_size
        if score is not None and not (
            isinstance(score, list) and 0 < len(score) < msg.count
            and all(type(t) is int and 0 <= t < vocab for t in score)
        ):  # fmt: skip
            raise ProtocolError("bad-body", "score: token ids to score, fewer than the positions")
        self._admit(shard, capacity)
        shard.open(msg.req, capacity, body["requester"], params, msg.epoch, score)

    def _admit(self, shard: Shard, capacity: int) -> None:
        """A request's caches only within the memory this node offered: beyond it, `busy`
        (the requester's client gets one line, the API a 503), never an out-of-memory."""
        plan_stage = self.plan.stage_of(self.id) if self.plan else None
        if plan_stage is None:
            return
        room = self.cfg.memory * HEADROOM - stage_bytes(plan_stage, self.shape)
        held = sum(e.cache.k.nbytes + e.cache.v.nbytes for e in shard.requests.values())
        need = self.shape.kv_bytes * (shard.end - shard.start) * capacity
        if held + need > room:
            raise ProtocolError(
                "busy", f"{self.cfg.name} is full: {len(shard.requests)} request(s) hold "
                f"{held / 2**20:.0f} MiB of caches, this one needs {need / 2**20:.0f} MiB more "
                f"of the {max(0, room) / 2**20:.0f} MiB offered; try again when one ends",
            )  # fmt: skip

    def _send_or_fail(self, node: str | None, out: Message, msg: Message) -> None:
        try:
            if node is None:
                raise RequestFailed("node-gone", "the plan has no next stage")
            self._send_node(node, out)
        except RequestFailed as e:
            self._fail_upstream(msg, e.code, str(e))

    def _fail_upstream(self, msg: Message, code: str, text: str) -> None:
        """Tell the request's requester its request failed here (it may be us)."""
        requester = msg.body.get("requester")
        if isinstance(requester, str) and (requester == self.id or requester in self.members.by_id):
            err = error(code, f"{self.cfg.name}: {text}", msg.req, msg.epoch)
            with contextlib.suppress(RequestFailed):
                self._send_node(requester, err)
        if self.shard:
            self.shard.close(msg.req)

    async def on_end(self, identity: bytes, msg: Message, host: str) -> None:
        if self.shard and self.shard.close(msg.req):
            log.debug("request %s finished: cache freed", msg.req)

    async def _expire_requests(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.cfg.request_timeout_s / 2))
            if self.shard:
                for rid in self.shard.expired(self.cfg.request_timeout_s):
                    self.shard.close(rid)
                    log.info(
                        "request %s idle for %.0fs: cache freed", rid, self.cfg.request_timeout_s
                    )

    # ---------------------------------------------------------------- requester side

    async def on_generate(self, identity: bytes, msg: Message, host: str) -> None:
        if self.leaving.is_set():
            raise ProtocolError("stopping", "this daemon is shutting down")
        body = msg.body
        try:
            params = SamplingParams.from_json(body["sampling"])
            prompt = self.tokenizer.encode_prompt(body["prompt"], body.get("chat") is True)
            req = self.new_request(
                functools.partial(self._reply, identity), prompt, max(1, body["max_tokens"]),
                params, ignore_eos=body.get("ignore_eos") is True,
            )  # fmt: skip
        except RinginferError as e:
            raise ProtocolError("bad-request", str(e)) from None
        await self._serve(req, self._generate(req))

    def new_request(
        self, sink: Sink, prompt: list[int], max_tokens: int | None, params: SamplingParams,
        stop: list[str] | None = None, ignore_eos: bool = False,
    ) -> Request:  # fmt: skip
        """A generation of up to `max_tokens` (None: to the end of the context); a prompt
        that leaves no room is a RinginferError. Run it with `start`."""
        context = self.ckpt.config.max_seq_len
        capacity, max_tokens = fit_request(len(prompt), max_tokens or context, context)
        stop_ids = frozenset() if ignore_eos else self.tokenizer.stop_ids
        return Request(uuid.uuid4().hex[:16], sink, prompt, capacity, max_tokens, params,
                       stop_ids, stop or [])  # fmt: skip

    def start(self, req: Request) -> asyncio.Task:
        """Run a generation in the background; cancelling the task ends it on every stage."""
        return self._spawn(self._serve(req, self._generate(req)))

    async def on_score(self, identity: bytes, msg: Message, host: str) -> None:
        """A text's perplexity over the ring: one ring request per window, scored by the
        last stage, the running perplexity sent to the client after each."""
        if self.leaving.is_set():
            raise ProtocolError("stopping", "this daemon is shutting down")
        context = min(msg.body["context"], self.ckpt.config.max_seq_len)
        try:
            tokens = self.tokenizer.encode(msg.body["text"])
            wins = windows(tokens, context, self.tokenizer.bos_id)
        except RinginferError as e:
            raise ProtocolError("bad-request", str(e)) from None
        req = Request(
            uuid.uuid4().hex[:16], functools.partial(self._reply, identity), [], context, 0,
            SamplingParams(), frozenset(),
        )  # fmt: skip
        await self._serve(req, self._perplexity(req, wins, context))

    async def _serve(self, req: Request, work: Coroutine[Any, Any, None]) -> None:
        """Run a client's request to its end, whatever that is, freeing its caches."""
        self.requests[req.id] = req
        req.task = asyncio.current_task()
        try:
            await work
        except ClientGone:
            log.info("request %s: client went away, cancelled", req.id)
        except RequestFailed as e:
            log.warning("request %s failed: %s", req.id, e)
            with contextlib.suppress(ClientGone, zmq.ZMQError):
                await req.sink(error(e.code, str(e), req.id))
        except asyncio.CancelledError:
            if not self.leaving.is_set():  # the API cancels when its client disconnects
                log.info("request %s: client went away, cancelled", req.id)
            with contextlib.suppress(ClientGone, zmq.ZMQError):
                await req.sink(error("stopping", "the daemon is shutting down", req.id))
        finally:
            self._release_plan(req)
            del self.requests[req.id]

    async def _accept(self, req: Request, prompt_tokens: int) -> list[dict[str, Any]]:
        """Wait for a live plan, bind the request to it and tell the client; the plan as JSON."""
        while self.plan is None or self.pending:
            log.info("request %s waits for the plan", req.id)
            try:
                await asyncio.wait_for(self.live.wait(), self.cfg.plan_wait_s)
            except TimeoutError:
                why = self.plan_error or "no live plan"
                raise RequestFailed("no-plan", f"{why} after {self.cfg.plan_wait_s:.0f}s") from None
        self._hold_plan(req)
        plan_json = [
            {"node": s.node, "name": self._name(s.node), "start": s.start, "end": s.end}
            for s in req.plan.stages
        ]
        body = {"plan": plan_json, "prompt_tokens": prompt_tokens}
        await req.sink(message(Kind.ACCEPTED, req=req.id, body=body))
        return plan_json

    async def _perplexity(self, req: Request, wins: list[Window], context: int) -> None:
        await self._accept(req, sum(len(w.ids) for w in wins))
        assert req.plan is not None
        began, tally = time.perf_counter(), Tally()
        for i, window in enumerate(wins):
            part = Request(f"{req.id}.{i}", req.sink, window.ids, len(window.ids), 0,
                           req.params, frozenset(), plan=req.plan,
                           scored=len(window.targets))  # fmt: skip
            self.requests[part.id] = part
            try:
                self._step_into_ring(part, torch.tensor([window.ids]), score=window.targets)
                tally.add(await self._ring_result(part))
            finally:
                del self.requests[part.id]
                self._end(part)
            body = {"window": i + 1, "windows": len(wins), "perplexity": tally.perplexity}
            await req.sink(message(Kind.SCORED, req=req.id, body=body))
        formats = {self._quantization_of(s.node): None for s in req.plan.stages}
        out = result(tally, time.perf_counter() - began, self.ckpt.name, ", ".join(formats),
                     context)  # fmt: skip
        await req.sink(message(Kind.DONE, req=req.id, body={"result": out}))

    def _quantization_of(self, node: str) -> str:
        if node == self.id:
            return self.quantization
        member = self.members.by_id.get(node)
        return member.quant if member else "?"

    async def _ring_result(self, req: Request) -> Any:
        """What the ring sends back for the request's pending step."""
        try:
            return await asyncio.wait_for(req.result, self.cfg.request_timeout_s)
        except TimeoutError:
            raise RequestFailed(
                "timeout", f"no answer from the ring in {self.cfg.request_timeout_s:.0f}s"
            ) from None

    def _hold_plan(self, req: Request) -> None:
        """Bind the request to the live plan: from here on a new plan waits for it."""
        req.plan = self.plan
        self.drained.clear()

    def _release_plan(self, req: Request) -> None:
        """Free the request's caches on its plan's stages, and let a waiting plan go ahead
        once no request holds one."""
        self._end(req)
        req.plan = None
        if not any(r.plan for r in self.requests.values()):
            self.drained.set()

    def _end(self, req: Request) -> None:
        """Free the request's caches on every stage of its plan."""
        self.ended.append(req.id)
        for node in req.plan.nodes if req.plan else ():
            with contextlib.suppress(RequestFailed):
                self._send_node(node, message(Kind.END, req=req.id, epoch=req.plan.epoch))

    async def _generate(self, req: Request) -> None:
        timings = Timings()
        plan_json = await self._accept(req, len(req.prompt))
        stop_ids = req.stop_ids
        loop = TokenLoop(req.prompt, req.max_tokens, req.params, stop_ids)
        stream, stops = TextStream(self.tokenizer), StopStrings(req.stop)
        pieces = []
        self._step_into_ring(req, loop.ids, loop.positions)
        while True:
            try:
                cands = await self._ring_result(req)
            except RequestFailed as e:
                if e.code not in REPLAYABLE:
                    raise
                cands = await self._replay(req, loop.tokens, e)
            token = loop.take(cands)
            timings.mark()
            req.step += 1
            piece = "" if token in stop_ids else stops.push(stream.push(token))
            done = loop.done or stops.hit
            if done:
                piece += stops.flush()
            else:  # the ring computes the next token while we serve the client
                self._step_into_ring(req, loop.ids, loop.positions)
            pieces.append(piece)
            await req.sink(message(Kind.TOKEN, req=req.id, body={"token": token, "text": piece}))
            if done:
                break
        finish_reason = "stop" if stops.hit else loop.finish_reason
        result = generation_result(
            "".join(pieces), loop.tokens, len(req.prompt), self.ckpt.name, finish_reason, timings
        )
        result["plan"] = plan_json
        if req.replays:
            result["replays"] = req.replays
        await req.sink(message(Kind.DONE, req=req.id, body={"result": result}))

    async def _replay(self, req: Request, tokens: list[int], failure: RequestFailed) -> Any:
        """A stage failed under the request: free what is left of it, wait for a plan the
        cluster can run (a new epoch without the lost node, or the same one if every stage
        is still a member) and feed it the whole history. What comes back is what the lost
        step would have returned; the sampler's state never left this node.
        Gives up, raising, once --request-timeout passes without a working plan."""
        deadline = time.monotonic() + self.cfg.request_timeout_s
        while True:
            assert req.plan is not None
            if len(req.replays) >= MAX_REPLAYS:
                raise RequestFailed(failure.code, f"{failure} (after {MAX_REPLAYS} replays)")
            failed_epoch = req.plan.epoch
            log.warning("request %s: %s; replaying its %d tokens into the next plan", req.id,
                        failure, len(req.prompt) + len(tokens))  # fmt: skip
            self._release_plan(req)  # the re-plan may go ahead
            req.result = None
            while not self._runnable(failed_epoch):
                if time.monotonic() > deadline:
                    raise RequestFailed(failure.code, f"{failure} (no working plan for "
                                        f"{self.cfg.request_timeout_s:.0f}s)")  # fmt: skip
                await asyncio.sleep(0.1)
            self._hold_plan(req)
            req.step = 0
            req.replays.append({"at_token": len(tokens), "why": str(failure),
                                "epoch": req.plan.epoch})  # fmt: skip
            try:
                return await self._feed_history(req, tokens)
            except RequestFailed as e:
                if e.code not in REPLAYABLE or time.monotonic() > deadline:
                    raise
                failure = e

    async def _feed_history(self, req: Request, tokens: list[int]) -> Any:
        """The prompt in one prefill, then each generated token in one step, as they were
        first computed: a single prefill of it all is faster, but batched matmuls round
        differently from one-row ones, and greedy decoding then drifts (seen at token 89).
        Returns what the last step sends back: the candidates for the next token."""
        self._step_into_ring(req, torch.tensor([req.prompt]))
        result = await self._ring_result(req)
        for i, token in enumerate(tokens):
            req.step += 1
            self._step_into_ring(req, torch.tensor([[token]]), torch.tensor([len(req.prompt) + i]))
            result = await self._ring_result(req)
        return result

    def _runnable(self, failed_epoch: int) -> bool:
        plan = self.plan
        if plan is None or self.pending is not None or self.leaving.is_set():
            return False
        return plan.epoch > failed_epoch or all(
            n == self.id or n in self.members.by_id for n in plan.nodes
        )

    def _step_into_ring(
        self,
        req: Request,
        ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        score: list[int] | None = None,
    ) -> None:
        """Send the request's next positions (from 0 if not given) to the first stage; its
        result, candidates or the log-probabilities of `score`, will come back."""
        assert req.plan is not None
        body: dict[str, Any] = {"requester": self.id}
        if req.step == 0:  # the prefill opens the request on every stage
            body.update(capacity=req.capacity, sampling=req.params.to_json())
        if score is not None:
            body["score"] = score
        start = int(positions[0]) if positions is not None else 0
        forward = message(
            Kind.FORWARD, (ids,), req=req.id, epoch=req.plan.epoch, step=req.step,
            start=start, count=ids.shape[1], body=body,
        )  # fmt: skip
        req.result = asyncio.get_running_loop().create_future()
        self._send_node(req.plan.nodes[0], forward)

    async def on_result(self, identity: bytes, msg: Message, host: str) -> None:
        req = self.requests.get(msg.req)
        if req is None and msg.req in self.ended:
            return  # the step that was under way when its request was cancelled
        if req is None or req.result is None or req.result.done() or msg.step != req.step:
            raise ProtocolError(
                "unknown-request", f"no step {msg.step} of request {msg.req} waits here"
            )
        vocab = self.ckpt.config.vocab_size
        specs = msg.specs
        if req.scored:
            if len(specs) != 1 or specs[0] != TensorSpec("float32", (req.scored,)):
                raise ProtocolError("bad-tensor", f"a score is float32 [{req.scored}]")
            req.result.set_result(msg.tensor(0))
            return
        ok = 1 <= len(specs) <= 2 and specs[0].dtype == "float32" and len(specs[0].shape) == 1
        n = specs[0].shape[0] if ok else 0
        if len(specs) == 2:
            ok = ok and specs[1].dtype == "int64" and specs[1].shape == (n,)
        if not ok or not 0 < n <= vocab or (len(specs) == 1 and n != vocab):
            raise ProtocolError("bad-tensor", "a result is float32 logits [n] and int64 ids [n]")
        ids = msg.tensor(1) if len(specs) == 2 else None
        if ids is not None and not 0 <= int(ids.min()) <= int(ids.max()) < vocab:
            raise ProtocolError("bad-tensor", "candidate ids outside the vocabulary")
        req.result.set_result(Candidates(msg.tensor(0), ids))

    async def on_error(self, identity: bytes, msg: Message, host: str) -> None:
        code, text = msg.body["code"], msg.body["message"]
        req = self.requests.get(msg.req)
        if req and req.result and not req.result.done():
            req.result.set_exception(RequestFailed(code, text))
            return
        if code == "version":
            log.error("a peer at %s refused us: %s", host or "?", text)
        else:
            log.info("error from %s: %s: %s", host or "self", code, text)

    # ---------------------------------------------------------------- status

    async def on_status(self, identity: bytes, msg: Message, host: str) -> None:
        await self._reply(identity, message(Kind.STATUS_REPLY, body={"status": self.status()}))

    def status(self) -> dict[str, Any]:
        plan = self.plan
        caps = self.cfg.caps
        me = {
            "id": self.id, "name": self.cfg.name, "address": self.address,
            "state": self.state(), "memory": self.cfg.memory,
            "requests": len(self.shard.requests) if self.shard else 0,
            "device": caps.device, "device_name": caps.device_name,
            "memory_total": caps.memory_total, "flops": caps.flops, "bandwidth": caps.bandwidth,
            "layer_ms": round(caps.layer_s * 1e3, 4), "rtt_ms": None, "version": __version__,
            "quantization": self.quantization,
        }  # fmt: skip
        members = [
            {"id": m.id, "name": m.name, "address": m.address, "state": m.state,
             "memory": m.memory, "requests": m.requests, "device": m.caps.device,
             "device_name": m.caps.device_name, "memory_total": m.caps.memory_total,
             "flops": m.caps.flops, "bandwidth": m.caps.bandwidth,
             "layer_ms": round(m.caps.layer_s * 1e3, 4),
             "rtt_ms": round(m.rtt * 1e3, 3) if m.rtt is not None else None,
             "version": m.version, "quantization": m.quant}
            for m in self.members
        ]  # fmt: skip
        nodes = []
        for node in sorted([me, *members], key=lambda n: n["id"]):
            stage = plan.stage_of(node["id"]) if plan else None
            nodes.append({
                **node, "layers": [stage.start, stage.end] if stage else None,
                "weights": stage_bytes(stage, self.shape) if stage else 0,
            })  # fmt: skip
        predicted = None
        specs = {n.id: n for n in self._candidates()}
        if plan and all(s.node in specs for s in plan.stages):
            predicted = predict(plan.stages, self.shape, specs, self._links()).to_json()
        stats = self.stats
        return {
            "epoch": plan.epoch if plan else 0,
            "model": self.ckpt.name,
            "n_layers": self.ckpt.n_layers,
            "context": self.ckpt.config.max_seq_len,
            "live": plan is not None,
            "plan_error": self.plan_error,
            "node": self.id,
            "cluster": self.cfg.cluster,
            "objective": self.cfg.objective,
            "protocol": VERSION,
            "mdns": self.discovery is not None,
            "secret": self.key or None,  # the cluster key's fingerprint
            "predicted": predicted,
            "problems": self.problems(),
            "nodes": nodes,
            "links": [
                {"from": a, "to": b, "rtt_ms": round(rtt * 1e3, 3)}
                for (a, b), rtt in sorted(self._links().items())
            ],
            "api": self.api.listener.address if self.api else None,
            "stats": {
                "requests_in_flight": len(self.requests),
                "cached_requests": me["requests"],
                "errors": dict(stats.errors),
                "bytes_sent": dict(stats.bytes_sent),
                "messages_sent": dict(stats.messages_sent),
                "compute_s": round(stats.compute_s, 6),
                "steps": stats.steps,
                "decode_compute_s": round(stats.decode_compute_s, 6),
                "decode_steps": stats.decode_steps,
            },
        }

    def problems(self) -> list[dict[str, str]]:
        """What a user should fix, each with how and how bad: shown by `status` and `doctor`."""
        out = []
        now = time.monotonic()
        if self.cfg.keys is None and not is_loopback(self.cfg.host):
            out.append({
                "level": "warn",
                "problem": f"no cluster secret on {self.cfg.host}:{self.cfg.port} (--insecure): "
                           "anyone on the network can join, send frames and read activations",
                "fix": "`ringinfer secret > cluster.key`, copy it to every machine, restart each "
                       "daemon with --secret-file cluster.key",
            })  # fmt: skip
        for address, t in self.strangers.items():
            if now - t < 60:
                out.append({
                    "level": "warn",
                    "problem": f"a process at {address} tried to connect without this cluster's "
                               "secret (nothing it sent was read)",
                    "fix": "if it is one of yours, give it the cluster's --secret-file",
                })  # fmt: skip
        for address, t in self.impostors.items():
            if now - t < self.cfg.dead_after_s:
                out.append({
                    "level": "fail",
                    "problem": f"the node at {address} uses this node's id {self.id}",
                    "fix": "a copied data dir: on one of the two machines stop the daemon, "
                           "delete node_id in its --data-dir, and start it again",
                })  # fmt: skip
        for node_id, addresses in self.members.clashes().items():
            out.append({
                    "level": "fail",
                "problem": f"nodes at {', '.join(addresses)} share the id {node_id}",
                "fix": "delete node_id in the --data-dir of all but one of them and restart it",
            })  # fmt: skip
        for f in self.foreign.values():
            if f["cluster"] == self.cfg.cluster and f["key"] != self.key:
                out.append({
                    "level": "fail",
                    "problem": f"{f['name']} at {f['address']} is in cluster '{f['cluster']}' "
                               f"but holds {'another' if f['key'] else 'no'} cluster secret",
                    "fix": "give every machine of the cluster the same --secret-file "
                           "(made once with `ringinfer secret > cluster.key`)",
                })  # fmt: skip
            elif f["cluster"] != self.cfg.cluster:
                out.append({
                    "level": "warn",
                    "problem": f"{f['name']} at {f['address']} is in cluster '{f['cluster']}', "
                               f"not '{self.cfg.cluster}'",
                    "fix": f"start it with --cluster {self.cfg.cluster} if it should join",
                })  # fmt: skip
            else:
                out.append({
                    "level": "fail",
                    "problem": f"{f['name']} at {f['address']} runs ringinfer {f['version']} "
                               f"(protocol {f['protocol']}, ours {VERSION})",
                    "fix": "run the same ringinfer version on every node",
                })  # fmt: skip
        others = [m for m in self.members if m.fingerprint != self.fingerprint]
        for m in others:
            out.append({
                    "level": "fail",
                "problem": f"{m.name} serves {m.model}, not {self.ckpt.name}",
                "fix": "start every daemon of one cluster with the same --model",
            })  # fmt: skip
        if self.plan_error:
            out.append({
                "level": "fail", "problem": self.plan_error,
                "fix": "add a node or memory (--max-memory), or use a smaller model",
            })  # fmt: skip
        return out


def node_spec(
    node_id: str, memory: int, pin: tuple[int, int] | None, caps: Capabilities
) -> NodeSpec:
    """What the planner knows of a node; a peer that measured nothing gets the defaults."""
    return NodeSpec(
        node_id, memory, pin, caps.flops or DEFAULT_FLOPS, caps.bandwidth or DEFAULT_BANDWIDTH,
        caps.layer_overhead_s or LAYER_OVERHEAD_S, caps.layer_s,
    )  # fmt: skip


@dataclass
class Listening:
    """The daemon's ROUTER, and with a cluster secret the ZAP socket that vets handshakes."""

    ctx: zmq.asyncio.Context
    router: zmq.asyncio.Socket
    zap: zmq.asyncio.Socket | None


def listen(host: str, port: int, keys: ClusterKeys | None = None) -> Listening:
    """The daemon's ROUTER, bound before anything slow so a taken port fails at once. With
    `keys` it is a CURVE server, and handshakes wait for the ZAP handler (bound first, so no
    connection is ever admitted unchecked)."""
    ctx = zmq.asyncio.Context.instance()
    zap = None
    if keys:
        zap = ctx.socket(zmq.REP)
        zap.setsockopt(zmq.LINGER, 0)
        zap.bind(ZAP_ENDPOINT)
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.MAXMSGSIZE, HARD_MAX_MESSAGE)
    router.setsockopt(zmq.LINGER, 0)
    if keys:
        keys.serve(router)
    try:
        router.bind(f"tcp://{host}:{port}")
    except zmq.ZMQError as e:
        ctx.destroy(linger=0)
        raise RinginferError(
            f"cannot listen on {host}:{port}: {os.strerror(e.errno)} (another daemon there? "
            "pass --port)"
        ) from None
    return Listening(ctx, router, zap)
