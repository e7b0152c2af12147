"""One request's decode steps through a GPU stage, replayed as a CUDA graph (issue 24).

Eager, a decode step of a small model on an H100 is the host launching ~400 kernels: 9 ms
against 1.7 ms of kernel time (bench/cuda_graph_probe.py). A graph launches them in one
call. It replays fixed addresses, so what changes from step to step lives in device
tensors the captured kernels read: the position (a [1] tensor), from which the step's RoPE
row is gathered from tables over the whole cache, its keys and values are written into the
cache (`index_copy_`), and flash attention's key length is made. The cache's buffers are the
request's own, at fixed addresses for its life, so a graph belongs to one request's cache.

A request's first decode step runs this same computation eagerly; its second captures it
(two warm-up runs, idempotent: they write the step's keys and values in place) and every
later one replays it. So a graph's logits are those of the eager static step, bit for bit.
Prefill, batches of several requests and the layers this does not cover (sliding windows,
attention sinks, experts: they choose work on the host) stay eager. `RINGINFER_CUDA_GRAPHS=0`
keeps every step eager.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from node.engine.models.attention import Part

if TYPE_CHECKING:
    from node.engine.kv_cache import KVCache
    from node.engine.models.stage import Stage

ENV = "RINGINFER_CUDA_GRAPHS"  # "0": eager decode steps
WARMUP = 2  # runs on a side stream before capture, as torch.cuda.graphs asks


def usable(stage: Stage, x: torch.Tensor, parts: Sequence[Part], keep: Any) -> bool:
    """Whether this pass is one request's single decode position on a stage that can replay
    it: the static path's conditions (Stage.decode_static), the head's one row kept."""
    if not x.is_cuda or len(parts) != 1 or parts[0].count != 1 or not stage.static_decode:
        return False
    if parts[0].cache.dtype not in (torch.bfloat16, torch.float16):  # flash attention's
        return False
    if stage.is_last and keep is not None and not _one_row(keep):
        return False
    return os.environ.get(ENV, "1") != "0"


def _one_row(keep: Any) -> bool:
    if isinstance(keep, slice):
        return keep == slice(-1, None)
    return isinstance(keep, torch.Tensor) and keep.numel() == 1


class DecodeGraph:
    """The static inputs, RoPE tables and captured graph of one request's decode steps
    through one stage. `__call__` gives the stage's output for the step (hidden states, or
    the last stage's logits of its one row), a tensor of its own."""

    def __init__(self, stage: Stage, x: torch.Tensor, cache: KVCache) -> None:
        # The cache is not kept here: it holds this object (cache.graph), and a cycle would
        # keep the graph's memory on the GPU until Python's collector ran.
        self.stage = stage
        self.x = x.clone()
        self.position = torch.zeros(1, dtype=torch.long, device=x.device)
        self.tables = stage.decode_tables(cache.capacity, cache.dtype, x.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        self.steps = 0

    def run(self, cache: KVCache) -> torch.Tensor:
        """The step, eagerly."""
        return self.stage.decode_static(self.x, self.position, cache, self.tables)

    def __call__(self, x: torch.Tensor, position: int, cache: KVCache) -> torch.Tensor:
        self.x.copy_(x)
        self.position.fill_(position)
        self.steps += 1
        if self.graph is None:
            if self.steps == 1:  # a request may stop here: no capture for one step
                return self.run(cache)
            self._capture(cache)
        assert self.graph is not None and self.out is not None
        self.graph.replay()
        return self.out.clone()

    def _capture(self, cache: KVCache) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                self.run(cache)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a daemon's other threads may use the GPU meanwhile (a stage building)
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.out = self.run(cache)
        self.graph = graph


def decode(stage: Stage, x: torch.Tensor, part: Part) -> torch.Tensor:
    """The step of `part` (one position) through `stage`, by its cache's graph."""
    cache = part.cache
    if cache.graph is None:
        cache.graph = DecodeGraph(stage, x, cache)
    return cache.graph(x, part.start, cache)
