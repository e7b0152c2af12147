"""The Triton int4 matmul (node/engine/models/int4_triton.py) against float32 on the
dequantized weight: in Triton's CPU interpreter anywhere Triton imports, and on CUDA at
Llama layer shapes, eager and replayed from a CUDA graph."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
HAS_TRITON = importlib.util.find_spec("triton") is not None

# Run in a child with TRITON_INTERPRET=1 (it must be set before triton is imported).
INTERPRETED = """
import torch
from node.engine.models import int4_triton as it
from tests.test_int4_triton import check, random_weight

torch.manual_seed(0)
for m, n, k in [(1, 48, 64), (3, 40, 96), (16, 64, 64), (17, 40, 96), (2, 24, 160)]:
    codes, scales, zeros = random_weight(n, k)
    w = it.pack(codes, scales, zeros, "cpu")
    configs = [None, it.Config(16, 32, 2, 1), it.Config(32, 64, 1, 1, dot=True, swap=False),
               it.Config(16, 32, 3, 1, dot=True)]
    for dtype in (torch.bfloat16, torch.float16):
        x = torch.randn(m, k).to(dtype)
        for config in configs:
            check(it.matmul(x, w, config), x, codes, scales, zeros, (m, n, k, config))
    assert not w.acc.any() and not w.count.any(), "split-K leaves its workspace zero"
print("ok")
"""


def random_weight(n: int, k: int, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device=device)
    scales = torch.rand(n, k // 32, device=device) * 0.02 + 0.001
    zeros = torch.randn(n, k // 32, device=device) * 0.01
    return codes, scales, zeros


def reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
              zeros: torch.Tensor) -> torch.Tensor:  # fmt: skip
    n, k = codes.shape
    w = (codes.view(n, k // 32, 32).float() - 8) * scales[..., None] + zeros[..., None]
    return x.float() @ w.view(n, k).T


def check(got: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
          zeros: torch.Tensor, what: object) -> None:  # fmt: skip
    """Within what a bfloat16 output of a float32 accumulation must meet."""
    expected = reference(x, codes, scales, zeros)
    assert got.dtype == x.dtype and got.shape == expected.shape, what
    tolerance = 1e-2 * expected.abs().max().item() + 1e-3
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=0, msg=str(what))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_interpreted_kernel_matches_float32():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", INTERPRETED], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def _cuda_ready() -> bool:
    if not (HAS_TRITON and torch.cuda.is_available()):
        return False
    from node.engine.models import int4_triton

    return int4_triton.available()


cuda = pytest.mark.skipif(not _cuda_ready(), reason="no CUDA GPU of compute capability 8.0+")
SHAPES = [(2048, 8192), (8192, 2048), (4096, 14336), (14336, 4096), (8192, 28672)]


@cuda
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 4, 16, 64])
def test_cuda_matches_float32_eager_and_graphed(m: int, n: int, k: int):
    from node.engine.models import int4_triton as it

    torch.manual_seed(m * 7 + n)
    codes, scales, zeros = random_weight(n, k, "cuda")
    w = it.pack(codes, scales, zeros, "cuda")
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    expected = reference(x, codes, scales, zeros)
    eager = it.matmul(x, w)
    torch.cuda.synchronize()
    tolerance = 0.03 * expected.abs().max().item()  # bfloat16, as tests/test_cuda.py
    torch.testing.assert_close(eager.float(), expected, atol=tolerance, rtol=0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        it.matmul(x, w)  # warm (compiled, workspace in use) before capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed = it.matmul(x, w)
    for _ in range(3):  # replays reuse the split-K workspace, which each call leaves zero
        graph.replay()
    torch.cuda.synchronize()
    ulp = 2**-7 * expected.abs().max().item()  # split-K sums in any order: a rounding apart
    torch.testing.assert_close(graphed.float(), eager.float(), atol=ulp, rtol=0)
    assert not w.acc.any() and not w.count.any()
