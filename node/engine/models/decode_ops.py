"""The decode path's small ops on the CPU, fused in C++ (decode_ops.cpp, built by native.py).

At one position a step such ops cost more in PyTorch's fixed overheads than in arithmetic:
a decode step of the default model spent 2.3 of its 16 ms in RMSNorm's five kernels a call.
RMSNorm computes what PyTorch's computes, in float32, summed in another order; RoPE and the
quantized products compute exactly what the Python paths do, in one call each.
`RINGINFER_DECODE_OPS=0`, or a machine where they do not build, keeps PyTorch's ops.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from node.engine.models import native

SOURCE = Path(__file__).with_suffix(".cpp")
KERNEL_ENV = "RINGINFER_DECODE_OPS"  # "0": PyTorch's own ops only
# No fused multiply-adds where the source writes a product and a sum: RoPE rounds as
# PyTorch's separate ops do.
FLAGS = tuple((cflags + ["-ffp-contract=off"], link) for cflags, link in native.FLAGS)


@functools.cache
def ops() -> Any | None:
    """`torch.ops.ringinfer_decode`, or None where it is off or would not build (the first
    call builds it, once per CPU model, torch and Python version). The environment is read
    at the first call, not on every op of the hot path: `ops.cache_clear()` reads it anew."""
    if os.environ.get(KERNEL_ENV, "1") == "0":
        return None
    try:
        return native.build("ringinfer_decode", SOURCE, FLAGS)
    except Exception as e:  # no compiler, a compiler error: PyTorch's ops serve
        native.log.warning("decode ops off (they did not compile: %s): PyTorch's ops serve, "
                           "slower", native.first_error(str(e)))  # fmt: skip
        return None
