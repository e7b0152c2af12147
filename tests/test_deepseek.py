"""DeepSeek V3 (node/engine/models/deepseek.py) against transformers: the variants its
config allows, the latent cache's size as the engine and the planner count it, half
precision and quantized weights. test_models.py runs conftest's tiny DeepSeek at every
split point and greedy; test_batching.py batched; test_ring.py through three daemons."""

from __future__ import annotations

import pytest
import torch

from node.engine.local import LocalPipeline
from node.engine.shapes import shape_of
from node.engine.weights import open_checkpoint
from tests.conftest import hf_model, make_model
from tests.test_quantized import relative_error

PROMPT = [3, 17, 101, 5, 42, 250, 7, 9, 61, 88, 13, 200]
# One q_proj (no query latent), biases, plain RoPE, two dense layers, weights not
# renormalised, one group of two searched: every branch the tiny model in conftest leaves out.
PLAIN = dict(q_lora_rank=None, attention_bias=True, rope_parameters=None,
             first_k_dense_replace=2, norm_topk_prob=False, n_group=2, topk_group=1)  # fmt: skip


def ours(path: str, splits: tuple[int, ...] = (), dtype: torch.dtype = torch.float32,
         quantize: str = "none") -> torch.Tensor:  # fmt: skip
    pipeline = LocalPipeline(open_checkpoint(path), splits, dtype=dtype, quantize=quantize)
    with torch.inference_mode():
        caches = pipeline.new_caches(len(PROMPT))
        return pipeline.forward(torch.tensor([PROMPT]), torch.arange(len(PROMPT)), caches)


def test_the_config_variants_equal_transformers_at_every_split(tmp_path):  # noqa: ANN001
    path = make_model("deepseek_v3", tmp_path / "plain", **PLAIN)
    with torch.inference_mode():
        expected = hf_model(path)(torch.tensor([PROMPT])).logits
    for splits in [(), (1,), (2,), (3,), (1, 2, 3)]:
        torch.testing.assert_close(ours(str(path), splits), expected, atol=1e-4, rtol=0)


def test_the_cache_holds_one_latent_a_position(tiny_models):  # noqa: ANN001
    """A position of a layer caches the key/value latent and the shared RoPE key (16 + 8
    numbers here), not keys and values for every head (4 x (16 + 12)); admission and the
    planner count the same."""
    ckpt = open_checkpoint(str(tiny_models["deepseek_v3"]))
    cache = LocalPipeline(ckpt).new_caches(100)[0]
    assert cache.nbytes == 4 * 100 * (16 + 8) * 4  # layers, positions, numbers, bytes
    assert shape_of(ckpt.family, ckpt.config, torch.float32).kv_bytes == (16 + 8) * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tracks_transformers(tiny_models, dtype):  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    path = tiny_models["deepseek_v3"]
    theirs = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    with torch.inference_mode():
        expected = theirs(torch.tensor([PROMPT])).logits.float()
    got = ours(str(path), (2,), dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, atol=0.03 * expected.abs().max().item(),
                               rtol=0)  # fmt: skip


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_weights_equal_transformers_on_their_values(tiny_models, fmt):  # noqa: ANN001
    """Linear layers, experts and the token table held as int8/int4 codes (as wide as the
    kernels take; kv_b_proj, the router and its bias stay in the compute dtype), against
    transformers running those codes' values."""
    from torch import nn

    from node.engine.models.quantized import module_format, quantize
    from tests.test_quantized import EXACT

    path = tiny_models["deepseek_v3"]
    model = hf_model(path)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim < 2 or "kv_b_proj" in name or name.endswith("mlp.gate.weight"):
                continue
            kept = module_format(nn.Linear(p.shape[-1], 1, device="meta"), fmt)
            for w in p.view(-1, *p.shape[-2:]) if kept != "none" else ():  # each expert
                w.copy_(quantize(w, kept).dequantize())
        expected = model(torch.tensor([PROMPT])).logits
    for splits in [(), (1,), (2, 3)]:
        assert relative_error(ours(str(path), splits, quantize=fmt), expected) < EXACT
