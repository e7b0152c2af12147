"""A chat reply's thought apart from its answer, as vLLM's and llama.cpp's reasoning parsers
split them: Qwen3's `<think>...</think>` block before the answer, and gpt-oss's harmony
messages (`<|channel|>analysis<|message|>...<|end|>`, then the `final` channel's answer, or
a tool call: a message to `functions.NAME`, ended by `<|call|>`).

The reply arrives as decoded text, piece by piece, and a marker may span pieces (a piece is
whatever the tokens so far decode to), so text that could still begin a marker is held
until the next piece decides; the split is the same however the text was cut.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from node.engine.stop_strings import overlap
from node.engine.tool_calls import CALL, ToolCallSplitter, call

if TYPE_CHECKING:
    from node.engine.tokenizer import Tokenizer

# Reply formats. THINK: a <think> block may open the reply; THINKING: the prompt opened it
# (templates that always think end the generation prompt with "<think>\n").
PLAIN, THINK, THINKING, HARMONY = "plain", "think", "thinking", "harmony"
FORMATS = (PLAIN, THINK, THINKING, HARMONY)
REASONING, CONTENT = "reasoning", "content"  # what a part of the reply is

OPEN, CLOSE = "<think>", "</think>"
MESSAGE, CHANNEL, START = "<|message|>", "<|channel|>", "<|start|>"
END_MESSAGE, END_REPLY = "<|end|>", ("<|return|>", "<|call|>")
BODY_ENDS = (END_MESSAGE, *END_REPLY, START)
MAX_HEADER = 512  # a harmony header longer than this is not one: shown as the answer
_CHANNEL = re.compile(re.escape(CHANNEL) + r"\s*([\w-]*)")
_RECIPIENT = re.compile(r"\bto=functions\.([\w.-]+)")

Part = tuple[str, Any]  # (REASONING or CONTENT, text), or (CALL, a tool_calls.ToolCall)


def reply_format(tokenizer: Tokenizer, prompt: list[int]) -> str:
    """How a chat reply to `prompt` (rendered by the tokenizer's template) is written."""
    if tokenizer.harmony:
        return HARMONY
    if CLOSE not in (tokenizer.chat_template or ""):
        return PLAIN
    tail = tokenizer.decode(prompt[-8:]).rstrip()
    return THINKING if tail.endswith(OPEN) else THINK


class ReplySplitter:
    """Feed a reply's text with `push`, then `flush` at its end; each returns the parts
    that may be shown now. In the <think> formats the thought is shown without the
    whitespace around it and the answer without the whitespace before it (Qwen3 writes "\\n"
    inside the block and "\\n\\n" after it), as llama.cpp shows them; harmony's text is kept
    as is. `done` turns true at harmony's end of reply: later text is dropped. A harmony
    message to a function is held whole and given as one (CALL, ToolCall); with `calls` (a
    tool_calls format: the request offered tools), so are the calls in the answer."""

    def __init__(self, fmt: str, calls: str | None = None) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"unknown reply format {fmt!r}")
        self.fmt, self.held, self.done = fmt, "", False
        self.calls = ToolCallSplitter(calls) if calls and fmt != HARMONY else None
        self.offered = calls is not None  # else a harmony message to a function is thought
        self.callee = ""  # the function the harmony message being read is to
        self.searched = 0  # of a call's held text: where an end marker may still start
        self.state = {PLAIN: CONTENT, THINK: "start", THINKING: REASONING, HARMONY: "header"}[fmt]
        self.lead = fmt != PLAIN  # whitespace at the start of a part is still to be dropped
        self.out: list[Part] = []

    def push(self, piece: str) -> list[Part]:
        self.held += piece
        if self.fmt == HARMONY:
            self._harmony()
        else:
            self._think()
        return self._taken()

    def flush(self) -> list[Part]:
        """The end of the reply: what was held back was not a marker (an unfinished harmony
        header is dropped), and the thought loses its trailing whitespace."""
        if self.state == CALL:  # a call the reply ended inside (its length ran out)
            self._emit_body(self.held)
        elif self.state in (CONTENT, REASONING, "start"):  # not an unfinished harmony header
            kind = REASONING if self.state == REASONING else CONTENT
            self._emit(kind, self.held.rstrip() if kind == REASONING else self.held)
        self.held, self.done = "", True
        return self._taken(end=True)

    def _taken(self, end: bool = False) -> list[Part]:
        """The parts ready, the answer's tool calls taken out of it (where asked)."""
        out, self.out = self.out, []
        if self.calls is None:
            return out
        parts: list[Part] = []
        for kind, text in out:
            parts.extend(self.calls.push(text) if kind == CONTENT else [(kind, text)])
        return parts + (self.calls.flush() if end else [])

    def _emit(self, kind: str, text: str) -> None:
        if self.lead:
            text = text.lstrip()
            self.lead = not text
        if not text:
            return
        if self.out and self.out[-1][0] == kind:
            self.out[-1] = (kind, self.out[-1][1] + text)
        else:
            self.out.append((kind, text))

    def _emit_body(self, text: str) -> None:
        """A harmony message's text: a call's, parsed (not JSON: shown as the answer)."""
        if self.state != CALL:
            self._emit(self.state, text)
            return
        try:
            self.out.append((CALL, call(self.callee, text.strip())))
        except (ValueError, TypeError, RecursionError):
            self._emit(CONTENT, text)

    def _enter(self, state: str) -> None:
        self.state, self.lead = state, self.fmt != PLAIN

    def _think(self) -> None:
        if self.state == "start":  # does the reply open a <think> block?
            text = self.held.lstrip()
            if text.startswith(OPEN):
                self.held = text[len(OPEN) :]
                self._enter(REASONING)
            elif OPEN.startswith(text):
                return  # only whitespace, or the start of "<think>": wait
            else:
                self._enter(CONTENT)
        if self.state == REASONING:
            cut = self.held.find(CLOSE)
            if cut < 0:  # hold a possible "</think>" start, and the whitespace before it
                body = self.held[: len(self.held) - overlap(self.held, CLOSE)]
                thought = body.rstrip()
                self._emit(REASONING, thought)
                self.held = self.held[len(thought) :]
                return
            self._emit(REASONING, self.held[:cut].rstrip())
            self.held = self.held[cut + len(CLOSE) :]
            self._enter(CONTENT)
        self._emit(CONTENT, self.held)
        self.held = ""

    def _harmony(self) -> None:
        while self.held and not self.done:
            if self.state == "header":
                cut = self.held.find(MESSAGE)
                if cut >= 0:  # "<|start|>assistant<|channel|>final<|message|>": its channel
                    found = _CHANNEL.search(self.held[:cut])
                    final = found is not None and found.group(1) == "final"
                    to = _RECIPIENT.search(self.held[:cut]) if self.offered else None
                    self.callee = to.group(1) if to else ""
                    self.held = self.held[cut + len(MESSAGE) :]
                    self.state = CALL if to else CONTENT if final else REASONING
                    self.lead = False
                elif _may_be_header(self.held):
                    return
                else:  # not harmony after all: the model's text is its answer
                    self.state, self.lead = CONTENT, False
                continue
            at = self.searched if self.state == CALL else 0
            ends = [(i, m) for m in BODY_ENDS if (i := self.held.find(m, at)) >= 0]
            if not ends:
                if self.state == CALL:  # a call is given whole: search only new text next
                    self.searched = max(0, len(self.held) - max(map(len, BODY_ENDS)) + 1)
                    return
                keep = max(overlap(self.held, m) for m in BODY_ENDS)
                self._emit(self.state, self.held[: len(self.held) - keep])
                self.held = self.held[len(self.held) - keep :]
                return
            cut, marker = min(ends)
            self._emit_body(self.held[:cut])
            self.searched = 0
            self.held = self.held[cut if marker == START else cut + len(marker) :]
            self.state = "header"
            self.done = marker in END_REPLY
        if self.done:
            self.held = ""


def _may_be_header(text: str) -> bool:
    """Whether `text` may still become a harmony header (it begins with a marker)."""
    text = text.lstrip()
    if len(text) > MAX_HEADER:
        return False
    # A recipient may come first: "<|start|>assistant" ends the prompt, " to=functions.f" ...
    return any(text.startswith(m) or m.startswith(text) for m in (CHANNEL, START, "to="))


def split_reply(fmt: str, text: str) -> tuple[str, str]:
    """A whole reply's (thought, answer)."""
    thought, answer, _ = split_calls(fmt, text, None)
    return thought, answer


def split_calls(fmt: str, text: str, calls: str | None) -> tuple[str, str, list[Any]]:
    """A whole reply's (thought, answer, tool calls: tool_calls.ToolCall)."""
    splitter = ReplySplitter(fmt, calls)
    parts = splitter.push(text) + splitter.flush()
    thought = "".join(t for kind, t in parts if kind == REASONING)
    answer = "".join(t for kind, t in parts if kind == CONTENT)
    return thought, answer, [c for kind, c in parts if kind == CALL]
