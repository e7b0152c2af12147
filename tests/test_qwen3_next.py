"""Qwen3-Next (node/engine/models/qwen3_next.py) against transformers: a prompt of several
delta-rule chunks, the same prompt in pieces (recurrent states carried between passes),
what a request's caches hold, and a state that cannot be rewritten. test_models.py runs
conftest's tiny model at every split point and greedy; test_batching.py packed with
others; test_ring.py through three daemons."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from node.engine.local import LocalPipeline
from node.engine.models.qwen3_next import CHUNK
from node.engine.shapes import shape_of
from node.engine.weights import open_checkpoint
from node.errors import RinginferError
from tests.conftest import hf_model

LONG = [(7 * i + 3) % 320 for i in range(2 * CHUNK + 22)]  # two whole chunks and a part


def test_a_prompt_of_several_chunks_equals_transformers_whole_and_in_pieces(tiny_models):  # noqa: ANN001
    path = tiny_models["qwen3_next"]
    with torch.inference_mode():
        expected = hf_model(path)(torch.tensor([LONG])).logits
        for splits in [(), (1,), (2, 3)]:
            pipeline = LocalPipeline(open_checkpoint(str(path)), splits)
            whole = pipeline.forward(torch.tensor([LONG]), torch.arange(len(LONG)),
                                     pipeline.new_caches(len(LONG)))  # fmt: skip
            torch.testing.assert_close(whole, expected, atol=1e-4, rtol=0)
            caches, pieces, at = pipeline.new_caches(len(LONG)), [], 0
            for size in (50, 1, 77, len(LONG) - 128):  # across chunk boundaries, one alone
                ids = torch.tensor([LONG[at : at + size]])
                pieces.append(pipeline.forward(ids, torch.arange(at, at + size), caches))
                at += size
            torch.testing.assert_close(torch.cat(pieces, dim=1), expected, atol=1e-4, rtol=0)


def test_a_request_holds_keys_for_attention_layers_and_fixed_states_for_deltanet(tiny_models):  # noqa: ANN001
    """Two attention layers hold keys and values for every position; the two DeltaNet layers
    a convolution window and a state whose size does not depend on the context."""
    pipeline = LocalPipeline(open_checkpoint(str(tiny_models["qwen3_next"])))
    for capacity in (64, 32768):
        cache = pipeline.new_caches(capacity)[0]
        keys = 2 * 2 * 2 * 32 * 4 * capacity  # layers, k and v, kv heads, head dim, bytes
        states = 2 * (80 * 3 + 4 * 8 * 12) * 4  # layers, (conv dim x 3 + heads x 8 x 12), bytes
        assert cache.nbytes == keys + states
        # the planner's count for the four layers: what admission will count
        shape = shape_of(pipeline.ckpt.family, pipeline.ckpt.config, torch.float32)
        assert shape.cache_bytes(4, capacity) == cache.nbytes
    assert pipeline.stages[0].cache_bytes(32768, torch.float32) == cache.nbytes  # admission


def test_a_recurrent_state_is_not_rewound(tiny_models, monkeypatch):  # noqa: ANN001
    """A pass over positions the state has already taken in is refused, not folded in twice;
    so is any pass after one that raised midway (its states half-updated)."""
    pipeline = LocalPipeline(open_checkpoint(str(tiny_models["qwen3_next"])))
    caches = pipeline.new_caches(16)
    with torch.inference_mode():
        pipeline.forward(torch.tensor([[5, 6, 7]]), torch.arange(3), caches)
        with pytest.raises(RinginferError, match="rewrites a recurrent state"):
            pipeline.forward(torch.tensor([[7]]), torch.tensor([2]), caches)
        last = pipeline.stages[0].layers[-1]
        monkeypatch.setattr(last, "forward", lambda *a: (_ for _ in ()).throw(MemoryError()))
        with pytest.raises(MemoryError):  # after the DeltaNet layers 0 and 2 took position 3
            pipeline.forward(torch.tensor([[8]]), torch.tensor([3]), caches)
        monkeypatch.undo()
        with pytest.raises(RinginferError):
            pipeline.forward(torch.tensor([[8]]), torch.tensor([3]), caches)


def test_a_killed_middle_stage_is_replayed_around_exactly(tmp_path):  # noqa: ANN001
    """Three daemons, the middle stage SIGKILLed after ~50 tokens: the requester replays its
    history into the plan of the two left, whose DeltaNet states are rebuilt from it, and
    the tokens are those of an uninterrupted run."""
    from tests.conftest import with_tokenizer
    from tests.daemons import EXACT_RING, Cluster
    from tests.test_replay import kill_at_token_50, local

    # A context for the whole generation, so that it is still decoding when the kill lands;
    # 8 layers (4 DeltaNet), which the planner spreads over the three nodes.
    model = str(with_tokenizer("qwen3_next", tmp_path / "qwen3_next", max_position_embeddings=512,
                               num_hidden_layers=8))  # fmt: skip
    cluster = Cluster(tmp_path, 3, ["--model", model, *EXACT_RING])
    try:
        want = local("--model", model)
        nodes = cluster.nodes[0].status()["nodes"]
        stages = sorted((n["layers"][0], n["name"]) for n in nodes if n["layers"])
        assert len(stages) == 3, nodes
        by_name = {d.name: d for d in cluster.nodes}
        first, middle, _ = (by_name[name] for _, name in stages)
        result = kill_at_token_50(first, middle)
        assert result["tokens"] == want
        assert len(result["replays"]) == 1 and middle.name in result["replays"][0]["why"]
    finally:
        cluster.stop()


def test_a_hub_qwen3_5_moe_checkpoint_equals_transformers(tmp_path):  # noqa: ANN001
    """Qwen3.5-MoE as the Hub holds it: a vision-language model's checkpoint (the text model
    under model.language_model, multimodal RoPE in its config), experts stacked in
    gate_up_proj [experts, 2 x width, dim] and down_proj. Its text logits at every split."""
    import transformers
    from safetensors.torch import load_file, save_file

    from tests.conftest import FAMILIES

    text = dict(FAMILIES["qwen3_5_moe"][1], rope_parameters={
        "rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1], "mrope_interleaved": True})  # fmt: skip
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                  out_hidden_size=64, patch_size=4, num_position_embeddings=16)  # fmt: skip
    config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(tmp_path)
    state, stacks = load_file(tmp_path / "model.safetensors"), {}
    for name in [n for n in state if ".mlp.experts." in n]:
        layer, rest = name.split(".mlp.experts.")
        expert, proj = rest.split(".", 1)
        stacks.setdefault(layer, {}).setdefault(proj, {})[int(expert)] = state.pop(name)
    for layer, p in stacks.items():
        n = len(p["gate_proj.weight"])
        gate_up = [torch.cat([p["gate_proj.weight"][e], p["up_proj.weight"][e]]) for e in range(n)]
        state[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        state[f"{layer}.mlp.experts.down_proj"] = torch.stack(
            [p["down_proj.weight"][e] for e in range(n)])  # fmt: skip
    assert any(k.startswith("model.language_model.layers.") for k in state)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with torch.inference_mode():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
        expected = theirs.eval()(torch.tensor([LONG[:12]])).logits
        for splits in [(), (1,), (2, 3)]:
            pipeline = LocalPipeline(open_checkpoint(str(tmp_path)), splits)
            got = pipeline.forward(torch.tensor([LONG[:12]]), torch.arange(12),
                                   pipeline.new_caches(12))  # fmt: skip
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def write_qwen3next_gguf(hf_dir: Path, out: Path, quant: str) -> Path:
    """`hf_dir`'s Qwen3-Next or Qwen3.5 as llama.cpp's converter writes it: Qwen3-Next's
    in_proj_qkvz split into flat attn_qkv and attn_gate and in_proj_ba kept (ssm_ba); for
    Qwen3.5 (qwen35, qwen35moe) b and a apart, and every value-head axis reordered from
    grouped by key head to tiled (_LinearAttentionVReorderBase); ssm_a = -exp(A_log), dt_bias
    as ssm_dt.bias, the kernel squeezed, zero-centred norms as 1 + w, experts stacked;
    matrices in `quant` where their rows are whole blocks."""
    import numpy as np

    from tests.test_gguf import (
        checkpoint_state,
        finish_gguf,
        gguf_place,
        in_whole_blocks,
        start_gguf,
        tensor_names,
    )

    cfg = hf_model(hf_dir).config
    nk, nv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv, r = cfg.linear_key_head_dim, cfg.linear_value_head_dim, nv // nk
    qwen35, n_experts = cfg.model_type.startswith("qwen3_5"), getattr(cfg, "num_experts", 0)
    arch = ("qwen35moe" if n_experts else "qwen35") if qwen35 else "qwen3next"
    w = start_gguf(out, arch, cfg)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(int(cfg.head_dim * cfg.rope_parameters["partial_rotary_factor"]))
    if qwen35:  # the converter's default interval, and the layers as layer_types has them
        w.add_full_attention_interval(4)
        w.add_array(f"{arch}.attention.recurrent_layers",
                    [t == "linear_attention" for t in cfg.layer_types])  # fmt: skip
        w.add_rope_dimension_sections([11, 11, 10, 0])
    else:
        w.add_full_attention_interval(cfg.layer_types.index("full_attention") + 1)
    w.add_ssm_conv_kernel(cfg.linear_conv_kernel_dim)
    w.add_ssm_state_size(dk)
    w.add_ssm_group_count(nk)
    w.add_ssm_time_step_rank(nv)
    w.add_ssm_inner_size(nv * dv)
    if n_experts:
        w.add_expert_count(n_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    names = tensor_names(arch, cfg.num_hidden_layers)

    def tiled(arr: np.ndarray, axis: int, head: int) -> np.ndarray:
        """Value heads [k0: v0 v1 .., k1: v0 v1 ..] as [v0: k0 k1 .., v1: k0 k1 ..]."""
        shape = arr.shape
        grouped = arr.reshape(*shape[:axis], nk, r, head, *shape[axis + 1 :])
        return np.swapaxes(grouped, axis, axis + 1).reshape(shape)

    def reordered(name: str, arr: np.ndarray) -> np.ndarray:
        if name.endswith(("in_proj_qkv.weight", "conv1d.weight")):
            return np.concatenate([arr[: 2 * nk * dk], tiled(arr[2 * nk * dk :], 0, dv)])
        if name.endswith("in_proj_z.weight"):
            return tiled(arr, 0, dv)
        if name.endswith(("in_proj_a.weight", "in_proj_b.weight", "A_log", "dt_bias")):
            return tiled(arr, 0, 1)
        if name.endswith("out_proj.weight"):
            return tiled(arr, 1, dv)
        return arr

    def tensors() -> Iterator[tuple[str, int | None, np.ndarray]]:
        for name, arr in checkpoint_state(hf_dir).items():
            block = f"blk.{name.split('.')[2]}" if name.startswith("model.layers.") else ""
            if qwen35 and "linear_attn." in name:
                arr = reordered(name, arr)
            if name.endswith("in_proj_qkvz.weight"):
                q, k, v, z = np.split(arr.reshape(nk, 2 * dk + 2 * r * dv, -1),
                                      [dk, 2 * dk, 2 * dk + r * dv], axis=1)  # fmt: skip
                flat = [x.reshape(-1, arr.shape[-1]) for x in (q, k, v, z)]
                yield f"{block}.attn_qkv.weight", None, np.concatenate(flat[:3])
                yield f"{block}.attn_gate.weight", None, flat[3]
            elif name.endswith("A_log"):
                yield f"{block}.ssm_a", None, -np.exp(arr)
            elif name.endswith("dt_bias"):
                yield f"{block}.ssm_dt.bias", None, arr
            else:
                if name.endswith("conv1d.weight"):
                    arr = arr.reshape(arr.shape[0], -1)
                elif name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
                    arr = arr + 1
                elif name.endswith("shared_expert_gate.weight"):
                    arr = arr.reshape(-1)
                yield *gguf_place(name, names), arr

    finish_gguf(w, tensors(), in_whole_blocks(quant))
    return out


# Q8_0 read as float (--quantize none): the layout exactly. Q4_0 kept as int4 codes: their
# values exactly, with bfloat16 activations into the products, which this tiny DeltaNet
# model amplifies (transformers' own bfloat16 run is 0.059 off its float32 one, against
# 0.009 for the tiny Qwen3-MoE), so within 0.1.
GGUF_CASES = [("F32", "auto", 1e-5), ("Q8_0", "none", 1e-5), ("Q4_0", "auto", 0.1)]


@pytest.mark.parametrize(("quant", "fmt", "tolerance"), GGUF_CASES)
@pytest.mark.parametrize("family", ["qwen3_next", "qwen3_5", "qwen3_5_moe"])
def test_gguf_equals_transformers_on_the_files_values(tiny_models, tmp_path, family, quant, fmt,
                                                      tolerance):  # noqa: ANN001  # fmt: skip
    """qwen3next, qwen35 and qwen35moe files as llama.cpp's converter writes them, against
    transformers running the values the file holds (each matrix whose rows are whole blocks
    quantized and dequantized: the converter's changes only move or split rows and
    columns, whole heads at a time), at every split."""
    import gguf
    import numpy as np

    from tests.test_quantized import relative_error

    source = tiny_models[family]
    path = write_qwen3next_gguf(source, tmp_path / f"{family}-{quant}.gguf", quant)
    model = hf_model(source)
    if quant != "F32":
        qtype = gguf.GGMLQuantizationType[quant]
        with torch.no_grad():
            for name, p in model.named_parameters():
                kept_float = name.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))
                if p.ndim < 2 or p.shape[-1] % 32 or kept_float or "conv1d" in name:
                    continue
                for w in p.view(-1, *p.shape[-2:]):  # each expert's
                    codes = gguf.quants.quantize(w.numpy(), qtype)
                    w.copy_(torch.from_numpy(np.asarray(gguf.quants.dequantize(codes, qtype))))
    with torch.inference_mode():
        expected = model(torch.tensor([LONG[:12]])).logits
    ckpt = open_checkpoint(str(path))
    assert ckpt.family.name == "qwen3_next"
    assert ckpt.config.linear == tuple(t == "linear_attention" for t in model.config.layer_types)
    for splits in [(), (1,), (2, 3)]:
        pipeline = LocalPipeline(ckpt, splits, quantize=fmt)
        with torch.inference_mode():
            got = pipeline.forward(torch.tensor([LONG[:12]]), torch.arange(12),
                                   pipeline.new_caches(12))  # fmt: skip
        assert relative_error(got, expected) < tolerance, splits
    assert ("int4" in pipeline.quantization) == (quant == "Q4_0")
