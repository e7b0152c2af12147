"""GGUF loading: a random Llama written with gguf.GGUFWriter as llama.cpp's converter does,
read by us and by transformers; and the GGUF tokenizer against transformers' converter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from node.engine import LocalPipeline
from node.weights import open_checkpoint
from tests.conftest import hf_model

PROMPT = [3, 17, 101, 5, 42, 250, 7, 9, 61, 88, 13, 200]
HF_TO_GGUF = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's Q/K row order for llama.cpp's RoPE kernel."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `rope_freqs` for llama3 scaling (divisors of each frequency)."""
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high:
            factors.append(1.0)
        elif wavelen > low:
            factors.append(rope["factor"])
        else:
            smooth = (
                rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]
            ) / (rope["high_freq_factor"] - rope["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


def write_gguf(hf_dir: Path, out: Path, quant: str) -> Path:
    import gguf

    model = hf_model(hf_dir)
    cfg = model.config
    arch = cfg.model_type  # llama or qwen2: llama.cpp permutes Q/K rows for llama only
    w = gguf.GGUFWriter(out, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_merges([])
    rope = cfg.rope_parameters
    if rope.get("rope_type") == "llama3":  # llama.cpp stores llama3 scaling as a tensor
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, head_dim))
    qtype = gguf.GGMLQuantizationType[quant]
    for name, tensor in model.state_dict().items():
        arr = tensor.numpy().astype(np.float32)
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for tied embeddings
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{HF_TO_GGUF[module]}.{kind}"
            if arch == "llama" and module.endswith("q_proj"):
                arr = llama_cpp_permute(arr, cfg.num_attention_heads)
            if arch == "llama" and module.endswith("k_proj"):
                arr = llama_cpp_permute(arr, cfg.num_key_value_heads)
        if arr.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


@pytest.mark.parametrize("family,quant", [("llama", "F32"), ("llama", "Q8_0"), ("qwen2", "Q8_0")])
def test_gguf_load_equals_transformers_load(tiny_models, tmp_path, family, quant):  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    path = write_gguf(tiny_models[family], tmp_path / f"{family}-{quant}.gguf", quant)
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.inference_mode():
        expected = theirs(torch.tensor([PROMPT])).logits
    for splits in [(), (1,), (2,), (3,)]:
        pipeline = LocalPipeline(open_checkpoint(str(path)), splits)
        with torch.inference_mode():
            got = pipeline.forward(
                torch.tensor([PROMPT]), torch.arange(len(PROMPT)), pipeline.new_caches(12)
            )
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    if quant == "F32":  # unquantized, it is also the original HF model
        with torch.inference_mode():
            original = hf_model(tiny_models[family])(torch.tensor([PROMPT])).logits
        torch.testing.assert_close(got, original, atol=1e-4, rtol=0)


def test_gguf_llama3_rope_and_tied_head_equal_the_hf_model(tiny_models, tmp_path):  # noqa: ANN001
    path = write_gguf(tiny_models["llama3"], tmp_path / "llama3.gguf", "F32")
    ckpt = open_checkpoint(str(path))
    assert ckpt.config.rope_type == "freq_factors" and ckpt.config.tie_embeddings
    with torch.inference_mode():
        expected = hf_model(tiny_models["llama3"])(torch.tensor([PROMPT])).logits
        pipeline = LocalPipeline(ckpt, (2,))
        got = pipeline.forward(torch.tensor([PROMPT]), torch.arange(12), pipeline.new_caches(12))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


TEXTS = [
    "The capital of France is",
    "Numbers 12345 and 3.14159!\n\n  indented\ttab",
    "héllo wörld 日本語 🤖 don't WE'RE",
    "<|im_start|>user\nHi<|im_end|>\n",
]


def test_gguf_tokenizer_equals_transformers_conversion():
    from transformers import AutoTokenizer

    ckpt = open_checkpoint(None)
    ours = ckpt.tokenizer()
    theirs = AutoTokenizer.from_pretrained(ckpt.path.parent, gguf_file=ckpt.path.name)
    for text in TEXTS:
        ids = ours.encode(text, add_special=False)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids) == text
