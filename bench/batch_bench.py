"""Concurrent streams through three pinned daemons: aggregate decode tokens/s and each
stream's time per token, for 1, 2, 4, 8, 16 streams (default model, greedy, EOS ignored).

Each stream is a client of its own (the `generate --node` protocol, a thread each) on one of
the three daemons in turn, so requests come from every node, as a team's would. All streams
of a round start together; each is timed by its TOKEN messages' arrivals. A stream's time per
token is (last arrival - first) / (arrivals - 1); the aggregate is the tokens that arrived
while every stream was decoding, over that window. Rounds alternate over the stream counts
`--repeats` times; medians. The stages' mean decode batch is read from status. Writes
bench/results/batch.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from ring_bench import (
    ROOT,
    model_config,
    pinned_thirds,
    provenance,
    run,
    start_cluster,
    stop_cluster,
)

sys.path.insert(0, str(ROOT))
from node.cluster.client import Client  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a refrigerator keeps food cold, step by step.",
    "List ten uses for a paperclip and say which is the most surprising.",
    "Describe the water cycle to a ten-year-old.",
    "What should I pack for a week of hiking in the mountains?",
    "Summarize the plot of a detective novel you would like to read.",
    "Give me a recipe for bread that needs no kneading.",
    "Why is the sky blue? Answer in a paragraph.",
]


def stream(address: str, prompt: str, tokens: int, out: list[float]) -> None:
    with Client(address) as client:
        for msg in client.generate(600, prompt=prompt, max_tokens=tokens, ignore_eos=True,
                                   chat=True, sampling={"temperature": 0.0}):  # fmt: skip
            if msg.kind.value == "token":
                out.append(time.perf_counter())


def one_round(addresses: list[str], k: int, tokens: int) -> dict:
    arrivals: list[list[float]] = [[] for _ in range(k)]
    threads = [
        threading.Thread(target=stream, args=(addresses[i % len(addresses)],
                                              PROMPTS[i % len(PROMPTS)], tokens, arrivals[i]))
        for i in range(k)
    ]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(len(a) != tokens for a in arrivals):
        raise SystemExit(f"a stream ended early: {[len(a) for a in arrivals]}")
    tpots = [(a[-1] - a[0]) / (len(a) - 1) for a in arrivals]
    begin = max(a[0] for a in arrivals)  # every stream decoding from here ...
    end = min(a[-1] for a in arrivals)  # ... to here
    inside = sum(1 for a in arrivals for t in a if begin < t <= end)
    status = run("status", "--node", addresses[0], "--json")
    return {
        "streams": k,
        "aggregate_tokens_per_s": inside / (end - begin) if end > begin else k / tpots[0],
        "stream_tpot_ms": 1000 * statistics.median(tpots),
        "worst_stream_tpot_ms": 1000 * max(tpots),
        "mean_batch": [n["batch"] for n in status["nodes"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--streams", default="1,2,4,8,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    for flag in ("--device", "--dtype", "--threads", "--quantize", "--prefill-chunk"):
        parser.add_argument(flag, help="passed to the daemons")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/batch.json")
    args = parser.parse_args()
    engine = ["--model", args.model] if args.model else []
    for flag in ("device", "dtype", "threads", "quantize", "prefill_chunk"):
        if getattr(args, flag):
            engine += [f"--{flag.replace('_', '-')}", getattr(args, flag)]
    counts = [int(k) for k in args.streams.split(",")]
    config = model_config(engine)
    root = Path(tempfile.mkdtemp(prefix="batch-bench-"))
    procs, addresses = start_cluster(
        root, [[*engine, *pin] for pin in pinned_thirds(config.n_layers)]
    )
    rounds: dict[int, list[dict]] = {k: [] for k in counts}
    try:
        one_round(addresses, max(counts), 8)  # warm every code path and batch size
        predicted = run("status", "--node", addresses[0], "--json")["predicted"]
        for i in range(args.repeats):
            for k in counts:
                rounds[k].append(one_round(addresses, k, args.tokens))
                r = rounds[k][-1]
                print(f"repeat {i + 1}, {k} streams: {r['aggregate_tokens_per_s']:.1f} tokens/s,"
                      f" {r['stream_tpot_ms']:.1f} ms/token a stream, batches {r['mean_batch']}",
                      file=sys.stderr)  # fmt: skip
    finally:
        stop_cluster(procs)
        shutil.rmtree(root, ignore_errors=True)
    keys = ("aggregate_tokens_per_s", "stream_tpot_ms", "worst_stream_tpot_ms")
    rows = [
        {"streams": k, **{key: statistics.median(r[key] for r in rounds[k]) for key in keys},
         "mean_batch": rounds[k][-1]["mean_batch"]}
        for k in counts
    ]  # fmt: skip
    one = rows[0]
    for row in rows:
        row["speedup"] = row["aggregate_tokens_per_s"] / one["aggregate_tokens_per_s"]
        row["tpot_ratio"] = row["stream_tpot_ms"] / one["stream_tpot_ms"]
    result = {
        **provenance(),
        "model": args.model or "default (SmolLM2-135M-Instruct GGUF)",
        "engine": engine,
        "tokens": args.tokens,
        "repeats": args.repeats,
        "predicted": predicted,
        "rows": rows,
        "runs": {str(k): v for k, v in rounds.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(f"{row['streams']:>3} streams: {row['aggregate_tokens_per_s']:7.1f} tokens/s "
              f"({row['speedup']:.2f}x), {row['stream_tpot_ms']:.1f} ms/token a stream "
              f"({row['tpot_ratio']:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
