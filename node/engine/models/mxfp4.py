"""MXFP4 weights (gpt-oss's experts) kept as they are stored: 4-bit e2m1 codes with one
power-of-two scale per 32 inputs, 4.25 bits a weight.

A code's value is a lookup, not an affine step (0, ±0.5, ±1, ±1.5, ±2, ±3, ±4, ±6), so
neither int4 (evenly spaced) nor int8 with a scale per row holds it exactly; doubled, the
values are small integers, and every weight is exactly `KVALUES[code] * 2**(e - 128)`.

Layout (llama.cpp's block_mxfp4, which gpt-oss GGUFs use): per row, per block of 32 inputs,
one e8m0 exponent byte and 16 bytes whose low nibbles are inputs 0..15 and high nibbles
inputs 16..31. Hugging Face's gpt-oss checkpoints pair neighbours instead (byte j holds
inputs 2j and 2j+1): `from_hf_blocks` reorders them.

Matmuls read the codes as they are (`mxfp4_linear`): on the CPU a kernel compiled for the
running machine at first use (mxfp4.cpp) decodes each block into registers, about as fast
per weight byte as PyTorch's int4 kernel; with many rows (prefill), on a GPU, or where that
kernel is off (`RINGINFER_MXFP4_KERNEL=0`, or it would not compile), the weights are
dequantized a tile of rows at a time for a GEMM. Both give the exact weights, so results
differ from the float reference by the order of summation only.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from node.engine.models import native

log = logging.getLogger("ringinfer")

BLOCK = 32
# e2m1 values, doubled so that they are integers (llama.cpp's kvalues_mxfp4).
KVALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)
KERNEL_ENV = "RINGINFER_MXFP4_KERNEL"  # "0": never compile or use the CPU kernel
SOURCE = Path(__file__).with_suffix(".cpp")
FLAGS = native.FLAGS  # a test builds other instruction sets by replacing it
# Up to this many rows the kernel reads the codes directly; more rows share each
# dequantized tile through a GEMM: faster from about 64 float32 rows on 1 or 2 cores, and
# from 16 bfloat16 rows where the CPU has AMX (bench/README.md).
DIRECT_ROWS = 64
DIRECT_ROWS_AMX_BF16 = 16
# Bytes dequantized at a time: a tile of rows, never the whole float weight. GEMMs that size
# keep the cores busy (1 MiB tiles left two threads half idle; bfloat16's AMX GEMMs on
# 2880 inputs are 1.3x faster with 1456 rows a tile than with 364: bench/README.md).
TILE_BYTES = {"cpu": 8 << 20, "cuda": 32 << 20}


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
        """The weights, exact in float32 or bfloat16 (at most 4 significant bits each): each
        block's 16 values, then one lookup a code (as the CPU kernel does; about 3x faster
        than scaling every weight)."""
        n, blocks, _ = self.codes.shape
        device = self.codes.device
        scales = torch.ldexp(torch.ones(n, blocks, device=device),
                             self.exponents.to(torch.int32) - 128)  # fmt: skip
        table = scales[..., None] * torch.tensor(KVALUES, dtype=torch.float32, device=device)
        nibbles = torch.cat([self.codes & 15, self.codes >> 4], dim=-1)  # inputs 0..15, 16..31
        return table.gather(-1, nibbles.long()).reshape(n, blocks * BLOCK).to(dtype)

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
        if device.type == "cpu":
            kernel()  # compiled (once) while loading, not in the first request

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        y = mxfp4_linear(rows, Mxfp4Tensor(self.codes, self.exponents), self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)


def mxfp4_linear(x: torch.Tensor, w: Mxfp4Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x W^T + b for x [M, K], from W's codes: the CPU kernel (float32 inside, x's dtype
    out), or exact tiles of W through F.linear."""
    ops = kernel() if x.device.type == "cpu" else None
    if ops is None:
        return _by_tiles(x, w, bias, lambda part: part.dequantize(x.dtype))
    # bfloat16 rows meet bfloat16 tiles (exact weights), others float32 ones.
    dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    if len(x) <= (DIRECT_ROWS_AMX_BF16 if dtype == torch.bfloat16 and _amx() else DIRECT_ROWS):
        return ops.linear(x, w.codes, w.exponents, bias)
    buffer = torch.empty(tile_rows(w.shape[1], dtype, "cpu"), w.shape[1], dtype=dtype)

    def dequantize(part: Mxfp4Tensor) -> torch.Tensor:
        out = buffer[: len(part.codes)]
        ops.dequantize(part.codes, part.exponents, out)
        return out

    b = None if bias is None else bias.to(dtype)
    return _by_tiles(x.to(dtype), w, b, dequantize).to(x.dtype)


def _by_tiles(x: torch.Tensor, w: Mxfp4Tensor, bias: torch.Tensor | None,
              dequantize: Callable[[Mxfp4Tensor], torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """F.linear over tiles of W's rows (in x's dtype), each dequantized when its turn comes."""
    n, k = w.shape
    step = tile_rows(k, x.dtype, x.device.type)
    if n <= step:
        return F.linear(x, dequantize(w), bias)
    y = x.new_empty(len(x), n)
    for i in range(0, n, step):
        part = slice(i, i + step)
        y[:, part] = F.linear(x, dequantize(w.rows(part)), None if bias is None else bias[part])
    return y


@functools.cache
def _amx() -> bool:
    return getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()


def tile_rows(k: int, dtype: torch.dtype, device_type: str) -> int:
    """Rows of `k` weights in `dtype` a tile holds."""
    return max(1, TILE_BYTES.get(device_type, TILE_BYTES["cuda"]) // (k * dtype.itemsize))


def kernel() -> Any | None:
    """The CPU kernel's ops (`torch.ops.ringinfer_mxfp4`), or None where it is off or would
    not build; the first call compiles it (once per CPU model, torch and Python version)."""
    return _kernel(os.environ.get(KERNEL_ENV, "1") != "0")


@functools.cache
def _kernel(enabled: bool) -> Any | None:
    if not enabled:
        reason = f"{KERNEL_ENV}=0"
    else:
        try:
            return build_kernel()
        except Exception as e:  # no compiler, a compiler error, no torch headers: all fall back
            reason = f"it did not compile: {native.first_error(str(e))}"
    log.warning("MXFP4 CPU kernel off (%s): weights are dequantized a tile at a time, "
                "several times slower", reason)  # fmt: skip
    return None


@functools.cache
def build_kernel() -> Any:
    """Load the kernel built for this CPU, torch and Python, building it first if need be
    (node/engine/models/native.py); raises where no flags build."""
    return native.build("ringinfer_mxfp4", SOURCE, FLAGS)
