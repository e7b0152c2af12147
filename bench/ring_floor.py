"""The floor under the ring's time per token on one machine: three bare processes, no daemon.

Each process holds a third of the default model's layers (the same engine and weights the
daemons use) and passes the decode step's hidden state to the next over a ZeroMQ PAIR socket;
the last sends the greedy token back to the first. No event loop, no message codec, no
threads of ours: what remains of the ring's cost over one process chaining the same three
stages is the process boundary itself (hops, and stages that sit idle between their steps
while sharing the machine's cores). Writes bench/results/ring_floor.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.ring_bench import provenance  # noqa: E402

PROMPT = list(range(1, 9))  # eight token ids: the step's positions do not matter here
CAPACITY = 512


def load_thirds(threads: int, which: range):  # noqa: ANN201
    import torch

    torch.set_num_threads(threads)
    from node.engine.weights import load_stage, open_checkpoint

    ckpt = open_checkpoint(None)
    n = ckpt.n_layers
    bounds = [0, n // 3, 2 * n // 3, n]
    cpu = torch.device("cpu")
    return [load_stage(ckpt, bounds[i], bounds[i + 1], cpu, torch.float32, None, "auto")
            for i in which]  # fmt: skip


def decode(stages, caches, steps: int, hop=None) -> list[float]:  # noqa: ANN001
    """Greedy steps through `stages` (all three, or the first with `hop` carrying the rest)."""
    import torch

    ids, pos, times = torch.tensor([PROMPT]), torch.arange(len(PROMPT)), []
    with torch.inference_mode():
        for _ in range(steps):
            began = time.perf_counter()
            x = ids
            for stage, cache in zip(stages, caches, strict=True):
                x = stage(x, pos, cache, last_only=stage.is_last)
            tok = hop(x) if hop else int(x[0, -1].argmax())
            times.append(time.perf_counter() - began)
            ids, pos = torch.tensor([[tok]]), torch.tensor([int(pos[-1]) + 1])
    return times


def stage_process(i: int, threads: int, steps: int, addrs: list[str], out: mp.Queue) -> None:
    import torch
    import zmq

    (stage,) = load_thirds(threads, range(i, i + 1))
    cache = stage.new_cache(1, CAPACITY, torch.float32, torch.device("cpu"))
    ctx = zmq.Context()
    rx, tx = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    rx.bind(addrs[i])
    tx.connect(addrs[(i + 1) % 3])
    if i == 0:

        def hop(x: torch.Tensor) -> int:
            tx.send(x.numpy().tobytes(), copy=False)
            return int.from_bytes(rx.recv(), "little")

        out.put(decode([stage], [cache], steps, hop))
        return
    dim = stage.cfg.dim
    with torch.inference_mode():
        for step in range(steps):
            x = torch.frombuffer(bytearray(rx.recv()), dtype=torch.float32).view(1, -1, dim)
            start = 0 if step == 0 else len(PROMPT) + step - 1
            h = stage(x, torch.arange(start, start + x.shape[1]), cache, last_only=stage.is_last)
            if stage.is_last:
                tx.send(int(h[0, -1].argmax()).to_bytes(4, "little"))
            else:
                tx.send(h.numpy().tobytes(), copy=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads in each process (default: all cores)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/ring_floor.json")
    args = parser.parse_args()
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # as the daemon sets it
    import torch

    stages = load_thirds(args.threads, range(3))
    caches = [s.new_cache(1, CAPACITY, torch.float32, torch.device("cpu")) for s in stages]
    local = decode(stages, caches, args.steps)[20:]
    del stages, caches
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    sock_dir = Path(os.environ.get("TMPDIR", "/tmp"))
    addrs = [f"ipc://{sock_dir}/ring-floor-{os.getpid()}-{i}" for i in range(3)]
    procs = [ctx.Process(target=stage_process, args=(i, args.threads, args.steps, addrs, out))
             for i in range(3)]  # fmt: skip
    for p in procs:
        p.start()
    ring = []
    while not ring:
        if any(p.exitcode for p in procs):
            raise SystemExit("a stage process failed (its traceback is above)")
        try:
            ring = out.get(timeout=1)[20:]  # the first process's times
        except queue.Empty:
            continue
    for p in procs:
        p.join()
    result = {
        **provenance(),
        "threads": args.threads,
        "gomp_spincount": os.environ["GOMP_SPINCOUNT"],
        "steps": args.steps,
        "local_tpot_ms": 1000 * statistics.median(local),
        "bare_ring_tpot_ms": 1000 * statistics.median(ring),
    }
    result["tpot_ratio"] = result["bare_ring_tpot_ms"] / result["local_tpot_ms"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"one process {result['local_tpot_ms']:.2f} ms/token, three bare processes "
          f"{result['bare_ring_tpot_ms']:.2f} ({result['tpot_ratio']:.2f}x)")


if __name__ == "__main__":
    main()
