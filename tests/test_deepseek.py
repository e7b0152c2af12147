"""DeepSeek V3 (node/engine/models/deepseek.py) against transformers: the variants its
config allows, the latent cache's size as the engine and the planner count it, half
precision and quantized weights, GGUF files as llama.cpp writes them. test_models.py runs
conftest's tiny DeepSeek at every split point and greedy; test_batching.py batched;
test_ring.py through three daemons."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from node.engine.local import LocalPipeline
from node.engine.shapes import shape_of
from node.engine.weights import open_checkpoint, stage_tensors
from tests.conftest import hf_model, make_model
from tests.test_gguf import (
    checkpoint_state,
    finish_gguf,
    gguf_place,
    in_whole_blocks,
    start_gguf,
    tensor_names,
)
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


def write_deepseek_gguf(hf_dir: Path, out: Path, quant: str, split_kv_b: bool = True) -> Path:
    """`hf_dir`'s model as llama.cpp's DeepseekV2Model converter writes it: gguf-py's names,
    experts stacked, the steering bias as exp_probs_b.bias, matrices in `quant` (routers
    and norms float32); kv_b split per head into attn_k_b (W_UK transposed) and attn_v_b,
    the query head size as key_length_mla, as since llama.cpp's MLA change (`split_kv_b`),
    or whole with the head sizes as key/value_length, as before it."""
    import gguf

    cfg = hf_model(hf_dir).config
    heads, nope, v_dim = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim
    rot, rank = cfg.qk_rope_head_dim, cfg.kv_lora_rank
    names = tensor_names("deepseek2", cfg.num_hidden_layers)
    w = start_gguf(out, "deepseek2", cfg, 1 if split_kv_b else heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(rot)
    w.add_leading_dense_block_count(cfg.first_k_dense_replace)
    if cfg.q_lora_rank:
        w.add_q_lora_rank(cfg.q_lora_rank)
    w.add_kv_lora_rank(rank)
    if split_kv_b:
        w.add_key_length(rank + rot)
        w.add_value_length(rank)
        w.add_key_length_mla(nope + rot)
        w.add_value_length_mla(v_dim)
    else:
        w.add_key_length(nope + rot)
        w.add_value_length(v_dim)
    w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    w.add_expert_count(cfg.n_routed_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    w.add_expert_shared_count(cfg.n_shared_experts)
    w.add_expert_group_count(cfg.n_group)
    w.add_expert_group_used_count(cfg.topk_group)
    w.add_expert_weights_scale(cfg.routed_scaling_factor)
    if cfg.norm_topk_prob:
        w.add_expert_weights_norm(True)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    rope = cfg.rope_parameters
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])

    def tensors() -> Iterator[tuple[str, int | None, np.ndarray]]:
        for name, arr in checkpoint_state(hf_dir).items():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            name = name.replace("e_score_correction_bias", "e_score_correction.bias")
            if split_kv_b and name.endswith("kv_b_proj.weight"):
                kv_b = arr.reshape(heads, nope + v_dim, rank)
                block = f"blk.{name.split('.')[2]}"
                yield (f"{block}.attn_k_b.weight", None,
                       np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1)))  # fmt: skip
                yield f"{block}.attn_v_b.weight", None, np.ascontiguousarray(kv_b[:, nope:])
            else:
                yield *gguf_place(name, names), arr

    finish_gguf(w, tensors(), in_whole_blocks(quant))
    return out


def twin_of(gguf_path: Path, hf_dir: Path, out: Path) -> Path:
    """`hf_dir`'s model holding the values `gguf_path` holds (gguf-py's dequantization),
    kv_b joined back from its halves: what transformers runs as the file's reference."""
    import shutil

    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    cfg = hf_model(hf_dir).config
    names = tensor_names("deepseek2", cfg.num_hidden_layers)
    held = {}
    for t in GGUFReader(gguf_path).tensors:
        arr = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        held[t.name] = np.asarray(arr, np.float32)
    state = {}
    for name, original in checkpoint_state(hf_dir).items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        block = f"blk.{name.split('.')[2]}" if name.startswith("model.layers.") else ""
        if name.endswith("kv_b_proj.weight") and f"{block}.attn_k_b.weight" in held:
            k_b, v_b = held[f"{block}.attn_k_b.weight"], held[f"{block}.attn_v_b.weight"]
            arr = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1)
        else:
            gname, expert = gguf_place(
                name.replace("e_score_correction_bias", "e_score_correction.bias"), names)
            arr = held[gname] if expert is None else held[gname][expert]  # fmt: skip
        state[name] = np.ascontiguousarray(arr, dtype=np.float32).reshape(original.shape)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(hf_dir / "config.json", out / "config.json")
    save_file(state, out / "model.safetensors")
    return out


@pytest.fixture(scope="module")
def gguf_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with mscale = mscale_all_dim, as DeepSeek's and Kimi's configs have:
    a GGUF stores only the latter, and llama.cpp (and we, reading one) take YaRN's cos/sin
    factor, their ratio, as 1."""
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 16}  # fmt: skip
    return make_model("deepseek_v3", tmp_path_factory.mktemp("ds") / "hf", rope_parameters=rope)


@pytest.mark.parametrize("quant", ["F32", "Q8_0", "Q4_0"])
@pytest.mark.parametrize("split_kv_b", [True, False], ids=["mla", "legacy"])
def test_gguf_equals_transformers_on_the_files_values(gguf_source, tmp_path, quant, split_kv_b):  # noqa: ANN001
    """deepseek2 files as llama.cpp's converter writes them, kv_b split (as since its MLA
    change) or whole (before), against transformers running the values the file holds: 4-bit
    blocks kept as int4 codes, 8-bit as int8 rows, at every split."""
    from tests.test_quantized import EXACT

    source = gguf_source
    path = write_deepseek_gguf(source, tmp_path / f"ds-{quant}.gguf", quant, split_kv_b)
    with torch.inference_mode():
        expected = hf_model(twin_of(path, source, tmp_path / "twin"))(torch.tensor([PROMPT])).logits
    ckpt = open_checkpoint(str(path))
    assert ckpt.family.name == "deepseek" and ckpt.config.kv_lora_rank == 16
    expert = ckpt.source_format("model.layers.1.mlp.experts.0.gate_proj.weight")
    assert expert == {"F32": "none", "Q8_0": "int8", "Q4_0": "int4"}[quant]
    kv_b = {"blk.1.attn_k_b.weight", "blk.1.attn_v_b.weight"} if split_kv_b else {
        "blk.1.attn_kv_b.weight"}  # fmt: skip
    assert kv_b <= stage_tensors(ckpt, 1, 2)  # what a peer fetches for layer 1
    tolerance = {"F32": 1e-5, "Q8_0": 0.025, "Q4_0": EXACT}[quant]
    for splits in [(), (1,), (2, 3)]:
        assert relative_error(ours(str(path), splits, quantize="auto"), expected) < tolerance


def test_an_fp8_checkpoint_is_read_by_its_block_scales(tiny_models, tmp_path):  # noqa: ANN001
    """DeepSeek's own release: linear weights in float8 e4m3, a `_scale_inv` per 128 x 128
    block (quantization_config). Read as float32 by their scales, against transformers on
    those values."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    source, fp8_dir, twin = tiny_models["deepseek_v3"], tmp_path / "fp8", tmp_path / "twin"
    for d in (fp8_dir, twin):
        shutil.copytree(source, d)
    state = load_file(source / "model.safetensors")
    fp8, values = dict(state), dict(state)
    for name, w in state.items():
        if w.ndim == 2 and name.endswith("proj.weight"):
            scale = w.abs().amax() / 448.0
            codes = (w / scale).to(torch.float8_e4m3fn)
            fp8[name], fp8[f"{name}_scale_inv"] = codes, scale.reshape(1, 1)
            values[name] = codes.float() * scale
    save_file(fp8, fp8_dir / "model.safetensors", metadata={"format": "pt"})
    save_file(values, twin / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "weight_block_size": [128, 128]}  # fmt: skip
    (fp8_dir / "config.json").write_text(json.dumps(config))
    with torch.inference_mode():
        expected = hf_model(twin)(torch.tensor([PROMPT])).logits
        assert (expected - hf_model(source)(torch.tensor([PROMPT])).logits).abs().max() > 1e-3
    torch.testing.assert_close(ours(str(fp8_dir), (2,)), expected, atol=1e-4, rtol=0)
