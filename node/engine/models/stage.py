"""What every architecture's stage provides, so loaders and generators need not know which."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from node.engine.kv_cache import KVCache
from node.engine.models.linear import Linear


def embedding(num_embeddings: int, embedding_dim: int) -> nn.Embedding:
    """An embedding table left uninitialised: its weights are loaded. (Initialising one on the
    meta device runs `normal_` through torch's Python reference ops and imports the compiler
    stack: over a second of start-up.)"""
    return nn.Embedding(
        num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim)
    )


class Stage(nn.Module):
    """Layers [start, end) of a model; `forward(x, positions, cache, last_only)` runs them.

    The first stage takes token ids [B, T], later ones hidden states [B, T, D]; the last
    returns logits, for the final position only when `last_only` (all a sampler needs).

    Subclasses build their modules in `__init__` (on the meta device while loading) for a
    device type, which decides weight layouts, and map each parameter to the Hugging Face
    checkpoint tensors it is made of with `checkpoint_names`.
    """

    def __init__(self, cfg: Any, start: int, end: int) -> None:
        super().__init__()
        self.cfg, self.start, self.end = cfg, start, end
        self.is_first, self.is_last = start == 0, end == cfg.n_layers

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, last_only: bool = False
    ) -> torch.Tensor:
        start, count = int(positions[0]), int(positions.shape[0])
        cache.check_room(start, count)
        h = self.layers_forward(x, positions, cache, start)
        cache.advance(start, count)
        if not self.is_last:
            return h
        return self.head(h[:, -1:] if last_only else h)

    def layers_forward(
        self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int
    ) -> torch.Tensor:
        """Embedding (first stage) and the owned layers, writing keys/values at `start`."""
        raise NotImplementedError

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head (last stage)."""
        raise NotImplementedError

    def new_cache(
        self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> KVCache:
        c = self.cfg
        n_layers = self.end - self.start
        return KVCache(n_layers, batch, c.n_kv_heads, c.head_dim, capacity, dtype, device)

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

    def to_device(self, device: torch.device) -> None:
        """Move tensors that are derived from the config rather than loaded (none by default)."""
