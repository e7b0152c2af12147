"""A linear layer whose weight layout follows what the device reads fastest."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def input_major(in_features: int, out_features: int, device_type: str) -> bool:
    """Whether to store W as [in, out] rather than nn.Linear's [out, in].

    Decoding multiplies one row by W, which is bound by how fast W streams from memory. On
    the CPU (MKL, measured on 2-core EPYC, bench/ notes) [in, out] streams at 16-24 GB/s for
    widening and square layers against 11-13 GB/s for [out, in]; narrowing layers (MLP down)
    are faster as [out, in]. The choice is a fixed rule, not a timing, so that every node
    computes bit-identical results run after run. GPUs keep the standard layout.
    """
    return device_type == "cpu" and out_features >= in_features


class Linear(nn.Module):
    """y = x W^T + b, with W stored [out, in] or, where `input_major`, [in, out]."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, device_type: str = "cpu"
    ) -> None:
        super().__init__()
        self.transposed = input_major(in_features, out_features, device_type)
        shape = (in_features, out_features) if self.transposed else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def arrange(self, weight: torch.Tensor) -> torch.Tensor:
        """Checkpoint layout [out, in] -> this layer's layout."""
        return weight.t() if self.transposed else weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.transposed:
            return F.linear(x, self.weight, self.bias)
        y = x @ self.weight
        return y + self.bias if self.bias is not None else y
