"""Our stages against transformers' models: logits, every split point, greedy tokens."""

from __future__ import annotations

import pytest
import torch

from node.engine.local import LocalPipeline, generate
from node.engine.sampling import SamplingParams
from node.engine.weights import open_checkpoint
from tests.conftest import FAMILIES, hf_greedy, hf_model

PROMPT = [3, 17, 101, 5, 42, 250, 7, 9, 61, 88, 13, 200]
ATOL = 1e-4


def our_logits(path, splits=()):  # noqa: ANN001, ANN201
    pipeline = LocalPipeline(open_checkpoint(str(path)), splits)
    caches = pipeline.new_caches(len(PROMPT))
    with torch.inference_mode():
        return pipeline.forward(torch.tensor([PROMPT]), torch.arange(len(PROMPT)), caches)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_at_every_split(tiny_models, family):  # noqa: ANN001
    path = tiny_models[family]
    with torch.inference_mode():
        expected = hf_model(path)(torch.tensor([PROMPT])).logits
    assert expected.std() > 0.1  # the random weights give informative logits
    n_layers = open_checkpoint(str(path)).n_layers
    for splits in [(), *[(s,) for s in range(1, n_layers)], (1, 2, 3)]:
        got = our_logits(path, splits)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=f"splits {splits}")


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_transformers_generate_at_every_split(tiny_models, family):  # noqa: ANN001
    path = tiny_models[family]
    expected = hf_greedy(hf_model(path), PROMPT, 20)
    ckpt = open_checkpoint(str(path))
    for splits in [(), *[(s,) for s in range(1, ckpt.n_layers)]]:
        step = LocalPipeline(ckpt, splits).session(len(PROMPT) + 20, SamplingParams())
        got = list(generate(step, PROMPT, 20, SamplingParams(), frozenset()))
        assert got == expected, f"splits {splits}"


def test_sliding_window_is_exercised(tiny_models):  # noqa: ANN001
    """Mistral's window (6) is shorter than the prompt, so a window-less model would differ."""
    path = tiny_models["mistral"]
    from transformers import AutoModelForCausalLM

    no_window = AutoModelForCausalLM.from_pretrained(path, sliding_window=None).eval()
    with torch.inference_mode():
        full = no_window(torch.tensor([PROMPT])).logits
    assert (our_logits(path) - full).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tracks_transformers(tiny_models, dtype, family):  # noqa: ANN001
    path = tiny_models[family]
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    pipeline = LocalPipeline(open_checkpoint(str(path)), (2,), dtype=dtype)
    with torch.inference_mode():
        expected = theirs(torch.tensor([PROMPT])).logits.float()
        got = pipeline.forward(torch.tensor([PROMPT]), torch.arange(12), pipeline.new_caches(12))
    assert got.dtype == dtype
    scale = expected.abs().max().item()
    torch.testing.assert_close(got.float(), expected, atol=0.03 * scale, rtol=0)
