"""Per-request key/value cache of one stage: static buffers sized to the request's need."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from node.errors import RinginferError

SPAN = 256  # positions a sliding layer's buffer holds beyond its window: a prompt chunk's


@dataclass
class _Group:
    """The buffers of the layers that share a window (None: the whole context): keys and
    values [layers, batch, heads, positions, head_dim] holding positions from `first` on."""

    window: int | None
    k: torch.Tensor
    v: torch.Tensor
    first: int = 0


class KVCache:
    """Keys and values for the layers one stage owns, for one request.

    Buffers are allocated once, so a decode step writes one position in place instead of
    growing tensors. A layer that sees the whole context holds `capacity` positions (prompt
    + tokens to generate, never more than the model's context). A sliding-window layer holds
    only its window and the positions one pass adds (`span`): when a pass would run past its
    buffer, the window's last positions move to its front, so its memory follows the window,
    not the context. `length` counts the positions already written. Values may be narrower
    than keys (`value_dim`; 0 for latent attention, whose values are in its keys).
    """

    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
        windows: Sequence[int | None] | None = None,
        span: int = SPAN,
        value_dim: int | None = None,
    ) -> None:
        windows = list(windows) if windows is not None else [None] * n_layers
        self.capacity, self.length, self.dtype = capacity, 0, dtype
        self.graph: Any = None  # its decode steps' CUDA graph (node/engine/models/cuda_graph.py)
        # A recurrent layer's state (node/engine/models/qwen3_next.py): fixed-size tensors a
        # stage's new_cache adds, whatever the context.
        self.states: list[tuple[torch.Tensor, ...]] = []
        self.groups: dict[int | None, _Group] = {}
        self.where: list[tuple[_Group, int]] = []  # each layer's group and index in it
        for w in dict.fromkeys(windows):
            count = windows.count(w)
            # Uninitialised: only written positions are ever read, and untouched pages of a
            # long context cost no resident memory until the request reaches them.
            shape = (count, batch, n_kv_heads, held_positions(w, capacity, span), head_dim)
            values = (*shape[:4], head_dim if value_dim is None else value_dim)
            self.groups[w] = _Group(w, torch.empty(shape, dtype=dtype, device=device),
                                    torch.empty(values, dtype=dtype, device=device))  # fmt: skip
        seen = dict.fromkeys(self.groups, 0)
        for w in windows:
            self.where.append((self.groups[w], seen[w]))
            seen[w] += 1

    @property
    def nbytes(self) -> int:
        held = sum(t.nbytes for state in self.states for t in state)
        return held + sum(g.k.nbytes + g.v.nbytes for g in self.groups.values())

    def check_room(self, start: int, count: int) -> None:
        """Positions must continue the cache (or rewrite its tail) and fit its capacity."""
        if start > self.length:
            raise RinginferError(f"position {start} skips ahead of a cache holding {self.length}")
        if start + count > self.capacity:
            raise RinginferError(
                f"positions up to {start + count} exceed the cache capacity of {self.capacity}"
            )
        for g in self.groups.values():
            if start < g.first:
                raise RinginferError(
                    f"position {start} has left the sliding window (the cache starts at "
                    f"{g.first})"
                )

    def buffers(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Keys and values [batch, heads, positions, head_dim] of `layer`, and the position
        their first entry holds."""
        group, i = self.where[layer]
        return group.k[i], group.v[i], group.first

    def update(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Write k, v ([batch, heads, T, head_dim]) at `start`; return the keys/values the
        positions written can see (all so far, or a window's), and the position of the first."""
        group, i = self.where[layer]
        end = start + k.shape[2]
        if end - group.first > group.k.shape[3]:
            _slide(group, start, end)
        at, upto = start - group.first, end - group.first
        group.k[i, :, :, at:upto] = k
        group.v[i, :, :, at:upto] = v
        return group.k[i, :, :, :upto], group.v[i, :, :, :upto], group.first

    def advance(self, start: int, count: int) -> None:
        """Record that positions [start, start+count) are now written in every layer."""
        self.length = start + count


def held_positions(window: int | None, capacity: int, span: int = SPAN) -> int:
    """Positions a layer's buffer holds for a request of `capacity` positions."""
    return capacity if window is None else min(capacity, window + span)


def _slide(group: _Group, start: int, end: int) -> None:
    """Make room for positions [start, end) in a sliding group, for every layer in it at
    once (all of them hold the same positions between passes): keep the window's last
    positions before `start`, the ones the earliest new query still sees, at the front;
    grow the buffer if one pass adds more positions than it holds beyond the window."""
    keep = max(group.first, start - group.window + 1)
    kept = start - keep
    length = group.k.shape[3]
    if kept + end - start > length:  # a pass longer than the span: grow
        length = kept + end - start
        for name in ("k", "v"):
            old = getattr(group, name)
            new = old.new_empty((*old.shape[:3], length, old.shape[4]))
            new[:, :, :, :kept] = old[:, :, :, keep - group.first : start - group.first]
            setattr(group, name, new)
    else:
        src = slice(keep - group.first, start - group.first)
        group.k[:, :, :, :kept] = group.k[:, :, :, src].clone()
        group.v[:, :, :, :kept] = group.v[:, :, :, src].clone()
    group.first = keep
