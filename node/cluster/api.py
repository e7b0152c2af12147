"""The daemon's HTTP face: OpenAI's API, the cluster's status as a stream, and the web page.

aiohttp serves it from the daemon's own event loop, so a request through the API is the
same generation as one from `ringinfer generate --node`: this node is its requester, its
tokens come back through the same code, and waiting for them never blocks the ring or
heartbeats. What the bodies mean and the answers look like is protocol/openai.py.

Nothing a client sends runs long on that loop: bodies are parsed, checked and tokenized in
worker threads, and a prompt is refused by its byte length before it is tokenized. And no
web page can drive it: what a browser lets any page send (another Host, as DNS rebinding
makes it; another Origin; a text/plain body) is refused before any route runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import hmac
import ipaddress
import json
import logging
import math
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web

from discovery.interfaces import is_loopback
from node.cluster.status import status
from node.engine.grammar import BadGrammar, Constraint, grammar_of
from node.engine.local import PromptTooLong
from node.engine.reasoning import (
    CONTENT,
    PLAIN,
    REASONING,
    THINKING,
    ReplySplitter,
    reply_format,
    split_calls,
)
from node.engine.sampling import SamplingParams
from node.engine.tokenizer import BadTemplateVariables, too_many_bytes
from node.engine.tool_calls import CALL, call_format, call_grammar, forced_start, prepared
from node.errors import RinginferError
from protocol import anthropic, ollama, responses
from protocol.openai import (
    Answer,
    APIError,
    CompletionRequest,
    logprobs_of,
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
RETRYABLE = ("no-plan", "node-gone", "stopping", "wrong-epoch", "not-a-stage", "busy",
             "stage-failed")
MIN_KEY_BYTES = 16  # 128 bits: not worth guessing, even at the rate the back-off leaves
MAX_VALUES = 2**20  # in one body: 4096 messages need ~20k; a prompt's text ~1 a token
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_ERROR_TEXT = 300  # an internal error's message as a client sees it: one line, this long


@dataclass
class Listener:
    """The API's socket, bound when the daemon starts (a taken port fails at once)."""

    sock: socket.socket
    address: str
    key: str | None  # what `Authorization: Bearer` must carry; None: no key asked
    hosts: frozenset[str] = LOOPBACK_NAMES  # the names `Host` may carry (IP addresses too)
    tls: ssl.SSLContext | None = None  # None: plain HTTP

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.address}/"

    @property
    def key_in_clear(self) -> bool:
        """Whether clients send the key as plain text over a network (a problem in status)."""
        host = self.address.rpartition(":")[0].strip("[]")
        return self.key is not None and self.tls is None and not is_loopback(host)


def bind(
    address: str, key_file: Path | None, insecure: bool, hosts: list[str] | None = None,
    tls_cert: Path | None = None, tls_key: Path | None = None,
) -> Listener | None:  # fmt: skip
    """`--api HOST:PORT` (or `off`) as a bound socket; refuses to serve the network unkeyed.
    `hosts`: names besides loopback and HOST that clients reach it by (`--api-host`)."""
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
    tls = _tls_context(tls_cert, tls_key)
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
    names = LOOPBACK_NAMES | {_host_name(n) for n in [host, *(hosts or [])]}
    return Listener(sock, address, key, names, tls)


def _read_key(path: Path) -> str:
    try:
        key = path.read_text().strip()
    except OSError as e:
        raise RinginferError(f"cannot read --api-key-file {path}: {e.strerror}") from None
    if not key:
        raise RinginferError(f"--api-key-file {path} is empty")
    if len(key.encode()) < MIN_KEY_BYTES:
        raise RinginferError(
            f"--api-key-file {path} holds a {len(key.encode())}-byte key, too short to keep "
            f"guessers out: use at least {MIN_KEY_BYTES} bytes (e.g. `openssl rand -hex 16`)"
        )
    return key


def _tls_context(cert: Path | None, key: Path | None) -> ssl.SSLContext | None:
    """`--api-tls-cert` and `--api-tls-key` as a server's TLS context (both, or neither)."""
    if cert is None and key is None:
        return None
    if cert is None or key is None:
        raise RinginferError("--api-tls-cert and --api-tls-key go together: give both files")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise RinginferError(f"cannot load --api-tls-cert {cert} with --api-tls-key {key}: "
                             f"{why}") from None  # fmt: skip
    return context


def _host_name(host: str) -> str:
    """A Host header's name, or a listening address's: no port, no brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        host = name
    return host.rstrip(".")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# Back-off on wrong API keys, per client address (IPv6 clients by their /64): a few are
# free, then each closes the address out for twice as long as the one before.
FREE_FAILURES = 5
FIRST_WAIT_S = 1.0
MAX_WAIT_S = 300.0
FORGET_S = 900.0  # failures this old are forgotten
MAX_CLIENTS = 4096  # addresses remembered; the stalest go first


@dataclass
class Backoff:
    """Wrong keys per client address and until when each is refused: a guesser gets a few
    tries, then one more each 1, 2, 4 ... 300 s. Bounded memory, whoever sends."""

    table: OrderedDict[str, tuple[int, float, float]] = field(default_factory=OrderedDict)

    def wait(self, who: str, now: float) -> float:
        """Seconds until `who` may try a key again (0: now)."""
        entry = self.table.get(who)
        return max(0.0, entry[2] - now) if entry else 0.0

    def failed(self, who: str, now: float) -> None:
        failures, last, _ = self.table.pop(who, (0, now, 0.0))
        failures = 1 if now - last > FORGET_S else failures + 1
        until = 0.0
        if failures >= FREE_FAILURES:
            until = now + min(MAX_WAIT_S, FIRST_WAIT_S * 2 ** (failures - FREE_FAILURES))
        self.table[who] = (failures, now, until)
        while len(self.table) > MAX_CLIENTS:
            self.table.popitem(last=False)

    def passed(self, who: str) -> None:
        self.table.pop(who, None)


def _client(request: web.Request) -> str:
    """Who a request is from, for the back-off: its address, an IPv6 one's /64."""
    remote = request.remote or "?"
    try:
        ip = ipaddress.ip_address(remote)
    except ValueError:
        return remote
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class API:
    """The HTTP server of one daemon."""

    def __init__(self, daemon: Daemon, listener: Listener) -> None:
        self.daemon, self.listener = daemon, listener
        self.created = int(time.time())
        self.backoff = Backoff()
        # Bodies are parsed one at a time (a hostile one holds the GIL a while: one such is
        # enough); prompts are tokenized beside them (the tokenizer lets go of the GIL).
        self.parsing = ThreadPoolExecutor(1, thread_name_prefix="api-json")
        self.tokenizing = ThreadPoolExecutor(2, thread_name_prefix="api-tokens")
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._errors])
        app.add_routes([
            web.get("/", self.page),
            web.get("/static/{name}", self.static),
            web.get("/health", self.health),
            web.get("/v1/models", self.models),
            web.get("/v1/models/{model:.+}", self.model),
            web.post("/v1/chat/completions", self.chat),
            web.post("/v1/completions", self.completions),
            web.post("/v1/responses", self.responses),
            web.post("/v1/messages", self.messages),
            web.post("/v1/messages/count_tokens", self.count_tokens),
            web.get("/api/version", self.ollama_version),
            web.get("/api/tags", self.ollama_tags),
            web.post("/api/show", self.ollama_show),
            web.post("/api/chat", self.ollama_chat),
            web.post("/api/generate", self.ollama_generate),
            web.get("/v1/status", self.status),
            web.get("/v1/status/stream", self.status_stream),
        ])  # fmt: skip
        # A client that disconnects cancels its handler, and so its request in the ring.
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        self.closing = asyncio.Event()

    async def start(self) -> None:
        await self.runner.setup()
        await web.SockSite(self.runner, self.listener.sock, shutdown_timeout=1.0,
                           ssl_context=self.listener.tls).start()  # fmt: skip
        keyed = "with an API key" if self.listener.key else "without a key"
        log.info("API and web page on %s (%s)", self.listener.url, keyed)
        if self.listener.key_in_clear:
            log.warning("the API key crosses the network in plain HTTP: give --api-tls-cert "
                        "and --api-tls-key")  # fmt: skip

    async def stop(self) -> None:
        self.closing.set()
        await self.runner.cleanup()
        self.parsing.shutdown(wait=False, cancel_futures=True)
        self.tokenizing.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- plumbing

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every failure as OpenAI's error JSON (Anthropic's on its routes); what a browser
        lets any page send refused first, then a key checked on the API's routes."""
        began = time.perf_counter()
        try:
            self._guard(request)
            if request.path.startswith(("/v1/", "/api/")):
                self._authorize(request)
            if request.method == "POST" and request.content_type != "application/json":
                why = f"the body must be application/json, not {request.content_type[:80]}"
                raise APIError(415, why, code="unsupported_media_type")
            response = await handler(request)
        except APIError as e:
            response = _error_response(e, request.path)
        except web.HTTPException as e:  # aiohttp's own: no such route, method, body too big
            if e.status < 400:
                raise
            e = APIError(e.status, _http_reason(e), "invalid_request_error" if e.status < 500
                         else "server_error")  # fmt: skip
            response = _error_response(e, request.path)
        except Exception as e:
            log.exception("API: internal error in %s %s", request.method, request.path)
            response = _error_response(APIError(500, _internal(e), "server_error"), request.path)
        if request.path != "/v1/status/stream":
            log.info("API: %s %s %d in %.3fs", request.method, request.path, response.status,
                     time.perf_counter() - began)  # fmt: skip
        return response

    def _guard(self, request: web.Request) -> None:
        """Refuse what only a web page of another site sends: a Host that is none of ours
        (DNS rebinding: a name of the attacker's resolved to us; an IP address cannot be
        one), and an Origin other than the page's own."""
        header = request.headers.get("Host")
        host = _host_name(header) if header is not None else None
        if host is not None and host not in self.listener.hosts and not _is_ip(host):
            raise APIError(421, f"this API does not answer to the name {host[:80]!r} (it "
                           "may be a DNS rebinding): use its address, or name it with "
                           "--api-host", code="misdirected_request")  # fmt: skip
        origin = request.headers.get("Origin")
        if origin is not None and not _same_origin(origin, request.scheme, header or ""):
            raise APIError(403, f"requests from a page at {origin[:80]!r} are refused: only "
                           "this daemon's own page may use its API from a browser",
                           code="cross_origin")  # fmt: skip

    def _authorize(self, request: web.Request) -> None:
        """The key, where one is asked; a client that sent wrong ones waits (429) first."""
        key = self.listener.key
        if key is None:
            return
        who, now = _client(request), time.monotonic()
        wait = self.backoff.wait(who, now)
        if wait:
            raise APIError(429, f"too many wrong API keys from {request.remote}: try again "
                           f"in {math.ceil(wait)} s", "rate_limit_error", "too_many_wrong_keys",
                           headers={"Retry-After": str(math.ceil(wait))})  # fmt: skip
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:  # Anthropic's clients send x-api-key
            scheme, given = "bearer", request.headers.get("x-api-key", "")
        if not given:
            why = ("no API key: send 'Authorization: Bearer KEY' or 'x-api-key: KEY' (the "
                   "daemon's --api-key-file)")  # fmt: skip
            raise APIError(401, why, "authentication_error", "missing_api_key")
        if not hmac.compare_digest(given.strip().encode(), key.encode()):
            self.backoff.failed(who, now)
            raise APIError(401, "wrong API key", "authentication_error", "invalid_api_key")
        self.backoff.passed(who)

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
        ask = await self._ask(request, functools.partial(parse_request, chat=chat))
        self._check_model(ask.model)
        return await self._serve(request, ask, OPENAI)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """OpenAI's Responses API (what Codex-style agents speak)."""
        ask = await self._ask(request, responses.parse_responses)
        self._check_model(ask.model)
        return await self._serve(request, ask, RESPONSES)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """Anthropic's Messages API. Any model name is taken (Claude Code asks for its own
        by default): the answer names the model served."""
        return await self._serve(request, await self._ask(request, anthropic.parse_messages),
                                 ANTHROPIC)  # fmt: skip

    async def count_tokens(self, request: web.Request) -> web.Response:
        ask = await self._ask(request, functools.partial(anthropic.parse_messages,
                                                         count_only=True))  # fmt: skip
        loop = asyncio.get_running_loop()
        prompt, _ = await loop.run_in_executor(self.tokenizing, self._tokens, ask)
        return web.json_response({"input_tokens": len(prompt)})

    async def ollama_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._ollama(request, chat=True)

    async def ollama_generate(self, request: web.Request) -> web.StreamResponse:
        return await self._ollama(request, chat=False)

    async def _ollama(self, request: web.Request, chat: bool) -> web.StreamResponse:
        ask = await self._ask(request, functools.partial(ollama.parse_chat, chat=chat))
        self._check_model(ask.model)
        return await self._serve(request, ask, OLLAMA_CHAT if chat else OLLAMA_GENERATE)

    async def _ask(self, request: web.Request, read: Reader) -> CompletionRequest:
        """The body read into a request in the parsing thread (_parse: limits and checks)."""
        raw = await _read_body(request)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.parsing, _parse, raw, self.context, read)

    async def ollama_version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": ollama.VERSION})

    async def ollama_tags(self, request: web.Request) -> web.Response:
        shape = self.daemon.shape
        size = shape.held(0, shape.n_layers) + shape.ends(True, True)
        return web.json_response(ollama.tags(self.daemon.ckpt.name, size, self.created,
                                             _details(self.daemon)))  # fmt: skip

    async def ollama_show(self, request: web.Request) -> web.Response:
        self._check_model((await self._ask(request, ollama.parse_show)).model)
        d = self.daemon
        arch = d.shape.architecture
        return web.json_response({
            "modelfile": "", "parameters": "", "template": d.tokenizer.chat_template or "",
            "details": _details(d),
            "model_info": {"general.architecture": arch, f"{arch}.context_length": self.context,
                           "general.parameter_count": d.shape.params},
            "capabilities": ["completion", "tools"] if d.tokenizer.chat_template else
            ["completion"],
            "modified_at": ollama.now(),
        })  # fmt: skip

    async def _serve(
        self, request: web.Request, ask: CompletionRequest, dialect: str
    ) -> web.StreamResponse:
        """One request through the ring, answered in `dialect`: OpenAI's, Anthropic's or
        Ollama's."""
        self._check_live()
        loop = asyncio.get_running_loop()
        prompt, start = await loop.run_in_executor(self.tokenizing, self._tokens, ask)
        tokenizer = self.daemon.tokenizer
        reply = reply_format(tokenizer, prompt) if ask.chat else PLAIN
        calls = None
        if ask.tools and ask.tool_choice != "none":
            calls = call_format(tokenizer.chat_template, tokenizer.harmony)
        if reply == THINKING and (start or ask.grammar is not None):
            start = "</think>\n\n" + start  # the thought the prompt opened, closed at once
        prompt = prompt + tokenizer.encode(start, add_special=False) if start else prompt
        shape = Reply(reply, calls, start, ask.parallel_tool_calls)
        constraint = None
        if ask.grammar is not None:
            constraint = await loop.run_in_executor(self.tokenizing, self._constraint, ask)
        queue: asyncio.Queue[Message] = asyncio.Queue()
        params = SamplingParams(ask.temperature, ask.top_k, ask.top_p, ask.seed,
                                logprobs=ask.logprobs)  # fmt: skip
        try:
            req = self.daemon.requester.new_request(
                queue.put, prompt, ask.max_tokens, params, ask.stop, ask.ignore_eos, constraint
            )  # fmt: skip
        except PromptTooLong as e:
            raise APIError(413, str(e), code="context_length_exceeded",
                           param="messages" if ask.chat else "prompt") from None  # fmt: skip
        except RinginferError as e:
            raise APIError(400, str(e)) from None
        task = self.daemon.requester.start(req)
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
                write = {OPENAI: self._stream, ANTHROPIC: self._anthropic_stream,
                         RESPONSES: self._responses_stream,
                         OLLAMA_CHAT: functools.partial(self._ollama_stream, messages=True),
                         OLLAMA_GENERATE: functools.partial(self._ollama_stream, messages=False),
                         }[dialect]  # fmt: skip
                return await write(request, ask, _replies(first, queue, shape), len(prompt))
            while (msg := await queue.get()).kind != Kind.DONE:
                if msg.kind == Kind.ERROR:
                    raise _ring_error(msg)
            result = msg.body["result"]
            text_of = self._token_text
            whole = {OPENAI: functools.partial(_openai_whole, text_of=text_of),
                     ANTHROPIC: _anthropic_whole,
                     RESPONSES: _responses_whole,
                     OLLAMA_CHAT: functools.partial(_ollama_whole, messages=True),
                     OLLAMA_GENERATE: functools.partial(_ollama_whole, messages=False),
                     }[dialect]  # fmt: skip
            return web.json_response(whole(ask, self.daemon.ckpt.name, result, len(prompt), shape))
        finally:
            if not task.done():  # the client went away: every stage frees the request
                task.cancel()

    def _tokens(self, ask: CompletionRequest) -> tuple[list[int], str]:
        """The prompt's tokens, in a worker thread: the chat template's rendering and the
        tokenizer's work (~1 s a MiB) never hold up the event loop. With tools, also the
        text a forced call begins with (tool_choice), to come after the prompt."""
        tokenizer = self.daemon.tokenizer
        if ask.chat and not tokenizer.chat_template:
            raise APIError(400, "this model has no chat template: use /v1/completions")
        tools = ask.tools if ask.tool_choice != "none" else []
        start = ""
        if tools and ask.tool_choice != "auto":
            fmt = call_format(tokenizer.chat_template, tokenizer.harmony)
            start = forced_start(fmt, ask.forced_tool)
            arguments = call_grammar(fmt, tools, ask.forced_tool)
            if ask.grammar is None and arguments is not None:  # the call as its schema says
                ask.grammar = ("tools", arguments)
        try:
            if ask.chat:
                messages, offered = prepared(ask.messages, tools, tokenizer.chat_template)
                prompt = tokenizer.encode_chat(messages, ask.template_kwargs, offered)
            else:
                prompt = tokenizer.encode(ask.prompt)
        except BadTemplateVariables as e:
            raise APIError(400, str(e), param="chat_template_kwargs") from None
        except RinginferError as e:
            raise APIError(400, str(e)) from None
        return prompt, start

    def _token_text(self, token: int) -> str:
        return self.daemon.tokenizer.decode([token])

    def _constraint(self, ask: CompletionRequest) -> Constraint | None:
        """The request's grammar compiled for this model, in a worker thread (a big schema
        takes a while); one that does not compile is a 400, but a forced call's arguments
        whose schema llguidance cannot take (OpenAPI's `format: int32`) go unconstrained."""
        tokenizer, (kind, spec) = self.daemon.tokenizer, ask.grammar
        try:
            return Constraint(grammar_of(kind, spec), tokenizer.backend,
                              self.daemon.ckpt.config.vocab_size, tokenizer.stop_ids)  # fmt: skip
        except BadGrammar as e:
            if kind == "tools":
                log.info("API: a forced call's arguments go unconstrained: %s", e)
                return None
            param = kind if kind in ("grammar", "tools") else "response_format"
            raise APIError(400, str(e), param=param) from None

    async def _stream(
        self, request: web.Request, ask: CompletionRequest, replies: Any, prompt_tokens: int
    ) -> web.StreamResponse:
        """OpenAI's server-sent events of a reply: its thought's deltas (reasoning_content),
        then its answer's (content) and tool calls."""
        response = await _event_stream(request)
        answer = Answer(ask.chat, self.daemon.ckpt.name)
        called = 0

        async def send(obj: dict[str, Any]) -> None:
            await response.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        try:
            if ask.chat:  # OpenAI's first chat chunk says who speaks
                await send(answer.chunk("", usage=ask.include_usage, first=True))
            async for kind, what in replies:
                if kind in (REASONING, CONTENT):
                    await send(answer.chunk(what, usage=ask.include_usage,
                                            reasoning=kind == REASONING))  # fmt: skip
                elif kind == CALL and (ask.parallel_tool_calls or not called):
                    await send(answer.call_chunk(called, what.to_openai(), ask.include_usage))
                    called += 1
                elif kind == LOGPROB:
                    lp = logprobs_of(ask.chat, [what], self._token_text)
                    await send(answer.logprobs_chunk(lp, ask.include_usage))
                elif kind == QUEUED:  # an SSE comment: clients skip it, people see it
                    await response.write(f": queued {what[0]} of {what[1]}\n\n".encode())
                elif kind == ERROR:  # headers are gone: the error is an event
                    await send(what.to_json())
                elif kind == DONE:
                    finish = "tool_calls" if called else what["finish_reason"]
                    await send(answer.chunk(None, finish, ask.include_usage))
                    if ask.include_usage:
                        use = usage(prompt_tokens, len(what["tokens"]))
                        await send(answer.usage_chunk(use))
                    await response.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            raise asyncio.CancelledError from None  # the client went away mid-stream
        return response

    async def _anthropic_stream(
        self, request: web.Request, ask: CompletionRequest, replies: Any, prompt_tokens: int
    ) -> web.StreamResponse:
        """Anthropic's events: message_start, a content block at a time (a thought where
        thinking was asked for, text, or a tool_use whose input comes as one JSON delta),
        message_delta, message_stop."""
        response = await _event_stream(request)
        answer = anthropic.MessageAnswer(self.daemon.ckpt.name, prompt_tokens)
        blocks, open_kind, called = 0, None, False  # open_kind: the block being written

        async def send(kind: str, data: dict[str, Any]) -> None:
            await response.write(anthropic.event(kind, {"type": kind, **data}))

        async def close_text() -> None:
            nonlocal blocks, open_kind
            if open_kind == REASONING:  # a thought's block ends with its (empty) signature
                await send("content_block_delta", {"index": blocks, "delta": {
                    "type": "signature_delta", "signature": ""}})
            if open_kind is not None:
                await send("content_block_stop", {"index": blocks})
                blocks, open_kind = blocks + 1, None

        try:
            await response.write(anthropic.event("message_start", answer.start()))
            async for kind, what in replies:
                if kind == CONTENT or (kind == REASONING and ask.show_thinking):
                    if open_kind != kind:
                        await close_text()
                        block = (anthropic.text_block("") if kind == CONTENT else
                                 anthropic.thinking_block(""))  # fmt: skip
                        await send("content_block_start", {"index": blocks,
                                                           "content_block": block})
                        open_kind = kind
                    delta = ({"type": "text_delta", "text": what} if kind == CONTENT else
                             {"type": "thinking_delta", "thinking": what})  # fmt: skip
                    await send("content_block_delta", {"index": blocks, "delta": delta})
                elif kind == CALL and (ask.parallel_tool_calls or not called):
                    await close_text()
                    block = anthropic.tool_use_block(what.id, what.name, what.arguments)
                    await send("content_block_start", {
                        "index": blocks, "content_block": {**block, "input": {}}})
                    await send("content_block_delta", {"index": blocks, "delta": {
                        "type": "input_json_delta", "partial_json": what.arguments}})
                    await send("content_block_stop", {"index": blocks})
                    blocks, called = blocks + 1, True
                elif kind == QUEUED:
                    await send("ping", {})
                elif kind == ERROR:
                    await response.write(anthropic.event("error", anthropic.error_json(what)))
                elif kind == DONE:
                    await close_text()
                    stop = anthropic.stop_reason(what["finish_reason"],
                                                 what.get("stop_sequence"), called)  # fmt: skip
                    await response.write(anthropic.event("message_delta", answer.delta(
                        stop, what.get("stop_sequence"), len(what["tokens"]))))
                    await send("message_stop", {})
        except ConnectionResetError:
            raise asyncio.CancelledError from None
        return response


    async def _ollama_stream(
        self, request: web.Request, ask: CompletionRequest, replies: Any, prompt_tokens: int,
        messages: bool = True,
    ) -> web.StreamResponse:  # fmt: skip
        """Ollama's NDJSON: a line a piece of the reply (chat's `messages`: the thought in
        message.thinking, tool calls in message.tool_calls; generate's: `response`), then
        the last line with the counts."""
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        model, called = self.daemon.ckpt.name, 0
        try:
            async for kind, what in replies:
                if kind in (REASONING, CONTENT) and (messages or kind == CONTENT):
                    line = ollama.part(model, messages, what, thinking=kind == REASONING)
                elif kind == CALL and messages and (ask.parallel_tool_calls or not called):
                    called += 1
                    line = ollama.part(model, True, "", calls=[
                        ollama.ollama_call(what.name, what.arguments)])
                elif kind == ERROR:
                    line = ollama.error_json(what)
                elif kind == DONE:
                    line = ollama.done(model, messages, what)
                else:
                    continue
                await response.write(ollama.line(line))
        except ConnectionResetError:
            raise asyncio.CancelledError from None
        return response


    async def _responses_stream(
        self, request: web.Request, ask: CompletionRequest, replies: Any, prompt_tokens: int
    ) -> web.StreamResponse:
        """The Responses API's events: the response created, an output item at a time (a
        message whose text comes as deltas, or a function call whose arguments come as one
        delta), the response completed with its usage."""
        response = await _event_stream(request)
        answer = responses.ResponseAnswer(ask, self.daemon.ckpt.name)
        output: list[dict[str, Any]] = []
        text, item = "", None  # the open message: its text and id

        async def send(kind: str, **data: Any) -> None:
            await response.write(answer.event(kind, **data))

        async def close_text() -> None:
            nonlocal text, item
            if item is None:
                return
            at = {"item_id": item, "output_index": len(output), "content_index": 0}
            await send("response.output_text.done", **at, text=text)
            await send("response.content_part.done", **at, part=responses.text_part(text))
            output.append(responses.message_item(text, item))
            await send("response.output_item.done", output_index=len(output) - 1,
                       item=output[-1])  # fmt: skip
            text, item = "", None

        try:
            await send("response.created", response=answer.response([], "in_progress"))
            await send("response.in_progress", response=answer.response([], "in_progress"))
            async for kind, what in replies:
                if kind == CONTENT:
                    if item is None:
                        opened = responses.message_item("", status="in_progress")
                        item = opened["id"]
                        await send("response.output_item.added", output_index=len(output),
                                   item=opened)  # fmt: skip
                        await send("response.content_part.added", item_id=item,
                                   output_index=len(output), content_index=0,
                                   part=responses.text_part(""))  # fmt: skip
                    text += what
                    await send("response.output_text.delta", item_id=item,
                               output_index=len(output), content_index=0, delta=what)
                elif kind == CALL and (ask.parallel_tool_calls or not any(
                        o["type"] == "function_call" for o in output)):  # fmt: skip
                    await close_text()
                    call = responses.call_item(what.id, what.name, what.arguments)
                    at = {"item_id": call["id"], "output_index": len(output)}
                    await send("response.output_item.added", output_index=len(output),
                               item={**call, "arguments": "", "status": "in_progress"})
                    await send("response.function_call_arguments.delta", **at,
                               delta=what.arguments)  # fmt: skip
                    await send("response.function_call_arguments.done", **at,
                               arguments=what.arguments)  # fmt: skip
                    output.append(call)
                    await send("response.output_item.done", output_index=len(output) - 1,
                               item=call)  # fmt: skip
                elif kind == ERROR:
                    await send("error", code=what.code, message=str(what), param=what.param)
                elif kind == DONE:
                    await close_text()
                    use = responses.usage(prompt_tokens, len(what["tokens"]))
                    status = _responses_status(what, output)
                    await send("response.completed" if status == "completed" else
                               "response.incomplete",
                               response=answer.response(output, status, use))  # fmt: skip
        except ConnectionResetError:
            raise asyncio.CancelledError from None
        return response


# The APIs a reply is written in.
OPENAI, ANTHROPIC, OLLAMA_CHAT, OLLAMA_GENERATE = "openai", "anthropic", "ollama-chat", "ollama"
RESPONSES = "responses"
# What _replies yields besides reply parts (reasoning.CONTENT, REASONING, tool_calls.CALL).
QUEUED, ERROR, DONE, LOGPROB = "queued", "error", "done", "logprob"


async def _replies(first: Message, queue: asyncio.Queue[Message], shape: Reply) -> Any:
    """A streamed reply's events as (kind, what): its parts as its format writes them
    (text, thought, calls), where it waits in the queue (place, of how many), the ring's
    error (APIError), and at the end the generation's result."""
    splitter = ReplySplitter(shape.fmt, shape.calls)
    for part in splitter.push(shape.start) if shape.start else []:
        yield part
    msg = first
    while True:
        if msg.kind == Kind.TOKEN and msg.body["text"]:
            for part in splitter.push(msg.body["text"]):
                yield part
        if msg.kind == Kind.TOKEN and "logprob" in msg.body:
            yield LOGPROB, msg.body["logprob"]
        elif msg.kind == Kind.QUEUED:
            yield QUEUED, (msg.body["position"], msg.body["queued"])
        elif msg.kind == Kind.ERROR:
            yield ERROR, _ring_error(msg)
            return
        elif msg.kind == Kind.DONE:
            for part in splitter.flush():
                yield part
            yield DONE, msg.body["result"]
            return
        msg = await queue.get()


def _calls_of(result: dict[str, Any], shape: Reply) -> tuple[str, str, list[Any]]:
    thought, text, calls = split_calls(shape.fmt, shape.start + result["text"], shape.calls)
    return thought, text, calls[: None if shape.parallel else 1]


def _openai_whole(
    ask: CompletionRequest, model: str, result: dict[str, Any], prompt_tokens: int, shape: Reply,
    text_of: Callable[[int], str],
) -> dict[str, Any]:  # fmt: skip
    thought, text, calls = _calls_of(result, shape)
    use = usage(prompt_tokens, len(result["tokens"]))
    answer = Answer(ask.chat, model)
    lp = logprobs_of(ask.chat, result.get("logprobs", []), text_of) if ask.logprobs >= 0 else None
    return answer.whole(text, result["finish_reason"], use, thought,
                        [c.to_openai() for c in calls], lp)  # fmt: skip


def _ollama_whole(
    ask: CompletionRequest, model: str, result: dict[str, Any], prompt_tokens: int, shape: Reply,
    messages: bool = True,
) -> dict[str, Any]:  # fmt: skip
    thought, text, calls = _calls_of(result, shape)
    return ollama.done(model, messages, result, text, thought,
                       [ollama.ollama_call(c.name, c.arguments) for c in calls])  # fmt: skip


def _details(daemon: Daemon) -> dict[str, Any]:
    """The model as Ollama describes one: family, size, how its weights are held."""
    shape, path = daemon.shape, str(daemon.ckpt.path)
    return ollama.details(shape.architecture, shape.params, daemon.quantization,
                          "gguf" if path.endswith(".gguf") else "safetensors")  # fmt: skip


def _responses_whole(
    ask: CompletionRequest, model: str, result: dict[str, Any], prompt_tokens: int, shape: Reply
) -> dict[str, Any]:
    _, text, calls = _calls_of(result, shape)
    output = [responses.message_item(text)] if text else []
    output += [responses.call_item(c.id, c.name, c.arguments) for c in calls]
    use = responses.usage(prompt_tokens, len(result["tokens"]))
    answer = responses.ResponseAnswer(ask, model)
    return answer.response(output, _responses_status(result, output), use)


def _responses_status(result: dict[str, Any], output: list[dict[str, Any]]) -> str:
    """incomplete where max_output_tokens cut the reply short (and it made no call)."""
    called = any(o["type"] == "function_call" for o in output)
    return "incomplete" if result["finish_reason"] == "length" and not called else "completed"


def _anthropic_whole(
    ask: CompletionRequest, model: str, result: dict[str, Any], prompt_tokens: int, shape: Reply
) -> dict[str, Any]:
    thought, text, calls = _calls_of(result, shape)
    content = [anthropic.thinking_block(thought)] if thought and ask.show_thinking else []
    content += [anthropic.text_block(text)] if text else []
    content += [anthropic.tool_use_block(c.id, c.name, c.arguments) for c in calls]
    stop = anthropic.stop_reason(result["finish_reason"], result.get("stop_sequence"),
                                 bool(calls))  # fmt: skip
    answer = anthropic.MessageAnswer(model, prompt_tokens)
    return answer.message(content, stop, result.get("stop_sequence"), len(result["tokens"]))


@dataclass(frozen=True)
class Reply:
    """How a chat reply is written: its reasoning format, its tool calls' format (None: no
    tools offered), the text it was made to begin with, whether several calls may stand."""

    fmt: str
    calls: str | None = None
    start: str = ""
    parallel: bool = True


async def _read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise APIError(413, f"the request body is over {MAX_BODY // 2**20} MiB") from None


Reader = Callable[[Any], CompletionRequest]  # a parsed body as a request (OpenAI's, Anthropic's)


def _parse(raw: bytes, context: int, read: Reader) -> CompletionRequest:
    """A body as a request, in a worker thread: a hostile one (millions of values, deep
    nesting, 16 MiB of prompt) costs that thread, is freed there, and is never tokenized.
    The collector waits meanwhile: it would walk the body's millions of containers once per
    700 of them, holding the GIL for seconds."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _checked(raw, context, read)
    except APIError as e:
        raise e.with_traceback(None) from None  # its frames hold the body: freed here
    finally:
        if collecting:
            gc.enable()


def _checked(raw: bytes, context: int, read: Reader) -> CompletionRequest:
    # Millions of small values cost the parser up to seconds with the GIL held (it has no
    # hook for arrays or strings); a request needs a few per message. Each value but the
    # first is after a ',' or opens an array or object: an upper bound, counted in strings too.
    values = raw.count(b",") + raw.count(b"[") + raw.count(b"{")
    if values > MAX_VALUES:
        raise APIError(400, f"the request body holds over {MAX_VALUES} values")
    try:  # the hooks are Python, so the thread lets go of the GIL between values
        body = json.loads(raw, object_pairs_hook=_object, parse_int=_integer,
                          parse_float=_finite, parse_constant=_constant)  # fmt: skip
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    try:
        ask = read(body)
    except APIError:
        raise
    except (TypeError, KeyError, AttributeError, ValueError, RecursionError) as e:
        # A shape no reader expected: the body's fault, never a 500 (read() checks fields).
        raise APIError(400, f"the request body is malformed: {type(e).__name__}") from None
    texts = [m["content"] for m in ask.messages] if ask.chat else [ask.prompt]
    too_long = too_many_bytes(texts, context)
    if too_long:
        raise APIError(413, too_long, code="context_length_exceeded",
                       param="messages" if ask.chat else "prompt")  # fmt: skip
    return ask


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return dict(pairs)


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # over Python's 4300 digits
        raise APIError(400, f"an integer of {len(text)} digits is out of range") from None


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise APIError(400, f"the number {text[:40]} is out of range (over a double's)")
    return value


def _constant(name: str) -> float:
    raise APIError(400, f"{name} is not a JSON number: numbers must be finite")


async def _event_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    })  # fmt: skip
    await response.prepare(request)
    return response


def _error_response(e: APIError, path: str = "") -> web.Response:
    body = (anthropic.error_json(e) if path.startswith("/v1/messages") else
            ollama.error_json(e) if path.startswith("/api/") else e.to_json())  # fmt: skip
    return web.json_response(body, status=e.status, headers=e.headers)


def _internal(e: Exception) -> str:
    """An internal error as a client sees it: its type and first line, never a trace."""
    lines = str(e).strip().splitlines()
    return f"internal error: {type(e).__name__}: {lines[0] if lines else ''}"[:MAX_ERROR_TEXT]


def _same_origin(origin: str, scheme: str, host: str) -> bool:
    """Whether a browser's Origin is the page's own: scheme, name and port as in Host."""
    try:
        return _where(origin) == _where(f"{scheme}://{host}")
    except ValueError:  # a port out of range, a broken IPv6 address
        return False


def _where(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port or DEFAULT_PORTS.get(parts.scheme)


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
        return ("no such route (see /v1/models, /v1/chat/completions, /v1/completions, "
                "/v1/messages)")
    if e.status == 405:
        return f"method not allowed here; use {e.headers.get('Allow', 'another method')}"
    return e.reason
