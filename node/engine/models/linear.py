"""A linear layer whose weight layout follows what the device reads fastest."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Below this many weights a layer is not worth splitting across threads.
_MIN_BLOCKED_WEIGHTS = 1 << 20
# Up to this many input rows, blocks run as one batched matmul (see Linear._blocked).
_BATCHED_MAX_ROWS = 16


def layout(in_features: int, out_features: int, device_type: str) -> tuple[bool, int]:
    """(input_major, blocks): how to store W, which nn.Linear keeps as [out, in].

    Decoding multiplies one row by W, which is bound by how fast W streams from memory.
    On the CPU (MKL; measurements in bench/README.md):
    - one gemv is served by one core, so a large W is cut into one block of output rows per
      thread and multiplied with a batched matmul, which runs the blocks on all cores;
    - widening and square layers stream faster stored [in, out] ("input-major"), narrowing
      ones (MLP down) as [out, in].
    Both are fixed rules, not timings, so a node computes the same thing run after run.
    GPUs keep nn.Linear's layout.
    """
    if device_type != "cpu":
        return False, 1
    threads = torch.get_num_threads()
    big = in_features * out_features >= _MIN_BLOCKED_WEIGHTS
    blocks = threads if big and threads > 1 and out_features % threads == 0 else 1
    return out_features >= in_features, blocks


class Linear(nn.Module):
    """y = x W^T + b, with W stored per `layout`: [out, in] or [in, out], maybe in blocks.

    Blocked weights are [blocks, in, out/blocks] (input-major) or [blocks, out/blocks, in].
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, device_type: str = "cpu"
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.input_major, self.blocks = layout(in_features, out_features, device_type)
        rows = out_features // self.blocks
        shape = (in_features, rows) if self.input_major else (rows, in_features)
        if self.blocks > 1:
            shape = (self.blocks, *shape)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def arrange(self, weight: torch.Tensor) -> torch.Tensor:
        """Checkpoint layout [out, in] -> this layer's layout."""
        if self.blocks > 1:
            weight = weight.reshape(self.blocks, -1, self.in_features)
        return weight.transpose(-1, -2) if self.input_major else weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks == 1:
            if not self.input_major:
                return F.linear(x, self.weight, self.bias)
            y = x @ self.weight
        else:
            y = self._blocked(x.reshape(-1, self.in_features)).view(*x.shape[:-1], -1)
        return y + self.bias if self.bias is not None else y

    def _blocked(self, rows: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.input_major else self.weight.transpose(1, 2)  # [blocks, in, n]
        if rows.shape[0] <= _BATCHED_MAX_ROWS:  # decoding: one batched matmul, all cores
            y = torch.bmm(rows.expand(self.blocks, -1, -1), w)
            return y.transpose(0, 1).reshape(rows.shape[0], self.out_features)
        # Prefill: each block's matmul already uses every core; write it in place rather
        # than interleave the blocks' outputs afterwards (a copy as large as the output).
        y = rows.new_empty(rows.shape[0], self.out_features)
        n = self.out_features // self.blocks
        for b in range(self.blocks):
            torch.mm(rows, w[b], out=y[:, b * n : (b + 1) * n])
        return y
