"""What every architecture's stage provides, so loaders and generators need not know which."""

from __future__ import annotations

import torch
from torch import nn

from node.kv_cache import KVCache


class Stage(nn.Module):
    """Layers [start, end) of a model; `forward(x, positions, cache, last_only)` runs them.

    The first stage takes token ids [B, T], later ones hidden states [B, T, D]; the last
    returns logits, for the final position only when `last_only` (all a sampler needs).

    Subclasses build their modules in `__init__` (on the meta device while loading) and name
    their parameters so `checkpoint_name` can map each to the Hugging Face checkpoint.
    """

    start: int
    end: int
    is_first: bool
    is_last: bool

    def checkpoint_name(self, key: str) -> str:
        raise NotImplementedError

    def from_checkpoint_layout(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Reshape a checkpoint tensor into our parameter's layout (identity by default)."""
        return tensor

    def to_device(self, device: torch.device) -> None:
        """Move tensors that are derived from the config rather than loaded (none by default)."""

    def new_cache(
        self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> KVCache:
        raise NotImplementedError
