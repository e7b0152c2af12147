"""A model's shape for the planner: from an open checkpoint, a config.json, or a built-in table.

`ringinfer plan` sizes clusters for models nobody has downloaded, so the shape never needs
weights: the architecture is built on PyTorch's `meta` device and its parameters counted.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from node.cluster.planner import ModelShape
from node.engine.models import Family, family_for_hf
from node.engine.models.quantized import BYTES_PER_WEIGHT, module_format, quantizable
from node.engine.weights import PACKAGED, layer_format, open_checkpoint
from node.errors import RinginferError
from node.json_file import read_json

_LAYER_PARAM = re.compile(r"(^|\.)\d+\.")

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip

# Well-known models' sizes, from their hub configs. Kinds: llama, llama3 (llama with
# Llama 3.1's RoPE scaling), qwen2, gpt2.
# name: (kind, hidden, layers, heads, kv heads, MLP width, vocabulary, context, tied)
_TABLE: dict[str, tuple[str, int, int, int, int, int, int, int, bool]] = {
    "meta-llama/Llama-3.1-8B": ("llama3", 4096, 32, 32, 8, 14336, 128256, 131072, False),
    "meta-llama/Llama-3.1-70B": ("llama3", 8192, 80, 64, 8, 28672, 128256, 131072, False),
    "meta-llama/Llama-3.1-405B": ("llama3", 16384, 126, 128, 8, 53248, 128256, 131072, False),
    "meta-llama/Llama-3.2-1B": ("llama3", 2048, 16, 32, 8, 8192, 128256, 131072, True),
    "meta-llama/Llama-3.2-3B": ("llama3", 3072, 28, 24, 8, 8192, 128256, 131072, True),
    "mistralai/Mistral-7B-v0.3": ("llama", 4096, 32, 32, 8, 14336, 32768, 32768, False),
    "Qwen/Qwen2.5-7B": ("qwen2", 3584, 28, 28, 4, 18944, 152064, 32768, False),
    "Qwen/Qwen2.5-72B": ("qwen2", 8192, 80, 64, 8, 29568, 152064, 32768, False),
    "HuggingFaceTB/SmolLM2-135M": ("llama", 576, 30, 9, 3, 1536, 49152, 8192, True),
    "HuggingFaceTB/SmolLM2-360M": ("llama", 960, 32, 15, 5, 2560, 49152, 8192, True),
    "HuggingFaceTB/SmolLM2-1.7B": ("llama", 2048, 24, 32, 32, 8192, 49152, 8192, True),
    "openai-community/gpt2": ("gpt2", 768, 12, 12, 12, 3072, 50257, 1024, True),
    "openai-community/gpt2-medium": ("gpt2", 1024, 24, 16, 16, 4096, 50257, 1024, True),
    "openai-community/gpt2-large": ("gpt2", 1280, 36, 20, 20, 5120, 50257, 1024, True),
    "openai-community/gpt2-xl": ("gpt2", 1600, 48, 25, 25, 6400, 50257, 1024, True),
}


def _hf_config(row: tuple[str, int, int, int, int, int, int, int, bool]) -> dict[str, Any]:
    """A table row as the config.json fields our config readers take."""
    kind, dim, layers, heads, kv, ffn, vocab, context, tied = row
    if kind == "gpt2":
        return {"model_type": "gpt2", "n_embd": dim, "n_layer": layers, "n_head": heads,
                "n_inner": ffn, "vocab_size": vocab, "n_positions": context,
                "tie_word_embeddings": tied}  # fmt: skip
    config = {
        "model_type": "qwen2" if kind == "qwen2" else "llama", "hidden_size": dim,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "intermediate_size": ffn, "vocab_size": vocab, "max_position_embeddings": context,
        "tie_word_embeddings": tied,
    }  # fmt: skip
    return {**config, "rope_scaling": _LLAMA3_ROPE} if kind == "llama3" else config


BUILT_IN = {name: _hf_config(row) for name, row in _TABLE.items()}


def _key(name: str) -> str:
    """'meta-llama/Llama-3.1-405B-Instruct' and 'llama-3.1-405b' name the same shape."""
    return name.rpartition("/")[2].lower().removesuffix("-instruct")


_BY_KEY = {_key(name): name for name in BUILT_IN}


def built_in(name: str) -> tuple[str, dict[str, Any]] | None:
    """(full name, config fields) of a well-known model, by full or short name."""
    full = _BY_KEY.get(_key(name))
    return (full, BUILT_IN[full]) if full else None


def shape_of(
    family: Family,
    config: Any,
    dtype: torch.dtype,
    wire_dtype: torch.dtype = torch.float16,
    quantize: str = "none",
) -> ModelShape:
    """Weight bytes per layer, for the embedding and for the head, from the model on `meta`,
    with linear layers and the token table held in `quantize` (none, int8, int4)."""
    n = config.n_layers
    with torch.device("meta"):
        first = family.stage_cls(config, 0, 1, "cpu")
        last = family.stage_cls(config, n - 1, n, "cpu") if n > 1 else None
    size = torch.empty((), dtype=dtype).element_size()

    def count(stage: torch.nn.Module | None, layers: bool) -> int:
        total = 0.0
        for prefix, module in stage.named_modules() if stage is not None else ():
            for name, p in module.named_parameters(prefix, recurse=False):
                if bool(_LAYER_PARAM.search(name)) != layers:
                    continue
                fmt = "none"
                if name.endswith(".weight") and quantizable(module, config.vocab_size):
                    fmt = module_format(module, quantize)
                total += p.numel() * BYTES_PER_WEIGHT.get(fmt, size)
        return int(total)

    embed = count(first, False) if last is not None else 0  # one stage: all edges are "head"
    head = count(last if last is not None else first, False)
    layer_params = sum(
        p.numel() for name, p in first.named_parameters() if _LAYER_PARAM.search(name)
    )
    layer_bytes = count(first, True)
    return ModelShape(
        n_layers=n,
        layer_bytes=layer_bytes,
        embed_bytes=embed,
        head_bytes=head,
        kv_bytes=2 * config.n_kv_heads * config.head_dim * size,
        hidden=config.dim,
        dtype_bytes=layer_bytes / layer_params,
        wire_bytes=torch.empty((), dtype=wire_dtype).element_size(),
    )


def shape_from_hf_config(
    config: dict[str, Any], dtype: torch.dtype, quantize: str = "none"
) -> ModelShape:
    family = family_for_hf(config)
    try:
        cfg = family.config_cls.from_hf(config)
    except KeyError as e:
        raise RinginferError(f"the model's config lacks the field {e}") from None
    return shape_of(family, cfg, dtype, quantize=quantize)


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
        shape = shape_of(ckpt.family, ckpt.config, dtype, quantize=fmt)
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
