"""Decode steps through a CPU stage's layers, one C++ call a layer (issue 24).

At one position a step, a layer of the default model spends as long in Python (module calls,
views, ~25 ATen dispatches) as in its weight reads: 3.5 of a 12 ms step. `decode_layer`
(decode_ops.cpp) makes the same ATen calls and fused ops on the same views as llama.py's
Block, so its outputs are those of the Python path, bit for bit; it serves the dense layers
of the Llama family (Llama, Mistral, Qwen2, Qwen3) held as int8/int4 codes, at one new
position for each of any number of requests (batched decode). Prompts, float or MXFP4
weights, sliding windows, sinks and experts keep the Python path, as does
`RINGINFER_DECODE_OPS=0`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from node.engine.models import decode_ops
from node.engine.models.attention import Part
from node.engine.models.moe import GatedMLP
from node.engine.models.quantized import QuantizedLinear

if TYPE_CHECKING:
    from node.engine.models.llama import LlamaStage


def usable(stage: LlamaStage, h: torch.Tensor, parts: Sequence[Part]) -> bool:
    """Whether this pass is one new position per request through layers `decode_layer`
    computes: float32 on the CPU, every layer's operands at hand."""
    if not h.is_cpu or h.dtype != torch.float32:  # (Int8Linear's operands are any device's)
        return False
    if any(p.count != 1 or p.cache.dtype != torch.float32 for p in parts):
        return False
    if any(p.cache.buffers(0)[2] != 0 for p in parts):  # a sliding cache: windows only
        return False
    return stage.static_decode and decode_ops.ops() is not None and operands(stage) is not None


def operands(stage: LlamaStage) -> list[tuple[Any, ...]] | None:
    """Each layer's weights as `decode_layer` takes them, gathered at the first step; None
    where a layer has what it lacks. A stage's weights are loaded once (weights.load_stage)
    and never replaced: one that replaced them would have to drop `_decode_operands`."""
    if not hasattr(stage, "_decode_operands"):
        layers = [_layer_operands(block) for block in stage.layers]
        stage._decode_operands = None if None in layers else layers
    return stage._decode_operands


def _layer_operands(block: torch.nn.Module) -> tuple[Any, ...] | None:
    attn, mlp = block.self_attn, block.mlp
    if not isinstance(mlp, GatedMLP) or mlp.act != "silu" or attn.sinks is not None:
        return None
    linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    if not all(isinstance(m, QuantizedLinear) and m.refine is None for m in linears):
        return None
    held = [m.cpu_operands() for m in linears]
    if None in held:  # MXFP4, or codes packed for a GPU
        return None
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    return (
        block.input_layernorm.weight, block.post_attention_layernorm.weight,
        block.input_layernorm.eps, [c for c, _, _ in held], [s for _, s, _ in held],
        [g for _, _, g in held], [m.out_features for m in linears], [m.bias for m in linears],
        None if q_norm is None else q_norm.weight, None if k_norm is None else k_norm.weight,
        attn.n_heads, attn.n_kv_heads,
    )  # fmt: skip


def layers(
    stage: LlamaStage, h: torch.Tensor, parts: Sequence[Part], rope: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """The stage's layers over h [1, B, D], the new position of each of B requests."""
    ops = decode_ops.ops()
    positions = [p.start for p in parts]
    for i, layer in enumerate(operands(stage)):
        buffers = [p.cache.buffers(i) for p in parts]
        keys, values = [k for k, _, _ in buffers], [v for _, v, _ in buffers]
        h = ops.decode_layer(h, *layer, *rope, keys, values, positions)
    return h
