"""Three daemons on loopback against `generate --local` (default: SmolLM2, greedy, 128 tokens).

Both sides run as the user runs them: `ringinfer generate --local --json` and `ringinfer
generate --node ... --json` against three `ringinfer daemon` processes on this machine. The
two alternate `--repeats` times and each timing is the median. The daemons' own counters
(status --json) give the bytes each sent and their compute time per decode step, hence the
per-hop latency: (ring TPOT - sum of the stages' compute per decode step) / network hops.
Writes bench/results/ring.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.ports import free_port  # noqa: E402

CLI = [sys.executable, "-m", "node.cli"]
PROMPT = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle. "
    "The story should have a beginning, a middle and an end."
)
RING_KINDS = ("forward", "result", "end")  # what crosses the ring for a request


def run(*args: str) -> dict:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"{' '.join(args[:3])} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def pinned_thirds(n_layers: int) -> list[list[str]]:
    """`--layers` for three daemons holding a third each. The ring's cost is measured, not
    placement (placement_bench.py): the planner would rightly keep the model on one of three
    daemons sharing these cores, their compute measured at once being each other's load."""
    cuts = [round(i * n_layers / 3) for i in range(4)]
    return [["--layers", f"{a}:{b}"] for a, b in zip(cuts, cuts[1:], strict=False)]


def provenance() -> dict[str, str]:
    """Which code ran on which machine, for a result file."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=ROOT).stdout.strip()  # fmt: skip
    machine = f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or ''}"
    return {"commit": commit, "machine": machine}


def side_by_side(runs: dict[str, list[dict]], keys: list[str]) -> dict[str, float]:
    """Each side's median of each key (as `{side}_{key}`), and for the first key the
    second side's median over the first's (`{key}_ratio`... as `tpot_ratio`)."""
    (a, a_runs), (b, b_runs) = runs.items()
    out = {}
    for key in keys:
        for side, side_runs in ((a, a_runs), (b, b_runs)):
            out[f"{side}_{key}"] = statistics.median(r[key] for r in side_runs)
    first = keys[0]
    out[f"{first.removesuffix('_ms')}_ratio"] = out[f"{b}_{first}"] / out[f"{a}_{first}"]
    return out


def run_plain(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)


def start_cluster(root: Path, flags: list[list[str]]) -> tuple[list[subprocess.Popen], list[str]]:
    """One daemon per entry of `flags` on loopback (found by --peer), once their plan is live."""
    ports = [free_port() for _ in flags]
    root.mkdir(parents=True, exist_ok=True)
    procs = []
    for i, (port, extra) in enumerate(zip(ports, flags, strict=True)):
        cmd = [*CLI, "daemon", "--host", "127.0.0.1", "--port", str(port), "--name",
               f"node{i + 1}", "--data-dir", str(root / f"node{i + 1}"), "--peer",
               f"127.0.0.1:{ports[0]}", "--no-mdns", *extra]  # fmt: skip
        if "--api" not in extra:  # one machine: not three HTTP servers on one port
            cmd += ["--api", "off"]
        log = open(root / f"node{i + 1}.log", "w")  # noqa: SIM115 - the daemon writes it
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    addresses = [f"127.0.0.1:{p}" for p in ports]
    for a in addresses:
        run("status", "--node", a, "--json", "--wait", "300")
    while len({run("status", "--node", a, "--json")["epoch"] for a in addresses}) > 1:
        time.sleep(0.5)
    return procs, addresses


def start_api_cluster(root: Path) -> tuple[list[subprocess.Popen], list[str], list[str]]:
    """Three daemons holding pinned thirds of the default model, each with its API: their
    processes, ring addresses and API addresses."""
    config = model_config([])
    apis = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    flags = [[*pin, "--api", api]
             for pin, api in zip(pinned_thirds(config.n_layers), apis, strict=True)]  # fmt: skip
    return (*start_cluster(root, flags), apis)


def stop_cluster(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        p.wait(timeout=60)


def counters(addresses: list[str]) -> list[dict]:
    """Each daemon's own counters, with its name."""
    stats = []
    for a in addresses:
        status = run("status", "--node", a, "--json")
        me = next(n for n in status["nodes"] if n["id"] == status["node"])
        stats.append({**status["stats"], "name": me["name"]})
    return stats


def ring_run(addresses: list[str], common: list[str]) -> dict:
    before = counters(addresses)
    out = run("generate", "--node", addresses[-1], *common)
    after = counters(addresses)
    tokens = len(out["tokens"])
    decode_steps = tokens - 1
    ring_bytes = sum(
        a["bytes_sent"].get(k, 0) - b["bytes_sent"].get(k, 0)
        for a, b in zip(after, before, strict=True)
        for k in RING_KINDS
    )
    hops = (
        sum(
            a["messages_sent"].get(k, 0) - b["messages_sent"].get(k, 0)
            for a, b in zip(after, before, strict=True)
            for k in ("forward", "result")
        )
        / tokens
    )
    by_name = {
        a["name"]: 1000 * (a["decode_compute_s"] - b["decode_compute_s"])
        / max(1, a["decode_steps"] - b["decode_steps"])
        for a, b in zip(after, before, strict=True)
    }  # fmt: skip
    stage_ms = [
        {"name": p["name"], "layers": [p["start"], p["end"]], "decode_ms": by_name[p["name"]]}
        for p in out["plan"]
    ]
    tpot_ms = 1000 * out["tpot_s"]
    return {
        "tokens": out["tokens"],
        "ttft_ms": 1000 * out["ttft_s"],
        "tpot_ms": tpot_ms,
        "ring_bytes_per_token": ring_bytes / tokens,
        "network_hops_per_token": hops,
        "stage_decode_ms": stage_ms,
        "per_hop_ms": (tpot_ms - sum(by_name.values())) / max(hops, 1),
        "decode_steps": decode_steps,
        "plan": out["plan"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wire-dtype", default="auto")
    parser.add_argument("--secret", action="store_true",
                        help="give the cluster a secret: every connection CurveZMQ-encrypted")
    for flag in ("--device", "--dtype", "--threads", "--quantize"):
        parser.add_argument(flag, help="passed to the daemons and to --local alike")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/ring.json")
    args = parser.parse_args()
    engine = ["--model", args.model] if args.model else []
    for flag in ("device", "dtype", "threads", "quantize"):
        if getattr(args, flag):
            engine += [f"--{flag}", getattr(args, flag)]
    common = ["--json", "--ignore-eos", "--max-tokens", str(args.tokens), PROMPT]
    root = Path(tempfile.mkdtemp(prefix="ring-bench-"))
    if args.secret:  # daemons and the CLI's clients all find it in the environment
        run_plain([*CLI, "secret", str(root / "cluster.key")])
        os.environ["RINGINFER_SECRET_FILE"] = str(root / "cluster.key")
    config = model_config(engine)
    hidden_bytes = 2 * config.dim
    flags = [[*engine, "--wire-dtype", args.wire_dtype, *pin]
             for pin in pinned_thirds(config.n_layers)]  # fmt: skip
    procs, addresses = start_cluster(root, flags)
    try:
        local_runs, ring_runs = [], []
        run("generate", "--node", addresses[-1], "--json", "--max-tokens", "8", PROMPT)  # warm
        for i in range(args.repeats):
            local_runs.append(run("generate", "--local", *engine, *common))
            ring_runs.append(ring_run(addresses, common))
            print(f"repeat {i + 1}: local {1000 * local_runs[-1]['tpot_s']:.1f} ms/token, "
                  f"ring {ring_runs[-1]['tpot_ms']:.1f} ms/token", file=sys.stderr)  # fmt: skip
        predicted = run("status", "--node", addresses[-1], "--json")["predicted"]
    finally:
        stop_cluster(procs)
        shutil.rmtree(root, ignore_errors=True)

    def med(runs: list[dict], key: str, scale: float = 1.0) -> float:
        return statistics.median(r[key] * scale for r in runs)

    stage_ms = [r["stage_decode_ms"] for r in ring_runs]
    hops = 2  # stage-to-stage hops carrying hidden states in a three-stage ring
    ring_bytes = med(ring_runs, "ring_bytes_per_token")
    result = {
        **provenance(),
        "model": local_runs[0]["model"],
        "tokens": args.tokens,
        "repeats": args.repeats,
        "wire_dtype": args.wire_dtype,
        "secret": args.secret,
        "plan": ring_runs[0]["plan"],
        "local_tpot_ms": med(local_runs, "tpot_s", 1000),
        "ring_tpot_ms": med(ring_runs, "tpot_ms"),
        "predicted_tpot_ms": predicted["tpot_ms"],
        "tpot_ratio": med(ring_runs, "tpot_ms") / med(local_runs, "tpot_s", 1000),
        "local_ttft_ms": med(local_runs, "ttft_s", 1000),
        "ring_ttft_ms": med(ring_runs, "ttft_ms"),
        "ttft_ratio": med(ring_runs, "ttft_ms") / med(local_runs, "ttft_s", 1000),
        "per_hop_ms": med(ring_runs, "per_hop_ms"),
        "network_hops_per_token": med(ring_runs, "network_hops_per_token"),
        "stage_decode_ms": [
            {**stages[0], "decode_ms": statistics.median(s["decode_ms"] for s in stages)}
            for stages in zip(*stage_ms, strict=True)
        ],
        "ring_bytes_per_token": ring_bytes,
        "bytes_target": hops * hidden_bytes + 4096,
        "same_greedy_tokens": all(r["tokens"] == local_runs[0]["tokens"] for r in ring_runs),
        "runs": {"local": [{k: v for k, v in r.items() if k != "tokens"} for r in local_runs],
                 "ring": [{k: v for k, v in r.items() if k != "tokens"} for r in ring_runs]},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    keys = ("local_tpot_ms", "ring_tpot_ms", "tpot_ratio", "ttft_ratio", "per_hop_ms",
            "ring_bytes_per_token", "bytes_target", "same_greedy_tokens")  # fmt: skip
    print(json.dumps({k: result[k] for k in keys}, indent=2))


def model_config(engine: list[str]) -> Any:
    """The model's config, read the way the daemons read it."""
    from node.engine.weights import open_checkpoint

    return open_checkpoint(engine[1] if engine[:1] == ["--model"] else None).config


if __name__ == "__main__":
    main()
