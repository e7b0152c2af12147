"""The layers one node serves under a plan, and the KV caches of the requests passing through.

`run` computes a batch of requests' positions in one forward pass (node/engine/batching.py
picks them). It is synchronous and runs on the daemon's single compute thread; the daemon's
event loop only hands inputs in and takes outputs out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from node.engine.batching import Work
from node.engine.kv_cache import KVCache
from node.engine.models.attention import Part
from node.engine.models.quantized import holdings, label
from node.engine.models.stage import Stage
from node.engine.perplexity import Scores, score_rows
from node.engine.sampling import Candidates, SamplingParams, candidates
from node.engine.weights import Checkpoint, Progress, load_stage
from node.errors import RinginferError
from protocol.wire import Piece, ProtocolError


@dataclass
class Entry:
    """One request's state on this stage."""

    cache: KVCache
    requester: str
    sampling: SamplingParams
    epoch: int
    score: list[int] | None = None  # a scored window's targets (last stage only uses them)
    scored: list[torch.Tensor] = field(default_factory=list)  # their log-probs, chunk by chunk
    accepted: int = 0  # positions taken in (computed or waiting): where the next must start
    last_used: float = field(default_factory=time.monotonic)


class Shard:
    """Layers [start, end) of the plan's model, loaded once per plan epoch that changes them."""

    def __init__(
        self,
        ckpt: Checkpoint,
        start: int,
        end: int,
        device: torch.device,
        dtype: torch.dtype,
        progress: Progress | None = None,
        quantize: str = "none",
    ) -> None:
        self.ckpt, self.start, self.end = ckpt, start, end
        self.device, self.dtype = device, dtype
        self.stage: Stage = load_stage(ckpt, start, end, device, dtype, progress, quantize)
        self.quantization = label(holdings(self.stage))
        self.requests: dict[str, Entry] = {}

    @property
    def is_first(self) -> bool:
        return self.stage.is_first

    @property
    def is_last(self) -> bool:
        return self.stage.is_last

    def open(
        self,
        req: str,
        capacity: int,
        requester: str,
        sampling: SamplingParams,
        epoch: int,
        score: list[int] | None = None,
    ) -> None:
        """Allocate the request's cache (its first step, the prefill)."""
        if req in self.requests:
            raise ProtocolError("duplicate-request", f"request {req} is already open here")
        if not 0 < capacity <= self.ckpt.config.max_seq_len:
            raise ProtocolError("bad-request", f"capacity {capacity} outside the model's context")
        cache = self.stage.new_cache(1, capacity, self.dtype, self.device)
        self.requests[req] = Entry(cache, requester, sampling, epoch, score)

    def accept(self, piece: Piece, x: torch.Tensor, epoch: int) -> Work:
        """Work for a piece, refused before any compute if it does not fit this stage or
        continue what the request has sent."""
        entry = self.requests.get(piece.req)
        if entry is None:
            raise ProtocolError("unknown-request", f"request {piece.req} is not open on this stage")
        c = self.ckpt.config
        start, count = piece.start, piece.count
        if self.is_first:
            expected, ok_dtype = (count,), x.dtype == torch.int64
        else:
            expected, ok_dtype = (count, c.dim), x.is_floating_point()
        if tuple(x.shape) != expected or not ok_dtype:
            kind = "token ids" if self.is_first else "hidden states"
            raise ProtocolError(
                "bad-tensor",
                f"expected {kind} of shape {list(expected)}, got {x.dtype} {list(x.shape)}",
            )
        if self.is_first and not 0 <= int(x.min()) <= int(x.max()) < c.vocab_size:
            raise ProtocolError("bad-tensor", f"token ids outside the vocabulary of {c.vocab_size}")
        if start != entry.accepted or piece.end > entry.cache.capacity:
            raise ProtocolError(
                "bad-positions",
                f"positions {start}..{piece.end} do not continue the {entry.accepted} taken "
                f"of {entry.cache.capacity}",
            )
        entry.accepted = start + count
        entry.last_used = time.monotonic()
        return Work(piece, x, epoch)

    @torch.inference_mode()
    def run(
        self, batch: list[Work], entries: list[Entry] | None = None
    ) -> torch.Tensor | list[Candidates | Scores | None]:
        """One forward pass over the batch's positions, packed. Hidden states [N, dim] out,
        or on the last stage each work's answer: candidates (or a scored window's
        log-probabilities) where it ends its step, None for a prompt's earlier chunks.

        `entries` are the works' requests as the caller found them open (a request may be
        closed on another thread meanwhile; its pass then computes into a dropped cache)."""
        if entries is None:
            entries = [self.requests[w.req] for w in batch]
        x = torch.cat([w.x for w in batch]) if len(batch) > 1 else batch[0].x
        x = x.to(self.device) if self.is_first else x.to(self.device, self.dtype)
        parts = [Part(e.cache, w.piece.start, w.count) for w, e in zip(batch, entries, strict=True)]
        keep = None  # the rows the last stage's head runs on
        starts: list[int] = []  # where each work's rows begin among them
        sampled: list[int] = []  # those that candidates come from
        if self.is_last:
            rows, at = [], 0
            for w, e in zip(batch, entries, strict=True):
                starts.append(len(rows))
                if e.score is not None:
                    rows.extend(range(at, at + w.count))
                elif w.piece.final:
                    sampled.append(len(rows))
                    rows.append(at + w.count - 1)
                at += w.count
            keep = torch.tensor(rows, dtype=torch.long, device=self.device)
        for e in entries:
            e.last_used = time.monotonic()
        try:
            out = self.stage.run(x[None], parts, keep)
        except RinginferError as e:
            raise ProtocolError("bad-positions", str(e)) from None
        if not self.is_last:
            return out[0]
        # The rows to sample from leave the device in one copy: one wait for a GPU, not one
        # per request (`candidates` moves its row to the CPU first, so nothing else changes).
        logits = iter(out[0, sampled].float().cpu())
        answers: list[Candidates | Scores | None] = []
        for w, e, at in zip(batch, entries, starts, strict=True):
            piece = w.piece
            if e.score is not None:
                e.scored.append(score_rows(out[0, at : at + w.count], piece.start, piece.end,
                                           e.score))  # fmt: skip
                answers.append(Scores(torch.cat(e.scored)) if piece.final else None)
            elif piece.final:
                answers.append(candidates(next(logits), e.sampling))
            else:
                answers.append(None)
        return answers

    def close(self, req: str) -> bool:
        return self.requests.pop(req, None) is not None

    def expired(self, idle_s: float) -> list[str]:
        now = time.monotonic()
        return [r for r, e in self.requests.items() if now - e.last_used > idle_s]
