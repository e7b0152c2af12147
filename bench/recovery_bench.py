"""Recovery: seconds from a stage's death to the next streamed token, per model size.

Three daemons on loopback share the model (the throughput objective's balanced stages); a
greedy generation streams from the third (the requester) through its HTTP API, and at token
`--kill-at` the first stage that is not the requester is SIGKILLed. The requester notices
after the dead bound (6 s of silence), the survivors re-plan and load the lost layers, and
the requester replays the request's history into the new ring; the next token then
streams. Each trial is a fresh cluster. Per model: the median recovery, the median time per
token before the kill, and from the requester's log when it noticed and when the new plan
went live.

Models: the default SmolLM2-135M (GGUF), and random-weight SmolLM2-360M and SmolLM2-1.7B
(built-in shapes, the default model's tokenizer; no such weights are offline, and recovery
does not depend on their values). Writes bench/results/recovery.json (or --out).
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch
from ring_bench import ROOT, free_port, provenance, run, start_cluster, stop_cluster

from node.engine.shapes import BUILT_IN
from node.engine.weights import default_model_path, open_checkpoint

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
RANDOM = ["HuggingFaceTB/SmolLM2-360M", "HuggingFaceTB/SmolLM2-1.7B"]


def random_model(name: str, root: Path) -> Path:
    """A Hugging Face directory of a built-in SmolLM2 shape: random bfloat16 weights, and
    the default model's tokenizer (the same vocabulary)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    path = root / name.rpartition("/")[2]
    model = AutoModelForCausalLM.from_config(LlamaConfig(**BUILT_IN[name]), dtype=torch.bfloat16)
    model.save_pretrained(path)
    gguf = default_model_path()
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(path)
    return path


def stream(api: str, tokens: int, on_token: object) -> list[float]:
    """A greedy streamed completion; when each token's text came. `on_token(i)` is called
    after the i-th."""
    host, port = api.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json"})  # fmt: skip
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit(f"the API answered {response.status}: {response.read()[:300]}")
    times = []
    for line in response:
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            if "error" in event:
                raise SystemExit(f"the request failed: {event['error']}")
            if event["choices"][0]["text"]:
                times.append(time.monotonic())
                on_token(len(times))
    return times


def phases(log: str, victim: str, wall_at_kill: float) -> dict[str, float | None]:
    """Seconds after the kill at which the requester's log says it noticed and had a plan."""

    def when(pattern: str) -> float | None:
        for line in log.splitlines():
            try:
                t = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                continue
            if t >= wall_at_kill - 0.5 and re.search(pattern, line):
                return round(t - wall_at_kill, 3)
        return None

    noticed = when(rf"member {victim} .*(silent|left)")
    return {"noticed_s": noticed, "plan_live_s": when(r"plan epoch \d+ live")}


def victim_of(address: str) -> int:
    """The index (0-2) of the stage to kill: the earliest one that is not the requester."""
    status = run("status", "--node", address, "--json")
    stages = sorted((n["layers"][0], n["name"]) for n in status["nodes"] if n["layers"])
    others = [name for _, name in stages if name != "node3"]
    if not others:
        raise SystemExit(f"the plan keeps the model on the requester alone: {stages}")
    return int(others[0].removeprefix("node")) - 1


def trial(model: list[str], root: Path, tokens: int, kill_at: int) -> dict:
    api = f"127.0.0.1:{free_port()}"
    # Not pinned: the survivors must be free to take the lost layers. throughput: on one
    # machine's equal daemons latency would rightly keep the model on one of them.
    flags = [[*model, "--objective", "throughput"] for _ in range(3)]
    flags[2] += ["--api", api]
    procs, addresses = start_cluster(root, flags)
    victim = victim_of(addresses[2])
    killed: dict[str, float] = {}

    def on_token(i: int) -> None:
        if i == kill_at:
            procs[victim].send_signal(signal.SIGKILL)
            killed["t"], killed["wall"] = time.monotonic(), time.time()

    try:
        times = stream(api, tokens, on_token)
    finally:
        procs[victim].kill()
        stop_cluster([p for i, p in enumerate(procs) if i != victim])
    before = [b - a for a, b in zip(times[: kill_at - 1], times[1:kill_at], strict=True)]
    log = (root / "node3.log").read_text()
    return {
        "recovery_s": round(times[kill_at] - killed["t"], 3),
        "tpot_before_ms": round(statistics.median(before) * 1e3, 2),
        "tokens": len(times),
        **phases(log, f"node{victim + 1}", killed["wall"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=80)
    parser.add_argument("--kill-at", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", default="default," + ",".join(RANDOM))
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/recovery.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="recovery-bench-"))
    results = {}
    try:
        for name in args.models.split(","):
            path = default_model_path() if name == "default" else random_model(name, work)
            ckpt = open_checkpoint(str(path))
            runs = []
            for i in range(args.repeats):
                root = work / f"{path.name}-{i}"
                runs.append(trial(["--model", str(path)], root, args.tokens, args.kill_at))
                print(f"{name}: {runs[-1]}", file=sys.stderr)
            results[name] = {
                "layers": ckpt.n_layers,
                "dim": ckpt.config.dim,
                "recovery_s": round(statistics.median(r["recovery_s"] for r in runs), 3),
                "tpot_before_ms": round(statistics.median(r["tpot_before_ms"] for r in runs), 2),
                "runs": runs,
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {**provenance(), "tokens": args.tokens, "kill_at": args.kill_at,
           "repeats": args.repeats, "dead_after_s": 6.0, "models": results}  # fmt: skip
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
