"""GPT-2 family: learned positions, LayerNorm, GELU (tanh), Conv1D checkpoints."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from node.engine.models.attention import Part, Step, positions_of
from node.engine.models.linear import Linear
from node.engine.models.stage import Stage, embedding
from node.errors import RinginferError

HF_MODEL_TYPES = ("gpt2",)
GGUF_ARCHITECTURES: tuple[str, ...] = ()
# Conv1D stores [in, out]; we keep nn.Linear's [out, in].
_CONV1D = re.compile(r".*\.(c_attn|c_proj|c_fc)\.weight$")


@dataclass(frozen=True)
class GPT2Config:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    hidden_dim: int
    norm_eps: float
    max_seq_len: int
    tie_embeddings: bool = True

    @classmethod
    def from_hf(cls, d: dict[str, Any]) -> GPT2Config:
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if d.get(flag):
                raise RinginferError(f"unsupported GPT-2 option '{flag}'")
        if d.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise RinginferError(f"unsupported activation '{d['activation_function']}'")
        dim = d["n_embd"]
        return cls(
            vocab_size=d["vocab_size"],
            dim=dim,
            n_layers=d["n_layer"],
            n_heads=d["n_head"],
            hidden_dim=d.get("n_inner") or 4 * dim,
            norm_eps=d.get("layer_norm_epsilon", 1e-5),
            max_seq_len=d.get("n_positions", 1024),
            tie_embeddings=d.get("tie_word_embeddings", True),
        )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads


class Attention(nn.Module):
    def __init__(self, cfg: GPT2Config, device_type: str) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.c_attn = Linear(cfg.dim, 3 * cfg.dim, True, device_type)
        self.c_proj = Linear(cfg.dim, cfg.dim, True, device_type)

    def forward(self, x: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).view(b, t, -1, self.head_dim).transpose(1, 2).chunk(3, dim=1)
        y = step.attend(layer, q, k, v)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: GPT2Config, device_type: str) -> None:
        super().__init__()
        self.c_fc = Linear(cfg.dim, cfg.hidden_dim, True, device_type)
        self.c_proj = Linear(cfg.hidden_dim, cfg.dim, True, device_type)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, cfg: GPT2Config, device_type: str) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg, device_type)
        self.ln_2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg, device_type)

    def forward(self, x: torch.Tensor, step: Step, layer: int) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), step, layer)
        return x + self.mlp(self.ln_2(x))


class GPT2Stage(Stage):
    """Blocks [start, end) of GPT-2; token + position embeddings first, ln_f + head last."""

    def __init__(self, cfg: GPT2Config, start: int, end: int, device_type: str = "cpu") -> None:
        super().__init__(cfg, start, end)
        if self.is_first:
            self.wte = embedding(cfg.vocab_size, cfg.dim)
            self.wpe = embedding(cfg.max_seq_len, cfg.dim)
        self.h = nn.ModuleList(Block(cfg, device_type) for _ in range(end - start))
        if self.is_last:
            self.ln_f = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
            self.lm_head = Linear(cfg.dim, cfg.vocab_size, False, device_type)

    def checkpoint_names(self, key: str) -> list[str]:
        m = re.match(r"h\.(\d+)\.(.*)", key)
        if m:
            return [f"transformer.h.{self.start + int(m[1])}.{m[2]}"]
        if key == "lm_head.weight":
            return ["transformer.wte.weight" if self.cfg.tie_embeddings else key]
        return [f"transformer.{key}"]

    def from_checkpoint_layout(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.t() if _CONV1D.match(hf_name) else tensor

    def layers_forward(self, x: torch.Tensor, parts: Sequence[Part]) -> torch.Tensor:
        if self.is_first:
            x = self.wte(x) + self.wpe(positions_of(parts, x.device))
        step = Step(parts, None, x.device)
        for i, block in enumerate(self.h):
            x = block(x, step, i)
        return x

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(h))
