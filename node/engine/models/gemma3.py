"""Gemma 3 text models: `gemma3_text`, and the language model of a multimodal `gemma3`.

Llama's attention (with q/k head norms) and a GeGLU MLP, each between two RMSNorms, norms
that scale by (1 + w), an embedding scaled by sqrt(hidden), and two kinds of layer: sliding
ones that see the last `sliding_window` positions with a local RoPE base, and global ones
with their own base (and linear scaling in the larger models).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from node.engine.models import llama
from node.engine.models.attention import Part, Step, positions_of
from node.engine.models.llama import (
    DecoderShape,
    LlamaStage,
    RMSNorm,
    default_inv_freq,
    gguf_keys,
    gguf_shape,
    hf_shape,
    rms_norm,
    rope_tables,
)
from node.engine.models.moe import GatedMLP
from node.errors import RinginferError

HF_MODEL_TYPES = ("gemma3_text", "gemma3")
GGUF_ARCHITECTURES = ("gemma3",)
SLIDING, FULL = "sliding_attention", "full_attention"
# Gemma3TextConfig's defaults: transformers leaves fields equal to them out of a saved
# config.json (a multimodal model's text_config above all).
_HF_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216,
    "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4,
    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131_072, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
    "query_pre_attn_scalar": 256, "sliding_window": 4096,
}  # fmt: skip
_SLIDING_PATTERN = 6  # every 6th layer global, the others sliding (HF's and llama.cpp's default)
# llama.cpp's names for the norms Gemma adds to (or names unlike) Llama's.
GGUF_LAYER_NAMES = {
    **llama.GGUF_LAYER_NAMES,
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}


@dataclass(frozen=True)
class Gemma3Config(DecoderShape):
    sliding: tuple[bool, ...]  # per layer: attends within the window (else to everything)
    sliding_window: int | None
    rope_theta: float  # global layers
    rope_local_theta: float = 10000.0  # sliding layers
    rope_factor: float = 1.0  # linear RoPE scaling of global layers
    rope_local_factor: float = 1.0
    query_pre_attn_scalar: float = 256.0  # scores are scaled by its -1/2 power
    final_logit_softcapping: float | None = None
    tie_embeddings: bool = True
    attention_bias: bool = False
    prefix: str = ""  # the checkpoint's names: "language_model." in a multimodal one
    qk_norm: ClassVar[bool] = True

    @property
    def qkv_bias(self) -> bool:
        return self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.attention_bias

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> Gemma3Config:
        multimodal = config["model_type"] == "gemma3"
        d = {**_HF_DEFAULTS, **((config.get("text_config") or {}) if multimodal else config)}
        for option in ("attn_logit_softcapping", "use_bidirectional_attention"):
            if d.get(option):
                raise RinginferError(f"unsupported gemma3 option '{option}'")
        if d["hidden_activation"] != "gelu_pytorch_tanh":
            raise RinginferError(f"unsupported activation '{d['hidden_activation']}'")
        n_layers = d["num_hidden_layers"]
        pattern = d.get("sliding_window_pattern") or d.get("_sliding_window_pattern")
        types = d.get("layer_types") or _pattern(n_layers, pattern or _SLIDING_PATTERN)
        if len(types) != n_layers or not set(types) <= {SLIDING, FULL}:
            raise RinginferError(f"bad gemma3 layer_types {types} for {n_layers} layers")
        rope = d.get("rope_parameters") or {}
        # Older configs: rope_theta and rope_scaling for global layers, rope_local_base_freq.
        full = {"rope_theta": d.get("rope_theta", 1e6), **(d.get("rope_scaling") or {}),
                **(rope.get(FULL) or {})}  # fmt: skip
        local = {"rope_theta": d.get("rope_local_base_freq", 1e4), **(rope.get(SLIDING) or {})}
        return cls(
            **hf_shape(d),
            sliding=tuple(t == SLIDING for t in types),
            sliding_window=d["sliding_window"],
            rope_theta=full["rope_theta"],
            rope_local_theta=local["rope_theta"],
            rope_factor=_linear_factor(full),
            rope_local_factor=_linear_factor(local),
            query_pre_attn_scalar=d["query_pre_attn_scalar"],
            final_logit_softcapping=d.get("final_logit_softcapping"),
            tie_embeddings=d["tie_word_embeddings"],
            attention_bias=d.get("attention_bias", False),
            prefix="language_model." if multimodal else "",
        )

    @classmethod
    def from_gguf(
        cls, meta: dict[str, Any], tensor_names: set[str], freq_factors: tuple[float, ...] | None
    ) -> Gemma3Config:
        """What llama.cpp reads of a gemma3 GGUF, and what it assumes for the rest: layer
        kinds by the pattern of 6, a local RoPE base of 10000, and scores scaled by
        1/sqrt(head_dim), except for the 62-layer 27B (1/sqrt(hidden / heads))."""
        key, shape = gguf_keys(meta), gguf_shape(meta)
        if key("attn_logit_softcapping"):
            raise RinginferError("unsupported gemma3 option 'attn_logit_softcapping'")
        if freq_factors is not None:
            raise RinginferError("unsupported rope_freqs tensor in a gemma3 GGUF file")
        scaling = key("rope.scaling.type", "none")
        if scaling not in ("none", "linear", None):
            raise RinginferError(f"unsupported RoPE scaling '{scaling}' in GGUF file")
        n_layers, head_dim = shape["n_layers"], shape["head_dim"]
        window = key("attention.sliding_window")
        pattern = key("attention.sliding_window_pattern", _SLIDING_PATTERN)
        if not window:
            sliding = (False,) * n_layers
        elif isinstance(pattern, list):  # a flag per layer
            sliding = tuple(bool(p) for p in pattern)
            if len(sliding) != n_layers:
                raise RinginferError(f"{len(sliding)} sliding-window flags for {n_layers} layers")
        else:
            sliding = tuple(t == SLIDING for t in _pattern(n_layers, pattern))
        return cls(
            **shape,
            sliding=sliding,
            sliding_window=window or None,
            rope_theta=key("rope.freq_base", 1e6),
            rope_local_theta=key("rope.freq_base_swa", 1e4),
            rope_factor=key("rope.scaling.factor", 1.0) if scaling == "linear" else 1.0,
            query_pre_attn_scalar=shape["dim"] / shape["n_heads"] if n_layers == 62 else head_dim,
            final_logit_softcapping=key("final_logit_softcapping"),
            tie_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
        )

    def inv_freq(self) -> dict[bool, torch.Tensor]:
        """RoPE inverse frequencies of sliding (True) and global (False) layers."""
        return {
            True: default_inv_freq(self.rope_local_theta, self.head_dim) / self.rope_local_factor,
            False: default_inv_freq(self.rope_theta, self.head_dim) / self.rope_factor,
        }


def _pattern(n_layers: int, every: int) -> list[str]:
    """Layer kinds where every `every`-th layer is global."""
    return [SLIDING if (i + 1) % every else FULL for i in range(n_layers)]


def _linear_factor(rope: dict[str, Any]) -> float:
    """The divisor of a layer kind's RoPE frequencies: 1, or a linear scaling's factor."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "linear"):
        raise RinginferError(f"unsupported RoPE scaling '{kind}' for gemma3")
    return rope.get("factor", 1.0) if kind == "linear" else 1.0


class GemmaRMSNorm(RMSNorm):
    """RMSNorm whose weight holds (1 + w) (see Gemma3Stage.from_checkpoint_layout), applied
    in float32 before rounding to the model's dtype, as Gemma's reference does (Llama's
    rounds first)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        return rms_norm(x.float(), w.float(), self.eps).to(x.dtype)


class Block(nn.Module):
    """Attention and MLP, each between a norm before it and a norm of its output. Every
    layer has the same modules (`layer`, which LlamaStage passes, is not needed)."""

    def __init__(self, cfg: Gemma3Config, layer: int, device_type: str) -> None:
        super().__init__()
        self.input_layernorm = GemmaRMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = llama.Attention(cfg, device_type, GemmaRMSNorm)
        self.post_attention_layernorm = GemmaRMSNorm(cfg.dim, cfg.norm_eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = GatedMLP(cfg.dim, cfg.hidden_dim, device_type, act="gelu")
        self.post_feedforward_layernorm = GemmaRMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), step, layer)
        x = x + self.post_attention_layernorm(attn)
        mlp = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(mlp)


class Gemma3Stage(LlamaStage):
    """Layers [start, end) of a Gemma 3 text model, plus embedding / head at the ends: Llama's
    layout and names, its own blocks and norms, a RoPE table for each kind of layer."""

    block_cls = Block
    norm_cls = GemmaRMSNorm

    def __init__(self, cfg: Gemma3Config, start: int, end: int, device_type: str = "cpu") -> None:
        super().__init__(cfg, start, end, device_type)
        self.sliding = cfg.sliding[start:end]
        # A float32 tensor, rounded to the compute dtype when used, as transformers does.
        self.embed_scale = torch.tensor(cfg.dim**0.5, device="cpu")

    def to_device(self, device: torch.device) -> None:
        self.inv_freq = {kind: f.to(device) for kind, f in self.inv_freq.items()}
        self.embed_scale = self.embed_scale.to(device)

    def windows(self) -> list[int | None]:
        return [self.cfg.sliding_window if sliding else None for sliding in self.sliding]

    def checkpoint_names(self, key: str) -> list[str]:
        return llama.checkpoint_names(key, self.start, self.cfg.tie_embeddings, self.cfg.prefix)

    def from_checkpoint_layout(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Norm weights w become (1 + w), computed in float32 as transformers does on use."""
        return tensor.float() + 1 if hf_name.endswith("norm.weight") else tensor

    def layers_forward(self, x: torch.Tensor, parts: Sequence[Part]) -> torch.Tensor:
        h = x
        if self.is_first:
            h = self.embed_tokens(x)
            h = h * self.embed_scale.to(h.dtype)
        positions = positions_of(parts, h.device)
        scale = self.cfg.query_pre_attn_scalar**-0.5
        steps = {
            kind: Step(parts, self.cfg.sliding_window if kind else None, h.device,
                       rope_tables(self.inv_freq[kind], positions, h.dtype), scale)
            for kind in set(self.sliding)
        }  # fmt: skip
        for i, layer in enumerate(self.layers):
            h = layer(h, steps[self.sliding[i]], i)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        logits = super().head(h)
        cap = self.cfg.final_logit_softcapping
        return torch.tanh(logits / cap) * cap if cap else logits

    @staticmethod
    def gguf_source(hf_name: str, arch: str) -> tuple[str, int | None]:
        return llama.gguf_source(hf_name, GGUF_LAYER_NAMES)

    @staticmethod
    def from_gguf_layout(hf_name: str, tensor: Any, cfg: Any, arch: str) -> Any:
        """llama.cpp's converter stores norm weights as (1 + w): back to w, as transformers
        reads them (from_checkpoint_layout adds the 1 again, so both agree bitwise)."""
        return tensor - 1 if hf_name.endswith("norm.weight") else tensor
