"""Anthropic's Messages API as data: a /v1/messages body checked into the same request an
OpenAI chat is (protocol/openai.py's CompletionRequest), and the objects and stream events
it answers with. Pure: the server is node/cluster/api.py.

What Claude Code and the `anthropic` client send: a system prompt (text or text blocks),
turns of text, `tool_use` and `tool_result` blocks, tools with an `input_schema`,
`tool_choice` (auto, any, tool, none), `stop_sequences`, `max_tokens` (required),
`thinking` (enabled: the model's thought comes back as thinking blocks, with an empty
signature; disabled: a thinking template is told so). Images and documents are a 400 naming
the block; unknown fields are ignored.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from protocol.openai import (
    MAX_MESSAGES,
    MAX_TOKENS,
    APIError,
    CompletionRequest,
    Fields,
    parse_stops,
    parse_tools,
)

# Our finish reasons as Anthropic's stop reasons.
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
# HTTP statuses as Anthropic's error types.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               503: "overloaded_error", 529: "overloaded_error"}  # fmt: skip


def error_json(e: APIError) -> dict[str, Any]:
    """An error as Anthropic's API writes it."""
    kind = ERROR_TYPES.get(e.status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": str(e)[:1000]}}


def parse_messages(body: Any, count_only: bool = False) -> CompletionRequest:
    """A Messages body as a chat CompletionRequest, or an APIError(400). `count_only`:
    /v1/messages/count_tokens, which needs no max_tokens."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    get = Fields(body)
    req = CompletionRequest(chat=True, model=get.typed("model", str))
    system = _system(body.get("system"))
    req.messages = ([{"role": "system", "content": system}] if system else []) + _turns(
        body.get("messages"))
    req.tools = parse_tools([_openai_tool(t) for t in get.typed("tools", list) or []])
    req.tool_choice = _tool_choice(get.typed("tool_choice", dict), req.tools)
    if count_only:
        return req
    req.max_tokens = get.integer("max_tokens", low=1, high=MAX_TOKENS)
    if req.max_tokens is None:
        raise APIError(400, "max_tokens: field required", param="max_tokens")
    temperature = get.number("temperature", 0.0, 1.0)
    req.temperature = 1.0 if temperature is None else temperature
    req.top_p = get.number("top_p", 0.0, 1.0) or 1.0
    req.top_k = get.integer("top_k", low=0, high=MAX_TOKENS) or 0
    req.stop = parse_stops(get.typed("stop_sequences", list))
    req.stream = bool(get.typed("stream", bool))
    thinking = (get.typed("thinking", dict) or {}).get("type")
    req.show_thinking = thinking in ("enabled", "adaptive")
    if thinking == "disabled":  # a thinking model's switch (Qwen3's templates read it)
        req.template_kwargs = {"enable_thinking": False}
    return req


def _system(value: Any) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        return "".join(_block_text(b, f"system[{i}]") for i, b in enumerate(value))
    raise APIError(400, "system must be a string or an array of text blocks", param="system")


def _block_text(block: Any, where: str) -> str:
    if not isinstance(block, dict) or block.get("type") != "text":
        kind = block.get("type") if isinstance(block, dict) else None
        raise APIError(400, f"{where}: only text blocks are supported here, got {kind!r}",
                       param=where)  # fmt: skip
    if not isinstance(block.get("text"), str):
        raise APIError(400, f"{where}.text must be a string", param=where)
    return block["text"]


def _turns(value: Any) -> list[dict[str, Any]]:
    """Anthropic's turns as OpenAI's messages: a user turn's tool_result blocks become tool
    messages (before its text), an assistant turn's tool_use blocks its tool_calls."""
    if not isinstance(value, list) or not value:
        raise APIError(400, "messages must be a non-empty array", param="messages")
    if len(value) > MAX_MESSAGES:
        raise APIError(400, f"messages: at most {MAX_MESSAGES} per request, got {len(value)}",
                       param="messages")  # fmt: skip
    out: list[dict[str, Any]] = []
    for i, turn in enumerate(value):
        where = f"messages[{i}]"
        role = turn.get("role") if isinstance(turn, dict) else None
        if role not in ("user", "assistant"):
            raise APIError(400, f"{where}.role must be user or assistant, got {role!r}",
                           param=f"{where}.role")  # fmt: skip
        content = turn.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise APIError(400, f"{where}.content must be a string or an array of blocks",
                           param=f"{where}.content")  # fmt: skip
        text, calls = [], []
        for j, b in enumerate(blocks):
            at = f"{where}.content[{j}]"
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "tool_result" and role == "user":
                out.append({"role": "tool", "tool_call_id": str(b.get("tool_use_id", "")),
                            "content": _result_text(b.get("content"), at)})  # fmt: skip
            elif kind == "tool_use" and role == "assistant":
                if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
                    raise APIError(400, f"{at}: a tool_use needs a name and an input object",
                                   param=at)  # fmt: skip
                calls.append({"id": str(b.get("id", "")), "type": "function",
                              "function": {"name": b["name"], "arguments": b.get("input", {})}})
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue  # an earlier turn's thought: templates drop those too
            else:
                text.append(_block_text(b, at))
        if text or calls or role == "assistant":
            message: dict[str, Any] = {"role": role, "content": "".join(text)}
            if calls:
                message["tool_calls"] = calls
            out.append(message)
    return out


def _result_text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(_block_text(b, f"{where}.content[{k}]") for k, b in enumerate(content))
    raise APIError(400, f"{where}.content must be a string or text blocks", param=where)


def _openai_tool(tool: Any) -> Any:
    """An Anthropic tool ({name, description, input_schema}) as OpenAI's tool object."""
    if not isinstance(tool, dict):
        return tool  # parse_tools names what is wrong
    names = {"name": "name", "description": "description", "input_schema": "parameters"}
    function = {names[k]: v for k, v in tool.items() if k in names}  # in the client's order
    return {"type": "function", "function": function}


def _tool_choice(value: dict[str, Any] | None, tools: list[dict[str, Any]]) -> str:
    kind = (value or {}).get("type", "auto" if tools else "none")
    if kind == "tool":
        name = value.get("name") if value else None
        if not isinstance(name, str) or name not in {t["function"]["name"] for t in tools}:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools",
                           param="tool_choice")  # fmt: skip
        return name
    choice = {"auto": "auto", "any": "required", "none": "none"}.get(str(kind))
    if choice is None:
        raise APIError(400, "tool_choice.type must be auto, any, tool or none",
                       param="tool_choice")  # fmt: skip
    return choice if tools else "none"


def stop_reason(finish_reason: str, stop_sequence: str | None, called: bool) -> str:
    if called:
        return "tool_use"
    return "stop_sequence" if stop_sequence else STOP_REASONS.get(finish_reason, "end_turn")


@dataclass
class MessageAnswer:
    """Builds one reply's Message object, or its stream's events, with one id."""

    model: str
    input_tokens: int
    id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex[:24]}")

    def message(self, content: list[dict[str, Any]], stop: str | None, stop_sequence: str | None,
                output_tokens: int) -> dict[str, Any]:  # fmt: skip
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": stop, "stop_sequence": stop_sequence,
                "usage": {"input_tokens": self.input_tokens, "output_tokens": output_tokens}}

    def start(self) -> dict[str, Any]:
        return {"type": "message_start", "message": self.message([], None, None, 0)}

    def delta(self, stop: str, stop_sequence: str | None, output_tokens: int) -> dict[str, Any]:
        return {"type": "message_delta",
                "delta": {"stop_reason": stop, "stop_sequence": stop_sequence},
                "usage": {"output_tokens": output_tokens}}  # fmt: skip


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def thinking_block(text: str) -> dict[str, Any]:
    return {"type": "thinking", "thinking": text, "signature": ""}


def tool_use_block(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """A call as a tool_use block: its id in Anthropic's shape, its arguments an object."""
    return {"type": "tool_use", "id": "toolu_" + call_id.removeprefix("call_"), "name": name,
            "input": json.loads(arguments)}  # fmt: skip


def event(kind: str, data: dict[str, Any]) -> bytes:
    """One server-sent event as Anthropic streams them: named, then its JSON."""
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()
