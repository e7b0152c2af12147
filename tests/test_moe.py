"""Mixture-of-experts families (Qwen3-MoE, Qwen2-MoE, Mixtral, gpt-oss) and Qwen3, read from GGUF
files as llama.cpp's converter writes them, against transformers at every split point; the
routing's edge cases; experts kept in the file's format; greedy through a 3-daemon ring."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from node.engine.gguf_file import GGUFFile
from node.engine.local import LocalPipeline
from node.engine.models.moe import SparseMoE
from node.engine.models.quantized import Int4Linear, holdings
from node.engine.models.stage import Stage
from node.engine.shapes import find_shape
from node.engine.weights import load_stage, open_checkpoint, stage_tensors
from tests.conftest import hf_model, make_model, run_cli
from tests.test_gguf import PROMPT, dequantized_twin, write_gguf
from tests.test_quantized import EXACT, relative_error

FAMILIES = ["qwen3", "qwen3_moe", "qwen2_moe", "mixtral", "gpt_oss"]
# GGUF carries no sliding window for llama-architecture files: Mixtral's real models have
# none, so its GGUF twin is written without one. transformers' GGUF loader ignores
# attention.key_length, so Qwen3's is written with its default head size (128).
GGUF_OVERRIDES = {"mixtral": {"sliding_window": None}, "qwen3": {"head_dim": 128}}
# Within what bfloat16 activations change (see test_quantized): int4 codes are the file's
# weights exactly, int8 rows requantize Q8_0's blocks. MXFP4: float32 elsewhere, experts
# in MXFP4 (as gpt-oss's GGUFs hold them), computed in float32 from their exact values.
PROJECTIONS = ("gate", "up", "down")
TOLERANCE = {"F32": 1e-5, "Q4_0": EXACT, "Q8_0": 0.025, "MXFP4": 1e-5}


def logits(path: str, splits: tuple[int, ...], quantize: str = "auto") -> torch.Tensor:
    pipeline = LocalPipeline(open_checkpoint(path), splits, quantize=quantize)
    with torch.inference_mode():
        caches = pipeline.new_caches(len(PROMPT))
        return pipeline.forward(torch.tensor([PROMPT]), torch.arange(len(PROMPT)), caches)


@pytest.fixture(scope="module")
def gguf_sources(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("moe")
    return {f: make_model(f, root / f, **GGUF_OVERRIDES.get(f, {})) for f in FAMILIES}


@pytest.mark.parametrize("quant", ["F32", "Q8_0", "Q4_0", "MXFP4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_at_every_split_equals_transformers(gguf_sources, tmp_path, family, quant):  # noqa: ANN001
    """Experts stacked as llama.cpp stacks them, Qwen2-MoE's shared expert and its gate
    vector, Mixtral's permuted Q/K: transformers runs the weights the file holds (gguf-py's
    dequantization), we keep them as the file's int4 / int8."""
    source = gguf_sources[family]
    experts = {f"blk.{i}.ffn_{p}_exps.weight": "MXFP4" for i in range(4) for p in PROJECTIONS}
    types = experts if quant == "MXFP4" else None
    path = write_gguf(source, tmp_path / f"{family}-{quant}.gguf", quant.replace("MXFP4", "F32"),
                      types)  # fmt: skip
    reference = dequantized_twin(path, source, tmp_path / "twin") if quant != "F32" else source
    with torch.inference_mode():
        expected = hf_model(reference)(torch.tensor([PROMPT])).logits
    ckpt = open_checkpoint(str(path))
    counts = {"qwen3": 0, "qwen3_moe": 8, "qwen2_moe": 6, "mixtral": 4, "gpt_oss": 4}
    assert ckpt.config.n_experts == counts[family]
    if quant == "MXFP4" and counts[family]:
        stage = load_stage(ckpt, 0, 4, torch.device("cpu"), torch.float32, quantize="auto")
        assert set(holdings(stage)) == {"mxfp4", "float32"}
    for splits in [(), *[(s,) for s in range(1, ckpt.n_layers)], (1, 2, 3)]:
        got = logits(str(path), splits)
        assert relative_error(got, expected) < TOLERANCE[quant], (family, quant, splits)


def test_a_mixtral_gguf_of_one_tensor_an_expert_equals_the_stacked_one(gguf_sources, tmp_path):  # noqa: ANN001
    """Mixtral GGUFs written before llama.cpp stacked experts (`blk.N.ffn_gate.E.weight`,
    still loaded by llama.cpp) load, and compute what the stacked file does."""
    source = gguf_sources["mixtral"]
    stacked = write_gguf(source, tmp_path / "stacked.gguf", "Q4_0")
    single = write_gguf(source, tmp_path / "single.gguf", "Q4_0", per_expert=True)
    names = set(GGUFFile(single).tensors)
    assert "blk.0.ffn_gate.3.weight" in names and "blk.0.ffn_gate_exps.weight" not in names
    assert torch.equal(logits(str(single), (2,)), logits(str(stacked), (2,)))
    ckpt = open_checkpoint(str(single))
    assert "blk.1.ffn_down.0.weight" in stage_tensors(ckpt, 1, 2)  # what a peer fetches


def test_experts_of_q4_k_m_kept_as_int4_and_int8_within_the_files_size(tmp_path):  # noqa: ANN001
    """A Qwen3-MoE written as llama.cpp's Q4_K_M writes it (Q4_K experts, Q6_K down
    projections): each expert's projections stay int4 / int8, and the whole model's
    resident weights are at most 1.3x the file's tensor bytes."""
    source = make_model("qwen3_moe", tmp_path / "hf", hidden_size=256, moe_intermediate_size=256,
                        intermediate_size=256, head_dim=64)  # fmt: skip
    # Q4_K_M gives some layers' down projections Q6_K (llama.cpp's use_more_bits)
    downs = {f"blk.{i}.ffn_down_exps.weight": "Q6_K" for i in (0, 3)}
    path = write_gguf(source, tmp_path / "q4km.gguf", "Q4_K", downs)
    ckpt = open_checkpoint(str(path))
    stage = load_stage(ckpt, 0, ckpt.n_layers, torch.device("cpu"), torch.float32, quantize="auto")
    for i, down in ((0, "Int8Linear"), (1, "Int4Linear")):
        experts = stage.layers[i].mlp.experts
        assert all(isinstance(e.gate_up_proj, Int4Linear) for e in experts)
        assert {type(e.down_proj).__name__ for e in experts} == {down}
    held = holdings(stage)
    file_bytes = sum(t.n_bytes for t in GGUFFile(path).tensors.values())
    norms = sum(p.numel() * p.element_size() for p in stage.parameters())
    assert sum(held.values()) + norms < 1.3 * file_bytes, (held, file_bytes)
    assert held["int4"] > held["int8"]  # gate and up: twice down's weights
    assert_shape_sizes(path, stage)


def assert_shape_sizes(path: Path, stage: Stage) -> None:
    """What `plan` and the planner count for a file (find_shape) is what a stage of all its
    layers holds, each weight in its own format, within 1%."""
    _, shape, _, _ = find_shape(str(path), torch.float32)
    layers = sum(sum(holdings(layer).values()) for layer in stage.layers)
    layers += sum(p.numel() * p.element_size() for p in stage.layers.parameters())
    assert shape.held(0, shape.n_layers) == pytest.approx(layers, rel=0.01)
    assert shape.embed_bytes == pytest.approx(sum(holdings(stage.embed_tokens).values()), rel=0.01)


def moe_twin(tmp_path, edit) -> tuple:  # noqa: ANN001
    """A Qwen3-MoE whose routers `edit` rewrites, saved, and transformers' logits for it."""
    path = make_model("qwen3_moe", tmp_path / "edited")
    model = hf_model(path)
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                edit(layer.mlp.gate.weight)
    model.save_pretrained(path)
    with torch.inference_mode():
        return path, model(torch.tensor([PROMPT])).logits


def test_experts_no_row_picks_are_never_computed():
    """A decode step (one row, 2 of 8 experts) beside experts whose weights are NaN: they
    are neither run nor summed, so the output is the picked experts' weighted sum."""
    torch.manual_seed(1)
    moe = SparseMoE(16, 24, 8, 2, False, 0, "cpu")
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
    row = torch.randn(1, 16)
    weights, experts = moe.route(row)
    with torch.no_grad():
        for e in set(range(8)) - set(experts[0].tolist()):
            for p in moe.experts[e].parameters():
                p.fill_(float("nan"))
        got = moe(row[None])[0, 0]
    want = sum(w * moe.experts[e](row[0]) for w, e in zip(weights[0], experts[0], strict=True))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_tied_router_scores_pick_as_the_reference_does(tmp_path):  # noqa: ANN001
    """Experts 2 and 5 score the same for every token (same router row) but compute
    different things: both implementations must keep the same one of the pair."""

    def tie(w: torch.Tensor) -> None:
        w[5] = w[2]

    path, expected = moe_twin(tmp_path, tie)
    for splits in [(), (1,), (3,)]:
        torch.testing.assert_close(logits(str(path), splits), expected, atol=1e-4, rtol=0)


def test_a_batch_routed_to_disjoint_and_shared_experts_equals_each_row_alone():
    """Rows built to pick experts {0,1}, {2,3}, {1,2} and {0,1} again: the batched pass
    (one call per expert, with all its rows) equals each row alone and the plain sum of
    each row's weighted experts."""
    torch.manual_seed(0)
    dim = 16
    moe = SparseMoE(dim, 24, 4, 2, True, 0, "cpu")
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0, 0.3)
        moe.gate.weight.copy_(10 * torch.eye(4, dim))
    rows = 0.1 * torch.randn(4, dim)
    for r, pair in enumerate([(0, 1), (2, 3), (1, 2), (0, 1)]):
        rows[r, list(pair)] += torch.tensor([1.0, 0.9])
    weights, experts = moe.route(rows)
    assert [sorted(e) for e in experts.tolist()] == [[0, 1], [2, 3], [1, 2], [0, 1]]
    with torch.inference_mode():
        batched = moe(rows[None])[0]
        alone = torch.cat([moe(rows[None, r : r + 1])[0] for r in range(4)])
        plain = torch.stack([
            sum(w * moe.experts[e](rows[r]) for w, e in zip(weights[r], experts[r], strict=True))
            for r in range(4)
        ])  # fmt: skip
    torch.testing.assert_close(batched, alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(batched, plain, atol=1e-6, rtol=0)


def test_experts_of_a_gguf_with_a_type_we_cannot_keep_are_named(tmp_path):  # noqa: ANN001
    source = make_model("qwen3_moe", tmp_path / "hf", hidden_size=256, moe_intermediate_size=256,
                        intermediate_size=256, head_dim=64)  # fmt: skip
    types = {"blk.1.ffn_up_exps.weight": "IQ2_XXS"}
    path = write_gguf(source, tmp_path / "iq.gguf", "Q4_K", types)
    proc = run_cli("generate", "--local", "--model", str(path), "hi")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "blk.1.ffn_up_exps.weight' is IQ2_XXS" in proc.stderr, proc.stderr


def openai_mxfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[..., out, in] float as gpt-oss's hub checkpoints store it: `_blocks` [..., out,
    in/32, 16] (byte j holds inputs 2j and 2j+1) and `_scales` [..., out, in/32] (e8m0),
    quantized by gguf-py (whose blocks hold inputs j and j+16 in byte j)."""
    import gguf

    *outer, k = w.shape
    raw = gguf.quants.quantize(w.reshape(-1, k), gguf.GGMLQuantizationType.MXFP4)
    raw = raw.reshape(-1, k // 32, 17)
    codes = np.concatenate([raw[..., 1:] & 15, raw[..., 1:] >> 4], axis=-1)  # inputs in order
    blocks = codes[..., 0::2] | codes[..., 1::2] << 4
    # Contiguous copies: safetensors.numpy writes a strided view's memory as it lies.
    return (np.ascontiguousarray(blocks.reshape(*outer, k // 32, 16)),
            np.ascontiguousarray(raw[..., 0].reshape(*outer, k // 32)))  # fmt: skip


def test_gpt_oss_hub_checkpoint_in_mxfp4_equals_transformers(gguf_sources, tmp_path):  # noqa: ANN001
    """A gpt-oss directory as OpenAI ships it (experts as MXFP4 `_blocks` / `_scales` and a
    quantization_config): transformers dequantizes it, we keep the experts in MXFP4, and
    fetching a layer takes both its codes and its scales."""
    from safetensors.numpy import load_file, save_file

    source, path = gguf_sources["gpt_oss"], tmp_path / "gpt-oss-mxfp4"
    path.mkdir()
    state = {}
    for name, w in load_file(source / "model.safetensors").items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = openai_mxfp4(np.ascontiguousarray(np.swapaxes(w, 1, 2)))
            state[f"{name}_blocks"], state[f"{name}_scales"] = blocks, scales
        else:
            state[name] = w
    save_file(state, path / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (path / "config.json").write_text(json.dumps(config))
    with torch.inference_mode():
        expected = hf_model(path)(torch.tensor([PROMPT])).logits
    ckpt = open_checkpoint(str(path))
    for splits in [(), (2,)]:
        torch.testing.assert_close(logits(str(path), splits), expected, atol=1e-5, rtol=0)
    stage = load_stage(ckpt, 1, 2, torch.device("cpu"), torch.float32, quantize="auto")
    assert set(holdings(stage)) == {"mxfp4", "float32"}
    assert {"model.layers.1.mlp.experts.down_proj_blocks",
            "model.layers.1.mlp.experts.down_proj_scales"} <= stage_tensors(ckpt, 1, 2)  # fmt: skip
