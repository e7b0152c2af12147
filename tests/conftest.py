"""Tiny random models saved as real Hugging Face directories, and how to run the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub

# A text to measure perplexity on: the Declaration of Independence (1776, public domain).
TEXT = Path(__file__).resolve().parent / "data" / "declaration.txt"

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, max_position_embeddings=64)
# The Qwen3-Next / Qwen3.5 models' attention and DeltaNet sizes: 2 key heads and 4 value
# heads of 8 and 12, a kernel of 4; attention heads of 32 with RoPE on a quarter.
DELTANET = dict(TINY, vocab_size=320, num_attention_heads=4, num_key_value_heads=2,
                head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                linear_key_head_dim=8, linear_value_head_dim=12,
                linear_conv_kernel_dim=4)  # fmt: skip

# name -> (transformers config class name, kwargs). Each exercises a different code path.
FAMILIES = {
    "llama": (
        "LlamaConfig",
        dict(TINY, vocab_size=320, num_attention_heads=4, num_key_value_heads=2),
    ),
    "llama3": (
        "LlamaConfig",
        dict(
            TINY,
            vocab_size=320,
            num_attention_heads=4,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
    ),
    "mistral": (
        "MistralConfig",
        dict(TINY, vocab_size=320, num_attention_heads=4, num_key_value_heads=2, sliding_window=6),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(
            TINY,
            vocab_size=320,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
    ),
    "qwen3": (
        "Qwen3Config",
        dict(TINY, vocab_size=320, num_attention_heads=4, num_key_value_heads=2, head_dim=24),
    ),
    # Experts: 8 of width 32, top 2 renormalised; layer 2 dense (mlp_only_layers).
    "qwen3_moe": (
        "Qwen3MoeConfig",
        dict(TINY, vocab_size=320, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
             num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
             norm_topk_prob=True, mlp_only_layers=[2]),
    ),  # fmt: skip
    # Mixtral: 4 experts, top 3, its own tensor names (block_sparse_moe, w1/w2/w3), a window.
    "mixtral": (
        "MixtralConfig",
        dict(TINY, vocab_size=320, num_attention_heads=4, num_key_value_heads=2,
             num_local_experts=4, num_experts_per_tok=3, sliding_window=7),
    ),  # fmt: skip
    # Qwen2-MoE: a shared expert with a sigmoid gate, top-k not renormalised, every 2nd
    # layer sparse (decoder_sparse_step).
    "qwen2_moe": (
        "Qwen2MoeConfig",
        dict(TINY, vocab_size=320, num_attention_heads=4, num_key_value_heads=2,
             num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32,
             shared_expert_intermediate_size=64, decoder_sparse_step=2),
    ),  # fmt: skip
    # gpt-oss: sinks, windows (5) shorter than the prompt on layers 0 and 2, YaRN, biases,
    # a top-k softmax router, the clamped SwiGLU; experts stored stacked and interleaved.
    "gpt_oss": (
        "GptOssConfig",
        dict(TINY, vocab_size=320, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             num_local_experts=4, num_experts_per_tok=2, sliding_window=5,
             rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                              "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                              "original_max_position_embeddings": 16}),
    ),  # fmt: skip
    # Gemma 3: head_dim 24 and scores scaled by 20^-1/2; a window (5) shorter than the prompt
    # on sliding layers 0, 2, 3, global layer 1 with linearly scaled RoPE; capped logits.
    "gemma3": (
        "Gemma3TextConfig",
        dict(TINY, vocab_size=320, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
             query_pre_attn_scalar=20, sliding_window=5,
             layer_types=["sliding_attention", "full_attention", "sliding_attention",
                          "sliding_attention"],
             rope_parameters={
                 "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
             final_logit_softcapping=30.0),
    ),  # fmt: skip
    # DeepSeek V3: latent attention (query latent 24, key/value latent 16, heads of 8 + 8
    # RoPE dims, values of 12), YaRN with mscale in the softmax scale; 8 experts in 4 groups
    # (2 searched), top 2, a shared expert, layer 0 dense, a steering bias (random below).
    "deepseek_v3": (
        "DeepseekV3Config",
        dict(TINY, vocab_size=320, num_attention_heads=4, num_key_value_heads=4,
             q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
             v_head_dim=12, n_routed_experts=8, n_shared_experts=1, moe_intermediate_size=32,
             num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
             routed_scaling_factor=2.5,
             rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                              "mscale": 1.0, "mscale_all_dim": 0.707,
                              "original_max_position_embeddings": 16}),
    ),  # fmt: skip
    # Qwen3-Next: DeltaNet layers 0 and 2, gated attention layers 1 and 3; 4 experts, top 2,
    # a shared expert with its gate, layer 2 dense.
    "qwen3_next": (
        "Qwen3NextConfig",
        dict(DELTANET, full_attention_interval=2,
             intermediate_size=80, num_experts=4, num_experts_per_tok=2,
             moe_intermediate_size=24, shared_expert_intermediate_size=40, mlp_only_layers=[2],
             rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                              "partial_rotary_factor": 0.25}),
    ),  # fmt: skip
    # Qwen3.5 (its text model): four flat DeltaNet projections, layers 0, 1, 3 DeltaNet;
    # dense, and with experts in every layer (renormalised, a shared expert).
    "qwen3_5": (
        "Qwen3_5TextConfig",
        dict(DELTANET, intermediate_size=80,
             layer_types=["linear_attention", "linear_attention", "full_attention",
                          "linear_attention"]),
    ),  # fmt: skip
    "qwen3_5_moe": (
        "Qwen3_5MoeTextConfig",
        dict(DELTANET, num_experts=4,
             num_experts_per_tok=2, moe_intermediate_size=24, shared_expert_intermediate_size=40,
             layer_types=["linear_attention", "full_attention", "linear_attention",
                          "full_attention"]),
    ),  # fmt: skip
    "gpt2": (
        "GPT2Config",
        dict(vocab_size=50257, n_embd=64, n_layer=4, n_head=4, n_positions=64),
    ),
}


def make_model(name: str, path: Path, seed: int = 0, **overrides: object) -> Path:
    import transformers

    cls_name, kwargs = FAMILIES[name]
    config = getattr(transformers, cls_name)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init is tiny; widen it so layers matter for the logits
        for p in model.parameters():
            p.normal_(0, 0.2)
        for name, b in model.named_buffers():  # DeepSeek's expert-steering bias
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.2)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: make_model(name, root / name) for name in FAMILIES}


def with_tokenizer(name: str, path: Path, **overrides: object) -> Path:
    """A tiny random model of family `name` with SmolLM2's tokenizer, saved by transformers
    as tokenizer.json (its vocabulary: 49152)."""
    from transformers import AutoTokenizer

    from node.engine.weights import open_checkpoint

    ckpt = open_checkpoint(None)
    dst = make_model(name, path, vocab_size=49152, **overrides)
    hf_tok = AutoTokenizer.from_pretrained(ckpt.path.parent, gguf_file=ckpt.path.name)
    hf_tok.save_pretrained(dst)
    return dst


@pytest.fixture(scope="session")
def llama_with_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return with_tokenizer("llama", tmp_path_factory.mktemp("tok") / "llama")


def hf_model(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # generate() then runs to max_new_tokens, as our engine with no stop ids does. Not
    # min_new_tokens: that masks EOS logits and so changes which tokens greedy picks.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def hf_greedy(model: torch.nn.Module, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' greedy `generate`: the oracle for our token loop."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt], device=device)
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


def run_cli(
    *args: str, timeout: float = 300, netns: str | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """`ringinfer ARGS` as a process, inside network namespace `netns` when given."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return subprocess.run(
        [*prefix, sys.executable, "-m", "node.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    """Build the CPU decode ops (node/engine/models/decode_ops.py) once, before any daemon
    starts: daemons started together on a fresh machine would each build them."""
    from node.engine.models import decode_ops

    decode_ops.ops()
