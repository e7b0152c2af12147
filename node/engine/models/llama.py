"""Llama family: Llama 2/3/3.1+, Mistral, Qwen2, Qwen3, SmolLM2 (RMSNorm, SwiGLU, RoPE, GQA),
and its mixture-of-experts variants Mixtral, Qwen2-MoE and Qwen3-MoE (node/engine/models/moe.py)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from node.engine.kv_cache import KVCache
from node.engine.models import cpu_decode, decode_ops
from node.engine.models.attention import Part, StaticStep, Step, positions_of
from node.engine.models.linear import Linear
from node.engine.models.moe import GatedMLP, SparseMoE
from node.engine.models.stage import Stage, embedding
from node.errors import RinginferError

HF_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe")
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen2moe", "qwen3", "qwen3moe")
# Architectures whose converters permute Q and K rows for llama.cpp's RoPE kernel.
_PERMUTED = ("llama",)


@dataclass(frozen=True)
class DecoderShape:
    """The sizes of a decoder with Llama's layout, shared by the families built on it."""

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden_dim: int
    head_dim: int
    norm_eps: float
    max_seq_len: int


def hf_shape(d: dict[str, Any]) -> dict[str, Any]:
    """DecoderShape's fields from a Hugging Face config.json."""
    dim, n_heads = d["hidden_size"], d["num_attention_heads"]
    return dict(
        vocab_size=d["vocab_size"],
        dim=dim,
        n_layers=d["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=d.get("num_key_value_heads") or n_heads,
        hidden_dim=d["intermediate_size"],
        head_dim=d.get("head_dim") or dim // n_heads,
        norm_eps=d.get("rms_norm_eps", 1e-6),
        max_seq_len=d.get("max_position_embeddings", 2048),
    )


def gguf_keys(meta: dict[str, Any]) -> Callable[..., Any]:
    """key(name, default): the GGUF metadata value `{architecture}.{name}`."""
    arch = meta["general.architecture"]
    return lambda name, default=None: meta.get(f"{arch}.{name}", default)


def gguf_shape(meta: dict[str, Any]) -> dict[str, Any]:
    """DecoderShape's fields from a GGUF file's metadata (llama.cpp's keys)."""
    key = gguf_keys(meta)
    dim, n_heads = key("embedding_length"), key("attention.head_count")
    return dict(
        vocab_size=key("vocab_size") or len(meta["tokenizer.ggml.tokens"]),
        dim=dim,
        n_layers=key("block_count"),
        n_heads=n_heads,
        n_kv_heads=key("attention.head_count_kv") or n_heads,
        hidden_dim=key("feed_forward_length"),
        head_dim=key("attention.key_length") or dim // n_heads,
        norm_eps=key("attention.layer_norm_rms_epsilon", 1e-6),
        max_seq_len=key("context_length", 2048),
    )


@dataclass(frozen=True)
class LlamaConfig(DecoderShape):
    rope_theta: float
    rope_type: str = "default"  # default | linear | llama3 | freq_factors | yarn
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    rope_freq_factors: tuple[float, ...] | None = None  # GGUF's rope_freqs tensor (llama3)
    rope_beta_fast: float = 32.0  # yarn
    rope_beta_slow: float = 1.0
    rope_truncate: bool = True
    rope_attention_factor: float | None = None  # yarn: cos and sin scaled (None: from factor)
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_window: int | None = None
    window_layers: tuple[int, ...] | None = None  # the layers the window applies to (None: all)
    attention_sinks: bool = False  # gpt-oss: a learned sink logit per head
    tie_embeddings: bool = False
    qk_norm: bool = False  # Qwen3: an RMSNorm over each head of q and k, before RoPE
    # Mixture of experts (n_experts 0: every layer dense).
    n_experts: int = 0
    n_experts_used: int = 0
    expert_dim: int = 0
    shared_expert_dim: int = 0  # Qwen2-MoE's shared expert (0: none)
    norm_topk_prob: bool = False  # renormalise the chosen experts' weights to sum 1
    dense_layers: tuple[int, ...] = ()  # layers of an MoE model with a dense MLP
    expert_prefix: str = "mlp"  # the checkpoint's MoE module: mlp, or Mixtral's block_sparse_moe
    moe_scoring: str = "softmax"  # softmax | topk_softmax (gpt-oss)
    expert_act: str = "silu"  # silu | gpt_oss (clamped SwiGLU)
    moe_bias: bool = False  # biases on the router and the experts (gpt-oss)

    def is_moe(self, layer: int) -> bool:
        return self.n_experts > 0 and layer not in self.dense_layers

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`'s attention (None: it sees the whole context)."""
        if self.window_layers is None or layer in self.window_layers:
            return self.sliding_window
        return None

    def rope_scale(self) -> float:
        """What cos and sin are multiplied by: YaRN's attention factor, else 1."""
        if self.rope_type != "yarn":
            return 1.0
        if self.rope_attention_factor is not None:
            return self.rope_attention_factor
        return 0.1 * math.log(self.rope_factor) + 1.0 if self.rope_factor > 1 else 1.0

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> LlamaConfig:
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        for unsupported in ("mlp_bias", "use_sliding_window"):
            if d.get(unsupported):
                raise RinginferError(f"unsupported {d['model_type']} option '{unsupported}'")
        if d.get("hidden_act", "silu") != "silu":
            raise RinginferError(f"unsupported activation '{d['hidden_act']}'")
        kind = d["model_type"]
        # Qwen writes a sliding_window it only uses with use_sliding_window (refused above).
        window = d.get("sliding_window") if kind in ("mistral", "mixtral") else None
        n_experts = d.get("num_experts") or d.get("num_local_experts") or 0
        n_layers = d["num_hidden_layers"]
        sparse_step = d.get("decoder_sparse_step") or 1
        dense = tuple(
            i for i in range(n_layers)
            if i in (d.get("mlp_only_layers") or ()) or (i + 1) % sparse_step
        )  # fmt: skip
        return cls(
            **hf_shape(d),
            rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
            rope_type=rope_type,
            rope_factor=rope.get("factor", 1.0),
            rope_low_freq_factor=rope.get("low_freq_factor", 1.0),
            rope_high_freq_factor=rope.get("high_freq_factor", 4.0),
            rope_original_max_len=rope.get("original_max_position_embeddings", 8192),
            qkv_bias=kind == "qwen2" or d.get("qkv_bias", kind == "qwen2_moe")
            or d.get("attention_bias", False),
            o_bias=d.get("attention_bias", False),
            sliding_window=window,
            tie_embeddings=d.get("tie_word_embeddings", False),
            qk_norm=kind in ("qwen3", "qwen3_moe"),
            n_experts=n_experts,
            n_experts_used=d.get("num_experts_per_tok", 0) if n_experts else 0,
            expert_dim=(d.get("moe_intermediate_size") or d["intermediate_size"]) * (n_experts > 0),
            shared_expert_dim=d.get("shared_expert_intermediate_size") or 0,
            norm_topk_prob=kind == "mixtral" or d.get("norm_topk_prob", False),
            dense_layers=dense if n_experts else (),
            expert_prefix="block_sparse_moe" if kind == "mixtral" else "mlp",
        )

    @classmethod
    def from_gguf(
        cls, meta: dict[str, Any], tensor_names: set[str], freq_factors: tuple[float, ...] | None
    ) -> LlamaConfig:
        arch, key = meta["general.architecture"], gguf_keys(meta)
        scaling = key("rope.scaling.type", "none")
        rope_type = "default"
        if freq_factors is not None:
            rope_type = "freq_factors"
        elif scaling == "linear":
            rope_type = "linear"
        elif scaling not in ("none", None):
            raise RinginferError(f"unsupported RoPE scaling '{scaling}' in GGUF file")
        n_layers, n_experts = key("block_count"), key("expert_count", 0)
        return cls(
            **gguf_shape(meta),
            rope_theta=key("rope.freq_base", 10000.0),
            rope_type=rope_type,
            rope_factor=key("rope.scaling.factor", key("rope.scale_linear", 1.0)),
            rope_freq_factors=freq_factors,
            qkv_bias="blk.0.attn_q.bias" in tensor_names,
            o_bias="blk.0.attn_output.bias" in tensor_names,
            tie_embeddings="output.weight" not in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            n_experts=n_experts,
            n_experts_used=key("expert_used_count", 0),
            expert_dim=key("expert_feed_forward_length") or key("feed_forward_length"),
            shared_expert_dim=key("expert_shared_feed_forward_length", 0),
            # llama.cpp renormalises for Mixtral and Qwen3-MoE, not for Qwen2-MoE.
            norm_topk_prob=key("expert_weights_norm", arch != "qwen2moe"),
            dense_layers=tuple(
                i for i in range(n_layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names
            ) if n_experts else (),
        )  # fmt: skip

    def inv_freq(self) -> torch.Tensor:
        """RoPE inverse frequencies, including the context-extension scalings we support."""
        inv_freq = default_inv_freq(self.rope_theta, self.head_dim)
        if self.rope_type == "default":
            return inv_freq
        if self.rope_type == "linear":
            return inv_freq / self.rope_factor
        if self.rope_type == "freq_factors":
            return inv_freq / torch.tensor(self.rope_freq_factors, device="cpu")
        if self.rope_type == "yarn":
            return self._yarn(inv_freq)
        if self.rope_type == "llama3":
            low_wavelen = self.rope_original_max_len / self.rope_low_freq_factor
            high_wavelen = self.rope_original_max_len / self.rope_high_freq_factor
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > low_wavelen, inv_freq / self.rope_factor, inv_freq)
            smooth = (self.rope_original_max_len / wavelen - self.rope_low_freq_factor) / (
                self.rope_high_freq_factor - self.rope_low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / self.rope_factor + smooth * scaled
            medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            return torch.where(medium, smoothed, scaled)
        raise RinginferError(f"unsupported RoPE scaling '{self.rope_type}'")

    def _yarn(self, inv_freq: torch.Tensor) -> torch.Tensor:
        """YaRN: frequencies that turn fewer than `beta_slow` times over the original context
        are interpolated by `factor`, those turning more than `beta_fast` times kept, a
        linear ramp between (as transformers' _compute_yarn_parameters)."""
        dim, base = self.head_dim, self.rope_theta

        def dim_of(rotations: float) -> float:
            turns = self.rope_original_max_len / (rotations * 2 * math.pi)
            return dim * math.log(turns) / (2 * math.log(base))

        low, high = dim_of(self.rope_beta_fast), dim_of(self.rope_beta_slow)
        if self.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.arange(dim // 2, dtype=torch.float32, device="cpu")
        ramp = ((ramp - low) / (high - low)).clamp(0, 1)
        keep = 1 - ramp
        return inv_freq / self.rope_factor * (1 - keep) + inv_freq * keep


def default_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    """RoPE's inverse frequencies theta^(-2i/head_dim), unscaled."""
    # Explicit CPU: stages are built under the meta device, and these are not loaded weights.
    exponent = torch.arange(0, head_dim, 2, device="cpu").float() / head_dim
    return 1.0 / (theta**exponent)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return rms_norm(x, self.weight, self.eps)
        # Normalised in float32, scaled in the model's dtype: as the reference implementation.
        return self.weight * F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """F.rms_norm over the last dimension; float32 on the CPU by the fused op (one loop, not
    PyTorch's five kernels: node/engine/models/decode_ops.py)."""
    if x.dtype == weight.dtype == torch.float32 and x.is_cpu and (ops := decode_ops.ops()):
        return ops.rms_norm(x.contiguous(), weight, eps)
    return F.rms_norm(x, weight.shape, weight, eps)


def rope_tables(
    inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin [T, head_dim] for `rotate` (Hugging Face half-split layout), both
    times `scale` (YaRN's attention factor)."""
    freqs = positions.to(inv_freq.device, torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = freqs.cos(), freqs.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return torch.cat((cos, cos), -1).to(dtype), torch.cat((-sin, sin), -1).to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """RoPE: x*cos + rotate_half(x)*sin, where rotate_half(x) = (-x2, x1).

    Rolling x by half a head gives (x2, x1); the sign lives in `signed_sin`, which saves the
    negation and concatenation per call (bitwise the same result). Float32 heads on the CPU
    take one fused op (decode_ops.cpp) for the four, rounding as they do.
    """
    if x.dtype == cos.dtype == torch.float32 and x.is_cpu and x.dim() == 4 and cos.dim() == 2:
        dense = x.stride(-1) == 1 and (x.shape[-2] == 1 or x.stride(-2) == x.shape[-1])
        if dense and (ops := decode_ops.ops()):
            return ops.rope(x, cos, signed_sin)
    return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin


class Attention(nn.Module):
    """Fused q/k/v, optional q/k head norms (of class `norm`), RoPE, and `step`'s attention.
    `cfg` is any family's config with Llama's attention fields."""

    def __init__(self, cfg: Any, device_type: str, norm: type[RMSNorm] = RMSNorm) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q_size, kv_size = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.dim, q_size + 2 * kv_size, cfg.qkv_bias, device_type)
        self.o_proj = Linear(q_size, cfg.dim, cfg.o_bias, device_type)
        if cfg.qk_norm:
            self.q_norm = norm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = norm(cfg.head_dim, cfg.norm_eps)
        sinks = getattr(cfg, "attention_sinks", False)  # gpt-oss
        self.sinks = nn.Parameter(torch.empty(cfg.n_heads)) if sinks else None

    def forward(self, x: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
        b, t, _ = x.shape
        heads = self.qkv_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        qk = heads[:, : self.n_heads + self.n_kv_heads]
        if hasattr(self, "q_norm"):
            q, k = qk.split([self.n_heads, self.n_kv_heads], dim=1)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=1)
        qk = rotate(qk, *step.rope)  # q, k in one go
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=1)
        v = heads[:, self.n_heads + self.n_kv_heads :]
        y = step.attend(layer, q, k, v, self.sinks)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    """Pre-norm attention and MLP; a family on this layout (DeepSeek) brings its own
    attention class and mixture of experts."""

    attention_cls: ClassVar[type[nn.Module]] = Attention  # (cfg, device_type)

    def __init__(self, cfg: LlamaConfig, layer: int, device_type: str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = self.attention_cls(cfg, device_type)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp: nn.Module = (
            self.experts(cfg, device_type) if cfg.is_moe(layer)
            else GatedMLP(cfg.dim, cfg.hidden_dim, device_type)
        )  # fmt: skip

    @staticmethod
    def experts(cfg: LlamaConfig, device_type: str) -> nn.Module:
        return SparseMoE(cfg.dim, cfg.expert_dim, cfg.n_experts, cfg.n_experts_used,
                         cfg.norm_topk_prob, cfg.shared_expert_dim, device_type, cfg.moe_scoring,
                         cfg.expert_act, cfg.moe_bias)  # fmt: skip

    def forward(self, x: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), step, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaStage(Stage):
    """Layers [start, end) of a Llama-family model, plus embedding / head at the ends.
    Families of the same layout (Gemma 3) bring their own block and final norm."""

    block_cls: ClassVar[type[nn.Module]] = Block  # (cfg, layer, device_type)
    norm_cls: ClassVar[type[RMSNorm]] = RMSNorm

    def __init__(self, cfg: Any, start: int, end: int, device_type: str = "cpu") -> None:
        super().__init__(cfg, start, end)
        if self.is_first:
            self.embed_tokens = embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(self.block_cls(cfg, i, device_type) for i in range(start, end))
        if self.is_last:
            self.norm = self.norm_cls(cfg.dim, cfg.norm_eps)
            self.lm_head = Linear(cfg.dim, cfg.vocab_size, False, device_type)
        self.inv_freq = cfg.inv_freq()

    def to_device(self, device: torch.device) -> None:
        self.inv_freq = self.inv_freq.to(device)

    def windows(self) -> list[int | None]:
        return [self.cfg.window(layer) for layer in range(self.start, self.end)]

    def checkpoint_names(self, key: str) -> list[str]:
        c = self.cfg
        return checkpoint_names(key, self.start, c.tie_embeddings, expert_prefix=c.expert_prefix)

    def layers_forward(self, x: torch.Tensor, parts: Sequence[Part]) -> torch.Tensor:
        h = self.embed_tokens(x) if self.is_first else x
        positions = positions_of(parts, h.device)
        rope = rope_tables(self.inv_freq, positions, h.dtype, self.cfg.rope_scale())
        if cpu_decode.usable(self, h, parts):  # one C++ call a layer
            return cpu_decode.layers(self, h, parts, rope)
        windows = self.windows()
        scale = self.attention_scale()
        steps = {w: Step(parts, w, h.device, rope, scale) for w in set(windows)}
        for i, layer in enumerate(self.layers):
            h = layer(h, steps[windows[i]], i)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))

    def attention_scale(self) -> float | None:
        """What scores are multiplied by (None: 1/sqrt of the query's head size)."""
        return None

    @property
    def static_decode(self) -> bool:
        """Full attention without sinks and no experts (they pick their work on the host),
        in this class's own layers_forward (Gemma 3 has its own)."""
        c = self.cfg
        return (
            type(self).layers_forward is LlamaStage.layers_forward
            and all(w is None for w in self.windows())
            and not c.attention_sinks
            and not any(c.is_moe(i) for i in range(self.start, self.end))
        )

    def decode_tables(
        self, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, ...]:
        positions = torch.arange(capacity, device=device)
        return rope_tables(self.inv_freq, positions, dtype, self.cfg.rope_scale())

    def decode_static(
        self, x: torch.Tensor, position: torch.Tensor, cache: KVCache,
        tables: tuple[torch.Tensor, ...],
    ) -> torch.Tensor:  # fmt: skip
        h = self.embed_tokens(x) if self.is_first else x
        step = StaticStep(cache, position, (tables[0][position], tables[1][position]))
        for i, layer in enumerate(self.layers):
            h = layer(h, step, i)
        return self.head(h) if self.is_last else h

    @staticmethod
    def gguf_source(hf_name: str, arch: str) -> tuple[str, int | None]:
        return gguf_source(hf_name)

    @staticmethod
    def from_gguf_layout(hf_name: str, tensor: Any, cfg: Any, arch: str) -> Any:
        return from_gguf_layout(hf_name, tensor, cfg, arch)


# Our fused projections and the checkpoint tensors they concatenate (one matmul, not three).
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
_MIXTRAL_EXPERT = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
GGUF_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}
# One expert's matrix: a slice of llama.cpp's stacked [experts, rows, columns] tensor.
_GGUF_EXPERT_NAMES = {
    "gate_proj": "ffn_gate_exps", "w1": "ffn_gate_exps",
    "up_proj": "ffn_up_exps", "w3": "ffn_up_exps",
    "down_proj": "ffn_down_exps", "w2": "ffn_down_exps",
}  # fmt: skip
_EXPERT = re.compile(
    r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.(weight|bias)"
)
_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def checkpoint_names(
    key: str, start: int, tied: bool, prefix: str = "", expert_prefix: str = "mlp"
) -> list[str]:
    """The Hugging Face checkpoint tensors our parameter `key` of a stage from layer `start`
    is made of: fused projections split into theirs, names under `prefix` (a multimodal
    checkpoint's "language_model."), Mixtral's MoE under `expert_prefix` with its own leaves."""
    m = re.match(r"layers\.(\d+)\.(.*?)(\w+)(\.weight|\.bias)?$", key)
    if m:
        layer, owner, leaf, kind = m.groups()  # owner: "" or ending in "."; kind: or None
        leaves = _FUSED.get(leaf, (leaf,))
        if expert_prefix != "mlp" and owner.startswith("mlp."):  # Mixtral's names
            owner = f"{expert_prefix}.{owner[4:]}"
            if ".experts." in owner:
                leaves = tuple(_MIXTRAL_EXPERT[n] for n in leaves)
        base = f"{prefix}model.layers.{start + int(layer)}.{owner}"
        return [f"{base}{n}{kind or ''}" for n in leaves]
    if key == "lm_head.weight":
        return [f"{prefix}model.embed_tokens.weight" if tied else f"{prefix}{key}"]
    return [f"{prefix}model.{key}"]


def gguf_source(
    hf_name: str, layer_names: dict[str, str] = GGUF_LAYER_NAMES
) -> tuple[str, int | None]:
    """llama.cpp's tensor for a Hugging Face checkpoint name, and the expert's index in it
    where llama.cpp stacks the experts of a layer into one tensor. `layer_names`: a
    family's own names for a layer's tensors (default: Llama's)."""
    m = _EXPERT.fullmatch(hf_name)
    if m:
        return f"blk.{m[1]}.{_GGUF_EXPERT_NAMES[m[3]]}.{m[4]}", int(m[2])
    m = re.match(r"model\.layers\.(\d+)\.(.*)", hf_name)
    if m:
        return f"blk.{m[1]}.{layer_names[m[2]]}", None
    return _GGUF_NAMES[hf_name], None


def from_gguf_layout(hf_name: str, tensor: Any, cfg: LlamaConfig, arch: str) -> Any:
    """A GGUF tensor in the checkpoint's layout: Qwen2-MoE's shared-expert gate is a vector
    there, a [1, dim] matrix here; and the row permutation llama.cpp's converter applies to Q
    and K for its RoPE kernel is undone (on a float tensor or a QuantizedTensor: whole rows
    move, codes and scales alike). Only the `llama` architecture is permuted; the Qwens use
    the NeoX (HF) layout as stored.
    """
    if hf_name.endswith("shared_expert_gate.weight"):
        return tensor.reshape(1, -1)
    if arch not in _PERMUTED:
        return tensor
    if hf_name.endswith("q_proj.weight") or hf_name.endswith("q_proj.bias"):
        heads = cfg.n_heads
    elif hf_name.endswith("k_proj.weight") or hf_name.endswith("k_proj.bias"):
        heads = cfg.n_kv_heads
    else:
        return tensor
    order = torch.arange(heads * cfg.head_dim).view(heads, cfg.head_dim // 2, 2).transpose(1, 2)
    index = order.reshape(-1)
    return tensor.rows(index) if hasattr(tensor, "rows") else tensor[index]
