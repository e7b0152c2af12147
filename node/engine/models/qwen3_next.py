"""Qwen3-Next and Qwen3.5: Gated DeltaNet layers (linear attention with a fixed-size
recurrent state per request) mixed with gated full-attention layers, dense or
mixture-of-experts MLPs. Qwen3.5 differs in its DeltaNet's four flat projections (Qwen3-Next
packs them by key head), its experts in every layer (stacked in the Hub's checkpoints), and
its checkpoints being a vision-language model's, the text model under `language_model`; its
multimodal RoPE is plain RoPE for text.

A DeltaNet layer keeps, per request, the last kernel-1 inputs of its causal convolution and
a state S [value heads, key dim, value dim] that each position updates: decayed by exp(g),
then corrected towards the position's value (the delta rule, step size beta). A prompt runs
in chunks (the WY form: a triangular solve per chunk), a decode step one update; both in
float32, as the reference computes them. Its memory does not grow with the context.

The attention layers: a sigmoid gate per output (q_proj gives each head's query and gate),
q/k norms, RoPE on the first `rotary_dim` numbers of a head. Norms scale by (1 + w), kept
as 1 + w from loading (the DeltaNet output norm, a plain w, excepted).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from node.engine.kv_cache import SPAN, KVCache
from node.engine.models import llama
from node.engine.models.attention import Part, Step, positions_of
from node.engine.models.linear import Linear
from node.engine.models.llama import (
    LlamaConfig,
    LlamaStage,
    RMSNorm,
    default_inv_freq,
    gguf_keys,
    gguf_shape,
    hf_shape,
    rope_tables,
    rotate,
)
from node.engine.models.moe import GatedMLP, SparseMoE
from node.errors import RinginferError

HF_MODEL_TYPES = ("qwen3_next", "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text")
GGUF_ARCHITECTURES = ("qwen3next", "qwen35", "qwen35moe")
CHUNK = 64  # positions a prompt's delta rule solves at once (the reference's chunk)
_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")


@dataclass(frozen=True)
class Qwen3NextConfig(LlamaConfig):
    linear: tuple[bool, ...] = ()  # per layer: a DeltaNet layer (else gated attention)
    lin_k_heads: int = 0
    lin_v_heads: int = 0
    lin_k_dim: int = 0
    lin_v_dim: int = 0
    conv_kernel: int = 4
    rotary_dim: int = 0  # the numbers of an attention head RoPE turns
    flat: bool = False  # Qwen3.5: in_proj_qkv/_z/_b/_a (else Qwen3-Next's packed qkvz, ba)
    # Value heads tiled over the key heads (k0 k1 .. k0 k1 ..), as llama.cpp's Qwen3.5
    # converter stores them; else grouped by key head (k0 k0 .. k1 k1 ..), as Hugging Face.
    tiled: bool = False
    language_model: bool = False  # checkpoint names under model.language_model (Qwen3.5's VL)

    @property
    def cache_width(self) -> float:
        """Numbers a position caches, per layer on average: keys and values in the attention
        layers only (a DeltaNet layer's state does not grow with the context)."""
        return 2 * self.n_kv_heads * self.head_dim * self.linear.count(False) / self.n_layers

    def state_bytes(self, size: int) -> float:
        """Bytes a request's recurrent states take per layer on average, whatever its
        context: each DeltaNet layer's convolution window (`size` bytes a number, the
        compute dtype's) and its float32 state."""
        each = self.conv_dim * (self.conv_kernel - 1) * size
        each += 4 * self.lin_v_heads * self.lin_k_dim * self.lin_v_dim
        return each * sum(self.linear) / self.n_layers

    @property
    def conv_dim(self) -> int:
        return 2 * self.lin_k_heads * self.lin_k_dim + self.lin_v_heads * self.lin_v_dim

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> Qwen3NextConfig:
        d = dict(config.get("text_config") or config)  # a vision-language model's text part
        d.setdefault("intermediate_size", 0)  # Qwen3.5-MoE has no dense MLP
        kind = d.get("model_type", config["model_type"])
        qwen35 = kind.startswith("qwen3_5")
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise RinginferError(f"unsupported RoPE scaling for {kind}")
        n = d["num_hidden_layers"]
        kinds = d.get("layer_types") or [
            "linear_attention" if (i + 1) % d.get("full_attention_interval", 4) else
            "full_attention" for i in range(n)]  # fmt: skip
        shape = hf_shape(d)
        n_experts = (d.get("num_experts") or 0) if not qwen35 or "moe" in kind else 0
        step = d.get("decoder_sparse_step") or 1
        dense = () if qwen35 else tuple(
            i for i in range(n) if i in (d.get("mlp_only_layers") or ()) or (i + 1) % step)
        partial = rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 0.25))
        return cls(
            **shape,
            rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
            # A vision-language checkpoint ties by its top-level key.
            tie_embeddings=config.get("tie_word_embeddings", d.get("tie_word_embeddings", False)),
            n_experts=n_experts,
            n_experts_used=d.get("num_experts_per_tok", 0) if n_experts else 0,
            expert_dim=d.get("moe_intermediate_size") or 0,
            shared_expert_dim=d.get("shared_expert_intermediate_size") or 0,
            norm_topk_prob=qwen35 or d.get("norm_topk_prob", True),
            dense_layers=dense if n_experts else (),
            linear=tuple(k == "linear_attention" for k in kinds),
            lin_k_heads=d["linear_num_key_heads"],
            lin_v_heads=d["linear_num_value_heads"],
            lin_k_dim=d["linear_key_head_dim"],
            lin_v_dim=d["linear_value_head_dim"],
            conv_kernel=d.get("linear_conv_kernel_dim", 4),
            rotary_dim=int(shape["head_dim"] * partial),
            flat=qwen35,
            language_model="text_config" in config,
        )

    @classmethod
    def from_gguf(
        cls, meta: dict[str, Any], tensor_names: set[str], freq_factors: tuple[float, ...] | None
    ) -> Qwen3NextConfig:
        """llama.cpp's qwen3next, qwen35 and qwen35moe keys. Its converter writes the
        DeltaNet's q, k, v and z flat (attn_qkv, attn_gate), so the layers take Qwen3.5's flat
        projections; for Qwen3.5 it also tiles the value heads (every tensor that has them),
        which the layers follow rather than undo (out_proj's columns would have to move
        within quantized blocks). Qwen3.5's interleaved MRoPE sections turn text positions
        (the same on all three axes) as plain RoPE does."""
        key = gguf_keys(meta)
        n, interval = key("block_count"), key("full_attention_interval", 4)
        n_experts, v_heads = key("expert_count", 0), key("ssm.time_step_rank")
        return cls(
            **{**gguf_shape(meta), "hidden_dim": key("feed_forward_length", 0)},
            rope_theta=key("rope.freq_base", 10000.0),
            tie_embeddings="output.weight" not in tensor_names,
            n_experts=n_experts,
            n_experts_used=key("expert_used_count", 0),
            expert_dim=key("expert_feed_forward_length", 0),
            shared_expert_dim=key("expert_shared_feed_forward_length", 0),
            norm_topk_prob=key("expert_weights_norm", True),
            dense_layers=tuple(
                i for i in range(n) if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names
            ) if n_experts else (),
            # Which layers are DeltaNets: listed where the converter had layer_types.
            linear=tuple(map(bool, key("attention.recurrent_layers", ())))[:n]
            or tuple((i + 1) % interval != 0 for i in range(n)),
            lin_k_heads=key("ssm.group_count"),
            lin_v_heads=v_heads,
            lin_k_dim=key("ssm.state_size"),
            lin_v_dim=key("ssm.inner_size") // v_heads,
            conv_kernel=key("ssm.conv_kernel", 4),
            rotary_dim=key("rope.dimension_count"),
            flat=True,
            tiled=meta["general.architecture"] != "qwen3next",
        )  # fmt: skip

    def inv_freq(self) -> torch.Tensor:
        return default_inv_freq(self.rope_theta, self.rotary_dim)


class GatedNorm(nn.Module):
    """RMSNorm of x, times w, times silu(z): the DeltaNet output's norm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)
        return (y * F.silu(z.float())).to(x.dtype)


class GatedAttention(nn.Module):
    """Attention whose output is gated per number (sigmoid of q_proj's second half a head)."""

    def __init__(self, cfg: Qwen3NextConfig, device_type: str) -> None:
        super().__init__()
        self.cfg = cfg
        q_size, kv_size = 2 * cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.qkv_proj = Linear(cfg.dim, q_size + 2 * kv_size, False, device_type)
        self.o_proj = Linear(cfg.n_heads * cfg.head_dim, cfg.dim, False, device_type)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
        c = self.cfg
        b, t, _ = x.shape
        qg, k, v = self.qkv_proj(x).split(
            [2 * c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim, c.n_kv_heads * c.head_dim], -1)
        q, gate = qg.view(b, t, c.n_heads, 2 * c.head_dim).split(c.head_dim, dim=-1)  # fmt: skip
        q = self._rope(self.q_norm(q.transpose(1, 2)), step)
        k = self._rope(self.k_norm(k.view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2)), step)
        y = step.attend(layer, q, k, v.view(b, t, c.n_kv_heads, c.head_dim).transpose(1, 2))
        y = y.transpose(1, 2).reshape(b, t, -1) * torch.sigmoid(gate.reshape(b, t, -1))
        return self.o_proj(y)

    def _rope(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        r = self.cfg.rotary_dim
        return torch.cat([rotate(x[..., :r], *step.rope), x[..., r:]], dim=-1)


class DeltaNet(nn.Module):
    """A Gated DeltaNet layer over each request's state (KVCache.states[layer])."""

    def __init__(self, cfg: Qwen3NextConfig, device_type: str) -> None:
        super().__init__()
        self.cfg = cfg
        nk, nv, dk, dv = cfg.lin_k_heads, cfg.lin_v_heads, cfg.lin_k_dim, cfg.lin_v_dim
        if cfg.flat:
            self.in_proj_qkv = Linear(cfg.dim, cfg.conv_dim, False, device_type)
            self.in_proj_z = Linear(cfg.dim, nv * dv, False, device_type)
            self.in_proj_b = Linear(cfg.dim, nv, False, device_type)
            self.in_proj_a = Linear(cfg.dim, nv, False, device_type)
        else:
            self.in_proj_qkvz = Linear(cfg.dim, 2 * nk * dk + 2 * nv * dv, False, device_type)
            self.in_proj_ba = Linear(cfg.dim, 2 * nv, False, device_type)
        self.conv1d = nn.Module()
        self.conv1d.weight = nn.Parameter(torch.empty(cfg.conv_dim, 1, cfg.conv_kernel))
        self.A_log = nn.Parameter(torch.empty(nv))
        self.dt_bias = nn.Parameter(torch.empty(nv))
        self.norm = GatedNorm(dv, cfg.norm_eps)
        self.out_proj = Linear(nv * dv, cfg.dim, False, device_type)

    def forward(self, x: torch.Tensor, parts: Sequence[Part], layer: int) -> torch.Tensor:
        c = self.cfg
        nk, nv, dk, dv, t = c.lin_k_heads, c.lin_v_heads, c.lin_k_dim, c.lin_v_dim, x.shape[1]
        r = nv // nk
        mixed, z, b, a = self._project(x[0])
        beta = torch.sigmoid(b.reshape(t, nv)).float()
        g = -self.A_log.float().exp() * F.softplus(a.reshape(t, nv).float() + self.dt_bias.float())
        w, out, at = self.conv1d.weight[:, 0], [], 0
        for p in parts:  # each request's own convolution window and state
            rows = slice(at, at + p.count)
            at += p.count
            conv, state = p.cache.states[layer]
            window = torch.cat([conv, mixed[rows].T], dim=1)  # [conv_dim, kernel - 1 + count]
            conv.copy_(window[:, p.count :])
            y = F.silu(torch.einsum("ctk,ck->tc", window.unfold(1, c.conv_kernel, 1), w))
            qq, kk, vv = y.split([nk * dk, nk * dk, nv * dv], dim=-1)
            qq, kk = l2norm(qq.view(-1, nk, dk).float()), l2norm(kk.view(-1, nk, dk).float())
            if c.tiled:  # value head j reads key head j % nk
                qq, kk = qq.repeat(1, r, 1), kk.repeat(1, r, 1)
            else:  # value head j reads key head j // r
                qq, kk = qq.repeat_interleave(r, dim=1), kk.repeat_interleave(r, dim=1)
            rule = delta_step if p.count == 1 else delta_chunked
            out.append(rule(qq * dk**-0.5, kk, vv.view(-1, nv, dv).float(), g[rows], beta[rows],
                            state))  # fmt: skip
        o = torch.cat(out).to(x.dtype)
        o = self.norm(o, z.reshape(t, nv, dv)).reshape(1, t, nv * dv)
        return self.out_proj(o)


    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The convolution's input [T, q | k | v], z [T, value heads, dv], b and a."""
        c, t = self.cfg, x.shape[0]
        if c.flat:
            return (self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_b(x),
                    self.in_proj_a(x))  # fmt: skip
        # Grouped by key head: [q, k, v (r heads), z (r heads)] and [b (r), a (r)].
        nk, dk, dv = c.lin_k_heads, c.lin_k_dim, c.lin_v_dim
        r = c.lin_v_heads // nk
        q, k, v, z = self.in_proj_qkvz(x).view(t, nk, -1).split([dk, dk, r * dv, r * dv], -1)
        b, a = self.in_proj_ba(x).view(t, nk, 2 * r).split(r, dim=-1)
        mixed = torch.cat([q.reshape(t, -1), k.reshape(t, -1), v.reshape(t, -1)], dim=-1)
        return mixed, z, b, a


def l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + 1e-6)


def delta_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
               beta: torch.Tensor, state: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """One position ([1, heads, dim] each): S decays, moves towards v by beta, is read by q."""
    state.mul_(g[0].exp()[:, None, None])
    delta = (v[0] - torch.einsum("hkv,hk->hv", state, k[0])) * beta[0][:, None]
    state.add_(k[0][:, :, None] * delta[:, None, :])
    return torch.einsum("hkv,hk->hv", state, q[0])[None]


def delta_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor,
                  beta: torch.Tensor, state: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """Positions [T, heads, dim] in chunks of CHUNK: within a chunk the updates' corrections
    come from one unit-triangular solve, the state carries between chunks."""
    outs = []
    for s in range(0, q.shape[0], CHUNK):
        qc, kc, vc = (x[s : s + CHUNK].transpose(0, 1) for x in (q, k, v))  # [heads, C, dim]
        gc = g[s : s + CHUNK].T.cumsum(-1)  # [heads, C]: cumulative log-decay
        bc = beta[s : s + CHUNK].T
        n = qc.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        decay = (gc[:, :, None] - gc[:, None, :]).masked_fill(~causal, float("-inf")).exp()
        kb = kc * bc[..., None]
        m = torch.eye(n, device=q.device) + ((kb @ kc.transpose(-1, -2)) * decay).tril(-1)
        u = torch.linalg.solve_triangular(m, vc * bc[..., None], upper=False, unitriangular=True)
        w = torch.linalg.solve_triangular(m, kb * gc.exp()[..., None], upper=False,
                                          unitriangular=True)  # fmt: skip
        v_new = u - w @ state
        o = (qc * gc.exp()[..., None]) @ state + ((qc @ kc.transpose(-1, -2)) * decay) @ v_new
        last = gc[:, -1:]
        state.mul_(last.exp()[..., None]).add_(
            (kc * (last - gc).exp()[..., None]).transpose(-1, -2) @ v_new)
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


class Qwen3NextBlock(nn.Module):
    def __init__(self, cfg: Qwen3NextConfig, layer: int, device_type: str) -> None:
        super().__init__()
        self.linear = cfg.linear[layer]
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        if self.linear:
            self.linear_attn = DeltaNet(cfg, device_type)
        else:
            self.self_attn = GatedAttention(cfg, device_type)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp: nn.Module = (
            SparseMoE(cfg.dim, cfg.expert_dim, cfg.n_experts, cfg.n_experts_used,
                      cfg.norm_topk_prob, cfg.shared_expert_dim, device_type)
            if cfg.is_moe(layer) else GatedMLP(cfg.dim, cfg.hidden_dim, device_type)
        )  # fmt: skip

    def forward(self, x: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
        """`layer`: this layer's index among the stage's DeltaNet layers (its state in the
        cache) or among its attention layers (its keys and values)."""
        h = self.input_layernorm(x)
        if self.linear:
            x = x + self.linear_attn(h, step.parts, layer)
        else:
            x = x + self.self_attn(h, step, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


# llama.cpp's names for a layer's tensors, where they differ from Llama's.
GGUF_NAMES = {
    **llama.GGUF_LAYER_NAMES,
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "linear_attn.in_proj_qkv.weight": "attn_qkv.weight",
    "linear_attn.in_proj_z.weight": "attn_gate.weight",
    "linear_attn.in_proj_b.weight": "ssm_beta.weight",
    "linear_attn.in_proj_a.weight": "ssm_alpha.weight",
    "linear_attn.conv1d.weight": "ssm_conv1d.weight",
    "linear_attn.A_log": "ssm_a",
    "linear_attn.dt_bias": "ssm_dt.bias",
    "linear_attn.norm.weight": "ssm_norm.weight",
    "linear_attn.out_proj.weight": "ssm_out.weight",
}


class Qwen3NextStage(LlamaStage):
    block_cls = Qwen3NextBlock
    static_decode = False  # type: ignore[assignment]

    def __init__(self, cfg: Any, start: int, end: int, device_type: str = "cpu") -> None:
        super().__init__(cfg, start, end, device_type)
        owned = cfg.linear[start:end]
        # Each owned layer's index: into the cache's states (DeltaNet) or its attention layers.
        self.slots = [owned[:i].count(owned[i]) for i in range(len(owned))]
        self.recurrent = any(owned)

    def layers_forward(self, x: torch.Tensor, parts: Sequence[Part]) -> torch.Tensor:
        for p in parts if self.recurrent else ():
            if p.start != p.cache.length:
                raise RinginferError(
                    f"position {p.start} rewrites a recurrent state holding {p.cache.length}")
            # Until the pass completes (Stage.run advances it): a pass that raises midway
            # leaves states no pass may continue.
            p.cache.length = -1
        h = self.embed_tokens(x) if self.is_first else x
        rope = rope_tables(self.inv_freq, positions_of(parts, h.device), h.dtype)
        step = Step(parts, None, h.device, rope)
        for layer, slot in zip(self.layers, self.slots, strict=True):
            h = layer(h, step, slot)
        return h

    def windows(self) -> list[int | None]:
        """The owned attention layers' (the cache holds keys and values for those only)."""
        return [None] * sum(not k for k in self.cfg.linear[self.start : self.end])

    def new_cache(
        self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device,
        span: int = SPAN,
    ) -> KVCache:  # fmt: skip
        """Keys and values of the attention layers, a convolution window and a state for
        each DeltaNet layer (float32, whatever the dtype: the rule runs in float32)."""
        c = self.cfg
        cache = KVCache(len(self.windows()), batch, c.n_kv_heads, c.head_dim, capacity, dtype,
                        device, self.windows(), span)  # fmt: skip
        n_linear = sum(c.linear[self.start : self.end])
        cache.states = [
            (torch.zeros(c.conv_dim, c.conv_kernel - 1, dtype=dtype, device=device),
             torch.zeros(c.lin_v_heads, c.lin_k_dim, c.lin_v_dim, device=device))
            for _ in range(n_linear)
        ]  # fmt: skip
        return cache

    def checkpoint_names(self, key: str) -> list[str]:
        names = super().checkpoint_names(key)
        if not self.cfg.language_model:
            return names
        return [n.replace("model.", "model.language_model.", 1) if n.startswith("model.") else n
                for n in names]  # fmt: skip

    @staticmethod
    def hf_source(hf_name: str) -> tuple[str, int | None]:
        """An expert's matrix from the layer's stacked gate_up_proj [experts, 2 x width, dim]
        or down_proj, as the Hub's Qwen3.5-MoE checkpoints hold them (the loader reads a
        checkpoint's own per-expert tensors where it has those instead)."""
        m = _EXPERT.fullmatch(hf_name)
        if not m:
            return hf_name, None
        return f"{m[1]}.{'down_proj' if m[3] == 'down' else 'gate_up_proj'}", int(m[2])

    @staticmethod
    def from_hf_file_layout(hf_name: str, tensor: Any) -> Any:
        m = _EXPERT.fullmatch(hf_name)
        if not m or m[3] == "down":
            return tensor
        half = tensor.shape[0] // 2
        return tensor[:half] if m[3] == "gate" else tensor[half:]

    @staticmethod
    def gguf_source(hf_name: str, arch: str) -> tuple[str, int | None]:
        """Qwen3-Next's files pack b and a into one tensor (ssm_ba), Qwen3.5's keep them."""
        name, expert = llama.gguf_source(hf_name, GGUF_NAMES)
        if arch == "qwen3next" and name.endswith(("ssm_beta.weight", "ssm_alpha.weight")):
            name = name.rsplit(".", 2)[0] + ".ssm_ba.weight"
        return name, expert

    @staticmethod
    def from_gguf_layout(hf_name: str, tensor: Any, cfg: Any, arch: str) -> Any:
        """What llama.cpp's converter changed undone: b and a from Qwen3-Next's ssm_ba (per
        key head, [b (r heads), a (r heads)]), A_log from ssm_a = -exp(A_log), the kernel's
        axis, and norms stored as 1 + w (from_checkpoint_layout adds the 1 again)."""
        if arch == "qwen3next" and hf_name.endswith(("in_proj_b.weight", "in_proj_a.weight")):
            r = cfg.lin_v_heads // cfg.lin_k_heads
            order = torch.arange(cfg.lin_k_heads * 2 * r).view(cfg.lin_k_heads, 2 * r)
            index = (order[:, :r] if hf_name.endswith("in_proj_b.weight") else order[:, r:])
            index = index.reshape(-1)
            return tensor.rows(index) if hasattr(tensor, "rows") else tensor[index]
        if hf_name.endswith("A_log"):
            return (-tensor).log()
        if hf_name.endswith("conv1d.weight"):
            return tensor.reshape(tensor.shape[0], 1, -1)
        if hf_name.endswith("norm.weight") and not hf_name.endswith("linear_attn.norm.weight"):
            return tensor - 1
        return llama.from_gguf_layout(hf_name, tensor, cfg, arch)

    def from_checkpoint_layout(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Norms scale by (1 + w): held as 1 + w, so they run as plain RMSNorms."""
        if hf_name.endswith("norm.weight") and not hf_name.endswith("linear_attn.norm.weight"):
            return tensor.float() + 1  # in float32, as the reference adds it (w is near 0)
        return tensor
