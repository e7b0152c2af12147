"""A new node fetching its layers from a peer, between two network namespaces: its transfer
rate against a raw TCP stream of the same bytes, and the time from its start to its serving.

- raw: in host 1 a bare Python socket writes the bytes (read from the model file, in the page
  cache) into one TCP connection; in host 2 another reads them all; and again writing them to
  a file and hashing them (SHA-256), which a fetch must do too.
- ringinfer: host 1 runs `daemon --model FILE`; host 2 a `daemon` without --model, pinned to
  every layer (`--layers 0:N`) so that it fetches every tensor of the model. Its log gives the
  fetch ("fetched X MiB in Ys") and the time from its start to "plan epoch E live".
  With the cluster secret (CurveZMQ on both sockets), as users run on a LAN; `--insecure`
  measures plain ZeroMQ.
- `--link 1gbit`: every host's network card is capped at that rate (a token bucket, tc tbf,
  both ways), as on a real LAN; without it the namespaces' veth pairs run as fast as the CPU
  copies, which on 2 cores the sender, the receiver and the kernel share.
- `--loopback`: both hosts on 127.0.0.1, no namespaces, for a machine without `ip` (such as
  a many-core GPU box, where the CPU no longer bounds the copy as on 2 cores).

Each repeat starts host 2 with an empty data dir (a new laptop): the join time includes its
first compute measurement. Medians. Needs root (ip netns). Writes bench/results/fetch.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from ring_bench import ROOT, provenance

sys.path.insert(0, str(ROOT))
from node.engine.manifest import build  # noqa: E402
from node.engine.weights import GGUFCheckpoint, stage_tensors  # noqa: E402
from tests.daemons import renamed_model  # noqa: E402
from tests.lan import Lan, require_netns  # noqa: E402

PORT = 7710
RAW_PORT = 7799
SERVE = """
import socket, sys
path, n = sys.argv[1], int(sys.argv[2])
s = socket.create_server(("0.0.0.0", int(sys.argv[3])))
with open(path, "rb") as f:
    data = f.read(n)
c, _ = s.accept()
c.sendall(data)
c.close()
"""
RECEIVE = """
import hashlib, socket, sys, time
n, keep = int(sys.argv[2]), len(sys.argv) > 4  # keep: write to a file and hash, as a fetch must
c = socket.create_connection((sys.argv[1], int(sys.argv[3])))
out, h = (open(sys.argv[4], "wb"), hashlib.sha256()) if keep else (None, None)
began, got = 0.0, 0
while got < n:
    b = c.recv(1 << 20)
    if not b:
        break
    began = began or time.perf_counter()  # from the first byte: the sender read the file first
    got += len(b)
    if keep:
        out.write(b)
        h.update(b)
if keep:
    out.close()
print(got, time.perf_counter() - began)
"""


def on(lan: Lan | None, i: int, *cmd: str) -> list[str]:
    """`cmd` as host i runs it: in its namespace, or here with --loopback."""
    return ["ip", "netns", "exec", lan.hosts[i], *cmd] if lan else list(cmd)


def address(lan: Lan | None, i: int) -> str:
    return lan.address(i) if lan else "127.0.0.1"


def raw_rate(lan: Lan | None, path: Path, n: int, keep: Path | None = None) -> float:
    """Bytes/s of one TCP stream from host 1 to host 2 (written to `keep` and hashed)."""
    server = subprocess.Popen(on(lan, 0, sys.executable, "-c", SERVE, str(path), str(n),
                                 str(RAW_PORT)))  # fmt: skip
    time.sleep(1.0)  # listening
    cmd = on(lan, 1, sys.executable, "-c", RECEIVE, address(lan, 0), str(n), str(RAW_PORT),
             *([str(keep)] if keep else []))  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()
    server.wait(timeout=60)
    got, seconds = int(out[0]), float(out[1])
    assert got == n, (got, n)
    return n / seconds


def daemon(lan: Lan | None, i: int, root: Path, args: list[str]) -> subprocess.Popen:
    log = open(root / f"h{i + 1}.log", "w")  # noqa: SIM115 - the daemon writes it
    cmd = on(lan, i, sys.executable, "-m", "node.cli", "daemon", "--port", str(PORT + i),
             "--name", f"h{i + 1}", "--data-dir", str(root / f"h{i + 1}"), "--api", "off",
             "--no-mdns", *args)  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def stamp(line: str) -> float:
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def wait_for(path: Path, pattern: str, timeout: float = 300) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in path.read_text().splitlines():
            if m := re.search(pattern, line):
                return m
        time.sleep(0.2)
    raise SystemExit(f"{path.name} never logged /{pattern}/:\n{path.read_text()[-3000:]}")


def join(lan: Lan | None, root: Path, model: Path, n_layers: int, security: list[str]) -> dict:
    """Host 2 joins with an empty data dir: its fetch, and its start to serving."""
    shutil.rmtree(root / "h2", ignore_errors=True)
    began = time.time()
    proc = daemon(lan, 1, root, [*security, "--peer", f"{address(lan, 0)}:{PORT}",
                                 "--layers", f"0:{n_layers}"])  # fmt: skip
    try:
        log = root / "h2.log"
        live = wait_for(log, rf"plan epoch \d+ live: layers 0-{n_layers}")
        fetched = wait_for(log, r"fetched ([\d.]+) MiB in ([\d.]+)s")
        started = wait_for(log, r"fetching [\d.]+ MiB for layers")
        return {
            "join_s": stamp(live.string) - began,
            "fetch_mib": float(fetched.group(1)),
            "fetch_s": float(fetched.group(2)),
            "fetch_rate": float(fetched.group(1)) * 2**20 / float(fetched.group(2)),
            "start_to_fetch_s": stamp(started.string) - began,
        }
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a GGUF file (default: the default model, "
                        "renamed: host 2 has the original installed)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--insecure", action="store_true", help="no cluster secret")
    parser.add_argument("--link", help="cap each host's link at this rate (tc units: 1gbit)")
    parser.add_argument("--loopback", action="store_true", help="both hosts on 127.0.0.1")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/fetch.json")
    args = parser.parse_args()
    if args.loopback and args.link:
        parser.error("--link shapes the namespaces' links: not with --loopback")
    if not args.loopback:
        require_netns()
    root = Path(tempfile.mkdtemp(prefix="fetch-bench-"))
    model = args.model or renamed_model(root / "default-renamed.gguf")
    manifest = build(model, model.name)
    ckpt = GGUFCheckpoint(model, model.name)
    n_layers = ckpt.n_layers
    n_bytes = sum(manifest.tensors[t].n_bytes for t in stage_tensors(ckpt, 0, n_layers))
    security = ["--insecure", "--host", "0.0.0.0"] if args.insecure else []
    if not args.insecure:
        subprocess.run([sys.executable, "-m", "node.cli", "secret", str(root / "cluster.key")],
                       check=True, cwd=ROOT)  # fmt: skip
        security = ["--secret-file", str(root / "cluster.key")]
    lan = None if args.loopback else Lan(2)
    holder = None
    try:
        for i in range(2 if args.link else 0):
            lan.shape(i, args.link)
        holder = daemon(lan, 0, root, [*security, "--model", str(model)])
        wait_for(root / "h1.log", r"plan epoch \d+ live")
        raw, kept, ours = [], [], []
        for i in range(args.repeats):
            raw.append(raw_rate(lan, model, n_bytes))
            kept.append(raw_rate(lan, model, n_bytes, root / "kept.bin"))
            ours.append(join(lan, root, model, n_layers, security))
            print(f"repeat {i + 1}: raw TCP {raw[-1] / 2**20:.0f} MiB/s (written and hashed: "
                  f"{kept[-1] / 2**20:.0f}), fetch "
                  f"{ours[-1]['fetch_rate'] / 2**20:.0f} MiB/s, joined in "
                  f"{ours[-1]['join_s']:.1f}s", file=sys.stderr)  # fmt: skip
    finally:
        if holder:
            holder.send_signal(signal.SIGTERM)
            holder.wait(timeout=60)
        if lan:
            lan.close()
        shutil.rmtree(root, ignore_errors=True)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in ours)

    raw_rate_med, kept_med = statistics.median(raw), statistics.median(kept)
    result = {
        **provenance(), "model": str(model), "secret": not args.insecure, "link": args.link,
        "hosts": "loopback" if args.loopback else "namespaces",
        "repeats": args.repeats, "bytes": n_bytes,
        "raw_tcp_mib_s": raw_rate_med / 2**20, "fetch_mib_s": med("fetch_rate") / 2**20,
        "fetch_vs_raw": med("fetch_rate") / raw_rate_med,
        "raw_tcp_written_hashed_mib_s": kept_med / 2**20,
        "fetch_vs_raw_written_hashed": med("fetch_rate") / kept_med,
        "join_to_serving_s": med("join_s"), "start_to_fetch_s": med("start_to_fetch_s"),
        "fetch_s": med("fetch_s"),
        "runs": {"raw_tcp_mib_s": [r / 2**20 for r in raw],
                 "raw_tcp_written_hashed_mib_s": [r / 2**20 for r in kept], "join": ours},
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
