"""The daemon's HTTP face: OpenAI's API, the cluster's status as a stream, and the web page.

aiohttp serves it from the daemon's own event loop, so a request through the API is the
same generation as one from `ringinfer generate --node`: this node is its requester, its
tokens come back through the same code, and waiting for them never blocks the ring or
heartbeats. What the bodies mean and the answers look like is protocol/openai.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from discovery.interfaces import is_loopback
from node.cluster.status import status
from node.engine.local import PromptTooLong
from node.engine.reasoning import PLAIN, REASONING, ReplySplitter, reply_format, split_reply
from node.engine.sampling import SamplingParams
from node.engine.tokenizer import BadTemplateVariables
from node.errors import RinginferError
from protocol.openai import (
    Answer,
    APIError,
    CompletionRequest,
    model_card,
    model_list,
    parse_request,
    usage,
)
from protocol.wire import Kind, Message

if TYPE_CHECKING:
    from node.cluster.daemon import Daemon

log = logging.getLogger("ringinfer")

WEB = Path(__file__).parent / "web"
MAX_BODY = 16 * 2**20
RETRY_AFTER_S = 5
STATUS_EVERY_S = 0.5
# What a failed request's error code means to an HTTP client: worth retrying, or not.
RETRYABLE = ("no-plan", "node-gone", "stopping", "wrong-epoch", "not-a-stage", "busy")


@dataclass
class Listener:
    """The API's socket, bound when the daemon starts (a taken port fails at once)."""

    sock: socket.socket
    address: str
    key: str | None  # what `Authorization: Bearer` must carry; None: no key asked


def bind(address: str, key_file: Path | None, insecure: bool) -> Listener | None:
    """`--api HOST:PORT` (or `off`) as a bound socket; refuses to serve the network unkeyed."""
    if address == "off":
        return None
    host, sep, port_text = address.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise RinginferError(f"--api {address}: expected HOST:PORT or off")
    key = _read_key(key_file) if key_file else None
    if key is None and not insecure and not is_loopback(host):
        raise RinginferError(
            f"--api {address} is reachable from the network: give --api-key-file FILE "
            "(a secret clients send as 'Authorization: Bearer'), or --api-insecure to let "
            "anyone on the network use it"
        )
    try:
        infos = socket.getaddrinfo(host, int(port_text), type=socket.SOCK_STREAM)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(128)
    except OSError as e:
        raise RinginferError(
            f"cannot serve the API on {address}: {e.strerror} (another daemon there? pass "
            "--api HOST:PORT, or --api off)"
        ) from None
    sock.setblocking(False)
    return Listener(sock, address, key)


def _read_key(path: Path) -> str:
    try:
        key = path.read_text().strip()
    except OSError as e:
        raise RinginferError(f"cannot read --api-key-file {path}: {e.strerror}") from None
    if not key:
        raise RinginferError(f"--api-key-file {path} is empty")
    return key


class API:
    """The HTTP server of one daemon."""

    def __init__(self, daemon: Daemon, listener: Listener) -> None:
        self.daemon, self.listener = daemon, listener
        self.created = int(time.time())
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors])
        app.add_routes([
            web.get("/", self.page),
            web.get("/static/{name}", self.static),
            web.get("/health", self.health),
            web.get("/v1/models", self.models),
            web.get("/v1/models/{model:.+}", self.model),
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/completions", self.completions),
            web.get("/v1/status", self.status),
            web.get("/v1/status/stream", self.status_stream),
        ])  # fmt: skip
        # A client that disconnects cancels its handler, and so its request in the ring.
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        self.closing = asyncio.Event()

    async def start(self) -> None:
        await self.runner.setup()
        await web.SockSite(self.runner, self.listener.sock, shutdown_timeout=1.0).start()
        keyed = "with an API key" if self.listener.key else "without a key"
        log.info("API and web page on http://%s/ (%s)", self.listener.address, keyed)

    async def stop(self) -> None:
        self.closing.set()
        await self.runner.cleanup()

    # ---------------------------------------------------------------- plumbing

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every failure as OpenAI's error JSON; a key checked on the API's routes."""
        began = time.perf_counter()
        try:
            if request.path.startswith("/v1/"):
                self._authorize(request)
            response = await handler(request)
        except APIError as e:
            response = _error_response(e)
        except web.HTTPException as e:  # aiohttp's own: no such route, method, body too big
            if e.status < 400:
                raise
            e = APIError(e.status, _http_reason(e), "invalid_request_error" if e.status < 500
                         else "server_error")  # fmt: skip
            response = _error_response(e)
        except Exception as e:
            log.exception("API: internal error in %s %s", request.method, request.path)
            response = _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}",
                                                "server_error"))  # fmt: skip
        if request.path != "/v1/status/stream":
            log.info("API: %s %s %d in %.3fs", request.method, request.path, response.status,
                     time.perf_counter() - began)  # fmt: skip
        return response

    def _authorize(self, request: web.Request) -> None:
        key = self.listener.key
        if key is None:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            why = "no API key: send 'Authorization: Bearer KEY' (the daemon's --api-key-file)"
            raise APIError(401, why, "authentication_error", "missing_api_key")
        if not hmac.compare_digest(given.strip().encode(), key.encode()):
            raise APIError(401, "wrong API key", "authentication_error", "invalid_api_key")

    @property
    def context(self) -> int:
        return self.daemon.ckpt.config.max_seq_len

    def _check_model(self, name: str | None) -> None:
        served = self.daemon.ckpt.name
        if name is not None and name != served:
            raise APIError(404, f"model '{name}' is not served here; this cluster serves "
                           f"'{served}'", code="model_not_found", param="model")  # fmt: skip

    def _check_live(self) -> None:
        daemon = self.daemon
        if daemon.leaving.is_set():
            raise _unavailable("this daemon is shutting down", "stopping")
        plans = daemon.plans
        if plans.plan is None or plans.pending is not None:
            why = plans.error or f"no live plan yet ({plans.state()})"
            raise _unavailable(why, "no_live_plan")

    # ---------------------------------------------------------------- routes

    async def page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})

    async def static(self, request: web.Request) -> web.StreamResponse:
        path = WEB / request.match_info["name"]
        if path.parent != WEB or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    async def health(self, request: web.Request) -> web.Response:
        """200 while a plan is live (a load balancer's "ready"), else 503."""
        try:
            self._check_live()
        except APIError as e:
            return _error_response(e)
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(model_list(self.daemon.ckpt.name, self.context, self.created))

    async def model(self, request: web.Request) -> web.Response:
        self._check_model(request.match_info["model"])
        return web.json_response(model_card(self.daemon.ckpt.name, self.context, self.created))

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(status(self.daemon))

    async def status_stream(self, request: web.Request) -> web.StreamResponse:
        """The status object as server-sent events, each time it changes (for the page)."""
        response = await _event_stream(request)
        last, quiet = "", 0.0
        with contextlib.suppress(ConnectionResetError):
            while not self.closing.is_set():
                text = json.dumps(status(self.daemon))
                if text != last or quiet > 15:
                    await response.write(f"data: {text}\n\n".encode())
                    last, quiet = text, 0.0
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.closing.wait(), STATUS_EVERY_S)
                quiet += STATUS_EVERY_S
        return response

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        ask = parse_request(await _json_body(request), chat)
        self._check_model(ask.model)
        self._check_live()
        prompt = self._tokens(ask)
        reply = reply_format(self.daemon.tokenizer, prompt) if chat else PLAIN
        queue: asyncio.Queue[Message] = asyncio.Queue()
        params = SamplingParams(ask.temperature, ask.top_k, ask.top_p, ask.seed)
        try:
            req = self.daemon.requester.new_request(
                queue.put, prompt, ask.max_tokens, params, ask.stop, ask.ignore_eos
            )  # fmt: skip
        except PromptTooLong as e:
            raise APIError(413, str(e), code="context_length_exceeded",
                           param="messages" if chat else "prompt") from None  # fmt: skip
        except RinginferError as e:
            raise APIError(400, str(e)) from None
        task = self.daemon.requester.start(req)
        answer = Answer(chat, self.daemon.ckpt.name)
        try:
            first = await queue.get()  # ACCEPTED, or why not: a plain error answer still
            if first.kind == Kind.ERROR:
                raise _ring_error(first)
            if ask.stream:
                # The first token, or a place in the queue, or why not (the ring is full
                # and so is the queue: a 503 still, not an event in a 200 stream).
                first = await queue.get()
                if first.kind == Kind.ERROR:
                    raise _ring_error(first)
                return await self._stream(request, ask, answer, first, queue, len(prompt), reply)
            return await self._whole(answer, queue, len(prompt), reply)
        finally:
            if not task.done():  # the client went away: every stage frees the request
                task.cancel()

    def _tokens(self, ask: CompletionRequest) -> list[int]:
        tokenizer = self.daemon.tokenizer
        if ask.chat and not tokenizer.chat_template:
            raise APIError(400, "this model has no chat template: use /v1/completions")
        try:
            if ask.chat:
                prompt = tokenizer.encode_chat(ask.messages, ask.template_kwargs)
            else:
                prompt = tokenizer.encode(ask.prompt)
        except BadTemplateVariables as e:
            raise APIError(400, str(e), param="chat_template_kwargs") from None
        except RinginferError as e:
            raise APIError(400, str(e)) from None
        return prompt

    async def _whole(
        self, answer: Answer, queue: asyncio.Queue[Message], prompt_tokens: int, reply: str
    ) -> web.Response:
        while True:
            msg = await queue.get()
            if msg.kind == Kind.ERROR:
                raise _ring_error(msg)
            if msg.kind == Kind.DONE:
                result = msg.body["result"]
                use = usage(prompt_tokens, len(result["tokens"]))
                thought, text = split_reply(reply, result["text"])
                return web.json_response(answer.whole(text, result["finish_reason"], use, thought))

    async def _stream(
        self, request: web.Request, ask: CompletionRequest, answer: Answer, first: Message,
        queue: asyncio.Queue[Message], prompt_tokens: int, reply: str,
    ) -> web.StreamResponse:  # fmt: skip
        """Server-sent events of a reply: its thought's deltas (reasoning_content), then its
        answer's (content), told apart as its format (`reply`) writes them."""
        response = await _event_stream(request)
        splitter = ReplySplitter(reply)

        async def send(obj: dict[str, Any]) -> None:
            await response.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        async def send_parts(parts: list[tuple[str, str]]) -> None:
            for kind, text in parts:
                await send(answer.chunk(text, usage=ask.include_usage, reasoning=kind == REASONING))

        try:
            if ask.chat:  # OpenAI's first chat chunk says who speaks
                await send(answer.chunk("", usage=ask.include_usage, first=True))
            msg = first
            while True:
                if msg.kind == Kind.TOKEN and msg.body["text"]:
                    await send_parts(splitter.push(msg.body["text"]))
                elif msg.kind == Kind.QUEUED:  # an SSE comment: clients skip it, people see it
                    place, waiting = msg.body["position"], msg.body["queued"]
                    await response.write(f": queued {place} of {waiting}\n\n".encode())
                elif msg.kind == Kind.ERROR:  # headers are gone: the error is an event
                    await send(_ring_error(msg).to_json())
                    break
                elif msg.kind == Kind.DONE:
                    result = msg.body["result"]
                    await send_parts(splitter.flush())
                    await send(answer.chunk(None, result["finish_reason"], ask.include_usage))
                    if ask.include_usage:
                        use = usage(prompt_tokens, len(result["tokens"]))
                        await send(answer.usage_chunk(use))
                    await response.write(b"data: [DONE]\n\n")
                    break
                msg = await queue.get()
        except ConnectionResetError:
            raise asyncio.CancelledError from None  # the client went away mid-stream
        return response


async def _json_body(request: web.Request) -> Any:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise APIError(413, f"the request body is over {MAX_BODY // 2**20} MiB") from None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None


async def _event_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    })  # fmt: skip
    await response.prepare(request)
    return response


def _error_response(e: APIError) -> web.Response:
    return web.json_response(e.to_json(), status=e.status, headers=e.headers)


def _unavailable(why: str, code: str) -> APIError:
    return APIError(503, why, "server_error", code, headers={"Retry-After": str(RETRY_AFTER_S)})


def _ring_error(msg: Message) -> APIError:
    """A request the ring failed: retry later if the cluster is changing, else a 5xx."""
    code, text = msg.body["code"], msg.body["message"]
    if code in RETRYABLE:
        return _unavailable(text, code.replace("-", "_"))
    return APIError(504 if code == "timeout" else 500, text, "server_error",
                    code.replace("-", "_"))  # fmt: skip


def _http_reason(e: web.HTTPException) -> str:
    if e.status == 404:
        return "no such route (see /v1/models, /v1/chat/completions, /v1/completions)"
    if e.status == 405:
        return f"method not allowed here; use {e.headers.get('Allow', 'another method')}"
    return e.reason
