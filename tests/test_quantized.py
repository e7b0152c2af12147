"""Quantized weights against float32 references of the same dequantized weights.

GGUF files: transformers loads them through gguf-py's own `dequantize` (the reference);
we keep 4-bit blocks as int4 codes and 5-8-bit ones as int8 rows. Hugging Face models with
--quantize: transformers runs the float weights our quantizer's codes stand for. Either way
what is tested is our packing, fusing, row permutation and kernels, at every split point.
"""

from __future__ import annotations

import json

import pytest
import torch

from node.engine.local import LocalPipeline
from node.engine.models.quantized import (
    CHUNK,
    QuantizedTensor,
    check_device,
    convert,
    pack_int4,
    quantize,
)
from node.engine.weights import open_checkpoint
from node.errors import RinginferError
from tests.conftest import hf_model, make_model, run_cli
from tests.test_gguf import K_TYPES, PROMPT, write_gguf

GGUF_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", *K_TYPES]
# Largest logit error allowed, relative to the largest reference logit. Where our codes are
# the reference's weights exactly (int4 from 4-bit blocks, either format from float), only
# bfloat16 activations and scales differ: 0.6-0.9% seen. int8 rows requantizing 5-8-bit
# blocks add their rounding: 1.4-1.9% seen; Q6_K's random fixture blocks (sub-block scales
# spread 2x within a row) 3.9%.
EXACT = 0.01
REQUANTIZED = {"Q6_K": 0.05}


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def logits_at_every_split(path: str, quant: str, n_layers: int) -> list[torch.Tensor]:
    out = []
    for splits in [(), *[(i,) for i in range(1, n_layers)]]:
        pipeline = LocalPipeline(open_checkpoint(path), splits, quantize=quant)
        with torch.inference_mode():
            caches = pipeline.new_caches(len(PROMPT))
            out.append(pipeline.forward(torch.tensor([PROMPT]), torch.arange(len(PROMPT)), caches))
    return out


@pytest.fixture(scope="module")
def k_model(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """K-quants pack 256 values a block: rows of 256 and 512."""
    path = tmp_path_factory.mktemp("kquant") / "llama"
    return make_model("llama", path, hidden_size=256, intermediate_size=512, num_hidden_layers=2)


@pytest.mark.parametrize("quant", GGUF_TYPES)
def test_gguf_blocks_kept_quantized_near_transformers(tiny_models, k_model, tmp_path, quant):  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    family = "qwen2" if quant in ("Q4_1", "Q8_0") else "llama"  # both layouts of Q and K
    source = k_model if quant in K_TYPES else tiny_models[family]
    path = write_gguf(source, tmp_path / f"{quant}.gguf", quant)
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    )
    with torch.inference_mode():
        expected = theirs.eval()(torch.tensor([PROMPT])).logits
    ckpt = open_checkpoint(str(path))
    fmt = ckpt.source_format("model.layers.0.mlp.down_proj.weight")
    assert fmt == ("int4" if quant.startswith("Q4") else "int8")
    tolerance = EXACT if fmt == "int4" else REQUANTIZED.get(quant, 0.025)
    for got in logits_at_every_split(str(path), "auto", ckpt.n_layers):
        assert relative_error(got, expected) < tolerance, quant


@pytest.mark.parametrize("quant", ["Q4_0", "Q4_1", "Q4_K"])
def test_int4_codes_are_the_files_weights_exactly(tiny_models, k_model, tmp_path, quant):  # noqa: ANN001
    """Codes, scales and zeros (and llama.cpp's Q/K row order undone) give back gguf-py's
    dequantized weights to float32 rounding."""
    source = k_model if quant in K_TYPES else tiny_models["llama"]
    ckpt = open_checkpoint(str(write_gguf(source, tmp_path / f"{quant}.gguf", quant)))
    for name in ["model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.0.mlp.down_proj.weight", "model.embed_tokens.weight"]:  # fmt: skip
        codes = ckpt.tensor(name, "int4")
        assert isinstance(codes, QuantizedTensor) and codes.bits == 4 and codes.group == 32
        torch.testing.assert_close(codes.dequantize(), ckpt.tensor(name), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_hf_models_quantized_at_load_near_transformers(tiny_models, tmp_path, family, fmt):  # noqa: ANN001
    model = hf_model(tiny_models[family])
    conv1d = family == "gpt2"  # GPT-2 stores [in, out]; rows to quantize are outputs
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and not name.endswith("wpe.weight"):
                w = p.t() if conv1d and "wte" not in name and "lm_head" not in name else p
                deq = quantize(w, fmt).dequantize()
                p.copy_(deq.t() if w is not p else deq)
        expected = model(torch.tensor([PROMPT])).logits
    n = model.config.num_hidden_layers
    for got in logits_at_every_split(str(tiny_models[family]), fmt, n):
        assert relative_error(got, expected) < EXACT, family


def test_quantizers_round_within_half_a_step():
    w = torch.randn(48, 256) * torch.linspace(0.01, 3, 48)[:, None]
    q8 = quantize(w, "int8")
    assert ((q8.dequantize() - w).abs() <= q8.scales / 2 + 1e-6).all()
    q4 = quantize(w, "int4")
    step = q4.scales.repeat_interleave(32, 1)
    assert ((q4.dequantize() - w).abs() <= step / 2 + 1e-6).all()
    assert q4.codes.max() <= 15 and q4.codes.dtype == torch.uint8
    assert convert(q4, "int4") is q4 and convert(q4, "int8").bits == 8
    torch.testing.assert_close(convert(q4, "none"), q4.dequantize())


def test_int4_packing_in_chunks_equals_packing_whole():
    """Large tensors are packed a chunk of rows at a time (bounded memory); the kernel's
    layout must not depend on where the chunks start."""
    codes = torch.randint(0, 16, (3 * CHUNK // 256 + 80, 256), dtype=torch.uint8)
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
    assert torch.equal(pack_int4(codes, torch.device("cpu")), whole)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_lm_head_top_logits_are_float32_exact(fmt):  # noqa: ANN001
    """The kernels' outputs are bfloat16; an LM head recomputes each row's logits near its
    maximum in float32 from the dequantized codes, so near-ties are not rounded into ties."""
    from node.engine.models.quantized import REFINE, QuantizedEmbedding, quantized_module

    torch.manual_seed(0)
    w = quantize(torch.randn(1000, 256) * 0.1, fmt)
    head = quantized_module(torch.nn.Linear(256, 1000, bias=False), fmt, torch.device("cpu"))
    head.refine = QuantizedEmbedding(1000, 256)
    head.load([w], torch.device("cpu"), torch.float32)
    x = torch.randn(3, 256) * 8
    exact = x.double() @ w.dequantize().double().t()
    got = head(x).double()
    high = exact.amax(-1, keepdim=True)
    near = exact >= high - REFINE / 2 * high.abs()  # well inside the recomputed band
    assert near.sum() >= 3
    torch.testing.assert_close(got[near], exact[near], rtol=1e-6, atol=1e-5)
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    assert (got - exact).abs().max() / exact.abs().max() < 1 / 64  # the others: bfloat16


def test_default_model_int4_knows_paris():
    proc = run_cli("generate", "--local", "--json", "The capital of France is",
                   "--max-tokens", "6", "--quantize", "int4")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["quantization"] == "int4" and out["text"].strip().startswith("Paris"), out


def test_unsupported_gguf_type_is_one_line(k_model, tmp_path):  # noqa: ANN001
    path = write_gguf(k_model, tmp_path / "iq2.gguf", "Q4_K", {"blk.1.ffn_up.weight": "IQ2_XXS"})
    proc = run_cli("generate", "--local", "--model", str(path), "hi")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "blk.1.ffn_up.weight' is IQ2_XXS" in proc.stderr and "--quantize none" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_quantized_formats_need_their_kernels():
    check_device("int4", torch.device("cpu"))
    with pytest.raises(RinginferError, match="not supported on mps"):
        check_device("int8", torch.device("mps"))
