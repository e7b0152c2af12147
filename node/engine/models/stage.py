"""What every architecture's stage provides, so loaders and generators need not know which."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from node.engine.kv_cache import SPAN, KVCache
from node.engine.models import cuda_graph
from node.engine.models.attention import Part
from node.engine.models.linear import Linear


def embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    """An embedding table left uninitialised: its weights are loaded. (Initialising one on the
    meta device runs `normal_` through torch's Python reference ops and imports the compiler
    stack: over a second of start-up.)"""
    return nn.Embedding(
        num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim)
    )


class Stage(nn.Module):
    """Layers [start, end) of a model; `run(x, parts, keep)` runs them for a packed batch of
    requests, `forward(x, positions, cache, last_only)` for one.

    The first stage takes token ids [1, N], later ones hidden states [1, N, D]; the last
    returns logits, of the rows a sampler needs only.

    Subclasses build their modules in `__init__` (on the meta device while loading) for a
    device type, which decides weight layouts, and map each parameter to the Hugging Face
    checkpoint tensors it is made of with `checkpoint_names`.
    """

    # Whether `decode_static` serves this stage's decode steps (a CUDA graph replays them).
    static_decode = False

    def __init__(self, cfg: Any, start: int, end: int) -> None:
        super().__init__()
        self.cfg, self.start, self.end = cfg, start, end
        self.is_first, self.is_last = start == 0, end == cfg.n_layers

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, last_only: bool = False
    ) -> torch.Tensor:
        """One request's positions; the last stage's logits of the final one if `last_only`."""
        part = Part(cache, int(positions[0]), int(positions.shape[0]))
        return self.run(x, [part], slice(-1, None) if last_only else None)

    def run(
        self, x: torch.Tensor, parts: Sequence[Part], keep: torch.Tensor | slice | None = None
    ) -> torch.Tensor:
        """The packed positions of `parts`, in order; the last stage runs its head on the
        rows `keep` picks (None: all)."""
        for p in parts:
            p.cache.check_room(p.start, p.count)
        # One request's decode step on a GPU: a graph's replay, the head's row included.
        graphed = cuda_graph.usable(self, x, parts, keep)
        h = cuda_graph.decode(self, x, parts[0]) if graphed else self.layers_forward(x, parts)
        for p in parts:
            p.cache.advance(p.start, p.count)
        if graphed or not self.is_last:
            return h
        rows = h if keep is None else h[:, keep]
        return self.head(rows) if rows.shape[1] else rows  # no rows: a prompt's early chunk

    def layers_forward(self, x: torch.Tensor, parts: Sequence[Part]) -> torch.Tensor:
        """Embedding (first stage) and the owned layers, writing each part's keys/values."""
        raise NotImplementedError

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head (last stage)."""
        raise NotImplementedError

    def decode_tables(
        self, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, ...]:
        """What `decode_static` gathers a position's rows from, for positions < capacity."""
        raise NotImplementedError

    def decode_static(
        self, x: torch.Tensor, position: torch.Tensor, cache: KVCache,
        tables: tuple[torch.Tensor, ...],
    ) -> torch.Tensor:  # fmt: skip
        """One decode position of one request, read from the device tensor `position`: the
        layers and, on the last stage, the head; nothing comes from the host, so a CUDA graph
        can replay it (node/engine/models/cuda_graph.py)."""
        raise NotImplementedError

    def new_cache(
        self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device,
        span: int = SPAN,
    ) -> KVCache:  # fmt: skip
        """A request's cache; a sliding-window layer's holds its window and `span` more."""
        c = self.cfg
        return KVCache(self.end - self.start, batch, c.n_kv_heads, c.head_dim, capacity, dtype,
                       device, self.windows(), span)  # fmt: skip

    def windows(self) -> list[int | None]:
        """Each owned layer's sliding window (None: it attends to the whole context)."""
        return [None] * (self.end - self.start)

    def cache_bytes(self, capacity: int, dtype: torch.dtype) -> int:
        """What a request of `capacity` positions holds here (sliding layers their window,
        recurrent layers their fixed state): its caches built on the meta device, sizes
        only. What admission counts."""
        return self.new_cache(1, capacity, dtype, torch.device("meta")).nbytes

    def checkpoint_names(self, key: str) -> list[str]:
        """The Hugging Face checkpoint tensors one of our parameters is made of, in order."""
        raise NotImplementedError

    def from_checkpoint_layout(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A checkpoint tensor in the [out, in] layout of torch (identity by default)."""
        return tensor

    def arrange(self, key: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """Our parameter `key` from its checkpoint tensors: fused by rows, laid out per layer."""
        tensor = torch.cat(parts) if len(parts) > 1 else parts[0]
        owner = self.get_submodule(key.rpartition(".")[0])
        if isinstance(owner, Linear) and key.endswith(".weight"):
            return owner.arrange(tensor)
        return tensor

    @staticmethod
    def hf_source(hf_name: str) -> tuple[str, int | None]:
        """The checkpoint file's tensor a tensor comes from, and its index along the first
        axis where the file stacks a layer's experts into one tensor (gpt-oss)."""
        return hf_name, None

    @staticmethod
    def from_hf_file_layout(hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor read per `hf_source` in the layout its name stands for (identity)."""
        return tensor

    @staticmethod
    def gguf_parts(gguf_name: str) -> tuple[str, ...]:
        """The tensors llama.cpp's converter splits a tensor of the checkpoint's into, where
        it does and the file has no `gguf_name` (none by default)."""
        return ()

    @staticmethod
    def gguf_join(gguf_name: str, parts: list[torch.Tensor]) -> torch.Tensor:
        """The tensor `gguf_name` from its `gguf_parts`, read as float in numpy order."""
        raise NotImplementedError

    @staticmethod
    def gguf_source(hf_name: str, arch: str) -> tuple[str, int | None]:
        """llama.cpp's tensor for a checkpoint tensor in a file of architecture `arch`, and
        the expert's index where llama.cpp stacks a layer's experts into one tensor (families
        read from GGUF files)."""
        raise NotImplementedError

    @staticmethod
    def from_gguf_layout(hf_name: str, tensor: Any, cfg: Any, arch: str) -> Any:
        """A GGUF tensor in the Hugging Face checkpoint's layout (identity by default)."""
        return tensor

    def to_device(self, device: torch.device) -> None:
        """Move tensors that are derived from the config rather than loaded (none by default)."""
