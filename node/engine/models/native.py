"""C++ kernels compiled for the running CPU at first use and cached: what PyTorch's own ops
lack or do slowly here (MXFP4 matmuls, the decode path's small fused ops).

A library is built once per source, CPU model, torch and Python version (~5 s, into
$RINGINFER_CACHE or ~/.cache/ringinfer) and loaded with `torch.ops.load_library`; its ops
are then `torch.ops.<name>`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("ringinfer")

CACHE = Path(os.environ.get("RINGINFER_CACHE", Path.home() / ".cache" / "ringinfer"))
# Compiler and linker flags, best first: for this CPU and thread-parallel (at::parallel_for
# is OpenMP's), then a portable build for compilers that take neither.
FLAGS = ((["-O3", "-march=native", "-fopenmp"], ["-fopenmp"]), (["-O3"], []))


def build(name: str, source: Path, flags: tuple = FLAGS) -> Any:
    """`torch.ops.<name>` from `source`, built first if need be with the first of `flags`
    that compiles (a warning says when that is not the first); raises where none does."""
    text = source.read_bytes()
    errors = []
    for cflags, link in flags:
        parts = [torch.__version__, sys.version, platform.machine(), cpu_flags(), *cflags]
        digest = hashlib.sha256(text + repr(parts).encode()).hexdigest()[:16]
        built = CACHE / f"{name.removeprefix('ringinfer_')}-{digest}"
        built /= name + (".pyd" if sys.platform == "win32" else ".so")
        try:
            if built.exists():
                torch.ops.load_library(built)
            else:
                _compile(name, source, cflags, link, built)
        except Exception as e:
            errors.append(e)
            continue
        if errors:
            log.warning("%s built without %s (%s): slower", name, " ".join(flags[0][0]),
                        first_error(str(errors[0])))  # fmt: skip
        return getattr(torch.ops, name)
    raise errors[0]


def _compile(name: str, source: Path, flags: list[str], link: list[str], built: Path) -> None:
    """Build and load the library, then move it to `built`: in a scratch folder of its own,
    so that processes starting together each build (torch's lock in a shared folder would
    hang every later start if one was killed while building), and none finds a half-written
    library."""
    from torch.utils import cpp_extension

    log.info("compiling %s (%s) into %s, once", source.name, " ".join(flags), built.parent)
    built.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=built.parent) as scratch:
        library = cpp_extension.load(name, [str(source)], extra_cflags=flags,
                                     extra_ldflags=link, build_directory=scratch,
                                     is_python_module=False)  # fmt: skip
        os.replace(library, built)


def cpu_flags() -> str:
    """What the compiler's -march=native sees: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keys = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.startswith(keys)}))


def first_error(message: str) -> str:
    """The compiler's first diagnostic (or a missing tool) out of torch's build log."""
    lines = [line.strip() for line in message.splitlines() if line.strip()] or ["no message"]
    said = (line for line in lines if "error:" in line or "not found" in line)
    return next(said, lines[0])[:200]
