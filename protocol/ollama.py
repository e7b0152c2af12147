"""Ollama's API as data, for front-ends that speak it (Open WebUI, Continue, the `ollama`
client): /api/chat and /api/generate bodies checked into the same request an OpenAI one is
(protocol/openai.py's CompletionRequest), and the NDJSON lines and model listings it answers
with. Pure: the server is node/cluster/api.py.

Ollama streams unless a body says `"stream": false`; sampling settings come in `options`
(`num_predict` is max_tokens); a model may be named with its tag (`name:latest`).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from protocol.openai import (
    MAX_TOKENS,
    SEEDS,
    APIError,
    CompletionRequest,
    Fields,
    parse_request,
    parse_stops,
)

VERSION = "0.1.0"  # ringinfer's: /api/version tells clients what they talk to

# Ollama's done reasons from our finish reasons.
DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop"}


def model_name(name: Any) -> str | None:
    """A model name without Ollama's default tag."""
    if name is None:
        return None
    if not isinstance(name, str):
        raise APIError(400, "model must be a string", param="model")
    return name.removesuffix(":latest")


def parse_show(body: Any) -> CompletionRequest:
    """An /api/show body: the model it asks about (as `model` or `name`)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return CompletionRequest(chat=False, model=model_name(body.get("model", body.get("name"))))


def parse_chat(body: Any, chat: bool) -> CompletionRequest:
    """An /api/chat (`chat`) or /api/generate body as a CompletionRequest. A generate
    prompt goes through the chat template as a user's turn (after `system`), as Ollama's
    does, unless `raw`."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    get = Fields(body)
    options = get.typed("options", dict) or {}
    if body.get("images"):
        raise APIError(400, "images are not supported", param="images")
    openai_body: dict[str, Any] = {"model": model_name(body.get("model"))}
    if chat:
        openai_body["messages"] = [_message(m, i) for i, m in enumerate(_list(body, "messages"))]
        if body.get("tools") is not None:
            openai_body["tools"] = body["tools"]
    else:
        prompt, system = get.typed("prompt", str) or "", get.typed("system", str)
        chat = not get.typed("raw", bool)
        if chat:
            openai_body["messages"] = [*([{"role": "system", "content": system}] if system
                                         else []), {"role": "user", "content": prompt}]
        else:
            openai_body["prompt"] = prompt
    req = parse_request(openai_body, chat)
    opts = Fields(options)
    temperature = opts.number("temperature", 0.0, 2.0)
    req.temperature = 0.8 if temperature is None else temperature  # Ollama's default
    req.top_p = opts.number("top_p", 0.0, 1.0) or 0.9
    top_k = opts.integer("top_k", low=0, high=MAX_TOKENS)
    req.top_k = 40 if top_k is None else top_k
    req.seed = opts.integer("seed", *SEEDS)
    predict = opts.integer("num_predict", low=-2, high=MAX_TOKENS)
    req.max_tokens = predict if predict is not None and predict > 0 else None
    req.stop = parse_stops(options.get("stop"))
    stream = get.typed("stream", bool)
    req.stream = True if stream is None else stream
    fmt = body.get("format")
    if fmt == "json":
        req.grammar = ("json_object", None)
    elif isinstance(fmt, dict):
        req.grammar = ("json_schema", fmt)
    elif fmt not in (None, ""):
        raise APIError(400, "format must be \"json\" or a JSON schema object", param="format")
    if chat and isinstance(body.get("think"), bool):
        req.template_kwargs = {"enable_thinking": body["think"]}
    return req


def _list(body: dict[str, Any], name: str) -> list[Any]:
    value = body.get(name)
    if not isinstance(value, list) or not value:
        raise APIError(400, f"{name} must be a non-empty array", param=name)
    return value


def _message(m: Any, i: int) -> Any:
    """An Ollama message as OpenAI's: its tool calls' arguments are objects already."""
    if not isinstance(m, dict):
        return m  # parse_request names what is wrong
    if m.get("images"):
        raise APIError(400, f"messages[{i}]: images are not supported", param=f"messages[{i}]")
    out = {k: v for k, v in m.items() if k in ("role", "content", "tool_call_id", "name")}
    if m.get("role") == "tool" and "tool_call_id" not in out:
        out["tool_call_id"] = str(m.get("tool_name", ""))
    if isinstance(m.get("tool_calls"), list):
        out["tool_calls"] = [{"type": "function", "function": c.get("function")}
                             for c in m["tool_calls"] if isinstance(c, dict)]  # fmt: skip
    return out


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def part(model: str, chat: bool, text: str, thinking: bool = False,
         calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    """One streamed line of a reply (not the last)."""
    out: dict[str, Any] = {"model": model, "created_at": now()}
    if chat:
        message: dict[str, Any] = {"role": "assistant", "content": "" if thinking else text}
        if thinking:
            message["thinking"] = text
        if calls:
            message["tool_calls"] = calls
        out["message"] = message
    else:
        out["response"] = text
    return {**out, "done": False}


def done(model: str, chat: bool, result: dict[str, Any], text: str = "", thinking: str = "",
         calls: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    """The last line (or the whole answer when not streamed): the generation's counts and
    times (nanoseconds) from its result, as Ollama reports them."""
    out = part(model, chat, text, calls=calls)
    if chat and thinking:
        out["message"]["thinking"] = thinking
    tokens = len(result["tokens"])
    prompt_ns = int(result["ttft_s"] * 1e9)
    eval_ns = int(result["tpot_s"] * max(0, tokens - 1) * 1e9)
    reason = "stop" if calls else DONE_REASONS.get(result["finish_reason"], "stop")
    return {**out, "done": True, "done_reason": reason, "total_duration": prompt_ns + eval_ns,
            "load_duration": 0, "prompt_eval_count": result["prompt_tokens"],
            "prompt_eval_duration": prompt_ns, "eval_count": tokens,
            "eval_duration": eval_ns}  # fmt: skip


def ollama_call(name: str, arguments: str) -> dict[str, Any]:
    return {"function": {"name": name, "arguments": json.loads(arguments)}}


def tags(name: str, size: int, modified: float, details: dict[str, Any]) -> dict[str, Any]:
    """/api/tags: the one model the cluster serves."""
    stamp = datetime.fromtimestamp(modified, timezone.utc).isoformat().replace("+00:00", "Z")
    return {"models": [{"name": name, "model": name, "modified_at": stamp, "size": size,
                        "digest": "", "details": details}]}


def details(architecture: str, params: int, quantization: str, file_format: str
            ) -> dict[str, Any]:  # fmt: skip
    return {"parent_model": "", "format": file_format,
            "family": architecture, "families": [architecture],
            "parameter_size": _size(params), "quantization_level": quantization}  # fmt: skip


def _size(params: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6)):
        if params >= scale:
            return f"{params / scale:.1f}{unit}"
    return str(params)


def error_json(e: APIError) -> dict[str, Any]:
    return {"error": str(e)[:1000]}
