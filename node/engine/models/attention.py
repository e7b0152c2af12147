"""Causal attention over a KV cache, shared by every architecture."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from node.engine.kv_cache import KVCache


@dataclass(frozen=True)
class Step:
    """What every layer of one forward pass shares: the cache, where it writes, the mask,
    and (for RoPE models) the rotation tables of these positions."""

    cache: KVCache
    start: int
    mask: torch.Tensor | None
    rope: tuple[torch.Tensor, torch.Tensor] | None = None


def causal_mask(
    start: int, count: int, window: int | None, device: torch.device
) -> torch.Tensor | None:
    """Boolean [count, start+count] mask (True = may attend), or None where `attend` is exact
    without one: a single query (it sees every cached key) or a prompt from position 0
    (SDPA's is_causal, which also skips the masked half of the work).

    Queries sit at positions start..start+count-1 and see keys 0..their own position, and
    no further back than `window` positions where the model has a sliding window.
    """
    length = start + count
    if (count == 1 or start == 0) and (window is None or length <= window):
        return None
    q_pos = torch.arange(start, length, device=device)[:, None]
    k_pos = torch.arange(length, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """q [B, H, T, D] against k, v [B, Hkv, L, D]; grouped-query heads share their kv head.

    With no mask, several queries are a prompt from position 0 (T == L): causal.
    """
    is_causal = mask is None and q.shape[2] > 1
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True
    )
