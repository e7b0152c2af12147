"""The CPU decode path's fused ops against PyTorch's (node/engine/models/decode_ops.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from node.engine.models import decode_ops
from node.engine.models.llama import RMSNorm


def test_the_ops_build_here():
    """Where they do not build this fails (with the compiler's error), so a CI run cannot
    pass on PyTorch's ops alone."""
    assert decode_ops.native.build("ringinfer_decode", decode_ops.SOURCE) is not None
    assert decode_ops.ops() is not None


@pytest.mark.parametrize("shape", [(1, 1, 576), (1, 7, 960), (3, 5, 2880), (2, 33), (4, 0, 64)])
def test_rms_norm_equals_pytorchs(shape):  # noqa: ANN001
    """Rows of any width (not only multiples of the lanes), large and tiny values."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen) * torch.logspace(-3, 3, shape[-1])
    w = torch.randn(shape[-1], generator=gen)
    got = decode_ops.ops().rms_norm(x, w, 1e-6)
    torch.testing.assert_close(got, F.rms_norm(x, (shape[-1],), w, 1e-6), rtol=2e-6, atol=0)


def test_the_model_norm_uses_them_and_falls_back_without(monkeypatch):  # noqa: ANN001
    """RMSNorm on float32 CPU rows runs the fused op; with RINGINFER_DECODE_OPS=0 (as where
    it would not build) PyTorch's, to the same values."""
    norm = RMSNorm(576, 1e-5)
    x = torch.randn(1, 3, 576)

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("PyTorch's RMSNorm ran")

    with torch.no_grad(), monkeypatch.context() as m:
        m.setattr(F, "rms_norm", refused)
        ours = norm(x)
    monkeypatch.setenv(decode_ops.KERNEL_ENV, "0")
    assert decode_ops.ops() is None
    with torch.no_grad():
        torch.testing.assert_close(norm(x), ours, rtol=2e-6, atol=0)
