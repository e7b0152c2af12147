"""What structured output costs: tokens/s of a reply kept to a JSON schema against free text,
through the API of one three-daemon loopback cluster (pinned thirds of the default model).

Both are streamed chat completions of the same question, greedy, `--tokens` tokens: free
text with end-of-sequence ignored, and a reply kept to a schema whose one string is longer
than `--tokens` can finish (so both run to the length). The constrained one pays for the
whole row of logits on the wire (the last stage hands it back instead of the argmax) and for
llguidance's mask at the requester. The two alternate `--repeats` times; TPOT as
api_bench.py times it, medians. The goal: constrained within 10% of free text.
Writes bench/results/structured.json (or --out).
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from api_bench import timed
from ring_bench import ROOT, provenance, side_by_side, start_api_cluster, stop_cluster

QUESTION = "Tell me a story about a lighthouse keeper, as JSON."
SCHEMA = {"type": "object", "properties": {"story": {"type": "string", "minLength": 4000}},
          "required": ["story"]}  # fmt: skip


def chat(api: str, tokens: int, constrained: bool) -> tuple[dict, str]:
    """One streamed chat completion, timed at each chunk that carries text."""
    host, port = api.split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    body: dict = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": tokens,
                  "temperature": 0, "stream": True}  # fmt: skip
    if constrained:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "story", "schema": SCHEMA}}
    else:
        body["ignore_eos"] = True
    began = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body),
                 {"Content-Type": "application/json"})  # fmt: skip
    response = conn.getresponse()
    arrivals, text = [], []
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        choices = json.loads(line[6:])["choices"]
        piece = choices[0]["delta"].get("content") if choices else None
        if piece:
            arrivals.append(time.perf_counter())
            text.append(piece)
    conn.close()
    return timed(arrivals, began), "".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/structured.json")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="structured-bench-"))
    procs, _, apis = start_api_cluster(root)
    try:
        for constrained in (False, True):  # warm both paths (the grammar's tokenizer too)
            chat(apis[-1], 8, constrained)
        runs: dict[str, list[dict]] = {"free": [], "schema": []}
        sample = ""
        for i in range(args.repeats):
            for name in runs:
                timing, text = chat(apis[-1], args.tokens, name == "schema")
                runs[name].append(timing)
                sample = text if name == "schema" else sample
            print(f"repeat {i + 1}: free {runs['free'][-1]['tpot_ms']:.2f} ms/token, schema "
                  f"{runs['schema'][-1]['tpot_ms']:.2f}", file=sys.stderr)  # fmt: skip
    finally:
        stop_cluster(procs)
        shutil.rmtree(root, ignore_errors=True)
    result = {**provenance(), "tokens": args.tokens, "repeats": args.repeats,
              **side_by_side(runs, ["tpot_ms", "median_gap_ms", "ttft_ms"]),
              "schema_reply_starts": sample[:80], "runs": runs}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
