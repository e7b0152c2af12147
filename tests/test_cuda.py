"""The CUDA path against transformers on the same GPU (skipped where there is no GPU)."""

from __future__ import annotations

import pytest
import torch

from node.engine import LocalPipeline, generate
from node.sampling import SamplingParams
from node.weights import open_checkpoint
from tests.conftest import FAMILIES, hf_greedy, hf_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
PROMPT = [3, 17, 101, 5, 42, 250, 7, 9, 61, 88, 13, 200]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_logits_and_greedy_match_transformers(tiny_models, family, dtype):  # noqa: ANN001
    path = tiny_models[family]
    theirs = hf_model(path).to(CUDA, dtype)
    ids = torch.tensor([PROMPT], device=CUDA)
    with torch.inference_mode():
        expected = theirs(ids).logits.float()
    expected_tokens = hf_greedy(theirs, PROMPT, 12)
    pipeline = LocalPipeline(open_checkpoint(str(path)), (1, 3), CUDA, dtype)
    with torch.inference_mode():
        got = pipeline.forward(ids, torch.arange(len(PROMPT)), pipeline.new_caches(12))
    assert got.device.type == "cuda" and got.dtype == dtype
    tolerance = 1e-3 if dtype == torch.float32 else 0.03 * expected.abs().max().item()
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=0)
    if dtype == torch.float32:  # half-precision greedy paths may part at near-ties
        greedy = SamplingParams()
        tokens = list(generate(pipeline.session(24, greedy), PROMPT, 12, greedy, frozenset()))
        assert tokens == expected_tokens
