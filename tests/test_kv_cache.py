"""Decoding with the cache equals recomputing the whole sequence at every step."""

from __future__ import annotations

import pytest
import torch

from node.engine.local import LocalPipeline
from node.engine.weights import open_checkpoint

PROMPT = [3, 17, 101, 5, 42, 250, 7]
STEPS = 20


# Windows of 5 or 6 (mistral on every layer, gpt-oss on alternate ones, gemma3 on three of
# four) shorter than the 27 positions decoded.
@pytest.mark.parametrize("family", ["llama", "mistral", "gpt2", "gpt_oss", "gemma3"])
def test_cached_decode_equals_full_recomputation(tiny_models, family):  # noqa: ANN001
    """With a span of 2, a sliding-window layer's cache holds its window and 2 positions:
    decoding slides it every other step (and the prompt's pass, longer than that, grows it),
    and every step still equals recomputing the whole sequence."""
    pipeline = LocalPipeline(open_checkpoint(str(tiny_models[family])), (1, 3))
    seq = list(PROMPT)
    caches = pipeline.new_caches(len(PROMPT) + STEPS, span=2)
    with torch.inference_mode():
        step_logits = pipeline.forward(torch.tensor([seq]), torch.arange(len(seq)), caches)
        for _ in range(STEPS):
            seq.append(int(step_logits[0, -1].argmax()))
            fresh = pipeline.new_caches(len(seq), span=2)  # one pass of all: grows
            full = pipeline.forward(torch.tensor([seq]), torch.arange(len(seq)), fresh)
            step_logits = pipeline.forward(
                torch.tensor([seq[-1:]]), torch.tensor([len(seq) - 1]), caches
            )
            torch.testing.assert_close(step_logits[0, -1], full[0, -1], atol=1e-4, rtol=0)
    assert caches[0].length == len(seq)
    sliding = sum(w is not None for s in pipeline.stages for w in s.windows())
    assert sliding == {"llama": 0, "gpt2": 0, "mistral": 4, "gpt_oss": 2, "gemma3": 3}[family]
    for stage, cache in zip(pipeline.stages, caches, strict=True):  # each layer's positions
        held = [cache.buffers(i)[0].shape[2] for i in range(stage.end - stage.start)]
        want = [len(seq) if w is None else max(w + 2, len(PROMPT)) for w in stage.windows()]
        assert held == want, (held, want)


def test_cache_refuses_positions_beyond_capacity_or_gaps(tiny_models):  # noqa: ANN001
    from node.errors import RinginferError

    pipeline = LocalPipeline(open_checkpoint(str(tiny_models["llama"])))
    caches = pipeline.new_caches(4)
    with torch.inference_mode(), pytest.raises(RinginferError, match="capacity"):
        pipeline.forward(torch.tensor([[1, 2, 3, 4, 5]]), torch.arange(5), caches)
    with torch.inference_mode(), pytest.raises(RinginferError, match="skips"):
        pipeline.forward(torch.tensor([[1]]), torch.tensor([2]), caches)


def test_admission_counts_a_sliding_layer_at_its_window(tiny_models):  # noqa: ANN001
    """What a node admits a request by: gemma3's sliding layers (window 5) hold 5 + SPAN
    positions of a long request, its global layer all of them; the cache holds that."""
    from node.engine.kv_cache import SPAN

    (stage,) = LocalPipeline(open_checkpoint(str(tiny_models["gemma3"]))).stages
    per_position = 2 * stage.cfg.n_kv_heads * stage.cfg.head_dim * 4
    held = per_position * (1000 + 3 * (5 + SPAN))
    assert stage.cache_bytes(1000, torch.float32) == held
    assert stage.new_cache(1, 1000, torch.float32, torch.device("cpu")).nbytes == held
