"""Perplexity of a text, as llama.cpp's `llama-perplexity` measures it.

The text is tokenized once and cut into windows of `context` tokens (a trailing part shorter
than a window is dropped); each window is evaluated from an empty cache, and only its second
half is scored, so every scored token has at least half a window of context. Where the
tokenizer starts texts with BOS, every window's first token is replaced by BOS. Perplexity is
exp of the mean negative log-likelihood over all scored tokens.

The decisions are pure functions; `run_local` evaluates windows in this process, and the
daemon evaluates them over the ring (the last stage scores, see node/engine/shard.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from node.errors import RinginferError


@dataclass(frozen=True)
class Window:
    ids: list[int]  # what the model reads
    first: int  # the first position whose prediction is scored

    @property
    def targets(self) -> list[int]:
        """The tokens positions first..end-2 predict."""
        return self.ids[self.first + 1 :]


def windows(tokens: list[int], context: int, bos: int | None) -> list[Window]:
    """The windows a text's tokens are scored in; refuses a text shorter than one window."""
    if context < 4:
        raise RinginferError(f"--context must be at least 4 tokens, got {context}")
    if len(tokens) < context:
        raise RinginferError(
            f"the text is {len(tokens)} tokens, shorter than one window of --context {context}"
        )
    out = []
    for start in range(0, len(tokens) - context + 1, context):
        ids = tokens[start : start + context]
        if bos is not None:
            ids = [bos, *ids[1:]]
        out.append(Window(ids, context // 2))
    return out


def score(logits: torch.Tensor, targets: list[int]) -> torch.Tensor:
    """Log-probabilities [n] of the n targets, which the last n + 1 of logits [T, vocab] but
    the very last predict."""
    return score_rows(logits, 0, logits.shape[0], targets)


def score_rows(logits: torch.Tensor, start: int, end: int, targets: list[int]) -> torch.Tensor:
    """`score` for a window's logits given in chunks: these are its rows from `start`, and
    its positions end at `end`. The log-probabilities of the targets these rows predict."""
    first = end - len(targets) - 1  # the row that predicts the first target
    lo, hi = max(start, first), min(start + logits.shape[0], end - 1)
    if hi <= lo:
        return torch.empty(0, device=logits.device)
    rows = logits[lo - start : hi - start].float().log_softmax(-1)
    wanted = torch.tensor(targets[lo - first : hi - first], device=rows.device)
    return rows.gather(1, wanted[:, None])[:, 0]


@dataclass(frozen=True)
class Scores:
    """What a last stage returns for a scored window instead of sampling candidates."""

    logprobs: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.logprobs.float().cpu(),)


@dataclass
class Tally:
    """Running negative log-likelihood over the windows scored so far."""

    nll: float = 0.0
    count: int = 0  # tokens scored
    windows: int = 0

    def add(self, logprobs: torch.Tensor) -> None:
        self.nll -= float(logprobs.double().sum())
        self.count += int(logprobs.numel())
        self.windows += 1

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.count) if self.count else math.nan


def run_local(forward: Callable[[list[int]], torch.Tensor], wins: list[Window]) -> Iterator[Tally]:
    """Score each window with `forward(ids) -> logits [T, vocab]`; yields the tally after each."""
    tally = Tally()
    for window in wins:
        with torch.inference_mode():
            tally.add(score(forward(window.ids), window.targets))
        yield tally


def result(
    tally: Tally, seconds: float, model: str, quantization: str, context: int
) -> dict[str, object]:
    """What `ringinfer perplexity --json` prints."""
    return {
        "perplexity": round(tally.perplexity, 6),
        "tokens": tally.count,
        "seconds": round(seconds, 3),
        "model": model,
        "quantization": quantization,
        "context": context,
        "windows": tally.windows,
    }
