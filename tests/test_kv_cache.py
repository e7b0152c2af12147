"""Decoding with the cache equals recomputing the whole sequence at every step."""

from __future__ import annotations

import pytest
import torch

from node.engine.local import LocalPipeline
from node.engine.weights import open_checkpoint

PROMPT = [3, 17, 101, 5, 42, 250, 7]
STEPS = 20


@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2"])
def test_cached_decode_equals_full_recomputation(tiny_models, family):  # noqa: ANN001
    pipeline = LocalPipeline(open_checkpoint(str(tiny_models[family])), (1, 3))
    seq = list(PROMPT)
    caches = pipeline.new_caches(len(PROMPT) + STEPS)
    with torch.inference_mode():
        step_logits = pipeline.forward(torch.tensor([seq]), torch.arange(len(seq)), caches)
        for _ in range(STEPS):
            seq.append(int(step_logits[0, -1].argmax()))
            fresh = pipeline.new_caches(len(seq))
            full = pipeline.forward(torch.tensor([seq]), torch.arange(len(seq)), fresh)
            step_logits = pipeline.forward(
                torch.tensor([seq[-1:]]), torch.tensor([len(seq) - 1]), caches
            )
            torch.testing.assert_close(step_logits[0, -1], full[0, -1], atol=1e-4, rtol=0)
    assert caches[0].length == len(seq)


def test_cache_refuses_positions_beyond_capacity_or_gaps(tiny_models):  # noqa: ANN001
    from node.errors import RinginferError

    pipeline = LocalPipeline(open_checkpoint(str(tiny_models["llama"])))
    caches = pipeline.new_caches(4)
    with torch.inference_mode(), pytest.raises(RinginferError, match="capacity"):
        pipeline.forward(torch.tensor([[1, 2, 3, 4, 5]]), torch.arange(5), caches)
    with torch.inference_mode(), pytest.raises(RinginferError, match="skips"):
        pipeline.forward(torch.tensor([[1]]), torch.tensor([2]), caches)
