"""DeepSeek V3 (and the models built on it): multi-head latent attention and shared plus
routed experts with group-limited sigmoid routing, on Llama's layer layout.

Latent attention caches one vector a position and layer for all heads: the key/value
latent c (kv_lora_rank, after its norm) and the RoPE key part shared by every head
(qk_rope_head_dim): 576 numbers for DeepSeek V3, where plain attention over its 128 heads
would cache 40960. Attention runs on it in the absorbed form: each head's query is taken
into the latent space (q_nope @ W_UK), so scores are [q_lat, q_rot] . [c, k_rot], one
key "head" shared by all query heads, and the values are the latents themselves, taken
out of the latent space by W_UV after the weighted sum. The same products as the
reference's (keys and values expanded by kv_b_proj) in another order.

RoPE: the checkpoint's rotary dimensions come in adjacent pairs; the loader moves the rows
that make them to halves (evens, then odds), so our half-split rotation is transformers'
`rope_interleave` bit for bit (q and k permuted alike leave every score unchanged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from node.engine.kv_cache import SPAN, KVCache
from node.engine.models.attention import Step
from node.engine.models.linear import Linear
from node.engine.models.llama import (
    GGUF_LAYER_NAMES,
    Block,
    LlamaConfig,
    LlamaStage,
    RMSNorm,
    gguf_keys,
    gguf_shape,
    gguf_source,
    hf_shape,
    rotate,
)
from node.engine.models.moe import GatedMLP, Router, SparseMoE
from node.errors import RinginferError

HF_MODEL_TYPES = ("deepseek_v3", "kimi_k2")  # Kimi K2's config.json: DeepSeek V3's layout
GGUF_ARCHITECTURES = ("deepseek2",)  # llama.cpp's name for V2, V3 and the models on them
LATENT_NORM_EPS = 1e-6  # the q and kv latents' norms: fixed, not rms_norm_eps


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def softmax_scale(query_head: int, yarn_factor: float | None, mscale_all: float | None) -> float:
    """query_head^-1/2, times YaRN's mscale(factor, mscale_all_dim) squared where set."""
    scale = query_head**-0.5
    if yarn_factor and mscale_all:
        scale *= yarn_mscale(yarn_factor, mscale_all) ** 2
    return scale


@dataclass(frozen=True)
class DeepseekConfig(LlamaConfig):
    """Llama's fields with head_dim the RoPE part of a head (what the rotation tables
    span) and n_kv_heads 1 (the latent); the latent attention's and the router's own."""

    q_lora_rank: int = 0  # 0: one q_proj, no query latent
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0  # each head's query/key part without RoPE
    v_head_dim: int = 0
    attn_scale: float = 1.0  # softmax scale: (nope + rope)^-1/2, YaRN's mscale squared
    rope_interleave: bool = True
    n_group: int = 1  # experts fall in groups; a token's top_group groups are searched
    top_group: int = 1
    routed_scale: float = 1.0  # the routed experts' weights are multiplied by it

    @property
    def cache_width(self) -> int:
        """Numbers a position of a layer caches: the latent and the shared RoPE key."""
        return self.kv_lora_rank + self.head_dim

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> DeepseekConfig:
        if d.get("hidden_act", "silu") != "silu":
            raise RinginferError(f"unsupported activation '{d['hidden_act']}'")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "yarn"):
            raise RinginferError(f"unsupported RoPE scaling '{rope_type}' for deepseek_v3")
        nope, rot = d["qk_nope_head_dim"], d["qk_rope_head_dim"]
        factor = rope.get("factor") or 1.0
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        yarn = rope_type == "yarn"
        scale, attention_factor = softmax_scale(nope + rot, yarn and factor, mscale_all), None
        if yarn:
            attention_factor = rope.get("attention_factor")
            if attention_factor is None:
                attention_factor = (
                    yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
                    if mscale and mscale_all else yarn_mscale(factor)
                )  # fmt: skip
        n_experts, n_layers = d.get("n_routed_experts") or 0, d["num_hidden_layers"]
        expert_dim = d.get("moe_intermediate_size") or 0
        return cls(
            **{**hf_shape(d), "head_dim": rot, "n_kv_heads": 1},
            rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
            rope_type=rope_type,
            rope_factor=factor,
            rope_beta_fast=rope.get("beta_fast") or 32.0,
            rope_beta_slow=rope.get("beta_slow") or 1.0,
            rope_original_max_len=rope.get("original_max_position_embeddings")
            or d.get("max_position_embeddings", 4096),
            rope_truncate=rope.get("truncate", True),
            rope_attention_factor=attention_factor,
            qkv_bias=d.get("attention_bias", False),
            o_bias=d.get("attention_bias", False),
            tie_embeddings=d.get("tie_word_embeddings", False),
            n_experts=n_experts,
            n_experts_used=d.get("num_experts_per_tok") or 0,
            expert_dim=expert_dim,
            shared_expert_dim=expert_dim * (d.get("n_shared_experts") or 0),
            norm_topk_prob=bool(d.get("norm_topk_prob", True)),
            dense_layers=tuple(range(min(d.get("first_k_dense_replace") or 0, n_layers))),
            q_lora_rank=d.get("q_lora_rank") or 0,
            kv_lora_rank=d["kv_lora_rank"],
            qk_nope_dim=nope,
            v_head_dim=d["v_head_dim"],
            attn_scale=scale,
            rope_interleave=d.get("rope_interleave", True),
            n_group=d.get("n_group") or 1,
            top_group=d.get("topk_group") or 1,
            routed_scale=d.get("routed_scaling_factor", 1.0),
        )


    @classmethod
    def from_gguf(
        cls, meta: dict[str, Any], tensor_names: set[str], freq_factors: tuple[float, ...] | None
    ) -> DeepseekConfig:
        """llama.cpp's deepseek2 keys. Files from after its MLA change (2025) give the query
        head as key_length_mla and split kv_b in two (see DeepseekStage.gguf_parts); older
        ones give it as key_length and hold kv_b whole."""
        key = gguf_keys(meta)
        if key("expert_gating_func", 1) != 2 and key("expert_count", 0):
            raise RinginferError("unsupported deepseek2 GGUF: softmax routing (DeepSeek V2); "
                                 "ringinfer runs V3's sigmoid routing")  # fmt: skip
        rot = key("rope.dimension_count")
        mla = key("attention.key_length_mla")
        nope = (mla or key("attention.key_length")) - rot
        v_dim = key("attention.value_length_mla") or key("attention.value_length")
        scaling = key("rope.scaling.type", "none") or "none"
        if scaling not in ("none", "yarn"):
            raise RinginferError(f"unsupported RoPE scaling '{scaling}' in GGUF file")
        factor = key("rope.scaling.factor", 1.0)
        # The converter writes 0.1 * mscale_all_dim (llama.cpp divides by 0.1 again).
        mscale_all = key("rope.scaling.yarn_log_multiplier", 0.0) / 0.1
        scale = softmax_scale(nope + rot, scaling == "yarn" and factor, mscale_all)
        n_experts, expert_dim = key("expert_count", 0), key("expert_feed_forward_length", 0)
        # Files converted before the group keys were written: V3's 8 groups, 4 searched.
        v3_groups = n_experts == 256
        return cls(
            **{**gguf_shape(meta), "head_dim": rot, "n_kv_heads": 1},
            rope_theta=key("rope.freq_base", 10000.0),
            rope_type="yarn" if scaling == "yarn" else "default",
            rope_factor=factor,
            rope_beta_fast=key("rope.scaling.yarn_beta_fast", 32.0),
            rope_beta_slow=key("rope.scaling.yarn_beta_slow", 1.0),
            rope_original_max_len=key("rope.scaling.original_context_length", 4096),
            rope_attention_factor=1.0 if mscale_all else None,
            qkv_bias="blk.0.attn_kv_a_mqa.bias" in tensor_names,
            o_bias="blk.0.attn_output.bias" in tensor_names,
            tie_embeddings="output.weight" not in tensor_names,
            n_experts=n_experts,
            n_experts_used=key("expert_used_count", 0),
            expert_dim=expert_dim,
            shared_expert_dim=expert_dim * key("expert_shared_count", 0),
            norm_topk_prob=key("expert_weights_norm", False),
            dense_layers=tuple(range(min(key("leading_dense_block_count", 0),
                                         key("block_count")))),  # fmt: skip
            q_lora_rank=key("attention.q_lora_rank", 0),
            kv_lora_rank=key("attention.kv_lora_rank"),
            qk_nope_dim=nope,
            v_head_dim=v_dim,
            attn_scale=scale,
            n_group=key("expert_group_count") or (8 if v3_groups else 1),
            top_group=key("expert_group_used_count") or (4 if v3_groups else 1),
            routed_scale=key("expert_weights_scale", 1.0),
        )


# llama.cpp's names for a layer's tensors, where they differ from Llama's.
GGUF_NAMES = {
    **GGUF_LAYER_NAMES,
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_proj_with_mqa.bias": "attn_kv_a_mqa.bias",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.kv_b_proj.weight": "attn_kv_b.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
}


class Matrix(nn.Module):
    """A weight used as per-head matrices, not as a linear layer: kept in the compute dtype
    (never quantized), as the absorbed attention multiplies by its slices."""

    def __init__(self, rows: int, columns: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, columns))


class LatentAttention(nn.Module):
    """Multi-head latent attention (see the module's docstring)."""

    def __init__(self, cfg: DeepseekConfig, device_type: str) -> None:
        super().__init__()
        self.cfg = cfg
        heads, q_dim = cfg.n_heads, cfg.qk_nope_dim + cfg.head_dim
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(cfg.dim, cfg.q_lora_rank, cfg.qkv_bias, device_type)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(cfg.q_lora_rank, heads * q_dim, False, device_type)
        else:
            self.q_proj = Linear(cfg.dim, heads * q_dim, False, device_type)
        self.kv_a_proj_with_mqa = Linear(cfg.dim, cfg.cache_width, cfg.qkv_bias, device_type)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Matrix(heads * (cfg.qk_nope_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        self.o_proj = Linear(heads * cfg.v_head_dim, cfg.dim, cfg.o_bias, device_type)

    def forward(self, x: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
        c = self.cfg
        b, t, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if c.q_lora_rank else self.q_proj(x)
        q_nope, q_rot = q.view(b, t, c.n_heads, -1).transpose(1, 2).split(
            [c.qk_nope_dim, c.head_dim], dim=-1)  # fmt: skip
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.head_dim], dim=-1)
        w = self.kv_b_proj.weight.view(c.n_heads, c.qk_nope_dim + c.v_head_dim, c.kv_lora_rank)
        query = torch.cat([q_nope @ w[:, : c.qk_nope_dim], rotate(q_rot, *step.rope)], dim=-1)
        key = torch.cat([self.kv_a_layernorm(latent), rotate(k_rot, *step.rope)], dim=-1)
        y = step.attend(layer, query, key[:, None], values_in_keys=c.kv_lora_rank)
        y = y @ w[:, c.qk_nope_dim :].transpose(1, 2)  # [b, heads, t, v_head_dim]
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class CorrectedRouter(Router):
    """The router with a bias that steers which experts are chosen, not their weights."""

    def __init__(self, dim: int, n_experts: int) -> None:
        super().__init__(dim, n_experts)
        self.e_score_correction_bias = nn.Parameter(torch.empty(n_experts))


class DeepseekMoE(SparseMoE):
    """Routed experts chosen by sigmoid scores within the best groups, plus shared experts
    every row passes through unweighted."""

    def __init__(self, cfg: DeepseekConfig, device_type: str) -> None:
        super().__init__(cfg.dim, cfg.expert_dim, cfg.n_experts, cfg.n_experts_used,
                         cfg.norm_topk_prob, 0, device_type)  # fmt: skip
        self.gate = CorrectedRouter(cfg.dim, cfg.n_experts)
        self.n_group, self.top_group = cfg.n_group, cfg.top_group
        self.routed_scale = cfg.routed_scale
        self.shared_experts = (
            GatedMLP(cfg.dim, cfg.shared_expert_dim, device_type) if cfg.shared_expert_dim else None
        )

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """In float32: a group's score is its two best biased scores' sum; the top k biased
        scores of the best groups pick the experts, their unbiased scores weigh them."""
        scores = F.linear(x.float(), self.gate.weight.float()).sigmoid()
        biased = scores + self.gate.e_score_correction_bias.float()
        n = len(x)
        groups = biased.view(n, self.n_group, -1).topk(2, dim=-1)[0].sum(dim=-1)
        best = groups.topk(self.top_group, dim=-1, sorted=False)[1]
        keep = torch.zeros_like(groups).scatter_(1, best, 1).bool()
        keep = keep[:, :, None].expand(-1, -1, biased.shape[1] // self.n_group).reshape(n, -1)
        experts = biased.masked_fill(~keep, float("-inf")).topk(self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, experts)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return (weights * self.routed_scale).to(x.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out if self.shared_experts is None else out + self.shared_experts(x)


class DeepseekBlock(Block):
    attention_cls = LatentAttention

    @staticmethod
    def experts(cfg: LlamaConfig, device_type: str) -> nn.Module:
        return DeepseekMoE(cfg, device_type)


class DeepseekStage(LlamaStage):
    block_cls = DeepseekBlock
    static_decode = False  # type: ignore[assignment]  # (the CUDA graph and CPU one-call paths)

    def attention_scale(self) -> float | None:
        return self.cfg.attn_scale

    def new_cache(
        self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device,
        span: int = SPAN,
    ) -> KVCache:  # fmt: skip
        """One latent a position and layer: keys of cache_width, no values of their own."""
        c = self.cfg
        return KVCache(self.end - self.start, batch, 1, c.cache_width, capacity, dtype, device,
                       self.windows(), span, value_dim=0)  # fmt: skip

    @staticmethod
    def gguf_source(hf_name: str, arch: str) -> tuple[str, int | None]:
        return gguf_source(hf_name, GGUF_NAMES)

    @staticmethod
    def gguf_parts(gguf_name: str) -> tuple[str, ...]:
        """kv_b, which llama.cpp's converter writes as W_UK transposed per head (attn_k_b,
        [heads, kv_lora_rank, nope]) and W_UV (attn_v_b, [heads, v_head_dim, kv_lora_rank])."""
        if gguf_name.endswith(".attn_kv_b.weight"):
            base = gguf_name.removesuffix("attn_kv_b.weight")
            return f"{base}attn_k_b.weight", f"{base}attn_v_b.weight"
        return ()

    @staticmethod
    def gguf_join(gguf_name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        k_b, v_b = parts
        return torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(-1, k_b.shape[1])

    def from_checkpoint_layout(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The RoPE rows of q and of the latent projection from pairs to halves."""
        c = self.cfg
        if not c.rope_interleave:
            return tensor
        if hf_name.endswith(("q_b_proj.weight", "q_proj.weight")):
            heads, kept = c.n_heads, c.qk_nope_dim
        elif hf_name.endswith(("kv_a_proj_with_mqa.weight", "kv_a_proj_with_mqa.bias")):
            heads, kept = 1, c.kv_lora_rank
        else:
            return tensor
        width = kept + c.head_dim
        order = torch.arange(heads * width).view(heads, width)
        rot = order[:, kept:]
        index = torch.cat([order[:, :kept], rot[:, 0::2], rot[:, 1::2]], dim=1).reshape(-1)
        return tensor.rows(index) if hasattr(tensor, "rows") else tensor[index]
