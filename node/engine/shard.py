"""The layers one node serves under a plan, and the KV caches of the requests passing through.

Everything here is synchronous and runs on the daemon's single compute thread; the daemon's
event loop only hands inputs in and takes outputs out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from node.engine.kv_cache import KVCache
from node.engine.models.quantized import holdings, label
from node.engine.models.stage import Stage
from node.engine.perplexity import Scores, score
from node.engine.sampling import Candidates, SamplingParams, candidates
from node.engine.weights import Checkpoint, Progress, load_stage
from node.errors import RinginferError
from protocol.wire import ProtocolError


@dataclass
class Entry:
    """One request's state on this stage."""

    cache: KVCache
    requester: str
    sampling: SamplingParams
    epoch: int
    score: list[int] | None = None  # a scored window's targets (last stage only uses them)
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

    def check_input(self, req: str, start: int, count: int, x: torch.Tensor) -> Entry:
        """Refuse input that does not fit this stage or the request before computing on it."""
        entry = self.requests.get(req)
        if entry is None:
            raise ProtocolError("unknown-request", f"request {req} is not open on this stage")
        c = self.ckpt.config
        if self.is_first:
            expected, ok_dtype = (1, count), x.dtype == torch.int64
        else:
            expected, ok_dtype = (1, count, c.dim), x.is_floating_point()
        if tuple(x.shape) != expected or not ok_dtype:
            kind = "token ids" if self.is_first else "hidden states"
            raise ProtocolError(
                "bad-tensor",
                f"expected {kind} of shape {list(expected)}, got {x.dtype} {list(x.shape)}",
            )
        if self.is_first and count and not 0 <= int(x.min()) <= int(x.max()) < c.vocab_size:
            raise ProtocolError("bad-tensor", f"token ids outside the vocabulary of {c.vocab_size}")
        if count == 0 or start != entry.cache.length or start + count > entry.cache.capacity:
            raise ProtocolError(
                "bad-positions",
                f"positions {start}..{start + count} do not continue the {entry.cache.length} "
                f"cached of {entry.cache.capacity}",
            )
        return entry

    @torch.inference_mode()
    def forward(
        self, req: str, start: int, x: torch.Tensor
    ) -> torch.Tensor | Candidates | Scores:
        """Run the request's next positions: hidden states out, or on the last stage
        candidates (or the scored window's log-probabilities)."""
        entry = self.requests.get(req)
        if entry is None:  # ended (END, a timeout) while this step waited for the compute thread
            raise ProtocolError("unknown-request", f"request {req} ended before this step ran")
        entry.last_used = time.monotonic()
        positions = torch.arange(start, start + x.shape[1], device=self.device)
        x = x.to(self.device) if self.is_first else x.to(self.device, self.dtype)
        scoring = self.is_last and entry.score is not None
        try:
            out = self.stage(x, positions, entry.cache, last_only=not scoring)
        except RinginferError as e:
            raise ProtocolError("bad-positions", str(e)) from None
        if scoring:
            return Scores(score(out[0], entry.score))
        if self.is_last:
            return candidates(out[0, -1], entry.sampling)
        return out

    def close(self, req: str) -> bool:
        return self.requests.pop(req, None) is not None

    def expired(self, idle_s: float) -> list[str]:
        now = time.monotonic()
        return [r for r, e in self.requests.items() if now - e.last_used > idle_s]
