"""MXFP4 experts on the CPU: the kernel that reads the codes (node/engine/models/mxfp4.cpp)
against dequantizing them per call, int4 and bfloat16 on the same shapes.

One gpt-oss-20b expert's matrices, gate_up 5760x2880 and down 2880x2880, random weights,
float32 rows in as a CPU stage sends them (bfloat16 for `bfloat16`), per call:
- `mxfp4`: Mxfp4Linear with its kernel (up to 64 rows; dequantized tiles and a GEMM above);
  `mxfp4_bf16_rows` the same with bfloat16 rows (its GEMMs then take bfloat16 tiles);
- `dequantize`: Mxfp4Linear with RINGINFER_MXFP4_KERNEL=0 (the exact fallback);
- `int4`: Int4Linear (PyTorch's int4 kernel, bfloat16 inside) on the same weights;
- `bfloat16`: F.linear with the weights in bfloat16.
Microseconds per call (median over rounds that alternate the paths, each round's own median),
and GB/s of the weight bytes each path holds and reads. `compile_s`: the kernel's first use in
a fresh cache (a child process) less a later one's. Writes bench/results/mxfp4.json (or --out).
`--flags` builds the kernel with other compiler flags: an AVX2 machine's kernels on an
AVX-512 one are `ATEN_CPU_CAPABILITY=avx2 ... --flags "-O3 -mavx2 -mfma -fopenmp"`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
from node.engine.models import mxfp4  # noqa: E402
from node.engine.models.mxfp4 import KERNEL_ENV, Mxfp4Linear, quantize_mxfp4  # noqa: E402
from node.engine.models.quantized import Int4Linear, quantize  # noqa: E402

SHAPES = {"gate_up": (5760, 2880), "down": (2880, 2880)}  # gpt-oss-20b: [out, in]
CPU = torch.device("cpu")


def paths(n: int, k: int, rows: int) -> dict[str, tuple[Callable[[], object], int]]:
    """Each path's call and the weight bytes it reads."""
    w = torch.randn(n, k) * 0.02
    mx = Mxfp4Linear(k, n, False)
    mx.load([quantize_mxfp4(w)], CPU, torch.float32)
    int4 = Int4Linear(k, n, False, "cpu")
    int4.load([quantize(w, "int4")], CPU, torch.float32)
    wb = w.bfloat16()
    x = torch.randn(rows, k)
    xb = x.bfloat16()
    held = mx.codes.nbytes + mx.exponents.nbytes
    return {
        "mxfp4": (lambda: mx(x), held),
        "mxfp4_bf16_rows": (lambda: mx(xb), held),
        "dequantize": (lambda: mx(x), held),  # run with the kernel switched off
        "int4": (lambda: int4(x), int4.packed.nbytes + int4.scales_zeros.nbytes),
        "bfloat16": (lambda: F.linear(xb, wb), wb.nbytes),
    }


def timed(call: Callable[[], object], seconds: float) -> float:
    """Median microseconds of back-to-back calls for about `seconds`."""
    began = time.perf_counter()
    call()
    calls = max(5, int(seconds / max(time.perf_counter() - began, 1e-6)))
    times = []
    for _ in range(calls):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return 1e6 * statistics.median(times)


def measure(n: int, k: int, rows: int, rounds: int, seconds: float) -> dict:
    runs = paths(n, k, rows)
    samples: dict[str, list[float]] = {p: [] for p in runs}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, (call, _) in runs.items():
                if name == "dequantize":
                    os.environ[KERNEL_ENV] = "0"
                try:
                    samples[name].append(timed(call, seconds))
                finally:
                    os.environ.pop(KERNEL_ENV, None)
    out = {}
    for name, (_, held) in runs.items():
        us = statistics.median(samples[name])
        out[name] = {"us": us, "gb_per_s": held / us / 1e3, "weight_bytes": held,
                     "rounds_us": samples[name]}  # fmt: skip
    per_byte = {p: out[p]["us"] / out[p]["weight_bytes"] for p in out}
    out["mxfp4_vs_int4_time_per_byte"] = per_byte["mxfp4"] / per_byte["int4"]
    out["dequantize_vs_mxfp4"] = out["dequantize"]["us"] / out["mxfp4"]["us"]
    return out


def compile_seconds() -> dict:
    """The kernel's first use in a fresh cache and a later process's, each in a child."""
    script = (
        "import time; from node.engine.models import mxfp4; t = time.perf_counter(); "
        "mxfp4.build_kernel(); print(time.perf_counter() - t)"
    )
    env = {**os.environ, "RINGINFER_CACHE": tempfile.mkdtemp()}
    command = [sys.executable, "-c", script]
    first, later = (
        float(subprocess.check_output(command, cwd=BENCH.parent, env=env, text=True))
        for _ in range(2)
    )
    return {"first_use_s": first, "later_process_s": later, "compile_s": first - later}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,8,300", help="rows per call")
    parser.add_argument("--threads", default=str(torch.get_num_threads()), help="e.g. 1,2")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.2, help="per path and round")
    parser.add_argument("--out", default=str(BENCH / "results" / "mxfp4.json"))
    parser.add_argument("--flags", help="the kernel's compiler flags (default: this CPU's)")
    args = parser.parse_args()
    if args.flags:
        mxfp4.FLAGS = ((args.flags.split(), ["-fopenmp"] if "-fopenmp" in args.flags else []),)
    ops = mxfp4.build_kernel()
    report: dict = {
        "benchmark": "MXFP4 experts on the CPU: kernel, dequantize fallback, int4, bfloat16",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "kernel_isa": ops.isa(),
                    "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()},
        "kernel_flags": mxfp4.FLAGS[0][0],
        "kernel_build": compile_seconds() if not args.flags else None,
        "results": {},
    }  # fmt: skip
    print(f"kernel build: {report['kernel_build']}", file=sys.stderr)
    for threads in map(int, args.threads.split(",")):
        torch.set_num_threads(threads)
        for name, (n, k) in SHAPES.items():
            for rows in map(int, args.rows.split(",")):
                r = measure(n, k, rows, args.rounds, args.seconds)
                report["results"][f"{name} {n}x{k}, {rows} rows, {threads} threads"] = r
                print(f"{threads}t {name} M={rows}: "
                      + ", ".join(f"{p} {r[p]['us']:.0f} us ({r[p]['gb_per_s']:.1f} GB/s)"
                                  for p in r if isinstance(r[p], dict))
                      + f"; mxfp4/int4 per byte {r['mxfp4_vs_int4_time_per_byte']:.2f}",
                      file=sys.stderr, flush=True)  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
