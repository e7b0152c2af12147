"""Choosing the next token from logits: a pure function any node can run."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from node.errors import RinginferError

MAX_LOGPROBS = 20  # alternatives a token may come with (OpenAI's top_logprobs bound)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no limit
    top_p: float = 1.0
    seed: int | None = None
    # The last stage hands back the whole row of raw logits: the requester constrains it
    # (engine/grammar.py) before cutting it to candidates itself.
    whole: bool = False
    logprobs: int = -1  # log-probabilities of the drawn token and of this many others (-1: none)

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise RinginferError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise RinginferError(f"top-k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise RinginferError(f"top-p must be in (0, 1], got {self.top_p}")

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"temperature": self.temperature, "top_k": self.top_k}
        d["top_p"] = self.top_p
        if self.seed is not None:
            d["seed"] = self.seed
        if self.whole:
            d["whole"] = True
        if self.logprobs >= 0:
            d["logprobs"] = self.logprobs
        return d

    @classmethod
    def from_json(cls, d: Any) -> SamplingParams:
        """Parameters a client or peer sent: RinginferError for anything malformed."""
        if not isinstance(d, dict):
            raise RinginferError("sampling parameters must be a JSON object")
        seed = d.get("seed")
        try:
            return cls(
                float(d.get("temperature", 0.0)),
                int(d.get("top_k", 0)),
                float(d.get("top_p", 1.0)),
                seed if type(seed) is int else None,
                d.get("whole") is True,
                min(MAX_LOGPROBS, int(d.get("logprobs", -1))),
            )
        except (TypeError, ValueError) as e:
            raise RinginferError(f"malformed sampling parameters: {e}") from None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator | None:
        """The random stream for a request: reproducible when a seed is given."""
        if self.greedy:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


@dataclass(frozen=True)
class Candidates:
    """What the last stage hands back to sample from: scaled logits of the tokens still in
    the running (`ids`, or the whole vocabulary in order when `ids` is None)."""

    logits: torch.Tensor  # float32 [n]
    ids: torch.Tensor | None = None  # int64 [n]
    # Where log-probabilities are asked for: the raw row's logsumexp, and its most likely
    # tokens' raw logits and ids (SamplingParams.logprobs of them).
    lse: float | None = None
    top_logits: torch.Tensor | None = None  # float32 [k]
    top_ids: torch.Tensor | None = None  # int64 [k]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What goes on the wire: logits and ids (none for a whole row), or with
        log-probabilities always both, then [lse, top logits] and the top ids."""
        if self.lse is None:
            return (self.logits,) if self.ids is None else (self.logits, self.ids)
        ids = self.ids if self.ids is not None else torch.arange(self.logits.numel())
        head = torch.cat([torch.tensor([self.lse]), self.top_logits])
        return self.logits, ids, head, self.top_ids

    def logprob(self, token: int, params: SamplingParams) -> float:
        """The drawn token's log-probability under the raw logits (not the temperature's):
        it is among the candidates, whose logits were divided by the temperature unless
        greedy or whole."""
        ids = self.ids if self.ids is not None else torch.arange(self.logits.numel())
        value = float(self.logits[int(torch.nonzero(ids == token)[0, 0])])
        if not params.greedy and not params.whole:
            value *= params.temperature
        return value - self.lse  # type: ignore[operator]


def candidates(logits: torch.Tensor, params: SamplingParams) -> Candidates:
    """Cut one position's logits [vocab] to the tokens `params` can still draw, with the
    log-probability figures where asked (Candidates.lse)."""
    logits = logits.float().cpu()
    cut = _cut(logits, params)
    if params.logprobs < 0:
        return cut
    top_logits, top_ids = torch.topk(logits, min(params.logprobs, logits.numel()))
    ids = cut.ids if cut.ids is not None else torch.arange(cut.logits.numel())
    return replace(cut, ids=ids, lse=float(torch.logsumexp(logits, 0)), top_logits=top_logits,
                   top_ids=top_ids)  # fmt: skip


def _cut(logits: torch.Tensor, params: SamplingParams) -> Candidates:
    """Cut one position's logits [vocab] to the tokens `params` can still draw.

    Greedy keeps the argmax. Otherwise the logits are divided by the temperature, cut to the
    top-k, then to the smallest set whose probability reaches top-p (always keeping the most
    likely token). Deterministic: it runs on the last stage, and only the survivors travel.
    """
    if params.whole:
        return Candidates(logits)
    if params.greedy:
        best = torch.argmax(logits)
        return Candidates(logits[best].reshape(1), best.reshape(1))
    logits = logits / params.temperature
    if not params.top_k and params.top_p >= 1.0:
        return Candidates(logits)
    if params.top_k and params.top_k < logits.numel():
        values, ids = torch.topk(logits, params.top_k)
    else:
        values, ids = torch.sort(logits, descending=True)
    if params.top_p < 1.0:
        probs = torch.softmax(values, dim=-1)
        keep = int(((probs.cumsum(dim=-1) - probs) < params.top_p).sum())
        values, ids = values[:keep], ids[:keep]
    return Candidates(values, ids)


def pick(cands: Candidates, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Draw the next token id from candidates: where the requester's random stream lives."""
    if cands.logits.numel() == 1 or params.greedy:
        index = int(torch.argmax(cands.logits))
    else:
        probs = torch.softmax(cands.logits, dim=-1)
        index = int(torch.multinomial(probs, 1, generator=generator))
    return index if cands.ids is None else int(cands.ids[index])


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token id from one position's logits [vocab]: `candidates`, then `pick`."""
    return pick(candidates(logits, params), params, generator)
