"""Causal attention over KV caches, shared by every architecture.

A forward pass packs the new positions of one or more requests into one sequence (batch 1,
ragged, no padding): the matmuls read each weight once for all of them, and attention runs
per request over that request's own cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from node.engine.kv_cache import KVCache

# cuDNN's attention builds an execution plan for each new shape, about 0.1 s each, and
# decoding meets a new cache length at every step of every request (a daemon's first
# requests on a GPU ran at ~170 ms a token, repeats of the same lengths at ~15). Flash and
# memory-efficient attention take any length.
torch.backends.cuda.enable_cudnn_sdp(False)


@dataclass(frozen=True)
class Part:
    """One request's positions in a packed forward: `count` of them from `start`."""

    cache: KVCache
    start: int
    count: int


def positions_of(parts: Sequence[Part], device: torch.device) -> torch.Tensor:
    """The packed positions of `parts`, in order."""
    if len(parts) == 1:
        p = parts[0]
        return torch.arange(p.start, p.start + p.count, device=device)
    return torch.cat([torch.arange(p.start, p.start + p.count) for p in parts]).to(device)


class Step:
    """What the layers of one forward pass share: the parts, their masks, (for RoPE models)
    the rotation tables of the packed positions, and the attention scale (None: SDPA's
    1/sqrt(head_dim)). A model whose layers differ in window or RoPE (Gemma 3's sliding and
    global layers) makes one Step for each kind of layer."""

    def __init__(
        self,
        parts: Sequence[Part],
        window: int | None,
        device: torch.device,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        scale: float | None = None,
    ) -> None:
        self.parts, self.rope, self.scale, self.window = parts, rope, scale, window
        self._masks: dict[tuple[int, int], torch.Tensor | None] = {}
        self.device = device
        # A decode pass of several requests on a GPU: one flash-attention call for all of
        # them where their dtype allows it (see _attend_ragged).
        self.ragged = device.type == "cuda" and window is None and len(parts) > 1 and all(
            p.count == 1 for p in parts
        )

    @cached_property
    def lengths(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Cumulative query and key lengths and the longest key length, for flash attention's
        ragged batch: made once a pass, by its first layer."""
        lengths = torch.tensor([0] + [p.start + 1 for p in self.parts], dtype=torch.int32)
        return (
            torch.arange(len(self.parts) + 1, dtype=torch.int32).to(self.device, non_blocking=True),
            lengths.cumsum(0, dtype=torch.int32).to(self.device, non_blocking=True),
            int(lengths.max()),
        )

    def mask(self, i: int, first: int) -> torch.Tensor | None:
        """Part i's mask over the keys its cache returns from position `first` on: made once
        a pass (every layer of a kind holds the same positions)."""
        if (i, first) not in self._masks:
            p = self.parts[i]
            self._masks[i, first] = causal_mask(p.start, p.count, self.window, self.device, first)
        return self._masks[i, first]

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor | None = None,
        sinks: torch.Tensor | None = None,
        values_in_keys: int | None = None,
    ) -> torch.Tensor:
        """q [1, H, N, D] and the new k, v [1, Hkv, N, D] of all parts packed: each part's
        keys and values go into its cache, its queries attend to that cache alone (and to a
        learned sink logit per head, where the model has them). With `values_in_keys` (latent
        attention) there is no v: the values are the keys' first that many numbers, and a
        cache holds keys only."""
        if values_in_keys is not None:
            v = k[..., :0]
        assert v is not None
        if len(self.parts) == 1:
            p = self.parts[0]
            keys, values, first = p.cache.update(layer, p.start, k, v)
            if values_in_keys is not None:
                return attend_latent(q, keys, values_in_keys, self.mask(0, first), self.scale)
            return attend(q, keys, values, self.mask(0, first), self.scale, sinks)
        if self.ragged and sinks is None and values_in_keys is None and q.dtype in (
            torch.bfloat16, torch.float16):  # fmt: skip
            return self._attend_ragged(layer, q, k, v)
        out, at = [], 0
        for i, p in enumerate(self.parts):
            span = slice(at, at + p.count)
            keys, values, first = p.cache.update(layer, p.start, k[:, :, span], v[:, :, span])
            mask = self.mask(i, first)
            out.append(
                attend_latent(q[:, :, span], keys, values_in_keys, mask, self.scale)
                if values_in_keys is not None
                else attend(q[:, :, span], keys, values, mask, self.scale, sinks)
            )
            at += p.count
        return torch.cat(out, dim=2)

    def _attend_ragged(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """One query per part, on a GPU: the new keys and values written in one call, the
        parts' caches packed, and one flash-attention call over their ragged lengths. A
        kernel launch per request and layer would cost more than the attention itself."""
        slots, new, held = [], [], []
        for i, p in enumerate(self.parts):
            keys, values, _ = p.cache.buffers(layer)  # a window-less layer's: from position 0
            at = slice(p.start, p.start + 1)
            slots += [keys[0, :, at], values[0, :, at]]
            new += [k[0, :, i : i + 1], v[0, :, i : i + 1]]
            held.append((keys[0, :, : p.start + 1], values[0, :, : p.start + 1]))
        torch._foreach_copy_(slots, new)
        keys = torch.cat([kv[0] for kv in held], dim=1)
        values = torch.cat([kv[1] for kv in held], dim=1)
        cum_q, cum_k, max_k = self.lengths
        out = torch.ops.aten._flash_attention_forward(
            q[0].transpose(0, 1), keys.transpose(0, 1), values.transpose(0, 1),
            cum_q, cum_k, 1, max_k, 0.0, False, False, scale=self.scale,
        )[0]  # fmt: skip
        return out.transpose(0, 1)[None]


class StaticStep:
    """One request's one position, read from the device tensor `position`: the step a CUDA
    graph replays (node/engine/models/cuda_graph.py). Each layer writes its keys and values
    at the position in place and flash attention reads the cache up to it: the kernels and
    their shapes are the same at every step, only the tensors' contents change."""

    scale = None  # SDPA's 1/sqrt(head_dim)
    window = None

    def __init__(
        self, cache: KVCache, position: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        self.cache, self.position, self.rope = cache, position, rope
        self.cum_q = torch.arange(2, dtype=torch.int32, device=position.device)
        self.cum_k = torch.cat([self.cum_q[:1], (position + 1).to(torch.int32)])

    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """q [1, H, 1, D] and the new k, v [1, Hkv, 1, D]."""
        keys, values, _ = self.cache.buffers(layer)  # [1, Hkv, capacity, D]
        keys.index_copy_(2, self.position, k)
        values.index_copy_(2, self.position, v)
        out = torch.ops.aten._flash_attention_forward(
            q[0].transpose(0, 1), keys[0].transpose(0, 1), values[0].transpose(0, 1),
            self.cum_q, self.cum_k, 1, keys.shape[2], 0.0, False, False, scale=self.scale,
        )[0]  # fmt: skip
        return out.transpose(0, 1)[None]


def causal_mask(
    start: int, count: int, window: int | None, device: torch.device, first: int = 0
) -> torch.Tensor | None:
    """Boolean [count, start+count-first] mask over keys first..start+count-1 (True = may
    attend), or None where `attend` is exact without one: a single query that sees every
    key held, or a prompt from position 0 (SDPA's is_causal, which also skips the masked
    half of the work).

    Queries sit at positions start..start+count-1 and see keys up to their own position, no
    further back than `window` positions where the model has a sliding window (a sliding
    layer's cache holds keys from `first` on, node/engine/kv_cache.py).
    """
    length = start + count
    if (count == 1 or start == 0) and (window is None or length - first <= window):
        return None
    q_pos = torch.arange(start, length, device=device)[:, None]
    k_pos = torch.arange(first, length, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [B, H, T, D] against k, v [B, Hkv, L, D]; grouped-query heads share their kv head.
    Scores are scaled by `scale` (None: 1/sqrt(D)).

    With no mask, several queries are a prompt from position 0 (T == L): causal.
    """
    is_causal = mask is None and q.shape[2] > 1
    if sinks is not None:
        return attend_with_sinks(q, k, v, mask, sinks, scale)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True, scale=scale
    )


def attend_latent(
    q: torch.Tensor, keys: torch.Tensor, value_dim: int, mask: torch.Tensor | None,
    scale: float | None,
) -> torch.Tensor:  # fmt: skip
    """Latent attention: q [B, H, T, D] against one key head [B, 1, L, D] whose first
    `value_dim` numbers are the values. The heads are folded into query rows, so SDPA runs
    one head on its fused kernels: with enable_gqa over 128 heads of width 576 it copies the
    keys to every head (2.3 s a decode step at 4096 positions on the CPU, against 0.07)."""
    b, h, t, d = q.shape
    if mask is None and t > 1:  # a prompt from position 0: causal
        mask = torch.ones(t, keys.shape[2], dtype=torch.bool, device=q.device).tril(
            keys.shape[2] - t)  # fmt: skip
    rows = q.transpose(1, 2).reshape(b, 1, t * h, d)
    out = F.scaled_dot_product_attention(
        rows, keys, keys[..., :value_dim],
        attn_mask=None if mask is None else mask.repeat_interleave(h, 0), scale=scale,
    )  # fmt: skip
    return out.view(b, t, h, value_dim).transpose(1, 2)


def attend_with_sinks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    sinks: torch.Tensor, scale: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """gpt-oss's attention: each head's softmax also spans a learned sink logit, which takes
    its share of the probability and adds nothing to the output (so a head can attend to
    nothing). Written out, as the reference does: SDPA has no such column."""
    t, length = q.shape[2], k.shape[2]
    if mask is None and t > 1:  # a prompt from position 0
        mask = torch.ones(t, length, dtype=torch.bool, device=q.device).tril(length - t)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = q @ k.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    column = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(q.shape[0], -1, t, 1)
    logits = torch.cat([scores, column], dim=-1)
    probs = F.softmax(logits - logits.amax(-1, keepdim=True), dim=-1)[..., :-1]
    return probs.to(v.dtype) @ v
