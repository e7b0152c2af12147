"""MXFP4 weights (gpt-oss's experts) kept as they are stored: 4-bit e2m1 codes with one
power-of-two scale per 32 inputs, 4.25 bits a weight.

A code's value is a lookup, not an affine step (0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6), so
neither int4 (evenly spaced) nor int8 with a scale per row holds it exactly; doubled, the
values are small integers, and every weight is exactly `KVALUES[code] * 2**(e - 128)`.

Layout (llama.cpp's block_mxfp4, which gpt-oss GGUFs use): per row, per block of 32 inputs,
one e8m0 exponent byte and 16 bytes whose low nibbles are inputs 0..15 and high nibbles
inputs 16..31. Hugging Face's gpt-oss checkpoints pair neighbours instead (byte j holds
inputs 2j and 2j+1): `from_hf_blocks` reorders them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BLOCK = 32
# e2m1 values, doubled so that they are integers (llama.cpp's kvalues_mxfp4).
KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


@dataclass
class Mxfp4Tensor:
    """A weight [N, K]: codes uint8 [N, K/32, 16] (two a byte), exponents uint8 [N, K/32]."""

    codes: torch.Tensor
    exponents: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape[0], self.codes.shape[1] * BLOCK

    def rows(self, index: torch.Tensor | slice) -> Mxfp4Tensor:
        return Mxfp4Tensor(self.codes[index], self.exponents[index])

    @staticmethod
    def cat(parts: list[Mxfp4Tensor]) -> Mxfp4Tensor:
        return Mxfp4Tensor(torch.cat([p.codes for p in parts]),
                           torch.cat([p.exponents for p in parts]))  # fmt: skip

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weights, exact in float32 or bfloat16 (at most 4 significant bits each)."""
        n, blocks, _ = self.codes.shape
        nibbles = torch.cat([self.codes & 15, self.codes >> 4], dim=-1)  # inputs 0..15, 16..31
        lut = torch.tensor(KVALUES, dtype=torch.float32, device=self.codes.device)
        values = lut[nibbles.long()]
        exps = self.exponents.to(torch.int32)[..., None] - 128
        return torch.ldexp(values, exps).reshape(n, blocks * BLOCK).to(dtype)

    @classmethod
    def from_gguf(cls, raw: np.ndarray, rows: int) -> Mxfp4Tensor:
        """A GGUF MXFP4 tensor's bytes (17 a block: exponent, then 16 of codes)."""
        b = torch.from_numpy(np.ascontiguousarray(raw).reshape(rows, -1, 1 + BLOCK // 2))
        return cls(b[..., 1:].contiguous(), b[..., 0].contiguous())

    @classmethod
    def from_hf_blocks(cls, blocks: torch.Tensor, scales: torch.Tensor) -> Mxfp4Tensor:
        """Hugging Face's `*_blocks` [N, K/32, 16] (byte j: inputs 2j, 2j+1) and `*_scales`
        [N, K/32] (e8m0)."""
        nibbles = torch.stack([blocks & 15, blocks >> 4], dim=-1).flatten(-2)  # in order
        codes = nibbles[..., :16] | nibbles[..., 16:] << 4
        return cls(codes.contiguous(), scales.contiguous())


def quantize_mxfp4(w: torch.Tensor) -> Mxfp4Tensor:
    """A float weight [N, K] to MXFP4 as llama.cpp's reference quantizer does: each block's
    exponent from its largest magnitude, each value its nearest code."""
    n, k = w.shape
    blocks = w.float().reshape(n, k // BLOCK, BLOCK)
    top = blocks.abs().amax(-1)
    e = torch.where(top > 0, torch.floor(torch.log2(top)) - 2 + 127, torch.zeros_like(top))
    e = e.clamp(0, 254).to(torch.uint8)
    scale = torch.ldexp(torch.ones_like(top), e.to(torch.int32) - 128)
    lut = torch.tensor(KVALUES, dtype=torch.float32)
    nearest = (blocks[..., None] - scale[..., None, None] * lut).abs().argmin(-1).to(torch.uint8)
    return Mxfp4Tensor((nearest[..., :16] | nearest[..., 16:] << 4).contiguous(), e)


class Mxfp4Linear(nn.Module):
    """y = x W^T + b with W held in MXFP4; computed in x's dtype from the exact weights."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.register_buffer("codes", torch.empty(0, dtype=torch.uint8), persistent=False)
        self.register_buffer("exponents", torch.empty(0, dtype=torch.uint8), persistent=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def load(self, parts: list[Mxfp4Tensor], device: torch.device, dtype: torch.dtype) -> None:
        w = Mxfp4Tensor.cat(parts) if len(parts) > 1 else parts[0]
        self.codes, self.exponents = w.codes.to(device), w.exponents.to(device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = Mxfp4Tensor(self.codes, self.exponents).dequantize(x.dtype)
        return F.linear(x, w, self.bias)
