"""The Triton int4 matmul (node/engine/models/int4_triton.py) against tinygemm and bfloat16.

For each weight (N, K) of Llama 1B/8B/70B layers and M = 1..16 rows: µs per call and TB/s
(bytes of the format's weight, scales and zeros / time) of ours, PyTorch's tinygemm
(`_weight_int4pack_mm`, packed as Int4Linear does) and bfloat16 F.linear. Each call reads a
different copy of the weight (copies summing to > 256 MB) so the 50 MB L2 never holds it.
Times: a CUDA graph of 100 calls replayed (no launch cost; the median of 5 replays), and
eager calls timed by CUDA events. The bound: the weight's bytes at the bandwidth a large
device-to-device copy reaches. `--sweep` times alternative configs per shape (checked
against float32 first; a config that fails to compile or is wrong is recorded and skipped)
and prints the best, to tune int4_triton.config_for; `--budget` caps the sweep's seconds.

    python3 bench/int4_kernel_bench.py --sweep --out bench/results/int4_kernel_h100.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from node.engine.models import int4_triton as it  # noqa: E402
from node.engine.models.quantized import pack_int4  # noqa: E402

SHAPES = [(2048, 8192), (8192, 2048), (6144, 4096), (4096, 14336), (28672, 4096),
          (14336, 4096), (8192, 28672)]  # fmt: skip
ROWS = [1, 2, 4, 8, 16]
CALLS = 100
ROTATE_BYTES = 256 << 20
TINYGEMM = torch.ops.aten._weight_int4pack_mm


def graph_us(fns: list) -> float:
    """µs per call: CALLS calls (cycling through fns) captured once, median of 5 replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns[:3]:
            f()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS):
            fns[i % len(fns)]()
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    del graph
    return sorted(times)[2]


def eager_us(fns: list, calls: int = 200) -> float:
    for f in fns[:3]:
        f()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(calls):
        fns[i % len(fns)]()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def copy_tb_s() -> float:
    """Device memory bandwidth as a 1 GiB copy sees it (bytes read + written)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us = eager_us([lambda: b.copy_(a)], 20)
    return 2 * a.numel() / us / 1e6


def timed(fns: list, nbytes: int, eager: bool = True) -> dict:
    out = {"us": graph_us(fns)}
    out["tb_s"] = nbytes / out["us"] / 1e6
    if eager:
        out["eager_us"] = eager_us(fns)
    return out


def candidates(m: int, n: int, k: int, sms: int) -> list[it.Config]:
    """Alternatives to config_for: both paths, block shapes, warps, split-K targets."""
    shapes = []
    if m <= 4:
        shapes += [(128, 64, 1, 2, False), (256, 64, 2, 2, False), (512, 64, 4, 2, False),
                   (256, 128, 2, 2, False), (128, 128, 1, 2, False), (256, 32, 2, 3, False),
                   (256, 64, 4, 3, False)]  # fmt: skip
    if m >= 2:
        shapes += [(64, 128, 4, 2, True), (128, 128, 4, 2, True), (128, 64, 4, 3, True),
                   (64, 256, 4, 2, True), (128, 256, 8, 2, True), (256, 64, 8, 2, True),
                   (64, 64, 4, 4, True)]  # fmt: skip
    out = []
    for bn, bk, warps, stages, dot in shapes:
        for per_sm in (1, 2, 4, 8):
            split = it.split_for(n, k, bn, bk, per_sm * sms)
            out.append(it.Config(bn, bk, split, warps, stages, dot))
        if dot:
            split = it.split_for(n, k, bn, bk, 4 * sms)
            out.append(it.Config(bn, bk, split, warps, stages, dot, swap=False))
    return list(dict.fromkeys(out))


def bench_shape(n: int, k: int, args: argparse.Namespace, sms: int, until: float) -> list[dict]:
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, device="cuda")
    scales = torch.rand(n, k // 32, device="cuda") * 0.02 + 0.001
    zeros = torch.randn(n, k // 32, device="cuda") * 0.01
    deq = (codes.view(n, k // 32, 32).float() - 8) * scales[..., None] + zeros[..., None]
    deq = deq.view(n, k)
    int4_bytes = n * k // 2 + 2 * (n * k // 32) * 2  # codes, a 2-byte scale and zero a group
    copies = max(1, -(-ROTATE_BYTES // int4_bytes))
    first = it.pack(codes, scales, zeros, "cuda")
    ours = [first] + [it.Int4Packed(first.words.clone(), first.scales.clone(),
                                    first.zeros.clone(), first.acc, first.count, n, k)
                      for _ in range(copies - 1)]  # fmt: skip
    packed = pack_int4(codes, torch.device("cuda"))
    sz = torch.stack([scales.t(), zeros.t()], -1).to(torch.bfloat16).contiguous()
    tiny = [(packed.clone(), sz.clone()) for _ in range(copies)]
    bf16_copies = max(1, -(-ROTATE_BYTES // (2 * n * k)))
    dense = [deq.to(torch.bfloat16) for _ in range(bf16_copies)]
    rows = []
    for m in ROWS:
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        expected = x.float() @ deq.T
        tolerance = 0.03 * expected.abs().max().item()
        default = it.config_for(m, n, k, sms)
        row = {"n": n, "k": k, "m": m, "int4_bytes": int4_bytes, "bf16_bytes": 2 * n * k,
               "config": vars(default)}  # fmt: skip
        err = (it.matmul(x, ours[0]).float() - expected).abs().max().item()
        row["ours_max_err"], row["ours_ok"] = err, err <= tolerance
        row["ours"] = timed([lambda w=w, x=x: it.matmul(x, w) for w in ours], int4_bytes)
        row["tinygemm"] = timed([lambda p=p, s=s, x=x: TINYGEMM(x, p, 32, s) for p, s in tiny],
                                int4_bytes)  # fmt: skip
        row["bf16"] = timed([lambda d=d, x=x: F.linear(x, d) for d in dense], 2 * n * k)
        row["bound_us"] = int4_bytes / args.copy_tb_s / 1e6
        if args.sweep:
            sweep, best = [], None
            for c in candidates(m, n, k, sms):
                if time.perf_counter() > until:
                    row["sweep_cut"] = "budget spent"
                    break
                entry = {"config": vars(c)}
                try:
                    err = (it.matmul(x, ours[0], c).float() - expected).abs().max().item()
                    if not err <= tolerance:
                        raise ValueError(f"wrong: max error {err:.3g} > {tolerance:.3g}")
                    entry |= timed([lambda w=w, c=c, x=x: it.matmul(x, w, c) for w in ours],
                                   int4_bytes, eager=False)  # fmt: skip
                    if best is None or entry["us"] < best["us"]:
                        best = entry
                except Exception as e:  # a config that does not compile or is wrong
                    entry["error"] = f"{type(e).__name__}: {str(e)[:200]}"
                    torch.cuda.synchronize()
                sweep.append(entry)
            row["sweep"], row["best"] = sweep, best
        rows.append(row)
        best = row.get("best") or {}
        print(f"N={n:6d} K={k:6d} M={m:2d}  ours {row['ours']['us']:7.1f} µs "
              f"{row['ours']['tb_s']:.2f} TB/s (eager {row['ours']['eager_us']:.1f})  "
              f"tinygemm {row['tinygemm']['us']:7.1f} µs {row['tinygemm']['tb_s']:.2f}  "
              f"bf16 {row['bf16']['us']:7.1f} µs {row['bf16']['tb_s']:.2f}  "
              f"bound {row['bound_us']:.1f} µs  ok={row['ours_ok']}"
              + (f"  best {best['us']:.1f} µs {best['tb_s']:.2f} TB/s {best['config']}"
                 if best else ""), flush=True)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--sweep", action="store_true", help="time alternative configs")
    parser.add_argument("--budget", type=float, default=170, help="seconds the sweep may take")
    parser.add_argument("--shapes", help="N:K,N:K,... (default: the Llama layer list)")
    args = parser.parse_args()
    shapes = SHAPES
    if args.shapes:
        shapes = [tuple(int(v) for v in s.split(":")) for s in args.shapes.split(",")]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    args.copy_tb_s = copy_tb_s()
    out = {"benchmark": "int4 matmul, M = 1..16 rows: Triton (ours), tinygemm, bfloat16",
           "device": torch.cuda.get_device_name(), "sms": sms, "torch": torch.__version__,
           "triton": triton.__version__, "copy_tb_s": args.copy_tb_s, "calls_per_graph": CALLS,
           "rows": []}  # fmt: skip
    print(f"{out['device']}, {sms} SMs, copy {args.copy_tb_s:.2f} TB/s", flush=True)
    began = time.perf_counter()
    for i, (n, k) in enumerate(shapes):  # the sweep's budget shared out over the shapes
        until = began + args.budget * (i + 1) / len(shapes)
        out["rows"] += bench_shape(n, k, args, sms, until)
        torch.cuda.empty_cache()
    out["seconds"] = time.perf_counter() - began
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
