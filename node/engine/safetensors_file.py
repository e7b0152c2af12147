"""Safetensors files as our loader and the shard cache see them: a tensor table, and any
tensor's bytes read on demand, from one file or from a Hugging Face directory's shards.

The format is 8 bytes of header length, a JSON header ({name: {dtype, shape,
data_offsets}}, "__metadata__" aside) and the data. `layout` writes such a header for a
shard cache's group file, which the `safetensors` library reads like any other.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

from node.engine.gguf_file import TensorFile, TensorInfo
from node.errors import RinginferError
from node.json_file import read_json

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
MAX_HEADER = 100 << 20  # the library's own limit


class SafetensorsFile(TensorFile):
    """One .safetensors file's tensors; ValueError for anything malformed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            self._fd = os.dup(f.fileno())
            size = os.fstat(self._fd).st_size
            (n,) = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))
            if not 2 <= n <= min(MAX_HEADER, size - 8):
                raise ValueError(f"header length {n} in a file of {size} bytes")
            header = json.loads(f.read(n))
        self.data_start = 8 + n
        self.tensors: dict[str, TensorInfo] = {}
        entries = [(n, t) for n, t in header.items() if n != "__metadata__"]
        for name, t in sorted(entries, key=lambda e: e[1]["data_offsets"][0]):  # file order
            begin, end = t["data_offsets"]
            shape = tuple(int(d) for d in t["shape"])
            if end - begin != int(np.prod(shape, dtype=np.int64)) * DTYPE_BYTES[t["dtype"]]:
                raise ValueError(f"tensor '{name}' has {end - begin} bytes for {shape}")
            if not 0 <= begin <= end <= size - self.data_start:
                raise ValueError(f"tensor '{name}' runs past the end of the file")
            self.tensors[name] = TensorInfo(name, shape, t["dtype"], self.data_start + begin,
                                            end - begin)  # fmt: skip


def weight_map(path: Path) -> dict[str, str]:
    """Each tensor's .safetensors file in a Hugging Face directory, sharded or single."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return dict(read_json(index).get("weight_map", {}))
    single = path / "model.safetensors"
    if not single.exists():
        raise RinginferError(
            f"no model.safetensors or model.safetensors.index.json in {path} "
            "(PyTorch .bin checkpoints are not supported; convert them to safetensors)"
        )
    try:
        return dict.fromkeys(SafetensorsFile(single).tensors, single.name)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RinginferError(f"cannot read {single}: {e}") from None


class SafetensorsDir:
    """A Hugging Face directory's weights: the tensors of all its .safetensors shards."""

    def __init__(self, path: Path, files: dict[str, str]) -> None:
        """`files`: each tensor's shard, as model.safetensors.index.json maps them."""
        self.path = path
        try:
            self.shards = {f: SafetensorsFile(path / f) for f in sorted(set(files.values()))}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"a malformed safetensors file in {path}: {e}") from None
        self.tensors = {n: i for s in self.shards.values() for n, i in s.tensors.items()}
        self._shard_of = {n: s for s in self.shards.values() for n in s.tensors}

    def read_bytes(self, name: str, start: int, size: int) -> np.ndarray:
        return self._shard_of[name].read_bytes(name, start, size)

    def close(self) -> None:
        for s in self.shards.values():
            s.close()


def layout(tensors: list[TensorInfo]) -> tuple[bytes, list[int]]:
    """A safetensors header for these tensors (their offsets ignored), padded to 8 bytes,
    and where each one's data starts after it."""
    at, entries, starts = 0, {}, []
    for info in tensors:
        entries[info.name] = {"dtype": info.type, "shape": list(info.shape),
                              "data_offsets": [at, at + info.n_bytes]}  # fmt: skip
        starts.append(at)
        at += info.n_bytes
    head = json.dumps(entries, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head, starts
