"""MXFP4 matmuls (node/engine/models/mxfp4.py and its CPU kernel, mxfp4.cpp) against the
exact weights: gguf-py's dequantization is the oracle for every code under extreme exponents,
and the kernel (this CPU's build, AVX2's, the portable one) and the dequantizing fallback
all equal F.linear on the dequantized weights, up to the order of summation."""

from __future__ import annotations

import functools
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from node.engine.models import mxfp4, native
from node.engine.models.mxfp4 import BLOCK, KERNEL_ENV, Mxfp4Linear, Mxfp4Tensor, quantize_mxfp4
from tests.test_quantized import relative_error

ROOT = Path(__file__).resolve().parent.parent
# [N, K]: N not a multiple of 4, 8 or 16 (the kernel's tiles), K from one block to gpt-oss's
# 2880; 300 rows of 2880 span several of the fallback's tiles.
SHAPES = [(1, 32), (13, 64), (37, 2880), (300, 2880)]
# One row, the kernel's tiles of 4 rows (partial, 4 + 3, 4 x 4 + 1), then GEMMs of tiles.
ROWS = [1, 3, 7, 17, mxfp4.DIRECT_ROWS + 1, 300]
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-8}  # bfloat16: its rounding of y
# Subnormal scales (2^-128, 2^-127), the smallest normal one, 1/2, and 2^126 (where codes of
# 4 and more overflow float32 to inf, in the oracle as here).
EXPONENTS = [0, 1, 2, 127, 254]
CPU = torch.device("cpu")


@functools.cache
def weights(n: int, k: int) -> Mxfp4Tensor:
    return quantize_mxfp4(torch.randn(n, k, generator=torch.Generator().manual_seed(n * k)))


def layer(w: Mxfp4Tensor, bias: torch.Tensor | None) -> Mxfp4Linear:
    n, k = w.shape
    out = Mxfp4Linear(k, n, bias is not None)
    out.load([w], CPU, torch.float32)
    if bias is not None:
        out.bias = torch.nn.Parameter(bias, requires_grad=False)
    return out


def check(rows: int, dtype: torch.dtype) -> None:
    """Mxfp4Linear on every shape, with and without a bias, against F.linear in float32 on
    the exact weights."""
    torch.manual_seed(rows)
    for n, k in SHAPES:
        w = weights(n, k)
        for bias in (None, torch.randn(n).to(dtype)):
            x = torch.randn(rows, k).to(dtype)
            with torch.inference_mode():
                got = layer(w, bias)(x[None])
            assert got.shape == (1, rows, n) and got.dtype == dtype
            b = None if bias is None else bias.float()
            expected = F.linear(x.float(), w.dequantize(), b)
            error = relative_error(got[0].float(), expected)
            assert error < TOLERANCE[dtype], (n, k, rows, bias is not None, dtype, error)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", ROWS)
def test_kernel_equals_the_dequantized_reference(rows, dtype):  # noqa: ANN001
    check(rows, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 17, 300])
def test_fallback_equals_the_dequantized_reference(monkeypatch, rows, dtype):  # noqa: ANN001
    """RINGINFER_MXFP4_KERNEL=0: tiles of dequantized rows through F.linear in x's dtype."""
    monkeypatch.setenv(KERNEL_ENV, "0")
    assert mxfp4.kernel() is None
    check(rows, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["1", "0"])
def test_many_tiles_of_rows_make_the_whole(monkeypatch, kernel, dtype):  # noqa: ANN001
    """Tiles of 3 rows of 2880 in float32, 6 in bfloat16 (the last one short), with the
    kernel's dequantization and with the fallback's."""
    monkeypatch.setenv(KERNEL_ENV, kernel)
    monkeypatch.setitem(mxfp4.TILE_BYTES, "cpu", 3 * 2880 * 4)
    assert mxfp4.tile_rows(2880, dtype, "cpu") == 12 // dtype.itemsize
    check(300, dtype)


def extreme_blocks() -> tuple[torch.Tensor, Mxfp4Tensor]:
    """One row per exponent in EXPONENTS, each the 256 bytes (every pair of codes) in 16
    blocks: gguf-py's floats for them, and ours from the bytes as a GGUF holds them."""
    codes = np.arange(256, dtype=np.uint8).reshape(1, 16, 16).repeat(len(EXPONENTS), 0)
    exps = np.array(EXPONENTS, dtype=np.uint8)[:, None, None].repeat(16, 1)
    raw = np.concatenate([exps, codes], -1).reshape(len(EXPONENTS), -1)
    with np.errstate(over="ignore"):  # inf where 2^126 times 4 or more
        oracle = torch.from_numpy(gguf_dequantize(raw, GGMLQuantizationType.MXFP4))
    return oracle, Mxfp4Tensor.from_gguf(raw, len(EXPONENTS))


def test_every_code_under_extreme_exponents_decodes_as_gguf_py_does():
    """All 16 codes (8, e2m1's -0, is a zero), subnormal and overflowing scales: the same
    floats from gguf-py, from Mxfp4Tensor.dequantize and from the kernel's tiles."""
    oracle, w = extreme_blocks()
    assert oracle.shape == w.shape == (len(EXPONENTS), 512)
    assert torch.equal(w.dequantize(), oracle)
    assert torch.equal(w.dequantize(torch.bfloat16).float(), oracle)  # exact in bfloat16 too
    assert oracle[-1].isinf().any()  # 4 * 2^126 and more
    assert ((oracle[0] != 0) & (oracle[0].abs() < torch.finfo(torch.float32).tiny)).any()
    assert (oracle.view(len(EXPONENTS), 16, BLOCK)[:, :, 8] == 0).all()  # input 8: code 8
    ops = mxfp4.build_kernel()
    for dtype in (torch.float32, torch.bfloat16):  # the kernel's tiles for GEMMs
        tile = torch.empty(w.shape, dtype=dtype)
        ops.dequantize(w.codes, w.exponents, tile)
        assert torch.equal(tile.float(), oracle), dtype


@pytest.mark.parametrize("rows", [16, 512])  # the kernel's own loop; the tiles' GEMM
def test_products_with_extreme_weights_are_exact(rows):  # noqa: ANN001
    """x = the identity's rows: y is W itself (each product 1 * w or 0 * w, exact for
    subnormal weights too); a row of +inf weights times positive inputs gives +inf."""
    oracle, w = extreme_blocks()
    finite = w.rows(slice(0, len(EXPONENTS) - 1))
    eye = torch.eye(512)
    got = torch.cat([layer(finite, None)(eye[i : i + rows]) for i in range(0, 512, rows)])
    assert torch.equal(got.t(), oracle[:-1])
    positive = Mxfp4Tensor(w.codes[-1:] & 0x77, w.exponents[-1:])  # codes 0..7, 2^126
    y = layer(positive, None)(torch.rand(rows, 512) + 0.5)
    assert (y == float("inf")).all()


def test_the_compiled_kernel_is_what_runs(monkeypatch):  # noqa: ANN001
    """Where the kernel does not build this fails (with the compiler's error), so a CI run
    cannot pass on the fallback alone; an x86 CPU with AVX2 gets a vectorised build."""
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    ops = mxfp4.build_kernel()
    flags = native.cpu_flags().split()
    if platform.machine().lower() in ("x86_64", "amd64") and "avx2" in flags:
        assert ops.isa() == ("avx512" if "avx512f" in flags else "avx2")
    assert mxfp4.kernel() is not None

    def refused(*args: object) -> None:
        raise AssertionError("the kernel's path dequantized the weights in Python")

    monkeypatch.setattr(Mxfp4Tensor, "dequantize", refused)
    for rows in (1, 300):
        assert layer(weights(37, 2880), None)(torch.randn(rows, 2880)).shape == (rows, 37)


# Builds other than this CPU's: AVX2 without AVX-512 (most AMD machines), and the portable
# loops (ARM, old x86) as x86-64's baseline compiles them.
OTHER_BUILDS = {"avx2": ["-O3", "-mavx2", "-mfma", "-fopenmp"], "generic": ["-O3", "-fopenmp"]}


@pytest.mark.parametrize("isa", OTHER_BUILDS)
def test_other_builds_equal_the_reference(isa):  # noqa: ANN001
    """The tests above against each build, in a process of its own (a process loads one
    kernel library), cached as the native one is."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if not x86 or (isa == "avx2" and "avx2" not in native.cpu_flags().split()):
        pytest.skip(f"this CPU cannot build or run the {isa} kernel")
    script = (
        "import torch\n"
        "from node.engine.models import mxfp4\n"
        "from tests import test_mxfp4 as t\n"
        f"mxfp4.FLAGS = (({OTHER_BUILDS[isa]!r}, ['-fopenmp']),)\n"
        f"assert mxfp4.build_kernel().isa() == {isa!r}\n"
        "for rows in t.ROWS:\n"
        "    for dtype in (torch.float32, torch.bfloat16):\n"
        "        t.check(rows, dtype)\n"
        "t.test_every_code_under_extreme_exponents_decodes_as_gguf_py_does()\n"
        "for rows in (16, 512):\n"
        "    t.test_products_with_extreme_weights_are_exact(rows)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
