"""How much of a CUDA decode step is launch overhead, and what the engine's graphs take off.

A random Llama-3.2-1B as one stage on the GPU, bfloat16 and int4. `probe`, eager
(RINGINFER_CUDA_GRAPHS=0): the step's wall time (host clock around a sync, 100 steps), the
GPU's kernel time in it (profiler, 10 steps) and its kernel count, then the same step
captured by hand as a CUDA graph at a fixed position and replayed (200 replays), and whether
the replay's logits equal the eager step's bit for bit. `engine`: greedy generation through
LocalPipeline with the engine's own graphs (node/engine/models/cuda_graph.py) and without,
ms per decode token ((t(N tokens) - t(1 token)) / (N - 1)), and how many tokens agree.

    python bench/cuda_graph_probe.py --out bench/results/cuda_graph_probe_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quant_bench import random_llama  # noqa: E402

from node.engine import shapes  # noqa: E402
from node.engine.local import LocalPipeline, generate  # noqa: E402
from node.engine.models import cuda_graph  # noqa: E402
from node.engine.models.attention import Part  # noqa: E402
from node.engine.sampling import SamplingParams  # noqa: E402
from node.engine.weights import open_checkpoint  # noqa: E402

CUDA = torch.device("cuda")


def timed(fn, n: int) -> float:  # noqa: ANN001
    """Milliseconds a call, host clock around a device sync."""
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - began) / n * 1e3


def probe(path: str, fmt: str) -> dict:
    os.environ[cuda_graph.ENV] = "0"  # the eager step, and graphs captured here by hand
    stage = LocalPipeline(open_checkpoint(path), (), CUDA, torch.bfloat16, quantize=fmt).stages[0]
    cache = stage.new_cache(1, 1024, torch.bfloat16, CUDA)
    token = torch.tensor([[5]], device=CUDA)
    with torch.inference_mode():
        stage.run(torch.arange(1, 65, device=CUDA)[None], [Part(cache, 0, 64)])

        def step() -> torch.Tensor:
            return stage.run(token, [Part(cache, cache.length, 1)], slice(-1, None))

        for _ in range(10):
            step()
        eager = timed(step, 100)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
        position = cache.length
        fixed = lambda: stage.run(token, [Part(cache, position, 1)], slice(-1, None))  # noqa: E731
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fixed()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = fixed()
        replay = timed(graph.replay, 200)
        same = torch.equal(fixed(), captured)
    return {"eager_ms": eager, "kernel_ms": sum(e.device_time for e in kernels) / 10 / 1e3,
            "kernels_per_step": len(kernels) / 10, "graph_replay_ms": replay,
            "graph_equals_eager": same}  # fmt: skip


def engine(path: str, fmt: str, tokens: int = 128) -> dict:
    """ms per decode token generating greedily with the engine's graphs and without."""
    pipeline = LocalPipeline(open_checkpoint(path), (), CUDA, torch.bfloat16, quantize=fmt)
    prompt, greedy = list(range(1, 65)), SamplingParams()

    def run(n: int) -> tuple[list[int], float]:
        torch.cuda.synchronize()
        began = time.perf_counter()
        session = pipeline.session(len(prompt) + n, greedy)
        out = list(generate(session, prompt, n, greedy, frozenset()))
        torch.cuda.synchronize()
        return out, time.perf_counter() - began

    out: dict = {}
    for graphs in ("0", "1", "0", "1"):  # alternating, the last of each kept
        os.environ[cuda_graph.ENV] = graphs
        run(tokens)
        first = min(run(1)[1] for _ in range(3))
        ids, total = run(tokens)
        out["graphs" if graphs == "1" else "eager"] = {
            "ms_per_token": (total - first) / (tokens - 1) * 1e3, "tokens": ids}
    same = sum(a == b for a, b in zip(out["graphs"].pop("tokens"), out["eager"].pop("tokens"),
                                      strict=True))  # fmt: skip
    out["tokens_equal"] = f"{same}/{tokens}"
    out["speedup"] = out["eager"]["ms_per_token"] / out["graphs"]["ms_per_token"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    args = parser.parse_args()
    path = random_llama(shapes.built_in("llama-3.2-1b")[0], Path(tempfile.mkdtemp()))
    out = {"benchmark": "CUDA decode step: eager, kernel time, graph replay",
           "model": "random Llama-3.2-1B, 16 layers + head, one stage, bfloat16 activations",
           "device": torch.cuda.get_device_name(), "torch": torch.__version__}  # fmt: skip
    for fmt in ("none", "int4"):
        out[fmt] = probe(path, fmt)
        print(fmt, out[fmt], flush=True)
        torch.cuda.empty_cache()
        out[f"engine_{fmt}"] = engine(path, fmt)
        print("engine", fmt, out[f"engine_{fmt}"], flush=True)
        torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
