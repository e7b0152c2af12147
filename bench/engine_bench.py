"""Single-process engine against transformers' generate (default: SmolLM2 on the CPU).

Each measurement runs in its own process, so neither side inherits the other's caches or
allocator state; the two sides alternate `--repeats` processes of 3 runs each (the first a
warm-up), and each timing is the median over all measured runs.
Writes bench/results/engine.json (or --out). Usage: python bench/engine_bench.py
[--tokens 128] [--threads N] [--dtype float32] [--device cpu] [--model PATH] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from node.engine.local import DTYPES, LocalPipeline, Timings, generate  # noqa: E402
from node.engine.sampling import SamplingParams  # noqa: E402
from node.engine.weights import Checkpoint, load_stage, open_checkpoint  # noqa: E402
from node.errors import RinginferError  # noqa: E402

PROMPT = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle. "
    "The story should have a beginning, a middle and an end, and it should be told in the "
    "first person, with vivid details about the sea, the weather and the keeper's daily routine."
)


def _prompt(ckpt: Checkpoint) -> list[int]:
    try:
        tok = ckpt.tokenizer()
    except RinginferError:  # a random-weight model without tokenizer files
        return [(7 * i) % ckpt.config.vocab_size for i in range(1, 56)]
    return tok.encode_prompt(PROMPT, True) if tok.chat_template else tok.encode(PROMPT)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ours(
    model: str | None, tokens: int, device: torch.device, dtype: torch.dtype, quantize: str
) -> dict:
    ckpt = open_checkpoint(model)
    prompt = _prompt(ckpt)
    pipeline = LocalPipeline(ckpt, (), device, dtype, quantize=quantize)
    runs = []
    for _ in range(RUNS_PER_PROCESS):
        timings = Timings()
        step = pipeline.session(len(prompt) + tokens, SamplingParams())
        out = list(generate(step, prompt, tokens, SamplingParams(), frozenset(), timings))
        runs.append(_result(len(prompt), timings, out))
    return runs[1:]  # the first run warms up allocator and kernels


def _hf_model(ckpt: Checkpoint, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if ckpt.path.suffix == ".gguf":
        hf = AutoModelForCausalLM.from_pretrained(
            ckpt.path.parent, gguf_file=ckpt.path.name, dtype=dtype
        )
    else:
        hf = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=dtype)
    return hf.to(device).eval()


def transformers_generate(
    model: str | None, tokens: int, device: torch.device, dtype: torch.dtype, quantize: str
) -> dict:
    from transformers.generation.streamers import BaseStreamer

    ckpt = open_checkpoint(model)
    prompt = _prompt(ckpt)
    hf = _hf_model(ckpt, device, dtype)
    # Both sides run the full length without stopping at EOS (ours: no stop ids). Not
    # min_new_tokens: that masks EOS logits and so changes which tokens greedy picks.
    hf.generation_config.eos_token_id = None

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.timings, self.prompt_seen, self.out = Timings(), False, []

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:  # generate() first hands the streamer the prompt
                self.prompt_seen = True
                return
            self.out.append(int(value.reshape(-1)[0]))  # .item() syncs the device
            self.timings.mark()

        def end(self) -> None:
            pass

    ids = torch.tensor([prompt], device=device)
    runs = []
    for _ in range(RUNS_PER_PROCESS):
        clock = Clock()
        _sync(device)
        clock.timings = Timings()
        with torch.inference_mode():
            hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=tokens,
                pad_token_id=0,
                do_sample=False,
                streamer=clock,
            )
        runs.append(_result(len(prompt), clock.timings, clock.out))
    return runs[1:]


def prefill_side_by_side(
    model: str | None, tokens: int, device: torch.device, dtype: torch.dtype, quantize: str
) -> dict:
    """Prefill alone, both engines in one process, alternating: the machine's drift (a shared
    CPU's speed moves by a fifth over tens of seconds) hits both sides alike."""
    ckpt = open_checkpoint(model)
    pipeline = LocalPipeline(ckpt, (), device, dtype)
    hf = _hf_model(ckpt, device, dtype)
    short = _prompt(ckpt)
    long = (short * (1 + 1000 // len(short)))[:1000]
    out = {}
    for prompt in (short, long):
        ids, positions = torch.tensor([prompt], device=device), torch.arange(len(prompt))
        times: dict[str, list[float]] = {"ours": [], "transformers": []}
        with torch.inference_mode():
            for _ in range(PREFILL_REPEATS):
                start = time.perf_counter()
                caches = pipeline.new_caches(len(prompt))
                pipeline.forward(ids, positions, caches, last_only=True)
                _sync(device)
                times["ours"].append(time.perf_counter() - start)
                start = time.perf_counter()
                hf(ids, logits_to_keep=1)
                _sync(device)
                times["transformers"].append(time.perf_counter() - start)
        medians = {k: statistics.median(v[1:]) for k, v in times.items()}  # first: warm-up
        out[f"{len(prompt)}_tokens"] = {
            "ours_s": medians["ours"],
            "transformers_s": medians["transformers"],
            "speedup": medians["transformers"] / medians["ours"],
        }
    return out


def stage_rss(model: str | None, start: int, end: int, quantize: str) -> dict:
    """Peak RSS of loading a stage (Linux /proc), from the moment the checkpoint is open."""
    ckpt = open_checkpoint(model)
    # One layer loaded and dropped first: the code that loading runs (torch's and numpy's
    # kernels, lazy imports) is paged in then, so what is measured is memory for weights.
    del_stage = load_stage(ckpt, start, start + 1, torch.device("cpu"), torch.float32,
                           quantize=quantize)  # fmt: skip
    del del_stage
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    before = _status_kib("VmRSS")
    stage = load_stage(ckpt, start, end, torch.device("cpu"), torch.float32, quantize=quantize)
    sum(float(t.float().sum()) for t in stage.state_dict(keep_vars=True).values())  # page in
    return {
        "layers": [start, end],
        "rss_before_load_mib": before / 1024,
        "peak_rss_mib": _status_kib("VmHWM") / 1024,
        "load_peak_growth_mib": (_status_kib("VmHWM") - before) / 1024,
    }


def _status_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split(field + ":")[1].split()[0])


def _result(prompt_tokens: int, timings: Timings, out: list[int]) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "new_tokens": len(out),
        "ttft_s": timings.ttft_s,
        "prefill_tokens_per_s": prompt_tokens / timings.ttft_s,
        "tpot_s": timings.tpot_s,
        "decode_tokens_per_s": timings.decode_tokens_per_s,
        "tokens": out,
    }


MEASURES = {"ours": ours, "transformers": transformers_generate}
RUNS_PER_PROCESS = 3
PREFILL_REPEATS = 8


def _child(args: argparse.Namespace) -> dict | list[dict]:
    torch.set_num_threads(args.threads)
    if args.child == "rss":
        start, end = map(int, args.layers.split(":"))
        return stage_rss(args.model, start, end, args.quantize)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    measure = prefill_side_by_side if args.child == "prefill" else MEASURES[args.child]
    return measure(args.model, args.tokens, device, dtype, args.quantize)


def _run_child(args: argparse.Namespace, *extra: str) -> dict | list[dict]:
    cmd = [sys.executable, __file__, "--tokens", str(args.tokens), "--threads", str(args.threads)]
    cmd += ["--dtype", args.dtype, "--device", args.device, "--quantize", args.quantize, *extra]
    if args.model:
        cmd += ["--model", args.model]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def _medians(runs: list[dict]) -> dict:
    """Each timing's median over all runs; tokens must agree across runs."""
    assert all(r["tokens"] == runs[0]["tokens"] for r in runs), "runs generated different tokens"
    timing_keys = ("ttft_s", "prefill_tokens_per_s", "tpot_s", "decode_tokens_per_s")
    out = {k: v for k, v in runs[0].items() if k not in timing_keys}
    out |= {k: statistics.median(r[k] for r in runs) for k in timing_keys}
    return out | {"tpot_s_all_runs": [round(r["tpot_s"], 5) for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quantize", default="none", help="our weights (transformers: float)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "engine.json"))
    parser.add_argument("--child", choices=[*MEASURES, "rss", "prefill"], help=argparse.SUPPRESS)
    parser.add_argument("--layers", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args)))
        return

    runs: dict[str, list[dict]] = {name: [] for name in MEASURES}
    for _ in range(args.repeats):
        for name in MEASURES:
            runs[name] += _run_child(args, "--child", name)
    o, t = _medians(runs["ours"]), _medians(runs["transformers"])
    n_layers = open_checkpoint(args.model).n_layers
    third = f"{n_layers // 3}:{2 * n_layers // 3}"
    report = {
        "benchmark": "single-process engine vs transformers generate, greedy, medians",
        "model": args.model or "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized)",
        "device": args.device,
        "dtype": args.dtype,
        "threads": args.threads,
        "new_tokens": args.tokens,
        "runs_each": args.repeats * (RUNS_PER_PROCESS - 1),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
            "torch": torch.__version__,
        },
        "ours": {k: v for k, v in o.items() if k != "tokens"},
        "transformers": {k: v for k, v in t.items() if k != "tokens"},
        "decode_speedup": o["decode_tokens_per_s"] / t["decode_tokens_per_s"],
        "prefill_speedup": o["prefill_tokens_per_s"] / t["prefill_tokens_per_s"],
        "same_greedy_tokens": o["tokens"] == t["tokens"],
        "prefill_side_by_side": _run_child(args, "--child", "prefill"),
        "target_decode_speedup": 1.5,
        "stage_peak_rss_mib": {
            "middle_third": _run_child(args, "--child", "rss", "--layers", third),
            "whole": _run_child(args, "--child", "rss", "--layers", f"0:{n_layers}"),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
