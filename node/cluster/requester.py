"""The requester side: the requests this node was asked for, by a client or the HTTP API.

The requester tokenizes, sends each step's positions into the ring and samples the next
token from what the last stage returns, so the sampler's state never leaves this node. It
keeps each request's token history: when a stage is lost under a request, the request is
replayed into the next plan and goes on as if nothing happened. A request that a stage has
no cache room for waits in a bounded queue, told its place, and is tried again as room
frees (`_recover` does both).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
import zmq

from node.cluster.planner import Plan
from node.cluster.transport import ClientGone
from node.engine.local import Timings, TokenLoop, fit_request, generation_result
from node.engine.perplexity import Tally, Window, result, windows
from node.engine.reasoning import PLAIN, reply_format
from node.engine.sampling import Candidates, SamplingParams
from node.engine.stop_strings import StopStrings
from node.engine.tokenizer import TextStream, too_many_bytes
from node.errors import RinginferError
from protocol.wire import (
    Kind,
    Message,
    Piece,
    ProtocolError,
    TensorSpec,
    error,
    forwards,
    message,
)

if TYPE_CHECKING:
    from node.cluster.daemon import Daemon
    from node.engine.grammar import Constraint

log = logging.getLogger("ringinfer")


class RequestFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# Failures of a stage, not of the request: replayed into the next plan (see _recover).
REPLAYABLE = ("node-gone", "wrong-epoch", "not-a-stage", "unknown-request", "bad-positions",
              "no-answer", "stage-failed")
MAX_REPLAYS = 8  # per request: a failure that comes back every time is not a lost stage
QUEUED_EVERY_S = 5.0  # a queued request's client hears its place at least this often


Sink = Callable[[Message], Awaitable[None]]  # where a request's answers go: client or API


def _texts(prompt: Any) -> list[str]:
    """The texts of a prompt: itself, or a chat's message contents (what is not text is
    refused by the template's rendering)."""
    if isinstance(prompt, str):
        return [prompt]
    messages = prompt if isinstance(prompt, list) else []
    return [m["content"] for m in messages
            if isinstance(m, dict) and isinstance(m.get("content"), str)]  # fmt: skip

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
    attempt: int = 0  # replays so far, and queue retries: each opens the request anew
    patience: float = 0.0  # seconds the pending step may take before it is presumed lost
    scored: int = 0  # scoring a window: how many log-probabilities the last stage returns
    reply_format: str = PLAIN  # how the reply is written (engine/reasoning.py); ACCEPTED says
    constraint: Constraint | None = None  # a grammar the reply keeps to (engine/grammar.py)

    @property
    def ring_id(self) -> str:
        """Its id on the stages: another for each attempt, so that a late END or step of an
        earlier attempt (on another path through the ring) never meets the next one."""
        return f"{self.id}~{self.attempt}" if self.attempt else self.id


class Requester:
    def __init__(self, node: Daemon) -> None:
        self.node = node
        self.requests: dict[str, Request] = {}
        self.ended: deque[str] = deque(maxlen=256)  # a cancelled request's last step may come
        self.drained = asyncio.Event()  # no request holds a plan: a new one may go live
        self.drained.set()
        self.queue: deque[Request] = deque()  # waiting for cache room, first come first
        self.finished = 0  # requests of ours that ended: the queue's head may try again
        # Steps to send at the end of this event-loop turn: (first stage, epoch) -> steps.
        self.outbox: dict[tuple[str, int], list[tuple[Request, dict[str, Any], torch.Tensor]]] = {}

    def stage_lost(self, member: str, why: str) -> None:
        """A member is gone: the steps of requests whose plan uses it fail now (and are
        replayed), not after --request-timeout."""
        for req in list(self.requests.values()):
            if req.plan and member in req.plan.nodes and req.result and not req.result.done():
                req.result.set_exception(RequestFailed("node-gone", why))

    async def stop(self) -> None:
        """Shutting down: every open request ends with an error to its client."""
        tasks = [r.task for r in list(self.requests.values()) if r.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def on_generate(self, identity: bytes, msg: Message, host: str) -> None:
        if self.node.leaving.is_set():
            raise ProtocolError("stopping", "this daemon is shutting down")
        body, reply = msg.body, functools.partial(self.node.transport.reply, identity)
        try:
            params = SamplingParams.from_json(body["sampling"])
            chat, tokenizer = body.get("chat") is True, self.node.tokenizer
            encode = functools.partial(tokenizer.encode_prompt, body["prompt"], chat,
                                       body.get("chat_template_kwargs"))  # fmt: skip
            prompt = await self.tokenize(_texts(body["prompt"]), encode)
            req = self.new_request(reply, prompt, max(1, body["max_tokens"]), params,
                                   ignore_eos=body.get("ignore_eos") is True)  # fmt: skip
            req.reply_format = reply_format(tokenizer, prompt) if chat else PLAIN
        except RinginferError as e:
            raise ProtocolError("bad-request", str(e)) from None
        await self.serve(req, self._generate(req))

    def new_request(
        self, sink: Sink, prompt: list[int], max_tokens: int | None, params: SamplingParams,
        stop: list[str] | None = None, ignore_eos: bool = False,
        constraint: Constraint | None = None,
    ) -> Request:  # fmt: skip
        """A generation of up to `max_tokens` (None: to the end of the context); a prompt
        that leaves no room is a RinginferError. Run it with `start`. With a `constraint`,
        the last stage hands back whole rows of logits, masked here."""
        context = self.node.ckpt.config.max_seq_len
        capacity, max_tokens = fit_request(len(prompt), max_tokens or context, context)
        stop_ids = frozenset() if ignore_eos else self.node.tokenizer.stop_ids
        if constraint is not None:
            params = replace(params, whole=True)
        return Request(uuid.uuid4().hex[:16], sink, prompt, capacity, max_tokens, params,
                       stop_ids, stop or [], constraint=constraint)  # fmt: skip

    def start(self, req: Request) -> asyncio.Task:
        """Run a generation in the background; cancelling the task ends it on every stage."""
        return self.node.spawn(self.serve(req, self._generate(req)))

    async def on_score(self, identity: bytes, msg: Message, host: str) -> None:
        """A text's perplexity over the ring: one ring request per window, scored by the
        last stage, the running perplexity sent to the client after each."""
        if self.node.leaving.is_set():
            raise ProtocolError("stopping", "this daemon is shutting down")
        context = min(msg.body["context"], self.node.ckpt.config.max_seq_len)
        try:
            # a text may hold many windows: bounded by the ring's message size, not the context
            tokens = await asyncio.to_thread(self.node.tokenizer.encode, msg.body["text"])
            wins = windows(tokens, context, self.node.tokenizer.bos_id)
        except RinginferError as e:
            raise ProtocolError("bad-request", str(e)) from None
        reply = functools.partial(self.node.transport.reply, identity)
        req = Request(uuid.uuid4().hex[:16], reply, [], context, 0, SamplingParams(), frozenset())
        await self.serve(req, self._perplexity(req, wins, context))

    async def tokenize(self, texts: list[str], encode: Callable[[], list[int]]) -> list[int]:
        """`encode()` in a worker thread, after refusing `texts` too long for the context by
        their bytes: a client's prompt never holds the event loop (heartbeats, the ring)."""
        too_long = too_many_bytes(texts, self.node.ckpt.config.max_seq_len)
        if too_long:
            raise RinginferError(too_long)
        return await asyncio.to_thread(encode)

    async def serve(self, req: Request, work: Coroutine[Any, Any, None]) -> None:
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
            if not self.node.leaving.is_set():  # the API cancels when its client disconnects
                log.info("request %s: client went away, cancelled", req.id)
            with contextlib.suppress(ClientGone, zmq.ZMQError):
                await req.sink(error("stopping", "the daemon is shutting down", req.id))
        finally:
            self._release_plan(req)
            del self.requests[req.id]
            self.finished += 1

    async def _accept(self, req: Request, prompt_tokens: int) -> list[dict[str, Any]]:
        """Wait for a live plan, bind the request to it and tell the client; the plan as JSON."""
        plans, wait_s = self.node.plans, self.node.cfg.plan_wait_s
        while plans.plan is None or plans.pending:
            log.info("request %s waits for the plan", req.id)
            try:
                await asyncio.wait_for(plans.live.wait(), wait_s)
            except TimeoutError:
                why = plans.error or "no live plan"
                raise RequestFailed("no-plan", f"{why} after {wait_s:.0f}s") from None
        self._hold_plan(req)
        plan_json = [
            {"node": s.node, "name": self.node.name(s.node), "start": s.start, "end": s.end}
            for s in req.plan.stages
        ]
        body = {"plan": plan_json, "prompt_tokens": prompt_tokens, "reply_format": req.reply_format}
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
        formats = {self.node.quantization_of(s.node): None for s in req.plan.stages}
        out = result(tally, time.perf_counter() - began, self.node.ckpt.name, ", ".join(formats),
                     context)  # fmt: skip
        await req.sink(message(Kind.DONE, req=req.id, body={"result": out}))

    async def _ring_result(self, req: Request) -> Any:
        """What the ring sends back for the request's pending step.

        A step with no answer in its patience while every stage still answers heartbeats
        was lost on a link (a connection reset drops what was in flight; ZeroMQ reconnects
        but does not resend): `no-answer`, and the request is replayed into the same ring."""
        assert req.result is not None
        timeout = self.node.cfg.request_timeout_s
        deadline, wait = time.monotonic() + timeout, req.patience
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(req.result), wait)
            except TimeoutError:
                if time.monotonic() >= deadline:
                    raise RequestFailed("timeout", f"no answer from the ring in {timeout:.0f}s"
                                        ) from None  # fmt: skip
                if self._ring_answers(req):  # else a silent stage: membership will tell
                    why = f"step {req.step} had no answer in {req.patience:.0f}s (lost on a link?)"
                    raise RequestFailed("no-answer", why) from None
                wait = min(1.0, max(0.01, deadline - time.monotonic()))

    def _ring_answers(self, req: Request) -> bool:
        """Every stage of the request's plan was heard from in the last heartbeats."""
        node, now = self.node, time.monotonic()
        recent = 2.5 * node.cfg.heartbeat_s
        for n in req.plan.nodes if req.plan else ():
            member = node.membership.members.by_id.get(n)
            if n != node.id and (member is None or now - member.last_seen > recent):
                return False
        return True

    def _hold_plan(self, req: Request) -> None:
        """Bind the request to the live plan: from here on a new plan waits for it."""
        req.plan = self.node.plans.plan
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
        self.ended.append(req.ring_id)
        for node in req.plan.nodes if req.plan else ():
            self.node.send_node(node, message(Kind.END, req=req.ring_id, epoch=req.plan.epoch))

    async def _generate(self, req: Request) -> None:
        timings = Timings()
        plan_json = await self._accept(req, len(req.prompt))
        stop_ids = req.stop_ids
        loop = TokenLoop(req.prompt, req.max_tokens, req.params, stop_ids, req.constraint)
        stream, stops = TextStream(self.node.tokenizer), StopStrings(req.stop)
        pieces = []
        self._step_into_ring(req, loop.ids, loop.positions)
        while True:
            try:
                cands = await self._ring_result(req)
            except RequestFailed as e:
                cands = await self._recover(req, loop.tokens, e)
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
            body = {"token": token, "text": piece}
            if loop.logprob is not None:
                body["logprob"] = loop.logprob
            await req.sink(message(Kind.TOKEN, req=req.id, body=body))
            if done:
                break
        finish_reason = "stop" if stops.hit else loop.finish_reason
        result = generation_result("".join(pieces), loop.tokens, len(req.prompt),
                                   self.node.ckpt.name, finish_reason, timings)  # fmt: skip
        result["plan"] = plan_json
        if stops.hit:
            result["stop_sequence"] = stops.which
        if loop.logprobs:
            result["logprobs"] = loop.logprobs
        if req.replays:
            result["replays"] = req.replays
        await req.sink(message(Kind.DONE, req=req.id, body={"result": result}))

    async def _recover(self, req: Request, tokens: list[int], failure: RequestFailed) -> Any:
        """A step failed: wait for what it needs and feed the whole history again.

        A lost stage (REPLAYABLE) waits for a plan the cluster can run: a new epoch without
        the lost node, or the same one if every stage is still a member. A full stage
        (`busy`) waits in the queue for room. What comes back is what the failed step would
        have returned; the sampler's state never left this node. Gives up, raising, once
        --request-timeout passes, or at once when the queue is full.

        A replay into the same ring that fails again waits longer each time (0.25 s, 0.5 s,
        ... 8 s) for the cluster to move on: after a partition heals, this node may hold a
        plan its stages have already left, until the coordinator learns of it again."""
        deadline = time.monotonic() + self.node.cfg.request_timeout_s
        previous, again = 0, 0  # the last failed epoch; replays into it that failed
        try:
            while True:
                assert req.plan is not None
                failed_epoch, lost = req.plan.epoch, failure.code in REPLAYABLE
                again = again + 1 if lost and failed_epoch == previous else 0
                previous = failed_epoch
                if lost:
                    if len(req.replays) >= MAX_REPLAYS:
                        raise RequestFailed(failure.code,
                                            f"{failure} (after {MAX_REPLAYS} replays)")  # fmt: skip
                    log.warning("request %s: %s; replaying its %d tokens into the next plan",
                                req.id, failure, len(req.prompt) + len(tokens))  # fmt: skip
                elif failure.code != "busy":
                    raise failure
                self._release_plan(req)  # a re-plan may go ahead, and the stages free it
                req.result, req.attempt = None, req.attempt + 1
                if not lost:
                    await self._wait_in_queue(req, failure, deadline)
                elif again:
                    await self._settle(failed_epoch, min(8.0, 0.25 * 2 ** (again - 1)))
                while not self._runnable(failed_epoch):
                    if time.monotonic() > deadline:
                        raise RequestFailed(failure.code, f"{failure} (no working plan for "
                                            f"{self.node.cfg.request_timeout_s:.0f}s)")  # fmt: skip
                    await asyncio.sleep(0.1)
                self._hold_plan(req)
                req.step = 0
                if lost:
                    req.replays.append({"at_token": len(tokens), "why": str(failure),
                                        "epoch": req.plan.epoch})  # fmt: skip
                try:
                    return await self._feed_history(req, tokens)
                except RequestFailed as e:
                    if time.monotonic() > deadline:
                        raise
                    failure = e
        finally:
            if req in self.queue:  # admitted, given up or cancelled: the one place it leaves
                self.queue.remove(req)

    async def _settle(self, epoch: int, seconds: float) -> None:
        """Up to `seconds`, or until the cluster has moved past `epoch`."""
        plans, until = self.node.plans, time.monotonic() + seconds
        while time.monotonic() < until and plans.pending is None and (
            plans.plan is None or plans.plan.epoch <= epoch
        ):
            await asyncio.sleep(0.05)

    async def _wait_in_queue(self, req: Request, failure: RequestFailed, deadline: float) -> None:
        """Until this request heads the queue and room may have freed: a request of ours
        ended, or a second passed (another requester's may have). Its client hears its
        place whenever it changes, and every few seconds meanwhile so it does not give up."""
        cfg = self.node.cfg
        if req not in self.queue:
            if len(self.queue) >= cfg.max_queue:
                raise RequestFailed("busy", f"{failure}; {len(self.queue)} request(s) wait "
                                    "here already (--max-queue)")  # fmt: skip
            self.queue.append(req)
            log.info("request %s queued at %d: %s", req.id, len(self.queue), failure)
        began, finished, told, last = time.monotonic(), self.finished, 0.0, 0
        while True:
            place, now = self.queue.index(req) + 1, time.monotonic()
            if place != last or now - told > QUEUED_EVERY_S:
                body = {"position": place, "queued": len(self.queue)}
                await req.sink(message(Kind.QUEUED, req=req.id, body=body))
                told, last = now, place
            if place == 1 and (self.finished != finished or now - began > 1.0):
                return
            if now > deadline:
                raise RequestFailed("busy", f"{failure} (queued for "
                                    f"{cfg.request_timeout_s:.0f}s)")  # fmt: skip
            await asyncio.sleep(0.05)

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
        plan = self.node.plans.plan
        if plan is None or self.node.plans.pending is not None or self.node.leaving.is_set():
            return False
        return plan.epoch > failed_epoch or all(
            n == self.node.id or n in self.node.membership.members.by_id for n in plan.nodes
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
        start = int(positions[0]) if positions is not None else 0
        count = ids.shape[1]
        body: dict[str, Any] = {"requester": self.node.id}
        if req.step == 0:  # the prefill opens the request on every stage
            body.update(capacity=req.capacity, sampling=req.params.to_json())
        if score is not None:
            body["score"] = score
        piece = Piece(req.ring_id, req.step, start, count, start + count, body).to_json()
        loop = asyncio.get_running_loop()
        req.result = loop.create_future()
        cfg = self.node.cfg  # a prefill may take longer: patience grows with its positions
        req.patience = min(cfg.request_timeout_s, cfg.step_timeout_s * max(1, ids.shape[1] / 32))
        if not self.outbox:
            loop.call_soon(self._flush)
        self.outbox.setdefault((req.plan.nodes[0], req.plan.epoch), []).append((req, piece, ids[0]))

    def _flush(self) -> None:
        """Send this event-loop turn's steps: one FORWARD to each first stage, which takes
        them into one pass (the results of a batch come back together, and each request's
        next step follows within the turn)."""
        outbox, self.outbox = self.outbox, {}
        for (first, epoch), steps in outbox.items():
            steps = [s for s in steps if s[0].plan and s[0].ring_id == s[1]["req"]]  # not ended
            if not steps:
                continue
            ids = torch.cat([s[2] for s in steps])
            for forward, sent in forwards(epoch, [s[1] for s in steps], ids):
                if self.node.send_node(first, forward):
                    continue
                why = "the plan's first stage is no longer a member"
                for req, _, _ in steps[sent]:  # replayed like any lost step
                    if req.result and not req.result.done():
                        req.result.set_exception(RequestFailed("node-gone", why))

    def _waiting(self, ring_id: str) -> Request | None:
        """The request whose current attempt has this id on the stages."""
        req = self.requests.get(ring_id.partition("~")[0])
        return req if req is not None and req.ring_id == ring_id else None

    async def on_result(self, identity: bytes, msg: Message, host: str) -> None:
        req = self._waiting(msg.req)
        if req is None and msg.req in self.ended:
            return  # the step under way when its request was cancelled, or an older attempt
        if req is None or req.result is None or req.result.done() or msg.step != req.step:
            raise ProtocolError(
                "unknown-request", f"no step {msg.step} of request {msg.req} waits here"
            )
        vocab = self.node.ckpt.config.vocab_size
        specs = msg.specs
        if req.scored:
            if len(specs) != 1 or specs[0] != TensorSpec("float32", (req.scored,)):
                raise ProtocolError("bad-tensor", f"a score is float32 [{req.scored}]")
            req.result.set_result(msg.tensor(0))
            return
        asked = req.params.logprobs  # then: ids always, and [lse, top logits], top ids
        ok = len(specs) in ((4,) if asked >= 0 else (1, 2))
        ok = ok and specs[0].dtype == "float32" and len(specs[0].shape) == 1
        n = specs[0].shape[0] if ok else 0
        if len(specs) >= 2:
            ok = ok and specs[1].dtype == "int64" and specs[1].shape == (n,)
        if asked >= 0:
            k = min(asked, vocab)
            ok = ok and specs[2] == TensorSpec("float32", (1 + k,))
            ok = ok and specs[3] == TensorSpec("int64", (k,))
        if not ok or not 0 < n <= vocab or (len(specs) == 1 and n != vocab):
            raise ProtocolError("bad-tensor", "a result is float32 logits [n] and int64 ids [n]"
                                " (and log-probabilities where asked)")  # fmt: skip
        ids = msg.tensor(1) if len(specs) >= 2 else None
        tops = msg.tensor(3) if asked >= 0 else None
        for some in (ids, tops):
            if some is not None and some.numel() and not 0 <= int(some.min()) <= int(
                    some.max()) < vocab:  # fmt: skip
                raise ProtocolError("bad-tensor", "candidate ids outside the vocabulary")
        if asked < 0:
            req.result.set_result(Candidates(msg.tensor(0), ids))
            return
        head = msg.tensor(2)
        req.result.set_result(Candidates(msg.tensor(0), ids, float(head[0]), head[1:], tops))

    async def on_error(self, identity: bytes, msg: Message, host: str) -> None:
        code, text = msg.body["code"], msg.body["message"]
        req = self._waiting(msg.req)
        if req and req.result and not req.result.done():
            req.result.set_exception(RequestFailed(code, text))
            return
        if code == "version":
            log.error("a peer at %s refused us: %s", host or "?", text)
        else:
            log.info("error from %s: %s: %s", host or "self", code, text)
