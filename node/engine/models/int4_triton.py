"""int4 weight times a few activation rows, in Triton: the decode matmul.

Why: a decode step reads every weight once for 1..16 rows, so it is bound by memory, and
PyTorch's tinygemm (`_weight_int4pack_mm`) reaches only ~0.9 TB/s of an H100's 3.35.

Layout (made once by `pack` from the codes, scales and zeros of quantized.QuantizedTensor):
- `words` int32 [K/8, N]: word [i, n] holds codes[n, 8i + s] in bits 4s..4s+3, so a program
  loads [BLOCK_K/8, BLOCK_N] words, contiguous along N (wide, coalesced loads);
- `scales`, `zeros` [K/32, N] float16 (bfloat16 where float16 would lose range), the zero
  folded with the code offset: W = code * scale + (zero - 8 * scale).
A tile is unpacked in registers to rows ordered (shift, word), and the activations are loaded
in that same permuted order, so no shuffle of the weights is needed. Codes become floats
through the exponent trick (0x4B000000 | q is 2**23 + q as a float32), not int-to-float.

Kernel: one program per (BLOCK_N outputs, K slice), all M <= 16 rows in the program so each
weight byte is read once. M <= 2 multiplies and sums on CUDA cores; more rows use tl.dot
(M padded to 16), by default with the weight tile as the left operand ("swap"), which lets
Hopper take it from registers. Split-K partial sums go to a float32 workspace by atomics; the
last program of a column block (a counter) writes the output and zeroes the workspace again,
so a call is one launch, graph-capturable. The workspace is shared per device: launches on
concurrent streams must not overlap. Configs come from `config_for` (a fixed heuristic of
M, N, K and the SM count; no autotuning, which would run inside graph capture); `matmul`'s
`config` overrides it (bench/int4_kernel_bench.py --sweep). M > 16 (prefill) dequantizes the
weight to x's dtype and calls torch.matmul.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - the callers check available()
    triton = None

MAX_ROWS = 16  # rows the skinny kernel takes; more are a prefill
_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


@functools.cache
def available() -> bool:
    """Triton importable and a CUDA GPU of compute capability 8.0 or newer."""
    cuda = triton is not None and torch.cuda.is_available()
    return cuda and torch.cuda.get_device_capability()[0] >= 8


@dataclass
class Int4Packed:
    words: torch.Tensor  # int32 [K/8, N]
    scales: torch.Tensor  # float16 or bfloat16 [K/32, N]
    zeros: torch.Tensor  # same, zero - 8 * scale
    acc: torch.Tensor  # float32 [16 * N] split-K workspace (shared, kept zero)
    count: torch.Tensor  # int32 [N/16] arrivals per column block (shared, kept zero)
    n: int
    k: int


@dataclass(frozen=True)
class Config:
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int = 2
    dot: bool = False
    swap: bool = True


def pack(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, device) -> Int4Packed:
    """The kernel's layout of int4 codes [N, K] (uint8 0..15) with float32 [N, K/32] scales
    and zeros; K must be a multiple of 32."""
    n, k = codes.shape
    if k % 32 or scales.shape != (n, k // 32) or zeros.shape != (n, k // 32):
        raise ValueError(f"int4 codes [{n}, {k}] need K % 32 == 0 and scales [{n}, {k // 32}]")
    device = torch.device(device)
    codes = codes.to(device)
    words = torch.zeros(n, k // 8, dtype=torch.int32, device=device)
    for s in range(8):  # two's complement: code 8..15 in the top nibble makes it negative
        words |= codes[:, s::8].to(torch.int32) << 4 * s
    words = words.t().contiguous()
    zero = zeros.double() - 8 * scales.double()
    tiny = scales[scales != 0].abs()  # float16 keeps 3 more bits where its range is enough
    fits = max(scales.abs().max().item(), zero.abs().max().item()) < 6e4
    fits = fits and (tiny.numel() == 0 or tiny.min().item() >= 2**-14)
    half = torch.float16 if fits else torch.bfloat16
    acc, count = _workspaces.get(device, (torch.empty(0), torch.empty(0)))
    if acc.numel() < MAX_ROWS * n:  # older packs keep the smaller one alive
        acc = torch.zeros(MAX_ROWS * n, dtype=torch.float32, device=device)
        count = torch.zeros(triton.cdiv(n, 16), dtype=torch.int32, device=device)
        _workspaces[device] = acc, count
    return Int4Packed(words, scales.t().to(device, half).contiguous(),
                      zero.t().to(device, half).contiguous(), acc, count, n, k)  # fmt: skip


@functools.cache
def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few programs are enough
    return torch.cuda.get_device_properties(device).multi_processor_count


def config_for(m: int, n: int, k: int, sms: int) -> Config:
    """Few rows: CUDA-core FMAs over wide column blocks (small programs, 8 an SM); more rows
    would make that compute bound, so tl.dot (4 programs an SM). Split K to reach that many
    programs, so enough loads are in flight to fill the memory bandwidth."""
    if m <= 2:
        block_n, block_k, warps, dot, per_sm = 256, 64, 2, False, 8
    else:
        block_n, block_k, warps, dot, per_sm = 128, 128, 4, True, 4
    split = split_for(n, k, block_n, block_k, per_sm * sms)
    return Config(block_n, block_k, split, warps, 2, dot)


def split_for(n: int, k: int, block_n: int, block_k: int, programs: int) -> int:
    """Split-K reaching about `programs` programs, with no slice left empty."""
    blocks = triton.cdiv(k, block_k)
    split = max(1, min(blocks, round(programs / triton.cdiv(n, block_n))))
    return triton.cdiv(blocks, triton.cdiv(blocks, split))


def matmul(x: torch.Tensor, w: Int4Packed, config: Config | None = None) -> torch.Tensor:
    """x [M, K] (bfloat16 or float16) @ W^T -> [M, N] in x's dtype, float32 accumulation."""
    m = x.shape[0]
    if m > MAX_ROWS:
        return x @ dequantize(w, x.dtype)
    x = x.contiguous()
    c = config or config_for(m, w.n, w.k, _sms(x.device))
    y = torch.empty(m, w.n, dtype=x.dtype, device=x.device)
    rows = MAX_ROWS if c.dot else triton.next_power_of_2(m)
    _gemv[(triton.cdiv(w.n, c.block_n), c.split_k)](
        x, w.words, w.scales, w.zeros, y, w.acc, w.count, m, w.n, w.k, c.split_k,
        BLOCK_M=rows, BLOCK_N=c.block_n, BLOCK_K=c.block_k, ATOMIC=c.split_k > 1, DOT=c.dot,
        SWAP=c.dot and c.swap, CPU=x.device.type == "cpu", num_warps=c.num_warps,
        num_stages=c.num_stages)  # fmt: skip
    return y


def dequantize(w: Int4Packed, dtype: torch.dtype) -> torch.Tensor:
    """W^T [K, N] in `dtype` (the prefill path)."""
    out = torch.empty(w.k, w.n, dtype=dtype, device=w.words.device)
    grid = (triton.cdiv(w.n, 128), triton.cdiv(w.k, 64))
    _dequant_kernel[grid](w.words, w.scales, w.zeros, out, w.n, w.k, BLOCK_N=128, BLOCK_K=64)
    return out


if triton is not None:

    @triton.jit
    def _tile(w_ptr, s_ptr, z_ptr, kb, offs_n, n_mask, N, K, BLOCK_K: tl.constexpr,
              BLOCK_N: tl.constexpr):  # fmt: skip
        """W^T rows kb*BLOCK_K.. as float32 [BLOCK_K, BLOCK_N], rows in _rows order."""
        g = kb * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
        mask = (g < K // 32)[:, None] & n_mask[None, :]
        sz = g[:, None] * N + offs_n[None, :]
        scale = tl.load(s_ptr + sz, mask=mask, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + sz, mask=mask, other=0.0).to(tl.float32)
        word = (g[:, None, None] * 4 + tl.arange(0, 4)[None, :, None]) * N + offs_n[None, None, :]
        words = tl.load(w_ptr + word, mask=mask[:, None, :], other=0)
        q = (words[None, :, :, :] >> (tl.arange(0, 8) * 4)[:, None, None, None]) & 15
        q = (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        w = q * scale[None, :, None, :] + zero[None, :, None, :]
        return tl.reshape(w, (BLOCK_K, BLOCK_N))

    @triton.jit
    def _rows(kb, BLOCK_K: tl.constexpr):
        """The k of each tile row: row s * BLOCK_K/8 + i holds k = 8i + s of the block."""
        r = tl.arange(0, BLOCK_K)
        return kb * BLOCK_K + 8 * (r % (BLOCK_K // 8)) + r // (BLOCK_K // 8)

    @triton.jit
    def _gemv(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, acc_ptr, count_ptr, M, N, K, split,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              ATOMIC: tl.constexpr, DOT: tl.constexpr, SWAP: tl.constexpr,
              CPU: tl.constexpr):  # fmt: skip
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        n_mask, m_mask = offs_n < N, offs_m < M
        blocks = tl.cdiv(K, BLOCK_K)
        per = tl.cdiv(blocks, split)
        if SWAP:
            acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(pid_k * per, tl.minimum(pid_k * per + per, blocks)):
            k = _rows(kb, BLOCK_K)
            xm = m_mask[:, None] & (k < K)[None, :]
            x = tl.load(x_ptr + offs_m[:, None] * K + k[None, :], mask=xm, other=0.0)
            w = _tile(w_ptr, s_ptr, z_ptr, kb, offs_n, n_mask, N, K, BLOCK_K, BLOCK_N)
            if DOT:
                if CPU:  # the interpreter's bfloat16 tl.dot is wrong (triton 3.9)
                    x = x.to(tl.float16)
                w = w.to(x.dtype)
                if SWAP:
                    acc_t = tl.dot(tl.trans(w), tl.trans(x), acc_t)
                else:
                    acc = tl.dot(x, w, acc)
            else:
                acc += tl.sum(x.to(tl.float32)[:, :, None] * w[None, :, :], axis=1)
        if SWAP:
            acc = tl.trans(acc_t)
        out = offs_m[:, None] * N + offs_n[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        if ATOMIC:  # the last arrival writes the sum and leaves the workspace zero
            tl.atomic_add(acc_ptr + out, acc, mask=mask, sem="relaxed")
            tl.debug_barrier()
            if tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel") == split - 1:
                total = tl.atomic_add(acc_ptr + out, tl.zeros_like(acc), mask=mask)  # from L2
                tl.store(y_ptr + out, total.to(y_ptr.dtype.element_ty), mask=mask)
                tl.store(acc_ptr + out, tl.zeros_like(acc), mask=mask)
                tl.store(count_ptr + pid_n, 0)
        else:
            tl.store(y_ptr + out, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):  # fmt: skip
        kb = tl.program_id(1)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        w = _tile(w_ptr, s_ptr, z_ptr, kb, offs_n, n_mask, N, K, BLOCK_K, BLOCK_N)
        k = _rows(kb, BLOCK_K)
        mask = (k < K)[:, None] & n_mask[None, :]
        tl.store(out_ptr + k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty), mask)
