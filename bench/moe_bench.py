"""Mixture-of-experts layers against dense layers of the same active parameters.

A decode step of an MoE layer reads its attention, its router and the `top_k` experts its
token routes to; the goal is that it costs no more than 1.3x a dense layer that reads the
same number of weights (a SwiGLU MLP `top_k` experts wide), with every expert held, in
memory close to what the GGUF file holds.

For each shape (real configs, a few random layers, held as their GGUFs hold them: Qwen3 in
int4 as its Q4_K_M keeps it, gpt-oss in MXFP4 as its experts are; every linear layer here):
- ms per layer per decode step (discovery.capabilities.measure_layer: random weights, the
  stage's own code, one position at a time), MoE and its dense twin;
- the predicted ms per token of the whole model (layers x ms per layer; head excluded);
- bytes held per layer against what the file holds for it (Q4_K_M: 4.5 bits a weight for
  Q4_K, 6.5625 for the Q6_K down projections half of its layers use, ~4.85 on average;
  MXFP4: 4.25).
Writes bench/results/moe.json (or --out). Usage: python bench/moe_bench.py [--shapes ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
from discovery.capabilities import measure_layer  # noqa: E402
from node.engine.models import family_for_hf  # noqa: E402
from node.engine.models.quantized import BYTES_PER_WEIGHT  # noqa: E402

# Hub config.json fields of the real models (the fields our config reader uses).
SHAPES = {
    "Qwen3-30B-A3B": {
        "model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
        "num_experts_per_tok": 8, "norm_topk_prob": True, "vocab_size": 151936,
        "max_position_embeddings": 40960, "rope_theta": 1000000.0,
    },
    "gpt-oss-20b": {
        "model_type": "gpt_oss", "hidden_size": 2880, "num_hidden_layers": 24,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
        "intermediate_size": 2880, "num_local_experts": 32, "num_experts_per_tok": 4,
        "vocab_size": 201088, "max_position_embeddings": 131072, "sliding_window": 128,
    },
}  # fmt: skip
# How each shape's GGUF holds its layers: Q4_K_M (int4 here), gpt-oss's MXFP4 experts.
FORMATS = {"Qwen3-30B-A3B": "int4", "gpt-oss-20b": "mxfp4"}
FILE_BITS = {"Qwen3-30B-A3B": 4.85, "gpt-oss-20b": 4.25}  # bits a weight in the GGUF


def dense_twin(fields: dict) -> dict:
    """The same attention with one dense SwiGLU MLP as wide as the experts a token reads."""
    dense = {k: v for k, v in fields.items() if "expert" not in k and k != "norm_topk_prob"}
    width = fields["num_experts_per_tok"] * fields.get("moe_intermediate_size",
                                                       fields["intermediate_size"])  # fmt: skip
    width += fields.get("shared_expert_intermediate_size", 0)
    return {**dense, "model_type": "qwen3", "intermediate_size": width}


def layer_weights(family: object, cfg: object) -> int:
    """Weights of one decoder layer (norms and router included)."""
    with torch.device("meta"):
        stage = family.stage_cls(cfg, 1, 2, "cpu")
    return sum(p.numel() for p in stage.parameters())


def run(name: str, fields: dict, device: torch.device, dtype: torch.dtype, fmt: str) -> dict:
    out = {"format": fmt}
    for kind, config in (("moe", fields), ("dense_same_active", dense_twin(fields))):
        family = family_for_hf(config)
        cfg = family.config_cls.from_hf(config)
        ms = 1e3 * measure_layer(family, cfg, device, dtype, fmt, max_bytes=1 << 40)
        weights = layer_weights(family, cfg)
        active = weights
        if cfg.n_experts:
            expert = 3 * cfg.dim * cfg.expert_dim
            active = weights - (cfg.n_experts - cfg.n_experts_used) * expert
        out[kind] = {
            "ms_per_layer": ms,
            "predicted_ms_per_token": ms * cfg.n_layers,
            "weights_per_layer": weights,
            "active_weights_per_layer": active,
            "held_bytes_per_layer": weights * BYTES_PER_WEIGHT[fmt],
            "file_bytes_per_layer": weights * FILE_BITS[name] / 8,
            "config": dataclasses.asdict(cfg),
        }
        print(f"{name} {kind}: {ms:.2f} ms/layer, {weights / 1e6:.0f}M weights "
              f"({active / 1e6:.0f}M active)", file=sys.stderr)  # fmt: skip
    moe, dense = out["moe"], out["dense_same_active"]
    out["moe_vs_dense"] = moe["ms_per_layer"] / dense["ms_per_layer"]
    out["held_vs_file"] = moe["held_bytes_per_layer"] / moe["file_bytes_per_layer"]
    print(f"{name}: MoE / dense of the same active weights = {out['moe_vs_dense']:.2f} "
          "(goal <= 1.3)", file=sys.stderr)  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on a GPU)")
    parser.add_argument("--format", help="hold every shape in this format (default: its GGUF's)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(BENCH / "results" / "moe.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    report = {
        "benchmark": "mixture-of-experts layers against dense layers (issue 22)",
        "device": args.device, "dtype": args.dtype, "threads": args.threads,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None},
        "shapes": {name: run(name, SHAPES[name], device, dtype, args.format or FORMATS[name])
                   for name in args.shapes.split(",")},
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
