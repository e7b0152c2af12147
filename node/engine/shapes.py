"""A model's shape for the planner: from an open checkpoint, a config.json, or a built-in table.

`ringinfer plan` sizes clusters for models nobody has downloaded, so the shape never needs
weights: the architecture is built on PyTorch's `meta` device and its parameters counted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from node.cluster.planner import ModelShape
from node.engine.models import Family, family_for_hf
from node.engine.models.quantized import held_per_weight, module_format, quantizable
from node.engine.weights import PACKAGED, formats_of, layer_format, open_checkpoint
from node.errors import RinginferError
from node.json_file import read_json

_LAYER_PARAM = re.compile(r"(^|\.)\d+\.")
# The format a checkpoint keeps a built stage's weight `key` in (weights.formats_of).
Formats = Callable[[nn.Module, str], str]

# Well-known models' shapes: the fields of their config.json on the Hugging Face hub that
# our config readers take, each model's own fields over its family's common ones.
_LLAMA31 = {"model_type": "llama", "vocab_size": 128256, "max_position_embeddings": 131072,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
_LLAMA32 = {**_LLAMA31, "rope_scaling": {**_LLAMA31["rope_scaling"], "factor": 32.0},
            "tie_word_embeddings": True}
_SMOLLM2 = {"model_type": "llama", "vocab_size": 49152, "max_position_embeddings": 8192,
            "tie_word_embeddings": True}
_QWEN25 = {"model_type": "qwen2", "vocab_size": 152064, "max_position_embeddings": 32768}
_QWEN3 = {"model_type": "qwen3", "vocab_size": 151936, "max_position_embeddings": 40960,
          "head_dim": 128}
_QWEN3_MOE = {**_QWEN3, "model_type": "qwen3_moe", "norm_topk_prob": True}
_QWEN2_MOE = {"model_type": "qwen2_moe", "vocab_size": 151936, "norm_topk_prob": False}
_GPT2 = {"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024}
_GPT_OSS = {"model_type": "gpt_oss", "vocab_size": 201088, "max_position_embeddings": 131072,
            "head_dim": 64, "sliding_window": 128, "num_experts_per_tok": 4,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                "original_max_position_embeddings": 4096}}

# DeepSeek V3's layout (Kimi K2 is built on it): latent attention, 3 dense layers then
# shared + routed experts.
_DEEPSEEK_V3 = {"model_type": "deepseek_v3", "vocab_size": 129280,
                "max_position_embeddings": 163840, "q_lora_rank": 1536, "kv_lora_rank": 512,
                "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
                "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
                "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4,
                "first_k_dense_replace": 3, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
                "rope_scaling": {"type": "yarn", "factor": 40, "mscale": 1.0,
                                 "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                 "beta_fast": 32, "beta_slow": 1}}


def _dims(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int) -> dict[str, int]:
    """The five numbers every Llama-like config.json has, by their names there."""
    return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": mlp}  # fmt: skip


def _experts(count: int, used: int, width: int, shared: int = 0) -> dict[str, int]:
    """Qwen-MoE's expert fields: routed experts, those a token uses, their MLP width, and
    the shared expert's (Qwen2-MoE)."""
    fields = {"num_experts": count, "num_experts_per_tok": used, "moe_intermediate_size": width}
    return {**fields, "shared_expert_intermediate_size": shared} if shared else fields


BUILT_IN: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.1-8B": {**_LLAMA31, **_dims(4096, 32, 32, 8, 14336)},
    "meta-llama/Llama-3.1-70B": {**_LLAMA31, **_dims(8192, 80, 64, 8, 28672)},
    "meta-llama/Llama-3.1-405B": {**_LLAMA31, **_dims(16384, 126, 128, 8, 53248)},
    "meta-llama/Llama-3.2-1B": {**_LLAMA32, **_dims(2048, 16, 32, 8, 8192)},
    "meta-llama/Llama-3.2-3B": {**_LLAMA32, **_dims(3072, 28, 24, 8, 8192)},
    "mistralai/Mistral-7B-v0.3": {"model_type": "mistral", "vocab_size": 32768,
                                  "max_position_embeddings": 32768,
                                  **_dims(4096, 32, 32, 8, 14336)},
    "mistralai/Mixtral-8x7B-v0.1": {"model_type": "mixtral", "vocab_size": 32000,
                                    "max_position_embeddings": 32768,
                                    **_dims(4096, 32, 32, 8, 14336),
                                    "num_local_experts": 8, "num_experts_per_tok": 2},
    "Qwen/Qwen2.5-7B": {**_QWEN25, **_dims(3584, 28, 28, 4, 18944)},
    "Qwen/Qwen2.5-72B": {**_QWEN25, **_dims(8192, 80, 64, 8, 29568)},
    "Qwen/Qwen1.5-MoE-A2.7B": {**_QWEN2_MOE, "max_position_embeddings": 8192,
                               **_dims(2048, 24, 16, 16, 5632), **_experts(60, 4, 1408, 5632)},
    "Qwen/Qwen2-57B-A14B": {**_QWEN2_MOE, "max_position_embeddings": 131072,
                            **_dims(3584, 28, 28, 4, 18944), **_experts(64, 8, 2560, 20480)},
    "Qwen/Qwen3-0.6B": {**_QWEN3, **_dims(1024, 28, 16, 8, 3072), "tie_word_embeddings": True},
    "Qwen/Qwen3-8B": {**_QWEN3, **_dims(4096, 36, 32, 8, 12288)},
    "Qwen/Qwen3-32B": {**_QWEN3, **_dims(5120, 64, 64, 8, 25600)},
    "Qwen/Qwen3-30B-A3B": {**_QWEN3_MOE, **_dims(2048, 48, 32, 4, 6144), **_experts(128, 8, 768)},
    "Qwen/Qwen3-235B-A22B": {**_QWEN3_MOE, **_dims(4096, 94, 64, 4, 12288),
                             **_experts(128, 8, 1536)},
    "HuggingFaceTB/SmolLM2-135M": {**_SMOLLM2, **_dims(576, 30, 9, 3, 1536)},
    "HuggingFaceTB/SmolLM2-360M": {**_SMOLLM2, **_dims(960, 32, 15, 5, 2560)},
    "HuggingFaceTB/SmolLM2-1.7B": {**_SMOLLM2, **_dims(2048, 24, 32, 32, 8192)},
    "openai-community/gpt2": {**_GPT2, "n_embd": 768, "n_layer": 12, "n_head": 12},
    "openai-community/gpt2-medium": {**_GPT2, "n_embd": 1024, "n_layer": 24, "n_head": 16},
    "openai-community/gpt2-large": {**_GPT2, "n_embd": 1280, "n_layer": 36, "n_head": 20},
    "openai-community/gpt2-xl": {**_GPT2, "n_embd": 1600, "n_layer": 48, "n_head": 25},
    "openai/gpt-oss-20b": {**_GPT_OSS, **_dims(2880, 24, 64, 8, 2880), "num_local_experts": 32},
    "openai/gpt-oss-120b": {**_GPT_OSS, **_dims(2880, 36, 64, 8, 2880),
                            "num_local_experts": 128},
    "deepseek-ai/DeepSeek-V3": {**_DEEPSEEK_V3, **_dims(7168, 61, 128, 128, 18432)},
    "moonshotai/Kimi-K2-Instruct": {
        **_DEEPSEEK_V3, **_dims(7168, 61, 64, 64, 18432), "model_type": "kimi_k2",
        "vocab_size": 163840, "max_position_embeddings": 131072, "n_routed_experts": 384,
        "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
        "routed_scaling_factor": 2.827, "rope_theta": 50000.0,
        "rope_scaling": {**_DEEPSEEK_V3["rope_scaling"], "factor": 32.0, "beta_fast": 1}},
    "Qwen/Qwen3-Next-80B-A3B-Instruct": {
        "model_type": "qwen3_next", "vocab_size": 151936, "max_position_embeddings": 262144,
        **_dims(2048, 48, 16, 2, 5120), "head_dim": 256, **_experts(512, 10, 512, 512),
        "norm_topk_prob": True, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
        "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
        "full_attention_interval": 4, "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
    "Qwen/Qwen3.5-35B-A3B": {
        "model_type": "qwen3_5_moe", "vocab_size": 248320, "max_position_embeddings": 262144,
        **_dims(2048, 40, 16, 2, 0), "head_dim": 256, **_experts(256, 8, 512, 512),
        "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_key_head_dim": 128,
        "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
        "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
    "Qwen/Qwen3.5-397B-A17B": {
        "model_type": "qwen3_5_moe", "vocab_size": 248320, "max_position_embeddings": 262144,
        **_dims(4096, 60, 32, 2, 0), "head_dim": 256, **_experts(512, 10, 1024, 1024),
        "linear_num_key_heads": 16, "linear_num_value_heads": 64, "linear_key_head_dim": 128,
        "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "full_attention_interval": 4,
        "rope_theta": 10000000.0, "partial_rotary_factor": 0.25},
    "google/gemma-3-27b-it": {
        "model_type": "gemma3_text", "vocab_size": 262208, "max_position_embeddings": 131072,
        **_dims(5376, 62, 32, 16, 21504), "head_dim": 128, "query_pre_attn_scalar": 168,
        "sliding_window": 1024, "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 8.0}},
    # Every row must build (tests/test_plan_cli.py plans each one).
}  # fmt: skip


def _key(name: str) -> str:
    """'meta-llama/Llama-3.1-405B-Instruct' and 'llama-3.1-405b' name the same shape."""
    return name.rpartition("/")[2].lower().removesuffix("-instruct")


_BY_KEY = {_key(name): name for name in BUILT_IN}


def built_in(name: str) -> tuple[str, dict[str, Any]] | None:
    """(full name, config fields) of a well-known model, by full or short name."""
    full = _BY_KEY.get(_key(name))
    return (full, BUILT_IN[full]) if full else None


@dataclass
class _Tally:
    """Of some weights: bytes held, bytes one decode step reads, parameters, those one
    token computes with, and the formats of the vocabulary's (token table, LM head)."""

    held: float = 0.0
    read: float = 0.0
    params: int = 0
    active: float = 0.0
    vocab: list[str] = field(default_factory=list)


def _routed(stage: nn.Module) -> list[nn.Module]:
    """The stage's mixture-of-experts modules: each has `experts` (a ModuleList) of which a
    token uses `top_k`, as SparseMoE."""
    return [
        m for m in stage.modules()
        if isinstance(getattr(m, "experts", None), nn.ModuleList) and getattr(m, "top_k", 0)
    ]  # fmt: skip


def _tally(stage: nn.Module, layers: bool, vocab_size: int, formats: Formats, size: int) -> _Tally:
    """The stage's decoder-layer weights (`layers`), or the others: linear layers and the
    token table in their `formats`, the rest at `size` bytes; a routed expert's share of
    tokens is top_k in n."""
    share = {id(p): m.top_k / len(m.experts) for m in _routed(stage)
             for p in m.experts.parameters()}  # fmt: skip
    out = _Tally()
    for prefix, module in stage.named_modules():
        for name, p in module.named_parameters(prefix, recurse=False):
            if bool(_LAYER_PARAM.search(name)) != layers:
                continue
            fmt = "none"
            if name.endswith(".weight") and quantizable(module, vocab_size):
                fmt = module_format(module, formats(stage, name))
                if isinstance(module, nn.Embedding) or module.out_features == vocab_size:
                    out.vocab.append(fmt)
            held = p.numel() * (held_per_weight(module, fmt, prefix == "lm_head") or size)
            used = share.get(id(p), 1.0)
            out.held += held
            out.read += p.numel() * (held_per_weight(module, fmt) or size) * used
            out.params += p.numel()
            out.active += p.numel() * used
    return out


def layer_kinds(config: Any) -> str:
    """The layers' kinds where they are not all plain attention and MLP, counted: 'latent
    attention · 3 dense + 58 MoE layers', '15 sliding-window (512) + 3 full attention'."""
    n = config.n_layers
    if hasattr(config, "sliding"):  # Gemma 3: a flag a layer
        windows = [config.sliding_window if s else None for s in config.sliding]
    elif hasattr(config, "window"):
        windows = [config.window(i) for i in range(n)]
    else:
        windows = [None] * n
    parts = []
    sliding = [w for w in windows if w is not None]
    linear = sum(getattr(config, "linear", ()))
    if getattr(config, "kv_lora_rank", 0):
        parts.append("latent attention")
    elif linear:
        parts.append(f"{linear} DeltaNet + {n - linear} gated attention")
    elif sliding and len(sliding) < n:
        parts.append(f"{len(sliding)} sliding-window ({max(sliding)}) + {n - len(sliding)} "
                     "full attention")  # fmt: skip
    elif sliding:
        parts.append(f"sliding-window attention ({max(sliding)})")
    moe = sum(config.is_moe(i) for i in range(n)) if hasattr(config, "is_moe") else 0
    if 0 < moe < n:
        parts.append(f"{n - moe} dense + {moe} MoE layers")
    return " · ".join(parts)


def shape_of(
    family: Family,
    config: Any,
    dtype: torch.dtype,
    wire_dtype: torch.dtype = torch.float16,
    quantize: str = "none",
    architecture: str = "",
    formats: Formats | None = None,
) -> ModelShape:
    """Weight bytes per layer (held, and read by a decode step), for the embedding and for
    the head, and parameter counts, from the model on `meta` with linear layers and the
    token table held in `quantize` (none, int8, int4), or in a checkpoint's own `formats`.
    An MoE model's dense layers (`config.dense_layers`) are another size. One layer of each
    kind is built, or with `formats` every layer, the mean of each kind counting: a Q4_K_M
    file keeps some layers' down projections in Q6_K (int8), a quarter more bytes there."""
    n = config.n_layers
    dense = tuple(getattr(config, "dense_layers", ()))
    dense = dense if len(dense) < n else ()  # no MoE layer at all: just a dense model
    main = next(i for i in range(n) if i not in dense)
    built: dict[int, nn.Module] = {}
    size = torch.empty((), dtype=dtype).element_size()

    def tally(i: int, layers: bool) -> _Tally:
        if i not in built:
            with torch.device("meta"):
                built[i] = family.stage_cls(config, i, i + 1, "cpu")
        return _tally(built[i], layers, config.vocab_size, formats or uniform, size)

    def uniform(stage: nn.Module, key: str) -> str:
        return quantize

    def mean(kind: list[int]) -> _Tally:
        tallies = [tally(i, True) for i in (kind if formats else kind[:1])]
        held, read, active = (sum(getattr(t, f) for t in tallies) / len(tallies)
                              for f in ("held", "read", "active"))  # fmt: skip
        return _Tally(held, read, tallies[0].params, active)

    layer = mean([i for i in range(n) if i not in dense])
    embed, head = tally(0, False), tally(n - 1, False)
    if n == 1:  # one stage: all its other weights count as the head's
        embed = _Tally()
    other = mean(list(dense)) if dense else _Tally()
    tied = config.vocab_size * config.dim if getattr(config, "tie_embeddings", False) else 0
    edges = embed.params + head.params - tied  # a tied head is the embedding's copy
    # One stage with both: an int8 table and head load from the same codes (load_stage), on
    # the CPU (a GPU dequantizes int8 linear layers, which these counts do not model).
    shared = tied if tied and embed.vocab + head.vocab == ["int8", "int8"] else 0
    routed = _routed(built[main])
    return ModelShape(
        n_layers=n,
        layer_bytes=int(layer.held),
        embed_bytes=int(embed.held),
        head_bytes=int(head.held),
        kv_bytes=math.ceil(
            getattr(config, "cache_width", 2 * config.n_kv_heads * config.head_dim) * size),
        state_bytes=math.ceil(config.state_bytes(size)) if hasattr(config, "state_bytes") else 0,
        hidden=config.dim,
        dtype_bytes=layer.held / layer.params,
        wire_bytes=torch.empty((), dtype=wire_dtype).element_size(),
        layer_read=int(layer.read),
        head_read=int(head.read),
        tied_bytes=shared,
        dense_layers=dense,
        dense_bytes=int(other.held),
        architecture=architecture,
        params=edges + (n - len(dense)) * layer.params + len(dense) * other.params,
        active_params=round(edges + (n - len(dense)) * layer.active + len(dense) * other.params),
        experts=len(routed[0].experts) if routed else 0,
        experts_used=routed[0].top_k if routed else 0,
        layer_kinds=layer_kinds(config),
    )


def shape_from_hf_config(
    config: dict[str, Any], dtype: torch.dtype, quantize: str = "none"
) -> ModelShape:
    family = family_for_hf(config)
    try:
        cfg = family.config_cls.from_hf(config)
    except KeyError as e:
        raise RinginferError(f"the model's config lacks the field {e}") from None
    return shape_of(family, cfg, dtype, quantize=quantize, architecture=config["model_type"])


def find_shape(
    spec: str | None, dtype: torch.dtype, quantize: str = "auto"
) -> tuple[str, ModelShape, str, str]:
    """(name, shape, where the shape came from, the layers' weight format) for a path, a
    cached hub id or a known name.
    `quantize` auto: a checkpoint's own formats (a GGUF's 4-bit layers as int4), else none.

    Never downloads: sizing a cluster must work before anything is fetched.
    """
    if spec is None or Path(spec).expanduser().exists() or spec in PACKAGED:
        ckpt = open_checkpoint(spec)
        fmt = layer_format(ckpt, quantize, torch.device("cpu"))
        shape = shape_of(ckpt.family, ckpt.config, dtype, quantize=fmt,
                         architecture=ckpt.architecture,
                         formats=formats_of(ckpt, quantize, torch.device("cpu")))
        return ckpt.name, shape, str(ckpt.path), fmt
    fmt = "none" if quantize == "auto" else quantize
    cached = _hub_cached_config(spec)
    if cached:
        return spec, shape_from_hf_config(read_json(Path(cached)), dtype, fmt), cached, fmt
    known = built_in(spec)
    if known:
        return known[0], shape_from_hf_config(known[1], dtype, fmt), "built-in table", fmt
    names = ", ".join(sorted(n.rpartition("/")[2] for n in BUILT_IN))
    raise RinginferError(
        f"unknown model '{spec}': not a local path, not in the Hugging Face cache, and not "
        f"one of the built-in shapes ({names})"
    )


def _hub_cached_config(repo_id: str) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # a name that is not a valid repo id is simply not cached
        return None
    return found if isinstance(found, str) else None
