"""CurveZMQ's cost: the same three-daemon ring with and without a cluster secret.

Both clusters (pinned thirds of the default model, on loopback) are up at once, and greedy
generations of `--tokens` tokens alternate between them `--repeats` times, so that the
machine's drift falls on both alike. Per run: time per token as the requester measures it,
the per-hop latency left after the stages' compute (as ring_bench.py), and the bytes the
daemons hand ZeroMQ per token (CURVE adds a 16-byte MAC and a little framing to each
message on the wire, which this does not count). Medians; the goal is at most 3% slower.
Writes bench/results/curve.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from ring_bench import (
    CLI,
    PROMPT,
    ROOT,
    model_config,
    pinned_thirds,
    provenance,
    ring_run,
    run_plain,
    side_by_side,
    start_cluster,
    stop_cluster,
)

ENV = "RINGINFER_SECRET_FILE"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/curve.json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="curve-bench-"))
    key = root / "cluster.key"
    run_plain([*CLI, "secret", str(key)])
    flags = pinned_thirds(model_config([]).n_layers)
    common = ["--json", "--ignore-eos", "--max-tokens", str(args.tokens), PROMPT]
    os.environ.pop(ENV, None)
    clusters = {}
    procs = []
    try:
        for name in ("plain", "curve"):
            if name == "curve":
                os.environ[ENV] = str(key)  # its daemons and clients find the secret here
            started, addresses = start_cluster(root / name, flags)
            procs += started
            clusters[name] = addresses
            os.environ.pop(ENV, None)
        runs: dict[str, list[dict]] = {"plain": [], "curve": []}
        for i in range(args.repeats):
            for name in ("plain", "curve") if i % 2 == 0 else ("curve", "plain"):
                if name == "curve":
                    os.environ[ENV] = str(key)
                runs[name].append(ring_run(clusters[name], common))
                os.environ.pop(ENV, None)
            print(f"repeat {i + 1}: plain {runs['plain'][-1]['tpot_ms']:.2f} ms/token, "
                  f"CURVE {runs['curve'][-1]['tpot_ms']:.2f}", file=sys.stderr)  # fmt: skip
    finally:
        os.environ.pop(ENV, None)
        stop_cluster(procs)
        shutil.rmtree(root, ignore_errors=True)

    result = {
        **provenance(),
        "tokens": args.tokens,
        "repeats": args.repeats,
        **side_by_side(runs, ["tpot_ms", "per_hop_ms", "ring_bytes_per_token"]),
        "same_tokens": all(r["tokens"] == runs["plain"][0]["tokens"]
                           for r in runs["plain"] + runs["curve"]),  # fmt: skip
        "runs": {n: [{k: v for k, v in r.items() if k not in ("tokens", "plan")} for r in rs]
                 for n, rs in runs.items()},  # fmt: skip
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
