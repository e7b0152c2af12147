"""Tool calls in a chat reply: how a model writes them, the prompt that offers tools to a
model whose chat template does not, and a splitter that takes the calls out of the reply's
answer as it streams (gpt-oss's harmony calls are told apart in reasoning.py, by channel).

Formats, by what the chat template writes (as vLLM's and llama.cpp's parsers read them):
- hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen2.5/3, Hermes,
  and our own prompt for templates without tools); the body may instead be Qwen3-Coder's
  `<function=NAME><parameter=KEY>VALUE</parameter></function>`;
- llama3: the whole reply one JSON object `{"name": ..., "parameters": {...}}` (Llama 3.1+,
  optionally after `<|python_tag|>`), or several joined by ';';
- mistral: `[TOOL_CALLS]` then a JSON array of calls, or `NAME[ARGS]{...}` (v11 and later);
- deepseek: `<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME` and a ```json block;
- kimi: `<|tool_call_begin|>functions.NAME:0<|tool_call_argument_begin|>{...}`.
Text that does not parse as a call stays in the answer: an unknown syntax is content.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from node.engine.stop_strings import overlap

HERMES, LLAMA3, MISTRAL, DEEPSEEK, KIMI, HARMONY = (
    "hermes", "llama3", "mistral", "deepseek", "kimi", "harmony")  # fmt: skip
CONTENT, CALL = "content", "call"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object's text, as OpenAI's API carries it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}  # fmt: skip


@dataclass(frozen=True)
class Syntax:
    """Where a format's calls are in the text: each between `open` and `close` (None: to
    the end of the reply); `drop`: markers around a group of calls, shown nowhere."""

    open: str
    close: str | None
    drop: tuple[str, ...] = ()


SYNTAX = {
    HERMES: Syntax("<tool_call>", "</tool_call>"),
    LLAMA3: Syntax("<|python_tag|>", None),
    MISTRAL: Syntax("[TOOL_CALLS]", None),
    DEEPSEEK: Syntax("<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>",
                     ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>")),
    KIMI: Syntax("<|tool_call_begin|>", "<|tool_call_end|>",
                 ("<|tool_calls_section_begin|>", "<|tool_calls_section_end|>")),
}  # fmt: skip
# What a reply starts with when the request forces a call (tool_choice "required" or a
# function): the opening of the format's call, and with a name, the call up to its arguments.
FORCED = {
    HERMES: ("<tool_call>\n", '<tool_call>\n{{"name": "{}", "arguments": '),
    LLAMA3: ('{"name": "', '{{"name": "{}", "parameters": '),
    MISTRAL: ("[TOOL_CALLS]", '[TOOL_CALLS][{{"name": "{}", "arguments": '),
    HARMONY: ("<|channel|>commentary to=functions.",
              "<|channel|>commentary to=functions.{} <|constrain|>json<|message|>"),
}  # fmt: skip


def call_format(template: str | None, harmony: bool) -> str:
    """The format a model writes its calls in, from its chat template; hermes where the
    template offers no tools (our prompt, tools_prompt, asks for that one)."""
    text = template or ""
    if harmony:
        return HARMONY
    for fmt, marker in ((MISTRAL, "[TOOL_CALLS]"), (DEEPSEEK, "tool▁call▁begin"),
                        (KIMI, "<|tool_call_begin|>"), (LLAMA3, "<|python_tag|>"),
                        (LLAMA3, '"parameters": ')):  # fmt: skip
        if marker in text:
            return fmt
    return HERMES


def renders_tools(template: str | None) -> bool:
    """Whether a chat template writes the tools it is given (else tools_prompt does)."""
    return bool(template) and re.search(r"\btools\b", template) is not None


def tools_prompt(tools: list[dict[str, Any]]) -> str:
    """Tools offered in a system message, for templates that have no place for them: the
    words Qwen's template uses, so that the model answers in the hermes format."""
    lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{lines}\n</tools>\n\nFor each function call, return a json object with "
            "function name and arguments within <tool_call></tool_call> XML tags:\n"
            '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
            "</tool_call>")  # fmt: skip


def forced_start(fmt: str, name: str | None) -> str:
    """The text a reply must begin with to call a tool (any, or `name`)."""
    start = FORCED.get(fmt)
    if start is None:
        return ""
    return start[1].format(name) if name else start[0]


# What ends a forced call after its arguments, where that is plain text (call_grammar).
CALL_END = {HERMES: "}\n</tool_call>", LLAMA3: "}"}


def call_grammar(fmt: str, tools: list[dict[str, Any]], name: str | None) -> str | None:
    """The grammar (llguidance's Lark, its %json taking a JSON schema) of what follows
    forced_start: the call's name where it is not yet written, its arguments as the tool's
    schema has them, the call's end. None where a call ends in a special token (harmony,
    Mistral): there the arguments are the model's own."""
    end = CALL_END.get(fmt)
    if end is None:
        return None
    opened = forced_start(fmt, None)
    alternatives = []
    for t in tools:
        if name is not None and t["function"]["name"] != name:
            continue
        head = forced_start(fmt, t["function"]["name"]).removeprefix(
            forced_start(fmt, name) if name else opened)  # fmt: skip
        schema = t["function"].get("parameters") or {"type": "object"}
        literal = f"{json.dumps(head)} " if head else ""
        alternatives.append(f"{literal}%json {json.dumps(schema)} {json.dumps(end)}")
    return "start: " + "\n     | ".join(alternatives)


class ToolCallSplitter:
    """Feed the answer's text with `push`, then `flush` at its end; each returns parts,
    (CONTENT, text) or (CALL, ToolCall), in the reply's order. Text that may still begin a
    marker is held until the next piece decides, and so is whitespace that may turn out to
    stand only between calls (dropped then, as llama.cpp does). llama3's bare JSON reply (no
    python tag) is held whole when it starts with '{', and is a call only if it parses."""

    def __init__(self, fmt: str) -> None:
        self.fmt, self.syntax = fmt, SYNTAX[fmt]
        self.held, self.inside, self.started = "", False, False
        self.space, self.called = "", False  # whitespace held back; whether a call came
        self.out_of_call = False  # text has come since the last call
        self.searched = 0  # of a call's held text: where its end marker may still start
        self.before = ""  # whitespace before the open call's marker (shown if it is no call)
        self.out: list[tuple[str, Any]] = []

    def push(self, piece: str) -> list[tuple[str, Any]]:
        self.held += piece
        self._scan()
        out, self.out = self.out, []
        return out

    def flush(self) -> list[tuple[str, Any]]:
        if self.inside or (self.fmt == LLAMA3 and self.held.lstrip().startswith("{")):
            self._body(self.held, ended=True)
        else:
            self._content(self.held)
        if not self.called:
            self._content(self.space, end=True)
        self.held, self.inside, self.space = "", False, ""
        out, self.out = self.out, []
        return out

    def _scan(self) -> None:
        s = self.syntax
        while self.held:
            if not self.started and self.fmt == LLAMA3:
                text = self.held.lstrip()
                if not text:
                    return
                self.started = True
                if text.startswith("{"):  # the bare JSON form: decided at the end
                    self.held, self.inside = text, True
                    self.syntax = s = Syntax("", None)
                    continue
            self.started = True
            if self.inside:
                if s.close is None:
                    return  # to the end of the reply
                cut = self.held.find(s.close, self.searched)
                if cut < 0:  # a long call is searched once, not again at every piece
                    self.searched = max(0, len(self.held) - len(s.close) + 1)
                    return
                self._body(self.held[:cut], ended=False)
                self.held, self.inside, self.searched = self.held[cut + len(s.close) :], False, 0
                continue
            markers = (s.open, *s.drop)
            found = [(i, m) for m in markers if (i := self.held.find(m)) >= 0]
            if not found:
                keep = max(overlap(self.held, m) for m in markers)
                self._content(self.held[: len(self.held) - keep])
                self.held = self.held[len(self.held) - keep :]
                return
            cut, marker = min(found)
            self._content(self.held[:cut])
            self.held, self.before, self.space = self.held[cut + len(marker) :], self.space, ""
            self.inside = marker == s.open

    def _content(self, text: str, end: bool = False) -> None:
        if self.called and not self.out_of_call:  # what follows a call starts at its text
            text = text.lstrip()
            self.out_of_call = bool(text)
        if not end:  # trailing whitespace waits for what follows it
            text = self.space + text
            body = text.rstrip()
            text, self.space = body, text[len(body) :]
        if not text:
            return
        if self.out and self.out[-1][0] == CONTENT:
            self.out[-1] = (CONTENT, self.out[-1][1] + text)
        else:
            self.out.append((CONTENT, text))

    def _body(self, body: str, ended: bool) -> None:
        """A call's text: its calls, or (not a call after all) content as written."""
        calls, before = parse_calls(self.fmt, body), self.before
        self.before = ""
        if calls is None:
            self._content(before + self.syntax.open + body
                          + ("" if ended or self.syntax.close is None else self.syntax.close))
            return  # fmt: skip
        self.out.extend((CALL, c) for c in calls)
        self.called, self.space, self.out_of_call = True, "", False


def parse_calls(fmt: str, body: str) -> list[ToolCall] | None:
    """The calls in one call's text (between a format's markers), or None."""
    try:
        if fmt == HERMES:
            return _hermes(body.strip())
        if fmt == LLAMA3:
            return _llama3(body.strip())
        if fmt == MISTRAL:
            return _mistral(body.strip())
        if fmt == DEEPSEEK:
            return _deepseek(body)
        if fmt == KIMI:
            return _kimi(body)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        return None
    raise ValueError(f"unknown tool call format {fmt!r}")


def call(name: Any, arguments: Any) -> ToolCall:
    """A call from a parsed name and arguments (an object, or its JSON text)."""
    if not isinstance(name, str) or not name:
        raise ValueError("a call needs a name")
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise ValueError("a call's arguments are an object")
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


_FUNCTION = re.compile(r"<function=([^>\s]+)>(.*?)</function>", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\s]+)>\n?(.*?)\n?</parameter>", re.S)


def _hermes(body: str) -> list[ToolCall]:
    if body.startswith("<function="):  # Qwen3-Coder: parameters as text, JSON where they are
        m = _FUNCTION.fullmatch(body)
        if m is None:
            raise ValueError("not a function block")
        params = {k: _value(v) for k, v in _PARAMETER.findall(m[2])}
        return [ToolCall(m[1], json.dumps(params, ensure_ascii=False))]
    obj = _closed(body)
    return [call(obj["name"], obj.get("arguments", obj.get("parameters")))]


def _closed(text: str) -> Any:
    """JSON text, or the same with the braces it left open closed (a small model often ends
    a call after its arguments' object without closing the call's own)."""
    for tail in ("", "}", "}}"):
        try:
            return json.loads(text + tail)
        except ValueError:
            continue
    raise ValueError("not JSON")


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _llama3(body: str) -> list[ToolCall]:
    calls = []
    for part in _json_values(body, ";"):
        if not isinstance(part, dict):
            raise ValueError("not a call")
        calls.append(call(part["name"], part.get("parameters", part.get("arguments"))))
    return calls


def _mistral(body: str) -> list[ToolCall]:
    if body.startswith("["):  # [{"name": ..., "arguments": ...}, ...]
        items = json.loads(body)
        return [call(i["name"], i.get("arguments")) for i in items]
    calls = []  # v11: NAME[ARGS]{...}, more after [TOOL_CALLS] again
    for chunk in body.split("[TOOL_CALLS]"):
        name, sep, args = chunk.partition("[ARGS]")
        if not sep:
            raise ValueError("no arguments")
        calls.append(call(name.strip(), args))
    return calls


def _deepseek(body: str) -> list[ToolCall]:
    """V3's `function<sep>NAME` and a ```json block, or V3.1's `NAME<sep>{...}`."""
    kind, sep, rest = body.partition("<｜tool▁sep｜>")
    if not sep:
        raise ValueError("not a function call")
    if kind.strip() != "function":
        return [call(kind.strip(), rest.strip())]
    name, _, args = rest.partition("\n")
    args = args.strip().removeprefix("```json").removesuffix("```").strip()
    return [call(name.strip(), args)]


def _kimi(body: str) -> list[ToolCall]:
    head, sep, args = body.partition("<|tool_call_argument_begin|>")
    if not sep:
        raise ValueError("no arguments")
    name = head.strip().removeprefix("functions.").rpartition(":")[0] or head.strip()
    return [call(name, args.strip())]


def _json_values(text: str, separator: str) -> list[Any]:
    """JSON values one after another, with `separator` (and whitespace) between them."""
    decoder, values, at = json.JSONDecoder(), [], 0
    while True:
        value, at = decoder.raw_decode(text, at)
        values.append(value)
        rest = text[at:].lstrip()
        if not rest:
            return values
        if not rest.startswith(separator):
            raise ValueError("text after a call")
        at = len(text) - len(rest) + len(separator)
        while at < len(text) and text[at].isspace():
            at += 1


def prepared(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]], template: str | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The conversation and tools as the chat template is to be given them. A template that
    renders tools takes both as they are; for one that does not, the tools go into the
    system message (tools_prompt), earlier calls into the assistant's text and tool results
    into a user's <tool_response>, as Qwen's template writes them."""
    if renders_tools(template):
        return messages, tools or None
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            written = [json.dumps({"name": c["function"]["name"],
                                   "arguments": c["function"]["arguments"]}, ensure_ascii=False)
                       for c in m["tool_calls"]]  # fmt: skip
            calls = "\n".join(f"<tool_call>\n{w}\n</tool_call>" for w in written)
            out.append({"role": "assistant",
                        "content": f"{m['content']}\n{calls}" if m["content"] else calls})
        elif m["role"] == "tool":
            out.append({"role": "user",
                        "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if tools:
        prompt = tools_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None
