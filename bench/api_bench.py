"""The HTTP API against `generate --node` on one three-daemon loopback cluster.

Same prompt, same requester node, greedy, `--tokens` tokens with end-of-sequence ignored, the
two paths alternating `--repeats` times. Both are timed in this client process, by when each
token's message arrives: ZeroMQ TOKEN messages for `generate --node`'s protocol, server-sent
`data:` chunks for the API (streamed /v1/completions). TTFT counts from sending the request;
TPOT is (last arrival - first arrival) / (arrivals - 1), and the median gap between arrivals
is reported beside it (on a 2-core machine that runs three daemons and the client, the mean
catches every scheduling hiccup), with the requester daemon's CPU time per token on each path
(its stage's compute, the same on both, plus what answering the client costs). Medians over
runs; the goal is API TPOT within
2% of the CLI path's. Writes bench/results/api.json (or --out).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from ring_bench import PROMPT, ROOT, provenance, side_by_side, start_api_cluster, stop_cluster

sys.path.insert(0, str(ROOT))
from node.cluster.client import Client  # noqa: E402


def timed(arrivals: list[float], began: float) -> dict[str, float]:
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return {
        "ttft_ms": 1000 * (arrivals[0] - began),
        "tpot_ms": 1000 * (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1),
        "median_gap_ms": 1000 * statistics.median(gaps),  # robust to the other load's hiccups
        "arrivals": len(arrivals),
    }


def through_cli_protocol(address: str, tokens: int) -> tuple[dict, str]:
    """What `generate --node` does, timed at each TOKEN message."""
    with Client(address) as client:
        began, arrivals, text = time.perf_counter(), [], []
        for msg in client.generate(300, prompt=PROMPT, max_tokens=tokens, ignore_eos=True,
                                   sampling={"temperature": 0.0}):  # fmt: skip
            if msg.kind.value == "token":
                arrivals.append(time.perf_counter())
                text.append(msg.body["text"])
    return timed(arrivals, began), "".join(text)


def through_api(api: str, tokens: int) -> tuple[dict, str]:
    """A streamed /v1/completions, timed at each chunk that carries text."""
    host, port = api.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    began = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json"})  # fmt: skip
    response = conn.getresponse()
    arrivals, text = [], []
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        piece = json.loads(line[6:])["choices"][0]["text"]
        if piece:
            arrivals.append(time.perf_counter())
            text.append(piece)
    conn.close()
    return timed(arrivals, began), "".join(text)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/api.json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="api-bench-"))
    procs, addresses, apis = start_api_cluster(root)
    try:
        through_api(apis[-1], 8)  # warm both paths
        through_cli_protocol(addresses[-1], 8)
        runs: dict[str, list[dict]] = {"cli": [], "api": []}
        texts = set()
        for i in range(args.repeats):
            for name, go in (("cli", lambda: through_cli_protocol(addresses[-1], args.tokens)),
                             ("api", lambda: through_api(apis[-1], args.tokens))):  # fmt: skip
                before = cpu_s(procs[-1].pid)
                timing, text = go()
                timing["requester_cpu_ms_per_token"] = (
                    1000 * (cpu_s(procs[-1].pid) - before) / args.tokens
                )
                runs[name].append(timing)
                texts.add(text)
            cli, api = runs["cli"][-1], runs["api"][-1]
            print(f"repeat {i + 1}: generate --node {cli['tpot_ms']:.2f} ms/token (median gap "
                  f"{cli['median_gap_ms']:.2f}), API {api['tpot_ms']:.2f} "
                  f"({api['median_gap_ms']:.2f})", file=sys.stderr)  # fmt: skip
    finally:
        stop_cluster(procs)
        shutil.rmtree(root, ignore_errors=True)

    keys = ["tpot_ms", "median_gap_ms", "ttft_ms", "requester_cpu_ms_per_token"]
    result = {
        **provenance(),
        "tokens": args.tokens,
        "repeats": args.repeats,
        **side_by_side(runs, keys),
        "same_text": len(texts) == 1,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
