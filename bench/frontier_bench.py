"""DeepSeek-V3- and Qwen3-Next-shaped layers: ms per layer here, and the whole model's
predicted time per token on a planned cluster of machines like this one.

Each shape is the model's own (bench/../node/engine/shapes.py's built-in config), its
layers held as its Q4_K_M GGUF holds them (int4 here), random weights, timed as a daemon
times its layers (discovery.capabilities.measure_layer: four layers stepped one position
at a time, the median step). Two liberties, both said in the JSON:
- a DeepSeek-V3 layer holds `--v3-experts` of its 256 routed experts (6.4 GB a layer in
  int4 would not fit four on a 24 GiB machine). A token reads its 8 routed experts and the
  shared one either way, so the bytes a step reads are the model's; the four layers still
  hold several GB, far beyond any CPU cache;
- DeepSeek-V3's three dense layers are timed apart (a dense MLP 18432 wide) and counted as
  three of its 61.
Then `make_plan` over `--nodes` machines of `--node-gib` each, every node this machine
(its measured layer time, matmul rate and bandwidth), gives the stages and the predicted
ms per token (layers, head and the hops between nodes).

    python bench/frontier_bench.py                  # bench/results/frontier.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
from discovery.capabilities import measure_compute, measure_layer  # noqa: E402
from node.cluster.planner import NodeSpec, make_plan, predict  # noqa: E402
from node.engine import shapes  # noqa: E402
from node.engine.models import family_for_hf  # noqa: E402

GIB = 2**30
# (built-in name, nodes, GiB a node): a cluster that holds the model in int4 with room
# for a 4096-position request.
CLUSTERS = {"DeepSeek-V3": (4, 128), "Qwen3-Next-80B-A3B-Instruct": (2, 32)}


def timed_layer(fields: dict, fmt: str, dtype: torch.dtype) -> tuple[float, float]:
    """(ms one layer takes a decode step, seconds building and timing it took)."""
    family = family_for_hf(fields)
    began = time.perf_counter()
    ms = 1e3 * measure_layer(family, family.config_cls.from_hf(fields), torch.device("cpu"),
                             dtype, fmt, max_bytes=1 << 40)  # fmt: skip
    return ms, time.perf_counter() - began


def run(name: str, fmt: str, dtype: torch.dtype, v3_experts: int, rates: tuple) -> dict:
    full, fields = shapes.built_in(name)
    out: dict = {"model": full, "format": fmt}
    kinds = {"layer": dict(fields)}
    if fields["model_type"] == "deepseek_v3":
        kinds["layer"].update(n_routed_experts=v3_experts, first_k_dense_replace=0)
        kinds["dense_layer"] = dict(fields, first_k_dense_replace=fields["num_hidden_layers"])
        out["experts_held_in_timed_layers"] = f"{v3_experts} of {fields['n_routed_experts']}"
    for kind, config in kinds.items():
        ms, took = timed_layer(config, fmt, dtype)
        out[f"ms_per_{kind}"] = round(ms, 3)
        print(f"{name} {kind}: {ms:.2f} ms ({took:.0f} s to build and time)", file=sys.stderr)
    family = family_for_hf(fields)
    cfg = family.config_cls.from_hf(fields)
    shape = shapes.shape_of(family, cfg, dtype, quantize=fmt, architecture=fields["model_type"])
    layers_ms = out["ms_per_layer"] * (cfg.n_layers - len(shape.dense_layers))
    layers_ms += out.get("ms_per_dense_layer", 0) * len(shape.dense_layers)
    out["layers_ms_per_token_one_machine"] = round(layers_ms, 1)
    n, gib = CLUSTERS[name]
    flops, bandwidth, overhead = rates
    # One measured layer time stands for every layer (the planner's model); the dense
    # layers' share goes into it as a weighted mean.
    layer_s = layers_ms / cfg.n_layers / 1e3
    nodes = [NodeSpec(f"node{i}", gib * GIB, flops=flops, bandwidth=bandwidth,
                      layer_overhead_s=overhead, layer_s=layer_s) for i in range(n)]  # fmt: skip
    plan = make_plan(full, 0, shape, nodes, "latency", context=4096)
    p = predict(plan.stages, shape, {x.id: x for x in nodes})
    out["cluster"] = {
        "nodes": n, "gib_each": gib, "held_gib": round(shape.held(0, cfg.n_layers) / GIB, 1),
        "stages": [[s.node, s.start, s.end] for s in plan.stages],
        "predicted_ms_per_token": round(p.tpot_s * 1e3, 1),
        "predicted_tokens_per_s": round(1 / p.tpot_s, 2),
        "request_cache_mib_at_32k": round(shape.cache_bytes(cfg.n_layers, 32768) / 2**20),
    }  # fmt: skip
    print(f"{name}: {out['cluster']}", file=sys.stderr)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(CLUSTERS))
    parser.add_argument("--format", default="int4")
    parser.add_argument("--dtype", default="float32", help="compute dtype")
    parser.add_argument("--v3-experts", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default=str(BENCH / "results" / "frontier.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rates = measure_compute(torch.device("cpu"), dtype)
    report = {
        "benchmark": "DeepSeek-V3 and Qwen3-Next layers, and the whole model planned (issue 25)",
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                    "torch": torch.__version__, "flops": rates[0], "bandwidth": rates[1],
                    "layer_overhead_s": rates[2]},
        "dtype": args.dtype,
        "shapes": {name: run(name, args.format, dtype, args.v3_experts, rates)
                   for name in args.shapes.split(",")},
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
