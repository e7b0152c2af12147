"""Mixture of experts: a router picks `top_k` of `n_experts` SwiGLU MLPs for each row.

Each expert is a gated MLP of its own (its projections quantized like any linear layer), so a
token reads only the experts it routes to: decode cost follows the active parameters, not the
total. A pass groups its rows by expert and calls each expert used once, with all its rows:
8 streams routed to the same expert read its weights once, as a dense layer would.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from node.engine.models.linear import Linear

# gpt-oss's clamped SwiGLU: (up + 1) * gate * sigmoid(alpha * gate), gate <= limit and
# |up| <= limit.
SWIGLU_ALPHA, SWIGLU_LIMIT = 1.702, 7.0


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up fused into one matmul. `act`: silu (SwiGLU),
    gelu (GeGLU, tanh approximation), or gpt-oss's clamped SwiGLU."""

    def __init__(
        self, dim: int, hidden_dim: int, device_type: str, act: str = "silu", bias: bool = False
    ) -> None:
        super().__init__()
        self.gate_up_proj = Linear(dim, 2 * hidden_dim, bias, device_type)
        self.down_proj = Linear(hidden_dim, dim, bias, device_type)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        if self.act == "silu":
            return self.down_proj(F.silu(gate) * up)
        if self.act == "gelu":
            return self.down_proj(F.gelu(gate, approximate="tanh") * up)
        gate = gate.clamp(max=SWIGLU_LIMIT)
        up = up.clamp(-SWIGLU_LIMIT, SWIGLU_LIMIT)
        return self.down_proj((up + 1) * (gate * torch.sigmoid(gate * SWIGLU_ALPHA)))


class Router(nn.Module):
    """Expert scores from a plain matrix in the compute dtype: never quantized, since its
    rounding would change which experts a token picks."""

    def __init__(self, dim: int, n_experts: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        self.bias = nn.Parameter(torch.empty(n_experts)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class SparseMoE(nn.Module):
    """Routed experts (Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss), plus Qwen2-MoE's shared
    expert with its own sigmoid gate, which every row passes through.

    `scoring`: "softmax" over all experts, then the top k (renormalised if `norm_topk_prob`);
    or gpt-oss's "topk_softmax", a softmax over the top k logits alone."""

    def __init__(
        self,
        dim: int,
        expert_dim: int,
        n_experts: int,
        top_k: int,
        norm_topk_prob: bool,
        shared_expert_dim: int,
        device_type: str,
        scoring: str = "softmax",
        act: str = "silu",
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob, self.scoring = top_k, norm_topk_prob, scoring
        self.gate = Router(dim, n_experts, bias)
        self.experts = nn.ModuleList(
            GatedMLP(dim, expert_dim, device_type, act, bias) for _ in range(n_experts)
        )
        self.shared_expert = None
        if shared_expert_dim:
            self.shared_expert = GatedMLP(dim, shared_expert_dim, device_type)
            self.shared_expert_gate = Router(dim, 1)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [N, top_k] in x's dtype, experts [N, top_k]): softmax over all experts in
        float32, the top k kept (renormalised to sum 1 where the model says so)."""
        logits = self.gate(x)
        if self.scoring == "topk_softmax":
            top, experts = torch.topk(logits, self.top_k, dim=-1)
            return F.softmax(top, dim=-1), experts
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        weights, experts = self.route(rows)
        experts_of = self._one_row if len(rows) == 1 else self._grouped
        out = experts_of(rows, weights, experts)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(rows)) * self.shared_expert(rows)
        return out.view(x.shape)

    def _one_row(
        self, row: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        """A decode step of one stream: its top k experts in ascending order, each scaled and
        summed in place. No gather, scatter or sort: at one row those small kernels cost
        as much as the experts' own matmuls."""
        out = None
        for e, w in sorted(zip(experts[0].tolist(), weights[0].tolist(), strict=True)):
            y = self.experts[e](row).mul_(w)
            out = y if out is None else out.add_(y)
        return out

    def _grouped(
        self, rows: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        """Several rows: each expert used is called once with all the rows routed to it."""
        out = torch.zeros_like(rows)
        # Every (row, choice) pair sorted by expert: each expert's rows are one slice.
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        at = 0
        for e, count in enumerate(counts):
            if not count:
                continue
            pairs = order[at : at + count]
            at += count
            picked = pairs // self.top_k
            y = self.experts[e](rows[picked]) * weights.flatten()[pairs, None]
            out.index_add_(0, picked, y)  # ascending expert order, as the reference sums
        return out
