"""Per-request key/value cache of one stage: static buffers sized to the request's need."""

from __future__ import annotations

import torch

from node.errors import RinginferError


class KVCache:
    """Keys and values for the layers one stage owns, for one request.

    Buffers are allocated once, at `capacity` positions (prompt + tokens to generate, never
    more than the model's context), so a decode step writes one position in place instead of
    growing tensors. `length` counts the positions already written.
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
    ) -> None:
        shape = (n_layers, batch, n_kv_heads, capacity, head_dim)
        # Uninitialised: only written positions are ever read, and untouched pages of a long
        # context cost no resident memory until the request reaches them.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.length = 0

    def check_room(self, start: int, count: int) -> None:
        """Positions must continue the cache (or rewrite its tail) and fit its capacity."""
        if start > self.length:
            raise RinginferError(f"position {start} skips ahead of a cache holding {self.length}")
        if start + count > self.capacity:
            raise RinginferError(
                f"positions up to {start + count} exceed the cache capacity of {self.capacity}"
            )

    def update(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v ([batch, heads, T, head_dim]) at `start`; return all keys/values so far."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, start: int, count: int) -> None:
        """Record that positions [start, start+count) are now written in every layer."""
        self.length = start + count
