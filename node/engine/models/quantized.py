"""Weights kept as integer codes (int8 per output row, int4 per group of 32 inputs) and the
layers that compute with them through PyTorch's own packed kernels.

Decoding reads every weight once per token, so bytes held are also time spent: int4 moves
about a sixth of float32's bytes. The formats, for a weight W [out, in]:
- int8: W = q * scale, q in -128..127, one scale per output row (`_weight_int8pack_mm`).
- int4: W = (q - 8) * scale + zero, q in 0..15, per group of `group` inputs
  (`_weight_int4pack_mm_for_cpu`, `_weight_int4pack_mm` on CUDA; packed per device at load,
  never stored packed). llama.cpp's Q4_0, Q4_1 and Q4_K blocks are this form exactly.
Activations around these matmuls are bfloat16 (both CPU kernels are fast for it only);
norms, softmax, RoPE and the residual stream keep the stage's dtype.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from node.engine.models import decode_ops
from node.engine.models.linear import Linear
from node.engine.models.mxfp4 import Mxfp4Linear, Mxfp4Tensor, quantize_mxfp4
from node.errors import RinginferError

GROUP = 32  # int4 group size: llama.cpp's block size, the smallest the kernels take
# PyTorch's int8 CPU kernel reads rows in blocks of 16: other widths crash the process
# (torch 2.13, measured: 16, 48, 80 run; 8, 24, 40, 100 segfault).
INT8_BLOCK = 16
CHUNK = 1 << 20  # values converted at a time: bounds the transient copies of a tensor (4 MiB)
ACT = torch.bfloat16
# An LM head's outputs this close to their row's maximum (relatively) are recomputed in
# float32 (QuantizedLinear): bfloat16 outputs and scales are each off by up to 2^-9.
REFINE = 2**-6


@dataclass
class QuantizedTensor:
    """A weight [out, in] as codes with per-group scales (and zeros, int4)."""

    codes: torch.Tensor  # int8 [N, K] (int8), or uint8 [N, K] holding 0..15 (int4)
    scales: torch.Tensor  # float32 [N, K // group]
    zeros: torch.Tensor | None = None  # float32 [N, K // group], int4 only

    @property
    def bits(self) -> int:
        return 8 if self.codes.dtype == torch.int8 else 4

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    @property
    def group(self) -> int:
        return self.codes.shape[1] // self.scales.shape[1]

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        g = self.group
        if self.bits == 8:
            return self.codes.float() * self.scales
        q = self.codes.view(n, k // g, g).float() - 8
        return (q * self.scales[..., None] + self.zeros[..., None]).view(n, k)

    def rows(self, index: torch.Tensor | slice) -> QuantizedTensor:
        zeros = None if self.zeros is None else self.zeros[index]
        return QuantizedTensor(self.codes[index], self.scales[index], zeros)

    @staticmethod
    def cat(parts: list[QuantizedTensor]) -> QuantizedTensor:
        """Row-wise concatenation (fused projections); parts must share format and group."""
        if len({(p.bits, p.group) for p in parts}) > 1:
            raise ValueError("cannot fuse weights of different formats")
        zeros = None if parts[0].zeros is None else torch.cat([p.zeros for p in parts])
        return QuantizedTensor(
            torch.cat([p.codes for p in parts]), torch.cat([p.scales for p in parts]), zeros
        )


def row_chunk(width: int) -> int:
    """Rows of `width` values to convert at a time."""
    return max(1, CHUNK // width)


def quantize(w: torch.Tensor, fmt: str) -> QuantizedTensor | Mxfp4Tensor:
    """A float weight [N, K] in `fmt` (int8 symmetric per row; int4 min/max per group;
    MXFP4 as llama.cpp quantizes it)."""
    if fmt == "mxfp4":
        return quantize_mxfp4(w)
    step = row_chunk(w.shape[1])
    return convert_rows(w.shape, ((i, w[i : i + step]) for i in range(0, len(w), step)), fmt)


def convert_rows(
    shape: tuple[int, int], chunks: Iterable[tuple[int, torch.Tensor]], fmt: str
) -> torch.Tensor | QuantizedTensor:
    """A weight [N, K] given as chunks of float rows (first row, rows), converted chunk by
    chunk into outputs allocated once: the chunks' transient copies then reuse each other's
    memory instead of interleaving with what is kept (glibc left 6x the kept bytes resident)."""
    n, k = shape
    if fmt == "none":
        out = torch.empty(n, k)
        for i, rows in chunks:
            out[i : i + len(rows)] = rows
        return out
    if fmt == "int4" and k % GROUP:
        raise RinginferError(f"int4 needs rows that are a multiple of {GROUP} long, not {k}")
    groups = 1 if fmt == "int8" else k // GROUP
    out = QuantizedTensor(
        torch.empty(n, k, dtype=torch.int8 if fmt == "int8" else torch.uint8),
        torch.empty(n, groups),
        torch.empty(n, groups) if fmt == "int4" else None,
    )
    for i, rows in chunks:
        part = _quantize_rows(rows.float(), fmt)
        out.codes[i : i + len(rows)] = part.codes
        out.scales[i : i + len(rows)] = part.scales
        if out.zeros is not None:
            out.zeros[i : i + len(rows)] = part.zeros
    return out


def _quantize_rows(w: torch.Tensor, fmt: str) -> QuantizedTensor:
    n, k = w.shape
    if fmt == "int8":
        scale = w.abs().amax(1, keepdim=True) / 127
        q = (w / scale.clamp(min=torch.finfo(torch.float32).tiny)).round().clamp(-128, 127)
        return QuantizedTensor(q.to(torch.int8), scale)
    g = w.view(n, k // GROUP, GROUP)
    low, high = g.amin(-1), g.amax(-1)
    scale = (high - low) / 15
    q = ((g - low[..., None]) / scale.clamp(min=1e-30)[..., None]).round().clamp(0, 15)
    return QuantizedTensor(q.to(torch.uint8).view(n, k), scale, low + 8 * scale)


def convert(t: torch.Tensor | QuantizedTensor | Mxfp4Tensor, fmt: str) -> Any:
    """A weight in `fmt`: float ('none', dequantized if need be), int8/int4 codes, or MXFP4
    (as the file holds it)."""
    if fmt == "none":
        return t.dequantize() if isinstance(t, QuantizedTensor | Mxfp4Tensor) else t
    if isinstance(t, Mxfp4Tensor):
        return t if fmt == "mxfp4" else convert(t.dequantize(), fmt)
    if isinstance(t, QuantizedTensor):
        if t.bits == int(fmt[3:]) and (t.bits == 8 or t.group == GROUP):
            return t
        step = row_chunk(t.shape[1])
        chunks = (
            (i, t.rows(slice(i, i + step)).dequantize()) for i in range(0, len(t.codes), step)
        )
        return convert_rows(t.shape, chunks, fmt)
    return quantize(t, fmt)


def check_device(fmt: str, device: torch.device) -> None:
    """Refuse a format whose kernels this device lacks, with what to use instead."""
    if fmt == "none" or device.type == "cpu":
        return
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if fmt == "int4" and major < 8:
            raise RinginferError(
                f"--quantize int4 needs an NVIDIA GPU of compute capability 8.0 or newer "
                f"(this one is {major}.{minor}); use --quantize int8 or none"
            )
        return
    raise RinginferError(
        f"--quantize {fmt} is not supported on {device.type}; use --quantize none "
        "(or run this node on the CPU)"
    )


# Bytes a weight costs held in each format: int4 codes plus a bfloat16 scale and zero per
# group of 32; int8 codes (plus one scale per row, left out).
BYTES_PER_WEIGHT = {"int8": 1.0, "int4": 0.5 + 4 / GROUP, "mxfp4": 0.5 + 1 / GROUP}


def held_per_weight(module: nn.Module, fmt: str, head: bool = False) -> float | None:
    """Bytes a weight of `module` (in its `module_format`) costs held; None if it stays
    float. A token table keeps float32 scales (and int4's zeros) for exact lookups; an LM
    head keeps its rows as such a table too (`refine`: int8 shares the codes, int4 copies)."""
    if fmt not in BYTES_PER_WEIGHT:
        return None
    width = module.embedding_dim if isinstance(module, nn.Embedding) else module.in_features
    table = 0.5 + 8 / GROUP if fmt == "int4" else 1.0 + 4 / width
    if isinstance(module, nn.Embedding):
        return table
    if head and fmt != "mxfp4":
        return BYTES_PER_WEIGHT[fmt] + table - (fmt == "int8")
    return BYTES_PER_WEIGHT[fmt]


def quantizable(module: nn.Module, vocab_size: int) -> bool:
    """Linear layers and the token table are kept quantized; norms, biases and position
    tables stay in the compute dtype."""
    table = isinstance(module, nn.Embedding) and module.num_embeddings == vocab_size
    return isinstance(module, Linear) or table


def swap_modules(
    stage: nn.Module, choose: Callable[[str], str], device: torch.device
) -> dict[str, str]:
    """Replace each quantizable module whose format `choose(its weight's key)` is not 'none'
    with its quantized twin (empty until `load`); returns the formats by weight key."""
    formats = {}
    for name, module in list(stage.named_modules()):
        if not quantizable(module, stage.cfg.vocab_size):
            continue
        fmt = module_format(module, choose(f"{name}.weight"))
        swapped = quantized_module(module, fmt, device) if fmt != "none" else None
        if isinstance(swapped, QuantizedLinear) and name == "lm_head":
            swapped.refine = QuantizedEmbedding(module.out_features, module.in_features)
        if swapped is not None:
            parent, _, child = name.rpartition(".")
            setattr(stage.get_submodule(parent), child, swapped)
            formats[f"{name}.weight"] = fmt
    return formats


def fill_random(stage: nn.Module, formats: dict[str, str], device: torch.device,
                dtype: torch.dtype) -> None:  # fmt: skip
    """Random weights for swapped modules: what timing a format needs, without a file."""
    for key, fmt in formats.items():
        module = stage.get_submodule(key.rpartition(".")[0])
        module.load([quantize(torch.randn(module.shape) * 0.02, fmt)], device, dtype)


def module_format(module: nn.Module, fmt: str) -> str:
    """int4 and MXFP4 where rows split into whole groups (MXFP4 for linear layers only),
    else int8 where rows are whole blocks of INT8_BLOCK, else the compute dtype."""
    width = module.embedding_dim if isinstance(module, nn.Embedding) else module.in_features
    table = isinstance(module, nn.Embedding)
    if (fmt == "mxfp4" and table) or (fmt in ("int4", "mxfp4") and width % GROUP):
        fmt = "int8"
    return "none" if fmt == "int8" and width % INT8_BLOCK else fmt


def quantized_module(module: nn.Module, fmt: str, device: torch.device) -> nn.Module | None:
    """The quantized twin of a float `Linear` or token `nn.Embedding` in `module_format`,
    empty until `load`; None where the float module is the better choice on this device."""
    if isinstance(module, nn.Embedding):
        return QuantizedEmbedding(module.num_embeddings, module.embedding_dim)
    bias = module.bias is not None
    if fmt == "int8" and device.type == "cuda":
        # PyTorch's CUDA int8 matmul is a naive kernel, ~6x slower than bfloat16 on an H100
        # (bench/README.md); the codes are dequantized to the compute dtype instead.
        _warn_once("int8 weights are dequantized to the compute dtype on CUDA (PyTorch's "
                   "int8 kernel is slower there); --quantize int4 keeps 4 bits")  # fmt: skip
        return None
    if fmt == "int4":
        return Int4Linear(module.in_features, module.out_features, bias, device.type)
    if fmt == "mxfp4":
        return Mxfp4Linear(module.in_features, module.out_features, bias)
    return Int8Linear(module.in_features, module.out_features, bias)


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        logging.getLogger("ringinfer").warning(message)


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W held as codes: bfloat16 rows into the kernel, the input's dtype
    out. Subclasses hold the codes (`load_codes`) and multiply (`matmul`).

    The kernels round their outputs to bfloat16: 1/8 apart at a logit of 25, which turns a
    float32 model's near-ties into exact ties and flips greedy choices. So an LM head
    (`refine`) recomputes in float32, from their own codes dequantized, the outputs of each
    row that bfloat16's rounding (of outputs and of scales) could have put below the row's
    maximum: those within `REFINE` of it, relatively. The other logits keep bfloat16's
    precision, ample for their probabilities.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.refine: QuantizedEmbedding | None = None  # the rows, gatherable, for an LM head

    @property
    def shape(self) -> tuple[int, int]:
        return self.out_features, self.in_features

    def load(self, parts: list[QuantizedTensor], device: torch.device, dtype: torch.dtype) -> None:
        w = QuantizedTensor.cat(parts) if len(parts) > 1 else parts[0]
        self.load_codes(w, device)
        if self.refine is not None:  # int8: the same codes; int4: a gatherable copy
            self.refine.load([w], device, torch.float32)

    def load_codes(self, w: QuantizedTensor, device: torch.device) -> None:
        raise NotImplementedError

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cpu_operands(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        """(codes, scales, group: 0 for int8) for decode_ops.quantized_linear, on the CPU."""
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        operands = self.cpu_operands() if x.is_cpu else None
        if operands is not None and (ops := decode_ops.ops()):  # the lines below, one call
            y = ops.quantized_linear(rows, *operands, self.out_features)
        else:
            y = self.matmul(rows.to(ACT))
            if y.shape[-1] != self.out_features:  # rows padded for the kernel
                y = y[:, : self.out_features]
            y = y.to(x.dtype)
        if self.refine is not None and x.dtype.itemsize > ACT.itemsize:
            high = y.amax(-1, keepdim=True)
            row, col = (y >= high - REFINE * high.abs()).nonzero(as_tuple=True)
            exact = (self.refine(col) * rows[row].float()).sum(-1)
            y = y.index_put((row, col), exact.to(y.dtype))
        y = y.reshape(*x.shape[:-1], -1)
        return y + self.bias if self.bias is not None else y


class Int8Linear(QuantizedLinear):
    """int8 rows and a scale per row: `_weight_int8pack_mm`."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias)
        self.register_buffer("codes", torch.empty(out_features, in_features, dtype=torch.int8),
                             persistent=False)  # fmt: skip
        self.register_buffer("scales", torch.empty(out_features, dtype=ACT), persistent=False)

    def load_codes(self, w: QuantizedTensor, device: torch.device) -> None:
        self.codes = w.codes.to(device).contiguous()
        self.scales = w.scales[:, 0].to(device, ACT)

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(rows, self.codes, self.scales)

    def cpu_operands(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        buffers = self._buffers  # not nn.Module's attribute lookup: this is the hot path
        return buffers["codes"], buffers["scales"], 0


class Int4Linear(QuantizedLinear):
    """int4 groups, packed for this device's kernel at load."""

    def __init__(self, in_features: int, out_features: int, bias: bool, device_type: str) -> None:
        super().__init__(in_features, out_features, bias)
        self.device_type = device_type
        self.group = GROUP
        # Packed layouts are device-specific; the real buffers are made by `load`.
        self.register_buffer("packed", torch.empty(0, dtype=torch.uint8), persistent=False)
        self.register_buffer("scales_zeros", torch.empty(0, dtype=ACT), persistent=False)

    def load_codes(self, w: QuantizedTensor, device: torch.device) -> None:
        codes, scales, zeros = w.codes, w.scales, w.zeros
        pad = -len(codes) % 16  # both kernels take output rows in multiples of 16 (CPU) / 8
        if pad:
            codes = torch.cat([codes, codes.new_full((pad, codes.shape[1]), 8)])
            scales = torch.cat([scales, scales.new_zeros(pad, scales.shape[1])])
            zeros = torch.cat([zeros, zeros.new_zeros(pad, zeros.shape[1])])
        self.group = w.group
        self.packed = pack_int4(codes, device)
        self.scales_zeros = torch.stack([scales.t(), zeros.t()], -1).to(device, ACT).contiguous()

    def cpu_operands(self) -> tuple[torch.Tensor, torch.Tensor, int] | None:
        if self.device_type != "cpu":
            return None
        buffers = self._buffers  # not nn.Module's attribute lookup: this is the hot path
        return buffers["packed"], buffers["scales_zeros"], self.group

    def matmul(self, rows: torch.Tensor) -> torch.Tensor:
        if self.device_type == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows, self.packed, self.group, self.scales_zeros
            )
        return torch.ops.aten._weight_int4pack_mm(rows, self.packed, self.group, self.scales_zeros)


def pack_int4(codes: torch.Tensor, device: torch.device) -> torch.Tensor:
    """int4 codes [N, K] (uint8 0..15) in the layout of this device's int4 matmul."""
    if device.type == "cpu":
        # The CPU packing takes int32 codes; packing a chunk of rows at a time bounds that
        # copy (blocks of 64 rows pack independently, so such chunks concatenate to the whole).
        step = -(-row_chunk(codes.shape[1]) // 64) * 64
        return torch.cat(
            [torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                codes[i : i + step].to(torch.int32).contiguous(), 2)
             for i in range(0, len(codes), step)]
        )  # fmt: skip
    k = codes.shape[1]
    tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)
    nibbles = (codes[:, ::2] << 4 | codes[:, 1::2]).to(device)
    return torch.ops.aten._convert_weight_to_int4pack(nibbles.contiguous(), tiles)


class QuantizedEmbedding(nn.Module):
    """A token embedding kept as codes; a lookup dequantizes only the rows it gathers."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.dtype = torch.float32
        self.group = embedding_dim
        self.register_buffer("codes", torch.empty(0, dtype=torch.int8), persistent=False)
        self.register_buffer("scales", torch.empty(0), persistent=False)
        self.register_buffer("zeros", None, persistent=False)

    @property
    def shape(self) -> tuple[int, int]:
        return self.num_embeddings, self.embedding_dim

    def load(self, parts: list[QuantizedTensor], device: torch.device, dtype: torch.dtype) -> None:
        (w,) = parts
        self.dtype, self.group = dtype, w.group
        codes = w.codes
        if w.bits == 4:  # two codes a byte: the table costs what the file did
            codes = codes[:, ::2] | codes[:, 1::2] << 4
        self.codes = codes.to(device).contiguous()
        self.scales = w.scales.to(device)
        self.zeros = None if w.zeros is None else w.zeros.to(device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        codes, scales = self.codes[ids], self.scales[ids]
        if self.zeros is None:
            return (codes.float() * scales).to(self.dtype)
        q = torch.stack([codes & 15, codes >> 4], -1).view(*ids.shape, -1, self.group)
        w = (q.float() - 8) * scales[..., None] + self.zeros[ids][..., None]
        return w.flatten(-2).to(self.dtype)


def holdings(model: nn.Module) -> dict[str, int]:
    """Bytes of weight matrices and token tables held, by format (int4, int8 or a float
    dtype), largest first; a tensor shared by two modules (a tied int8 head) counts once."""
    held: dict[str, int] = {}
    seen: set[int] = set()
    for m in model.modules():
        if isinstance(m, QuantizedLinear | QuantizedEmbedding | Mxfp4Linear):
            is_int4 = isinstance(m, Int4Linear) or getattr(m, "zeros", None) is not None
            fmt = "mxfp4" if isinstance(m, Mxfp4Linear) else "int4" if is_int4 else "int8"
            tensors = [b for b in m.buffers(recurse=False) if b is not None]
        elif isinstance(m, Linear | nn.Embedding):
            fmt, tensors = str(m.weight.dtype).removeprefix("torch."), [m.weight]
        else:
            continue
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                held[fmt] = held.get(fmt, 0) + t.numel() * t.element_size()
    return dict(sorted(held.items(), key=lambda kv: -kv[1]))


def label(held: dict[str, int]) -> str:
    """'int4', 'int4+int8', 'float32': the formats held, largest share first."""
    return "+".join(held) or "none"
