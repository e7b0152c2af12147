"""OpenAI's Responses API as data, the subset Codex-style clients use: a /v1/responses body
(`input` as text or items: messages, function_call, function_call_output; `instructions`;
function tools) checked into the same request a chat is (protocol/openai.py's
CompletionRequest), and the response object and its stream events. Pure: the server is
node/cluster/api.py.

Nothing is stored: `previous_response_id` is a 400 asking for the whole conversation, and
`store` is ignored. Reasoning items a client sends back are skipped, as templates drop
earlier thoughts.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from protocol.openai import (
    MAX_MESSAGES,
    MAX_TOKENS,
    APIError,
    CompletionRequest,
    Fields,
    parse_format,
    parse_request,
)

ROLES = ("system", "developer", "user", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")


def parse_responses(body: Any) -> CompletionRequest:
    """A Responses body as a chat CompletionRequest, or an APIError(400)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    get = Fields(body)
    if body.get("previous_response_id") is not None:
        raise APIError(400, "responses are not stored here: send the whole conversation as "
                       "input instead of previous_response_id",
                       param="previous_response_id")  # fmt: skip
    fmt = (get.typed("text", dict) or {}).get("format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":  # the schema beside its type
        fmt = {"type": "json_schema", "json_schema": fmt}
    try:
        grammar = parse_format(fmt if isinstance(fmt, dict) else None)
    except APIError as e:
        raise APIError(400, str(e).replace("response_format", "text.format"),
                       param="text.format") from None  # fmt: skip
    instructions = get.typed("instructions", str)
    messages = [{"role": "system", "content": instructions}] if instructions else []
    messages += _items(body.get("input"))
    chat = {"model": get.typed("model", str), "messages": messages,
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "stream": body.get("stream"), "parallel_tool_calls": body.get("parallel_tool_calls")}
    tools = get.typed("tools", list)
    if tools is not None:
        chat["tools"] = [_chat_tool(t) for t in tools]
    if body.get("tool_choice") is not None:
        chat["tool_choice"] = _chat_choice(body["tool_choice"])
    req = parse_request(chat, chat=True)
    req.max_tokens = get.integer("max_output_tokens", low=1, high=MAX_TOKENS)
    req.grammar = grammar
    return req


def _items(value: Any) -> list[dict[str, Any]]:
    """`input` as chat messages: text is one user message; items in order, consecutive
    function calls joined into one assistant message."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value or len(value) > MAX_MESSAGES:
        raise APIError(400, f"input must be a string or an array of 1 to {MAX_MESSAGES} items",
                       param="input")  # fmt: skip
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            out.append({"role": item.get("role"), "content": _content(item.get("content"),
                                                                      where)})  # fmt: skip
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            last = out[-1] if out else None
            if last and last.get("role") == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": output if isinstance(output, str) else json.dumps(output)})
        elif kind == "reasoning":
            continue
        else:
            raise APIError(400, f"{where}: items of type {kind!r} are not supported", param=where)
    return out


def _content(content: Any, where: str) -> Any:
    """A message's content as chat's: its text parts' text (chat checks the rest)."""
    if not isinstance(content, list):
        return content
    parts = []
    for j, p in enumerate(content):
        if not isinstance(p, dict) or p.get("type") not in TEXT_PARTS:
            kind = p.get("type") if isinstance(p, dict) else None
            raise APIError(400, f"{where}.content[{j}]: only text parts are supported, got "
                           f"{kind!r}", param=f"{where}.content[{j}]")  # fmt: skip
        parts.append({"type": "text", "text": p.get("text")})
    return parts


def _chat_tool(tool: Any) -> Any:
    """A Responses function tool ({type, name, description, parameters}) as chat's."""
    if not isinstance(tool, dict) or tool.get("type") != "function":
        return tool  # parse_request names what is wrong
    return {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}


def _chat_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


@dataclass
class ResponseAnswer:
    """Builds one reply's response object and stream events, with one id and clock."""

    ask: CompletionRequest
    model: str
    id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex[:24]}")
    created: int = field(default_factory=lambda: int(time.time()))
    sequence: int = 0

    def response(self, output: list[dict[str, Any]], status: str,
                 use: dict[str, int] | None = None) -> dict[str, Any]:  # fmt: skip
        ask = self.ask
        choice = ask.tool_choice if ask.forced_tool is None else {
            "type": "function", "name": ask.forced_tool}  # fmt: skip
        return {
            "id": self.id, "object": "response", "created_at": self.created, "model": self.model,
            "status": status, "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete" else None,
            "parallel_tool_calls": ask.parallel_tool_calls, "tool_choice": choice,
            "tools": [{"type": "function", **t["function"]} for t in ask.tools],
            "temperature": ask.temperature, "top_p": ask.top_p,
            "max_output_tokens": ask.max_tokens, "usage": use,
        }  # fmt: skip

    def event(self, kind: str, **data: Any) -> bytes:
        """One server-sent event, numbered in order."""
        payload = {"type": kind, "sequence_number": self.sequence, **data}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()


def message_item(text: str, item_id: str | None = None, status: str = "completed") -> dict:
    return {"type": "message", "id": item_id or f"msg_{uuid.uuid4().hex[:24]}",
            "status": status, "role": "assistant",
            "content": [] if status == "in_progress" else [text_part(text)]}  # fmt: skip


def text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


def call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"type": "function_call", "id": "fc_" + call_id.removeprefix("call_"),
            "call_id": call_id, "name": name, "arguments": arguments, "status": status}


def usage(prompt_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + output_tokens}  # fmt: skip
