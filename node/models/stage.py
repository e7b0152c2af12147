"""What every architecture's stage provides, so loaders and generators need not know which."""

from __future__ import annotations

import torch
from torch import nn

from node.kv_cache import KVCache
from node.models.linear import Linear


class Stage(nn.Module):
    """Layers [start, end) of a model; `forward(x, positions, cache, last_only)` runs them.

    The first stage takes token ids [B, T], later ones hidden states [B, T, D]; the last
    returns logits, for the final position only when `last_only` (all a sampler needs).

    Subclasses build their modules in `__init__` (on the meta device while loading) for a
    device type, which decides weight layouts, and map each parameter to the Hugging Face
    checkpoint tensors it is made of with `checkpoint_names`.
    """

    start: int
    end: int
    is_first: bool
    is_last: bool

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

    def new_cache(
        self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device
    ) -> KVCache:
        raise NotImplementedError
