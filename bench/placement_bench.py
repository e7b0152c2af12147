"""Placement: the planner's plan against a memory-proportional split and the best single machine.

A heterogeneous cluster on one host (for example one GPU daemon and two CPU daemons, as
`--devices cuda,cpu,cpu`) runs the same greedy generation under each placement:

- `planner-latency`, `planner-throughput`: the daemons plan for themselves (`--objective`);
- `memory-proportional`: layers pinned in proportion to each daemon's offered memory, the
  rule memory-weighted placers use (and ours did before it measured compute);
- `single-<device>`: one daemon alone on each distinct device; the fastest is the best
  single machine, which the planner's latency plan must not be slower than.

Every placement's time per output token is measured through the first daemon (median of
`--repeats`), beside what the planner predicted for it. Writes bench/results/placement.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ring_bench import PROMPT, ROOT, run, start_cluster, stop_cluster  # noqa: E402

sys.path.insert(0, str(ROOT))
from node.cluster.planner import largest_remainder  # noqa: E402


def measure(address: str, common: list[str], repeats: int) -> tuple[float, list[int]]:
    runs = [run("generate", "--node", address, *common) for _ in range(repeats)]
    return statistics.median(1000 * r["tpot_s"] for r in runs), runs[0]["tokens"]


def placement(
    root: Path, flags: list[list[str]], common: list[str], repeats: int, name: str
) -> dict:
    procs, addresses = start_cluster(root / name, flags)
    try:
        run("generate", "--node", addresses[0], *common)  # warm-up, not counted
        tpot, tokens = measure(addresses[0], common, repeats)
        status = run("status", "--node", addresses[0], "--json")
    finally:
        stop_cluster(procs)
    names = {n["id"]: n["name"] for n in status["nodes"]}
    stages = [
        {"node": names[n["id"]], "layers": n["layers"]} for n in status["nodes"] if n["layers"]
    ]
    result = {
        "placement": name, "stages": sorted(stages, key=lambda s: s["layers"][0]),
        "tpot_ms": tpot, "predicted_tpot_ms": status["predicted"]["tpot_ms"], "tokens": tokens,
        "memory": {n["name"]: n["memory"] for n in status["nodes"]},
    }  # fmt: skip
    print(f"{name}: {tpot:.1f} ms/token measured, {result['predicted_tpot_ms']:.1f} predicted, "
          f"{result['stages']}", file=sys.stderr)  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--devices", default="cuda,cpu,cpu", help="one daemon per device")
    parser.add_argument("--threads", help="torch threads of each CPU daemon")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/placement.json")
    args = parser.parse_args()
    model = ["--model", args.model] if args.model else []
    devices = args.devices.split(",")
    flags = []
    for d in devices:
        threads = ["--threads", args.threads] if args.threads and d == "cpu" else []
        flags.append([*model, "--device", d, *threads, "--wire-dtype", "float32"])
    common = ["--json", "--ignore-eos", "--max-tokens", str(args.tokens), PROMPT]
    root = Path(tempfile.mkdtemp(prefix="placement-bench-"))
    try:
        results = [
            placement(
                root, [[*f, "--objective", o] for f in flags], common, args.repeats, f"planner-{o}"
            )  # fmt: skip
            for o in ("latency", "throughput")
        ]
        offered = results[0]["memory"]
        memory = [offered[f"node{i + 1}"] for i in range(len(flags))]
        n_layers = int(run("plan", *model, "--json", "--cluster-file", str(
            _one_node_file(root)))["n_layers"])  # fmt: skip
        counts = largest_remainder(n_layers, memory)
        bounds = [sum(counts[:i]) for i in range(len(counts) + 1)]
        pinned = [
            [*f, "--layers", f"{a}:{b}"] if b > a else f
            for f, a, b in zip(flags, bounds, bounds[1:], strict=False)
        ]
        results.append(placement(root, pinned, common, args.repeats, "memory-proportional"))
        singles = {}  # each device alone, as one daemon measured the same way
        for i, d in enumerate(devices):
            if d not in singles:
                alone = placement(root, [flags[i]], common, args.repeats, f"single-{d}")
                singles[d] = alone["tpot_ms"]
                results.append(alone)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    best = min(singles, key=singles.get)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()  # fmt: skip
    out = {
        "commit": commit,
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "devices": devices, "threads": args.threads, "tokens": args.tokens,
        "repeats": args.repeats, "model": args.model or "default",
        "placements": [{k: v for k, v in r.items() if k != "tokens"} for r in results],
        "single_machine_tpot_ms": singles, "best_single": best,
        "planner_vs_best_single": results[0]["tpot_ms"] / singles[best],
        "memory_proportional_vs_planner": results[2]["tpot_ms"] / results[0]["tpot_ms"],
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    keys = ("single_machine_tpot_ms", "planner_vs_best_single", "memory_proportional_vs_planner")
    print(json.dumps({k: out[k] for k in keys}, indent=2))


def _one_node_file(root: Path) -> Path:
    """A cluster file big enough for any model: `plan --json` then reports its layers."""
    path = root / "one.json"
    path.write_text(json.dumps({"nodes": [{"name": "x", "memory": "100T"}]}))
    return path


if __name__ == "__main__":
    main()
