"""OpenAI's HTTP API as data: request bodies checked into what a generation needs, and the
objects the API answers with (completions, stream chunks, errors). Pure: the server is
node/cluster/api.py.

Fields are checked as OpenAI checks them: unknown ones are ignored, known ones of the wrong
type are a 400 naming the field, and features we do not have (n > 1, echo, suffix) are a
400 that says so rather than being silently dropped.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_TOOLS = 128  # as OpenAI's API: the tools of one request
MAX_TOOLS_CHARS = 2**20  # their JSON, all together: the prompt's length bounds it anyway
TOOL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
TOOL_CHOICES = ("none", "auto", "required")
MAX_STOPS = 4
MAX_STOP_CHARS = 1000  # a stop string is matched against the reply at every token
MAX_ERROR_CHARS = 1000  # an error's message: short, whatever value it quotes
MAX_MESSAGES = 4096  # per chat request: more is no conversation, only work for the server
MAX_TOKENS = 2**31 - 1  # max_tokens and top_k past any context or vocabulary
SEEDS = (-(2**63), 2**64 - 1)  # what torch's generators take
MAX_LOGPROBS = 20  # top_logprobs, as OpenAI bounds it


class APIError(Exception):
    """An answer other than 200: its HTTP status, and OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param
        self.headers = headers or {}

    def to_json(self) -> dict[str, Any]:
        return {
            "error": {"message": str(self)[:MAX_ERROR_CHARS], "type": self.kind,
                      "param": self.param, "code": self.code}
        }  # fmt: skip


@dataclass
class CompletionRequest:
    """What one /v1/chat/completions or /v1/completions body asks for."""

    chat: bool
    model: str | None
    messages: list[dict[str, str]] = field(default_factory=list)  # chat
    prompt: str = ""  # completions
    max_tokens: int | None = None  # None: up to the model's context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # llama.cpp's extension
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False  # llama.cpp's extension: generate max_tokens whatever comes
    # vLLM's and llama.cpp's: variables for the chat template (checked where it is rendered)
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    tools: list[dict[str, Any]] = field(default_factory=list)  # chat: OpenAI's tool objects
    tool_choice: str = "auto"  # none, auto, required, or the one function's name to call
    parallel_tool_calls: bool = True
    # A grammar the reply keeps to: (json_object, None), (json_schema, schema), (grammar, text)
    grammar: tuple[str, Any] | None = None
    logprobs: int = -1  # each token's log-probability and this many alternatives (-1: none)
    show_thinking: bool = False  # Anthropic's: the thought as blocks of its own, when asked

    @property
    def forced_tool(self) -> str | None:
        """The function a reply must call (tool_choice names one), else None."""
        return None if self.tool_choice in TOOL_CHOICES else self.tool_choice


def parse_request(body: Any, chat: bool) -> CompletionRequest:
    """A request body (parsed JSON) as a CompletionRequest, or an APIError(400)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    get = Fields(body)
    req = CompletionRequest(chat=chat, model=get.typed("model", str))
    if chat:
        req.messages = _messages(body.get("messages"))
        req.template_kwargs = get.typed("chat_template_kwargs", dict) or {}
        req.tools = parse_tools(get.typed("tools", list) or [])
        req.tool_choice = _tool_choice(body.get("tool_choice"), req.tools)
        parallel = get.typed("parallel_tool_calls", bool)
        req.parallel_tool_calls = True if parallel is None else parallel
    else:
        req.prompt = _prompt(body.get("prompt"))
    n = get.integer("n", low=1)
    if n is not None and n != 1:
        raise APIError(400, f"n: only 1 choice per request is supported, got {n}", param="n")
    for name in ("max_completion_tokens", "max_tokens"):  # the newer name wins
        value = get.integer(name, low=1, high=MAX_TOKENS)
        if value is not None:
            req.max_tokens = value
            break
    temperature = get.number("temperature", 0.0, 2.0)
    req.temperature = 1.0 if temperature is None else temperature
    top_p = get.number("top_p", 0.0, 1.0)
    req.top_p = top_p or 1.0  # 0 means "only the top token": greedy anyway
    if top_p == 0.0:
        req.temperature = 0.0
    req.top_k = get.integer("top_k", low=0, high=MAX_TOKENS) or 0
    req.seed = get.integer("seed", *SEEDS)
    req.stop = parse_stops(body.get("stop"))
    req.stream = bool(get.typed("stream", bool))
    options = get.typed("stream_options", dict) or {}
    include = options.get("include_usage")
    if include is not None and type(include) is not bool:
        raise APIError(400, "stream_options.include_usage must be a boolean",
                       param="stream_options.include_usage")  # fmt: skip
    req.include_usage = bool(include)
    req.ignore_eos = bool(get.typed("ignore_eos", bool))
    req.grammar = parse_format(get.typed("response_format", dict))
    grammar = get.typed("grammar", str)  # llama.cpp's extension: GBNF, or Lark
    if grammar is not None:
        req.grammar = ("grammar", grammar)
    if chat:  # logprobs: true, and top_logprobs alternatives (0-20)
        top = get.integer("top_logprobs", low=0, high=MAX_LOGPROBS)
        if get.typed("logprobs", bool):
            req.logprobs = top or 0
        elif top:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    else:  # the legacy form: logprobs is the number of alternatives (0-5)
        count = get.integer("logprobs", low=0, high=5)
        req.logprobs = -1 if count is None else count
    if not chat and body.get("tools") is not None:
        raise APIError(400, "tools are for /v1/chat/completions", param="tools")
    if get.integer("best_of", low=1) not in (None, 1):
        raise APIError(400, "best_of: only 1 is supported", param="best_of")
    if get.typed("echo", bool):
        raise APIError(400, "echo is not supported", param="echo")
    if not chat and get.typed("suffix", str):
        raise APIError(400, "suffix is not supported", param="suffix")
    return req


def parse_format(value: dict[str, Any] | None) -> tuple[str, Any] | None:
    """response_format: text (None), json_object, or json_schema with its schema."""
    kind = (value or {}).get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return ("json_object", None)
    if kind == "json_schema":
        spec = value.get("json_schema") if value else None
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise APIError(400, "response_format.json_schema.schema must be a JSON schema object",
                           param="response_format.json_schema.schema")  # fmt: skip
        return ("json_schema", schema)
    raise APIError(400, f"response_format.type must be text, json_object or json_schema, got "
                   f"{str(kind)[:40]!r}", param="response_format.type")  # fmt: skip


class Fields:
    """Typed reads of optional fields: absent or null is None, a wrong type a 400."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def typed(self, name: str, kind: type) -> Any:
        value = self.body.get(name)
        if value is not None and type(value) is not kind:
            why = f"{name} must be {_JSON_NAMES[kind]}, got {_json_type(value)}"
            raise APIError(400, why, param=name)
        return value

    def integer(self, name: str, low: int | None = None, high: int | None = None) -> int | None:
        value = self.typed(name, int)
        if value is not None and low is not None and value < low:
            raise APIError(400, f"{name} must be at least {low}, got {value}", param=name)
        if value is not None and high is not None and value > high:
            raise APIError(400, f"{name} must be at most {high}, got {value}", param=name)
        return value

    def number(self, name: str, low: float, high: float) -> float | None:
        value = self.body.get(name)
        if value is None:
            return None
        if type(value) not in (int, float):
            raise APIError(400, f"{name} must be a number, got {_json_type(value)}", param=name)
        if not low <= value <= high:
            raise APIError(400, f"{name} must be between {low:g} and {high:g}, got {value}",
                           param=name)  # fmt: skip
        return float(value)


# JSON's types as an error message names them (what a field must be, what it was).
_JSON_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               list: "an array", dict: "an object"}  # fmt: skip


def _json_type(value: Any) -> str:
    return _JSON_NAMES.get(type(value), "null")


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise APIError(400, "messages must be a non-empty array", param="messages")
    if len(value) > MAX_MESSAGES:
        raise APIError(400, f"messages: at most {MAX_MESSAGES} per request, got {len(value)}",
                       param="messages")  # fmt: skip
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object", param=where)
        role = m.get("role")
        if role not in ROLES:
            raise APIError(
                400, f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}",
                param=f"{where}.role",
            )  # fmt: skip
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        message = {"role": "system" if role == "developer" else role,
                   "content": _text(content, f"{where}.content")}  # fmt: skip
        if role == "assistant" and m.get("tool_calls") is not None:
            message["tool_calls"] = _calls(m["tool_calls"], f"{where}.tool_calls")
        if role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str):
                raise APIError(400, f"{where}.tool_call_id must be a string",
                               param=f"{where}.tool_call_id")  # fmt: skip
            message["tool_call_id"] = call_id
            if isinstance(m.get("name"), str):
                message["name"] = m["name"]
        out.append(message)
    return out


def _calls(value: Any, where: str) -> list[dict[str, Any]]:
    """An assistant message's earlier tool calls, their arguments parsed to an object (as
    chat templates render them)."""
    if not isinstance(value, list) or len(value) > MAX_TOOLS:
        raise APIError(400, f"{where} must be an array of at most {MAX_TOOLS} calls",
                       param=where)  # fmt: skip
    out = []
    for i, c in enumerate(value):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise APIError(400, f"{where}[{i}] must be a function call with a name",
                           param=f"{where}[{i}]")  # fmt: skip
        args = fn.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except (ValueError, RecursionError):
            raise APIError(400, f"{where}[{i}].function.arguments is not JSON",
                           param=f"{where}[{i}].function.arguments") from None  # fmt: skip
        if not isinstance(args, dict):
            raise APIError(400, f"{where}[{i}].function.arguments must be a JSON object",
                           param=f"{where}[{i}].function.arguments")  # fmt: skip
        out.append({"id": str(c.get("id", "")), "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})  # fmt: skip
    return out


def parse_tools(value: list[Any]) -> list[dict[str, Any]]:
    """OpenAI's tool objects: functions with a name, a description and a JSON schema."""
    if len(value) > MAX_TOOLS:
        raise APIError(400, f"tools: at most {MAX_TOOLS}, got {len(value)}", param="tools")
    if len(json.dumps(value)) > MAX_TOOLS_CHARS:
        raise APIError(400, f"tools: over {MAX_TOOLS_CHARS} characters of JSON", param="tools")
    out, names = [], set()
    for i, t in enumerate(value):
        where = f"tools[{i}]"
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict):
            raise APIError(400, f"{where} must be {{'type': 'function', 'function': {{...}}}}",
                           param=where)  # fmt: skip
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise APIError(400, f"{where}.function.name must be 1-64 letters, digits, '_', "
                           "'.' or '-'", param=f"{where}.function.name")  # fmt: skip
        if name in names:
            raise APIError(400, f"{where}: a second tool named {name!r}", param=where)
        names.add(name)
        if not isinstance(fn.get("parameters", {}), dict):
            raise APIError(400, f"{where}.function.parameters must be a JSON schema object",
                           param=f"{where}.function.parameters")  # fmt: skip
        if not isinstance(fn.get("description", ""), str):
            raise APIError(400, f"{where}.function.description must be a string",
                           param=f"{where}.function.description")  # fmt: skip
        out.append(t)  # as sent: templates write it as JSON, in the client's own order
    return out


def _tool_choice(value: Any, tools: list[dict[str, Any]]) -> str:
    """none, auto, required, or the name of the one function to call."""
    if value is None:
        return "auto" if tools else "none"
    if isinstance(value, str) and value in TOOL_CHOICES:
        name = None if value == "none" or tools else value
    elif isinstance(value, dict) and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        if not isinstance(name, str) or name not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools",
                           param="tool_choice")  # fmt: skip
        return name
    else:
        raise APIError(400, "tool_choice must be 'none', 'auto', 'required' or "
                       "{'type': 'function', 'function': {'name': ...}}",
                       param="tool_choice")  # fmt: skip
    if name is not None:
        raise APIError(400, f"tool_choice is {value!r} but the request has no tools",
                       param="tool_choice")  # fmt: skip
    return value


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or an array of text parts (images are refused)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise APIError(400, f"{where}: only text parts are supported", param=where)
            if not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}: a text part needs a string 'text'", param=where)
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(400, f"{where} must be a string or an array of text parts", param=where)


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise APIError(400, "prompt must be a string (one prompt per request)", param="prompt")
    return value


def parse_stops(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise APIError(400, "stop must be a string or an array of strings", param="stop")
    if len(value) > MAX_STOPS:
        raise APIError(400, f"stop: at most {MAX_STOPS} strings, got {len(value)}",
                       param="stop")  # fmt: skip
    if any(len(s) > MAX_STOP_CHARS for s in value):
        raise APIError(400, f"stop: at most {MAX_STOP_CHARS} characters a string", param="stop")
    return value


# ---------------------------------------------------------------- answers


@dataclass
class Answer:
    """Builds the objects of one completion's answer, with one id and creation time."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"

    def _object(self, kind: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}  # fmt: skip

    def whole(
        self, text: str, finish_reason: str, usage: dict[str, int], reasoning: str = "",
        calls: list[dict[str, Any]] | None = None, logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """The answer of a request that did not stream; a chat's thought, if it had one, in
        `reasoning_content` beside the answer (as vLLM and llama.cpp answer), and its tool
        `calls` (OpenAI's objects: then the content is null if empty)."""
        if self.chat:
            message: dict[str, Any] = {"role": "assistant",
                                       "content": None if calls and not text else text}
            if reasoning:
                message["reasoning_content"] = reasoning
            if calls:
                message["tool_calls"] = calls
                finish_reason = "tool_calls"
            choice = {"index": 0, "message": message, "logprobs": logprobs,
                      "finish_reason": finish_reason}  # fmt: skip
            return self._object("chat.completion", [choice], usage=usage)
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return self._object("text_completion", [choice], usage=usage)

    def chunk(
        self, text: str | None, finish_reason: str | None = None, usage: bool = False,
        first: bool = False, reasoning: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        """One streamed event: text (the first one of a chat also says the role; a chat's
        thought goes in `reasoning_content`), or the end with its finish reason. `usage`:
        the stream promised a usage event, so others carry `usage: null`."""
        extra = {"usage": None} if usage else {}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["reasoning_content" if reasoning else "content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None,
                      "finish_reason": finish_reason}  # fmt: skip
            return self._object("chat.completion.chunk", [choice], **extra)
        choice = {"index": 0, "text": text or "", "logprobs": None,
                  "finish_reason": finish_reason}  # fmt: skip
        return self._object("text_completion", [choice], **extra)

    def logprobs_chunk(self, logprobs: dict[str, Any], usage: bool = False) -> dict[str, Any]:
        """A streamed token's log-probabilities (its text comes in its own chunk)."""
        out = self.chunk(None if self.chat else "", usage=usage)
        out["choices"][0]["logprobs"] = logprobs
        return out

    def call_chunk(self, index: int, call: dict[str, Any], usage: bool = False) -> dict[str, Any]:
        """A streamed tool call, whole: its id, name and arguments in one delta."""
        choice = {"index": 0, "delta": {"tool_calls": [{"index": index, **call}]},
                  "logprobs": None, "finish_reason": None}  # fmt: skip
        return self._object("chat.completion.chunk", [choice],
                            **({"usage": None} if usage else {}))  # fmt: skip

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        """The last event of a stream that asked for usage: no choices."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._object(kind, [], usage=usage)


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def model_list(name: str, context: int, created: int) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(name, context, created)]}


def model_card(name: str, context: int, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "ringinfer",
            "context_length": context}  # fmt: skip


def logprobs_of(chat: bool, entries: list[dict[str, Any]], text_of: Any) -> dict[str, Any]:
    """Tokens' log-probabilities in OpenAI's shape: a chat's `content` list, or the legacy
    completions object. `entries`: (token id, logprob, [(id, logprob)]) as dicts;
    `text_of(id)`: a token's text."""
    if chat:
        def one(token: int, logprob: float) -> dict[str, Any]:
            text = text_of(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [
            {**one(e["token"], e["logprob"]),
             "top_logprobs": [one(i, lp) for i, lp in e["top"]]} for e in entries]}  # fmt: skip
    texts = [text_of(e["token"]) for e in entries]
    offsets = [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    return {"tokens": texts, "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{text_of(i): lp for i, lp in e["top"]} for e in entries],
            "text_offset": offsets}  # fmt: skip
