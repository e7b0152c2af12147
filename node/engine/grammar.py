"""Structured output: a grammar (a JSON schema, any JSON object, or a Lark grammar) the
reply is kept inside of, by masking at the requester's sampler every token that would leave
it, with llguidance (the grammar engine vLLM, SGLang and llama.cpp use: it computes a
token mask in tens of microseconds from the tokenizer's own vocabulary, and installs from
PyPI with no compiler).

The mask needs the whole logits row, so a constrained request asks its last stage for the
row (SamplingParams.whole) and the requester cuts it (top-k, top-p) after masking.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from node.errors import RinginferError

MAX_GRAMMAR_CHARS = 2**18  # a schema or grammar's text: bigger ones are no output format


class BadGrammar(RinginferError):
    """A schema or grammar that cannot be compiled (a 400 through the API)."""


def grammar_of(kind: str, spec: Any) -> str:
    """llguidance's grammar for `kind`: json_object (any object), json_schema (`spec` a
    schema object) or grammar (`spec` llama.cpp's GBNF or Lark); BadGrammar when it does not
    compile."""
    import llguidance

    try:
        if kind == "json_object":
            grammar = llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})
        elif kind == "json_schema":
            text = json.dumps(spec)
            if len(text) > MAX_GRAMMAR_CHARS:
                raise BadGrammar(f"the schema is over {MAX_GRAMMAR_CHARS} characters")
            grammar = llguidance.LLMatcher.grammar_from_json_schema(text)
        elif kind in ("grammar", "tools"):  # tools: tool_calls.call_grammar's Lark
            if len(spec) > MAX_GRAMMAR_CHARS:
                raise BadGrammar(f"the grammar is over {MAX_GRAMMAR_CHARS} characters")
            grammar = llguidance.grammar_from("grammar", spec)
        else:
            raise BadGrammar(f"unknown grammar kind {kind!r}")
    except (ValueError, TypeError) as e:
        raise BadGrammar(f"the {kind.replace('_', ' ')} does not compile: {_line(e)}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise BadGrammar(f"the {kind.replace('_', ' ')} does not compile: {_line(error)}")
    return grammar


def _line(e: Any) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else "")[:300]


_TOKENIZERS: dict[tuple[int, int, tuple[int, ...]], tuple[Any, Any]] = {}


def _tokenizer(backend: Any, vocab: int, eos: tuple[int, ...]) -> Any:
    """llguidance's view of a vocabulary: built once a tokenizer (~1 s; kept with the
    tokenizer it was built from, so its id is not reused)."""
    import llguidance

    key = (id(backend), vocab, eos)
    if key not in _TOKENIZERS:
        tok = llguidance.LLTokenizer(backend.to_str(), n_vocab=vocab, eos_token=list(eos))
        _TOKENIZERS[key] = (backend, tok)
    return _TOKENIZERS[key][1]


class Constraint:
    """A grammar's state through one reply: `allowed` tokens next, `take` the one drawn."""

    def __init__(self, grammar: str, backend: Any, vocab: int, stop_ids: frozenset[int]) -> None:
        import llguidance
        import llguidance.torch  # here, in the API's worker thread: ~2 s the first time

        if backend is None:
            raise BadGrammar("this model's tokenizer cannot be constrained (GPT-2's tiktoken)")
        tok = _tokenizer(backend, vocab, tuple(sorted(stop_ids)))
        self.matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
        if self.matcher.is_error():
            raise BadGrammar(f"the grammar does not compile: {_line(self.matcher.get_error())}")
        self.vocab = vocab

    def allowed(self) -> torch.Tensor:
        """bool [vocab]: the tokens that keep the reply inside the grammar (only the stop
        tokens once it is complete). Empty if the grammar cannot go on (an error state)."""
        from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

        bits = allocate_token_bitmask(1, self.vocab)
        fill_next_token_bitmask(self.matcher, bits)
        shifts = torch.arange(32, dtype=torch.int32)
        mask = ((bits[0][:, None] >> shifts) & 1).bool().reshape(-1)
        return mask[: self.vocab]

    def take(self, token: int) -> None:
        self.matcher.consume_token(token)
