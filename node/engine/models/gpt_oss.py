"""gpt-oss (OpenAI's open-weight MoE): the Llama family's stage with its own options, read
from Hugging Face directories and from llama.cpp's GGUF files.

What sets it apart, all of it switched on in `LlamaConfig`: attention sinks (a learned logit
per head that takes probability and gives nothing), sliding-window layers alternating with
full ones, biases on attention, router and experts, a router that softmaxes its top k
logits alone, the clamped SwiGLU, and YaRN RoPE. Its checkpoints stack a layer's experts:
Hugging Face's as [experts, in, 2*out] with gate and up interleaved column by column,
llama.cpp's as separate [experts, out, in] gate, up and down tensors (experts in MXFP4).
"""

from __future__ import annotations

import re
from typing import Any

from node.engine.models import llama
from node.engine.models.llama import LlamaConfig, LlamaStage
from node.engine.models.moe import SWIGLU_ALPHA, SWIGLU_LIMIT
from node.engine.models.mxfp4 import Mxfp4Tensor
from node.errors import RinginferError

HF_MODEL_TYPES = ("gpt_oss",)
GGUF_ARCHITECTURES = ("gpt-oss",)

_EXPERT = re.compile(
    r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.(weight|bias)"
)
# llama.cpp's names for gpt-oss's tensors where they are not Llama's.
_GGUF_LAYER_NAMES = {
    **llama.GGUF_LAYER_NAMES,
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "self_attn.sinks": "attn_sinks.weight",
    "mlp.router.weight": "ffn_gate_inp.weight",
    "mlp.router.bias": "ffn_gate_inp.bias",
}


def config_from_hf(d: dict[str, Any]) -> LlamaConfig:
    if (d.get("swiglu_alpha", SWIGLU_ALPHA), d.get("swiglu_limit", SWIGLU_LIMIT)) != (
        SWIGLU_ALPHA, SWIGLU_LIMIT,
    ):  # fmt: skip
        raise RinginferError("unsupported gpt-oss SwiGLU constants (alpha 1.702, limit 7 only)")
    n_layers = d["num_hidden_layers"]
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    types = d.get("layer_types") or [
        "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)
    ]
    return _config(
        llama.hf_shape(d),
        norm_eps=d.get("rms_norm_eps", 1e-5), max_seq_len=d.get("max_position_embeddings", 4096),
        rope_theta=rope.get("rope_theta", d.get("rope_theta", 150000.0)),
        rope_type=rope.get("rope_type", rope.get("type", "default")),
        rope_factor=rope.get("factor", 1.0),
        rope_original_max_len=rope.get("original_max_position_embeddings", 4096),
        rope_beta_fast=rope.get("beta_fast", 32.0), rope_beta_slow=rope.get("beta_slow", 1.0),
        rope_truncate=rope.get("truncate", False),
        rope_attention_factor=rope.get("attention_factor"),
        sliding_window=d.get("sliding_window"),
        window_layers=tuple(i for i, t in enumerate(types) if t == "sliding_attention"),
        expert_dim=d["intermediate_size"], n_experts=d["num_local_experts"],
        n_experts_used=d["num_experts_per_tok"],
        tie_embeddings=d.get("tie_word_embeddings", False),
    )  # fmt: skip


def config_from_gguf(
    meta: dict[str, Any], tensor_names: set[str], freq_factors: tuple[float, ...] | None
) -> LlamaConfig:
    """llama.cpp's gpt-oss metadata; its sliding layers are the even ones (swa pattern 2)."""

    key = llama.gguf_keys(meta)
    n_layers, scaling = key("block_count"), key("rope.scaling.type", "none")
    return _config(
        llama.gguf_shape(meta),
        norm_eps=key("attention.layer_norm_rms_epsilon", 1e-5),
        max_seq_len=key("context_length", 4096), rope_theta=key("rope.freq_base", 150000.0),
        rope_type="yarn" if scaling == "yarn" else "default",
        rope_factor=key("rope.scaling.factor", 1.0),
        rope_original_max_len=key("rope.scaling.original_context_length", 4096),
        rope_beta_fast=key("rope.scaling.yarn_beta_fast", 32.0),
        rope_beta_slow=key("rope.scaling.yarn_beta_slow", 1.0),
        sliding_window=key("attention.sliding_window"),
        window_layers=tuple(range(0, n_layers, 2)),
        expert_dim=key("expert_feed_forward_length") or key("feed_forward_length"),
        n_experts=key("expert_count"), n_experts_used=key("expert_used_count"),
        tie_embeddings="output.weight" not in tensor_names,
    )  # fmt: skip


def _config(shape: dict[str, Any], **fields: Any) -> LlamaConfig:
    """The decoder's sizes (`shape`, with gpt-oss's own defaults in `fields` over them) and
    what every gpt-oss shares: biases, sinks, its router and experts (as wide as its MLP)."""
    fields = {**shape, **fields}
    return LlamaConfig(
        **{**fields, "hidden_dim": fields["expert_dim"]}, qkv_bias=True, o_bias=True,
        attention_sinks=True, moe_scoring="topk_softmax", expert_act="gpt_oss", moe_bias=True,
    )  # fmt: skip


class GptOssConfig(LlamaConfig):
    """gpt-oss's config readers (the fields are LlamaConfig's)."""

    from_hf = staticmethod(config_from_hf)  # type: ignore[assignment]
    from_gguf = staticmethod(config_from_gguf)  # type: ignore[assignment]


class GptOssStage(LlamaStage):
    """gpt-oss's layers: LlamaStage with its checkpoints' names and layouts."""

    def checkpoint_names(self, key: str) -> list[str]:
        return [n.replace(".mlp.gate.", ".mlp.router.") for n in super().checkpoint_names(key)]

    @staticmethod
    def hf_source(hf_name: str) -> tuple[str, int | None]:
        """One expert's gate, up or down comes from the layer's stacked tensor."""
        m = _EXPERT.fullmatch(hf_name)
        if not m:
            return hf_name, None
        stacked = "gate_up_proj" if m[3] != "down" else "down_proj"
        return f"{m[1]}.{stacked}{'_bias' if m[4] == 'bias' else ''}", int(m[2])

    @staticmethod
    def from_hf_file_layout(hf_name: str, tensor: Any) -> Any:
        """An expert's slice of a stacked tensor as the [out, in] matrix or vector it names.
        Float: [in, 2*out] with gate and up interleaved column by column, down [in, out].
        MXFP4 (`*_blocks`): already [out, in], gate and up interleaved row by row."""
        m = _EXPERT.fullmatch(hf_name)
        if not m:
            return tensor
        if isinstance(tensor, Mxfp4Tensor):
            return tensor if m[3] == "down" else tensor.rows(slice(m[3] == "up", None, 2))
        if m[3] != "down":
            tensor = tensor[..., 0::2] if m[3] == "gate" else tensor[..., 1::2]
        return tensor.t() if m[4] == "weight" else tensor

    @staticmethod
    def gguf_source(hf_name: str, arch: str) -> tuple[str, int | None]:
        return llama.gguf_source(hf_name, _GGUF_LAYER_NAMES)

    @staticmethod
    def from_gguf_layout(hf_name: str, tensor: Any, cfg: Any, arch: str) -> Any:
        return tensor  # llama.cpp keeps the NeoX (HF) RoPE layout for gpt-oss
