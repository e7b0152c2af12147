"""What this node can do, measured: the planner's inputs about one machine.

Decoding a token streams every weight once through a matrix-vector product, so the rate
that matters most is the bytes per second our own `Linear` reaches on one row ("bandwidth");
prefill and big batches are bound by matmul FLOP/s. Both are timed at start-up for the
device and dtype the daemon computes in (about a second), and cached in the data dir: a
restart reuses them unless the hardware, the thread count or the software changed.
Free memory is read fresh every time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from node import __version__
from node.engine.local import available_memory
from node.engine.models import family_named
from node.engine.models.linear import Linear
from node.engine.models.quantized import fill_random, swap_modules
from node.errors import RinginferError
from node.json_file import write_json

CACHE_FILE = "capabilities.json"
MEASURE_S = 0.4  # per measurement, after a warm-up


@dataclass(frozen=True)
class Capabilities:
    device: str  # cpu, cuda or mps
    device_name: str
    memory_total: int  # bytes
    memory_available: int  # bytes free for weights when measured
    flops: float  # matmul FLOP/s at the compute dtype
    bandwidth: float  # bytes of weights per second through a one-row product
    layer_overhead_s: float = 0.0  # fixed cost of one decoder layer's ~20 small kernels
    layer_s: float = 0.0  # one layer of the served model per decode step; 0: not measured

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Capabilities:
        """From a peer's HELLO or a cache file; missing or bad fields get safe defaults."""

        def num(key: str, default: float) -> float:
            v = data.get(key)
            return float(v) if type(v) in (int, float) and v > 0 else default

        return cls(
            device=str(data.get("device", "?"))[:16],
            device_name=str(data.get("device_name", ""))[:80],
            memory_total=int(num("memory_total", 0) or 0),
            memory_available=int(num("memory_available", 0) or 0),
            flops=num("flops", 0.0),
            bandwidth=num("bandwidth", 0.0),
            layer_overhead_s=num("layer_overhead_s", 0.0),
            layer_s=num("layer_s", 0.0),
        )


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple GPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({torch.get_num_threads()} threads)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def total_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def synchronizer(device: torch.device) -> Any:
    """What waits for `device` to finish queued work, so timings cover it."""
    syncs = {"cuda": torch.cuda.synchronize, "mps": lambda: torch.mps.synchronize()}
    return syncs.get(device.type, lambda: None)


def _timed(fn: Any, device: torch.device) -> float:
    """Seconds per call of `fn`, run for about MEASURE_S after one warm-up call."""
    sync = synchronizer(device)
    fn()
    sync()
    calls, began = 0, time.perf_counter()
    while time.perf_counter() - began < MEASURE_S:
        fn()
        calls += 1
    sync()
    return (time.perf_counter() - began) / calls


@torch.inference_mode()
def measure_compute(device: torch.device, dtype: torch.dtype) -> tuple[float, float, float]:
    """(matmul FLOP/s, one-row weight bandwidth in bytes/s, seconds of fixed cost per
    decoder layer) on `device` at `dtype`."""
    big = device.type != "cpu"
    n = 4096 if big else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    flops = 2 * n**3 / _timed(lambda: a @ b, device)
    # A weight well beyond the caches, laid out and multiplied as our decoder layers are.
    rows, cols = (8192, 16384) if big else (2048, 8192)
    layer = Linear(rows, cols, False, device.type).to(device=device, dtype=dtype)
    torch.nn.init.normal_(layer.weight)
    x = torch.randn(1, 1, rows, device=device, dtype=dtype)
    bandwidth = (
        layer.weight.numel() * layer.weight.element_size() / _timed(lambda: layer(x), device)
    )
    # What a layer costs beyond its weights: a decoder layer launches about 20 kernels
    # (norms, projections, RoPE, cache writes, attention, residuals) on one position.
    h = torch.randn(1, 1, 64, device=device, dtype=dtype)
    w = torch.randn(64, 64, device=device, dtype=dtype)

    def small_kernels() -> torch.Tensor:
        y = h
        for _ in range(10):
            y = (y @ w) * 0.5
        return y

    overhead = _timed(small_kernels, device)
    return flops, bandwidth, overhead


LAYER_STEPS = 16  # decode steps timed (after as many untimed)
PROBE_LAYERS = 4  # layers timed together, so their weights do not all sit in a CPU cache
MAX_PROBE_BYTES = 1 << 30  # bigger layers are not built just to time them (roofline instead)


@torch.inference_mode()
def measure_layer(
    family: Any,
    config: Any,
    device: torch.device,
    dtype: torch.dtype,
    fmt: str = "none",
    max_bytes: int = MAX_PROBE_BYTES,
) -> float:
    """Seconds one decoder layer of this model takes per decode step here: a few random
    layers, built as our stages build theirs (weights held in `fmt`), stepped one position at
    a time. Unlike the roofline from bandwidth and FLOP/s, this includes attention and every
    small kernel's real cost."""
    n = config.n_layers
    start = 1 if n > 2 else 0  # middle layers: no embedding, no head
    count = max(1, min(PROBE_LAYERS, n - 1 - start))
    with torch.device("meta"):
        stage = family.stage_cls(config, start, start + count, device.type)
        if sum(t.numel() for t in stage.state_dict().values()) * dtype.itemsize > max_bytes:
            return 0.0
        formats = swap_modules(stage, lambda key: fmt, device)
    weights = {
        k: torch.empty(t.shape, dtype=dtype, device=device).normal_(0, 0.02)
        for k, t in stage.state_dict().items()
    }
    stage.load_state_dict(weights, assign=True, strict=True)
    fill_random(stage, formats, device, dtype)
    stage.to_device(device)
    stage = stage.eval()
    x = torch.randn(1, 1, config.dim, device=device, dtype=dtype)
    if stage.is_first:
        x = torch.zeros(1, 1, dtype=torch.long, device=device)
    sync = synchronizer(device)
    # Two passes over the same positions, the first untimed: a GPU loads and picks kernels
    # the first time it meets each attention length, which costs more than the step.
    for _ in range(2):
        cache = stage.new_cache(1, LAYER_STEPS, dtype, device)
        times = []
        for pos in range(LAYER_STEPS):
            sync()
            began = time.perf_counter()
            stage(x, torch.tensor([pos], device=device), cache)
            sync()
            times.append(time.perf_counter() - began)
    return statistics.median(times) / count


def _measure_apart(
    device: torch.device, dtype: torch.dtype, model: tuple[str, Any, Any, str] | None, compute: bool
) -> dict[str, Any]:
    """Measure in a child process. Measuring here left the daemon's own process slower at
    every later decode step (allocator and thread-pool state after the big buffers are
    freed: ~20% on the 2-core VM for a single daemon), so nothing of it stays with us."""
    request = {
        "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "compute": compute,
        "family": model[1].name if model else None,
        "config": dataclasses.asdict(model[2]) if model else None,
        "format": model[3] if model else None,
    }  # fmt: skip
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "discovery.capabilities", json.dumps(request)],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if proc.returncode == 0:
            return json.loads(proc.stdout)
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    except (OSError, subprocess.TimeoutExpired, ValueError) as e:
        why = str(e)
    raise RinginferError(f"measuring {device} failed: {why}")


def _measure_here(request: dict[str, Any]) -> dict[str, Any]:
    """The child's side of `_measure_apart`."""
    torch.set_num_threads(request["threads"])
    device, dtype = torch.device(request["device"]), getattr(torch, request["dtype"])
    out: dict[str, Any] = {}
    if request["compute"]:
        flops, bandwidth, overhead = measure_compute(device, dtype)
        out["compute"] = {"flops": flops, "bandwidth": bandwidth, "layer_overhead_s": overhead}
    if request["family"]:
        family = family_named(request["family"])
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in request["config"].items()}
        config = family.config_cls(**fields)
        out["layer_s"] = measure_layer(family, config, device, dtype, request["format"])
    return out


def model_key_of(model: tuple[str, Any, Any, str]) -> str:
    name, _, config, fmt = model
    return f"{name}|{config.n_layers}|{config.dim}|{fmt}"


# How layers are timed; a new method makes older cached timings stale. 2: a GPU stage's
# decode steps replay CUDA graphs (node/engine/models/cuda_graph.py), 4x faster than eager;
# 3: a CPU stage's quantized layers decode in one C++ call each (cpu_decode.py), ~1.3x.
METHOD = 3


def cache_key(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "device": str(device), "name": device_name(device), "dtype": str(dtype),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "ringinfer": __version__,
        "method": METHOD,
    }  # fmt: skip


def load_or_measure(
    data_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    remeasure: bool = False,
    model: tuple[str, Any, Any, str] | None = None,
) -> tuple[Capabilities, bool]:
    """(capabilities, whether they were measured now rather than read from the cache).

    `model` is (name, family, config) of the model served: its layer is timed too, and
    cached per model."""  # fmt: skip
    key = cache_key(device, dtype)
    path = data_dir / CACHE_FILE
    cached: dict[str, Any] = {}
    if not remeasure:
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            cached = {}
    numbers = ("flops", "bandwidth", "layer_overhead_s")
    fresh = not (
        isinstance(cached, dict)
        and cached.get("key") == key
        and all(type(cached.get(k)) is float and cached[k] > 0 for k in numbers)
    )
    layers = cached.get("layer_s") if not fresh else None
    layers = layers if isinstance(layers, dict) else {}
    model_key = model_key_of(model) if model else ""
    need_layer = model is not None and type(layers.get(model_key)) is not float
    if fresh or need_layer:
        measured = _measure_apart(device, dtype, model if need_layer else None, fresh)
        if fresh:
            cached = {"key": key, **measured["compute"], "measured_at": time.time()}
        if need_layer:
            layers[model_key] = measured["layer_s"]
        cached["layer_s"] = layers
        fresh = True
        write_json(path, cached)
    caps = Capabilities(
        device=device.type,
        device_name=key["name"],
        memory_total=total_memory(device),
        memory_available=available_memory(device),
        flops=float(cached["flops"]),
        bandwidth=float(cached["bandwidth"]),
        layer_overhead_s=float(cached["layer_overhead_s"]),
        layer_s=float(layers.get(model_key, 0.0)) if model else 0.0,
    )
    return caps, fresh


if __name__ == "__main__":  # the measuring child: one JSON request in, one JSON result out
    print(json.dumps(_measure_here(json.loads(sys.argv[1]))))
