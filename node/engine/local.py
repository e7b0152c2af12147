"""A model run as in-process stages, and the token loop that generates with it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from node.engine.batching import PREFILL_CHUNK
from node.engine.kv_cache import SPAN, KVCache
from node.engine.models.quantized import holdings, label
from node.engine.sampling import Candidates, SamplingParams, candidates, pick
from node.engine.weights import Checkpoint, Progress, load_stage
from node.errors import RinginferError

if TYPE_CHECKING:
    from node.engine.grammar import Constraint

CPU = torch.device("cpu")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# step(token ids [1, T], positions [T]) -> what to sample the next token from
Step = Callable[[torch.Tensor, torch.Tensor], Candidates]


def pick_device(name: str) -> torch.device:
    """`auto` prefers CUDA, then MPS, then the CPU; a named device must be present."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    kind = name.split(":")[0]
    if kind not in available:
        raise RinginferError(f"unknown device '{name}' (use auto, cpu, cuda or mps)")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RinginferError(f"malformed device '{name}' (use cpu, cuda, cuda:N or mps)") from None
    count = torch.cuda.device_count() if kind == "cuda" else 1
    if not available[kind] or (device.index or 0) >= count:
        raise RinginferError(f"device '{name}' is not available on this machine")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto`: float32 on the CPU, bfloat16 on CUDA, float16 on MPS."""
    if name == "auto":
        return {"cuda": torch.bfloat16, "mps": torch.float16}.get(device.type, torch.float32)
    if name not in DTYPES:
        raise RinginferError(f"unknown dtype '{name}' (use {', '.join(DTYPES)})")
    return DTYPES[name]


def available_memory(device: torch.device) -> int:
    """Bytes free for weights now: the GPU's free memory, else the system's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def split_bounds(n_layers: int, splits: Sequence[int]) -> list[tuple[int, int]]:
    """Layer ranges for stages cut at `splits` (strictly increasing, inside 1..n_layers-1)."""
    bounds = [0, *splits, n_layers]
    if any(a >= b for a, b in zip(bounds, bounds[1:], strict=False)):
        raise RinginferError(
            f"split points must increase strictly within 1..{n_layers - 1}, got "
            f"{','.join(map(str, splits))}"
        )
    return list(zip(bounds, bounds[1:], strict=False))


class LocalPipeline:
    """Stages of one model chained in this process: the ring without the network."""

    def __init__(
        self,
        ckpt: Checkpoint,
        splits: Sequence[int] = (),
        device: torch.device = CPU,
        dtype: torch.dtype = torch.float32,
        progress: Callable[[int, int], Progress] | None = None,
        quantize: str = "none",
    ) -> None:
        self.ckpt, self.device, self.dtype = ckpt, device, dtype
        ranges = split_bounds(ckpt.n_layers, splits)
        self.stages = [
            load_stage(ckpt, a, b, device, dtype, progress(a, b) if progress else None, quantize)
            for a, b in ranges
        ]

    @property
    def quantization(self) -> str:
        """The formats the stages hold their weights in, e.g. 'int4+int8'."""
        return label(holdings(torch.nn.ModuleList(self.stages)))

    def new_caches(self, capacity: int, span: int = SPAN) -> list[KVCache]:
        """Each stage's cache for a request of `capacity` positions; passes of up to `span`
        positions fit a sliding-window layer's buffer without growing it."""
        return [s.new_cache(1, capacity, self.dtype, self.device, span) for s in self.stages]

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        caches: list[KVCache],
        last_only: bool = False,
    ) -> torch.Tensor:
        x = x.to(self.device)
        for stage, cache in zip(self.stages, caches, strict=True):
            x = stage(x, positions, cache, last_only)
        return x

    def session(
        self, capacity: int, params: SamplingParams, chunk: int = PREFILL_CHUNK
    ) -> Step:
        """A step function bound to fresh caches: what one request decodes with. A prompt
        longer than `chunk` goes in chunks of it, as a ring's stages take it, so that one
        request alone computes here exactly what it computes in a ring."""
        caches = self.new_caches(capacity, chunk)

        @torch.inference_mode()
        def step(ids: torch.Tensor, positions: torch.Tensor) -> Candidates:
            last = (ids.shape[1] - 1) // chunk * chunk  # where the final chunk starts
            for at in range(0, last, chunk):
                self.forward(ids[:, at : at + chunk], positions[at : at + chunk], caches, True)
            out = self.forward(ids[:, last:], positions[last:], caches, last_only=True)
            return candidates(out[0, -1], params)

        return step


class PromptTooLong(RinginferError):
    """A prompt that leaves the model's context no room to generate (the API's 413)."""


def fit_request(prompt_tokens: int, max_tokens: int, context: int) -> tuple[int, int]:
    """(KV capacity, tokens to generate) for a request, within the model's context.

    The last generated token is never fed back, so `max_tokens` needs one position less.
    A prompt that leaves no room to generate is refused before any compute.
    """
    if prompt_tokens == 0:
        raise RinginferError("the prompt is empty")
    if prompt_tokens >= context:
        raise PromptTooLong(
            f"the prompt is {prompt_tokens} tokens; the model's context holds {context}"
        )
    capacity = min(prompt_tokens + max_tokens - 1, context)
    return capacity, capacity - prompt_tokens + 1


@dataclass
class Timings:
    """When a request started and when each of its tokens came: TTFT and TPOT."""

    started: float = field(default_factory=time.perf_counter)
    token_times: list[float] = field(default_factory=list)

    def mark(self) -> None:
        self.token_times.append(time.perf_counter())

    @property
    def ttft_s(self) -> float:
        return self.token_times[0] - self.started if self.token_times else 0.0

    @property
    def tpot_s(self) -> float:
        t = self.token_times
        return (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return 1.0 / self.tpot_s if self.tpot_s else 0.0


def generation_result(
    text: str,
    tokens: list[int],
    prompt_tokens: int,
    model: str,
    finish_reason: str,
    timings: Timings,
) -> dict[str, Any]:
    """What `generate --json` prints, the same whether the tokens came locally or by the ring."""
    return {
        "text": text,
        "tokens": tokens,
        "prompt_tokens": prompt_tokens,
        "model": model,
        "finish_reason": finish_reason,
        "ttft_s": round(timings.ttft_s, 6),
        "tpot_s": round(timings.tpot_s, 6),
        "decode_tokens_per_s": round(timings.decode_tokens_per_s, 3),
    }


class TokenLoop:
    """The requester's side of generation, shared by the local engine and the ring.

    `ids` / `positions` are what to feed next: the whole prompt once, then one position per
    step. `take` samples a token from what came back; a stop token is taken (as transformers'
    generate returns it) and ends the loop.
    """

    def __init__(
        self, prompt: list[int], max_tokens: int, params: SamplingParams, stop_ids: frozenset[int],
        constraint: Constraint | None = None,
    ) -> None:  # fmt: skip
        self.params, self.stop_ids, self.max_tokens = params, stop_ids, max_tokens
        self.constraint = constraint  # then the candidates are the whole row (params.whole)
        self.logprobs: list[dict[str, Any]] = []  # per token, where params.logprobs asks
        self.logprob: dict[str, Any] | None = None  # the last token's
        self.generator = params.generator()
        self.ids = torch.tensor([prompt])
        self.positions = torch.arange(len(prompt))
        self.tokens: list[int] = []
        self.done = False

    def take(self, cands: Candidates) -> int:
        received = cands
        if self.constraint is not None:
            cands = self._constrained(cands.logits)
        token = pick(cands, self.params, self.generator)
        if self.constraint is not None:
            self.constraint.take(token)
        self.logprob = None  # this token's, where asked (not a stop token's)
        if received.lse is not None and token not in self.stop_ids:
            lse = received.lse
            self.logprob = {
                "token": token, "logprob": received.logprob(token, self.params),
                "top": [(int(i), float(v) - lse) for i, v in zip(
                    received.top_ids, received.top_logits, strict=True)]}  # fmt: skip
            self.logprobs.append(self.logprob)
        self.tokens.append(token)
        self.done = token in self.stop_ids or len(self.tokens) >= self.max_tokens
        self.ids = torch.tensor([[token]])
        self.positions = self.positions[-1:] + 1
        return token

    def _constrained(self, logits: torch.Tensor) -> Candidates:
        """The whole row with the grammar's masked out, cut as the last stage would."""
        allowed = self.constraint.allowed()
        if not allowed.any():  # the grammar cannot go on: end the reply
            allowed[sorted(self.stop_ids)[:1] or [0]] = True
        masked = logits.masked_fill(~allowed[: logits.numel()], float("-inf"))
        return candidates(masked, replace(self.params, whole=False))

    @property
    def finish_reason(self) -> str:
        return "stop" if self.tokens and self.tokens[-1] in self.stop_ids else "length"


def generate(
    step: Step,
    prompt: list[int],
    max_tokens: int,
    params: SamplingParams,
    stop_ids: frozenset[int],
    timings: Timings | None = None,
    constraint: Constraint | None = None,
) -> Iterator[int]:
    """Yield generated token ids, each as soon as it is sampled (inside `constraint`'s
    grammar, where given: then `params` must ask for the whole row)."""
    loop = TokenLoop(prompt, max_tokens, params, stop_ids, constraint)
    while not loop.done:
        token = loop.take(step(loop.ids, loop.positions))
        if timings is not None:
            timings.mark()
        yield token
