"""A GGUF file's header, metadata and tensor table, read lazily; tensor bytes read on demand.

gguf-py's `GGUFReader` builds a numpy view for every vocabulary string and merge (about 4 s
for the default model's 100k of them) and maps the whole file. We parse the same format with
gguf-py's own constants and types (it stays the authority, and the tests compare us with its
reader), decode string arrays in one pass, and read a tensor's bytes with `pread` into memory
we own, so a stage's resident memory holds only the tensors it keeps, not pages of the file.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUFValueType
from gguf import GGMLQuantizationType as QType

_SCALARS = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_DEPTH = 2  # arrays of arrays at most: gguf-py writes no deeper, llama.cpp reads no deeper
MAX_ELEMENTS = 1 << 50  # a tensor's elements: far past any model, far below int64's end
# The fewest bytes each item a header announces takes, so a count is checked against the
# bytes left before anything is read or allocated for it.
KV_MIN = 8 + 4 + 1  # a key's length, its type, one byte of value
TENSOR_MIN = 8 + 4 + 8 + 4 + 8  # a name's length, n_dims, one dim, type, offset


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: [rows, columns] for a matrix (GGUF stores it reversed)
    type: QType | str  # a GGML type, or a safetensors dtype ("BF16")
    offset: int  # from the start of the file
    n_bytes: int


class TensorFile:
    """A file whose tensors are read on demand, with `pread` into memory we own."""

    _fd = -1
    tensors: dict[str, TensorInfo]

    def read_bytes(self, name: str, start: int, size: int) -> np.ndarray:
        """Bytes [start, start + size) of a tensor's data, in a fresh array."""
        offset = self.tensors[name].offset + start
        out = np.empty(size, dtype=np.uint8)
        view, done = memoryview(out), 0
        while done < size:
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise ValueError(f"tensor '{name}' is truncated")
            done += n
        return out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


class GGUFFile(TensorFile):
    """Metadata as a dict (arrays as lists, as `ReaderField.contents()` gives them) and a
    tensor table; raises ValueError for anything that is not a well-formed GGUF file.

    `header_only`: the file is a GGUF's header alone (its bytes up to `data_start`, as a
    shard cache keeps it), whose tensors live elsewhere."""

    def __init__(self, path: Path, header_only: bool = False) -> None:
        self.path, self._fd = path, -1
        with open(path, "rb") as f:
            self._fd = os.dup(f.fileno())
            self._size = os.fstat(self._fd).st_size
            self._buf = b""
            self._pos = 0
            self._base = 0  # the file offset of _buf[0]
            self._file = f
            magic, version = self._unpack("<II")
            if magic != GGUF_MAGIC:
                raise ValueError("bad magic number")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} (supported: 2, 3)")
            n_tensors, n_kv = self._unpack("<QQ")
            self._claim(n_kv, KV_MIN, "metadata entries")
            self._claim(n_tensors, TENSOR_MIN, "tensors")
            self.metadata: dict[str, Any] = {}
            for _ in range(n_kv):
                key = self._string()
                (kind,) = self._unpack("<I")
                self.metadata[key] = self._value(GGUFValueType(kind))
            infos = []
            for _ in range(n_tensors):
                name = self._string()
                (n_dims,) = self._unpack("<I")
                if not 1 <= n_dims <= MAX_DIMS:
                    raise ValueError(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS})")
                dims = self._unpack(f"<{n_dims}Q")
                if not all(dims) or math.prod(dims) > MAX_ELEMENTS:
                    raise ValueError(f"tensor {name!r} has sizes {list(dims)}")
                kind, offset = self._unpack("<IQ")
                infos.append((name, dims, QType(kind), offset))
            align = self.metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
            if not isinstance(align, int) or align <= 0 or align & (align - 1):
                raise ValueError(f"invalid alignment {align!r}")
            start = -(-(self._base + self._pos) // align) * align
            del self._file, self._buf
        self.data_start = start
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, kind, offset in sorted(infos, key=lambda i: i[3]):  # in file order
            block, block_bytes = GGML_QUANT_SIZES[kind]
            if dims[0] % block:
                raise ValueError(f"tensor {name!r}: rows of {dims[0]} are not {block}-blocks")
            n_bytes = math.prod(dims) * block_bytes // block
            info = TensorInfo(name, tuple(reversed(dims)), kind, start + offset, n_bytes)
            if info.offset + n_bytes > self._size and not header_only:
                raise ValueError(f"tensor '{name}' runs past the end of the file")
            if name in self.tensors:
                raise ValueError(f"duplicate tensor '{name}'")
            self.tensors[name] = info

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """A tensor's raw bytes (of rows [a, b) of a matrix only, if given), in a fresh
        array: never a mapping of the file."""
        info = self.tensors[name]
        if rows is None:
            return self.read_bytes(name, 0, info.n_bytes)
        row_bytes = info.n_bytes // info.shape[0]
        return self.read_bytes(name, rows[0] * row_bytes, (rows[1] - rows[0]) * row_bytes)

    # Header parsing: a buffered forward reader over the file object.

    def _left(self) -> int:
        return self._size - self._base - self._pos

    def _claim(self, count: int, item_bytes: int, what: str) -> None:
        """A count the header announces, checked against the bytes left before anything is
        read or allocated for it (a hostile header claims 2**40-byte strings)."""
        if count * item_bytes > self._left():
            raise ValueError(f"the header claims {count} {what}, more than the file holds")

    def _need(self, n: int) -> None:
        if self._pos + n > len(self._buf):
            if n > self._left():
                raise ValueError("the header runs past the end of the file")
            chunk = self._file.read(max(n, 1 << 20))
            self._base += self._pos
            self._buf = self._buf[self._pos :] + chunk
            self._pos = 0
            if n > len(self._buf):
                raise ValueError("the header runs past the end of the file")

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        n = struct.calcsize(fmt)
        self._need(n)
        out = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += n
        return out

    def _bytes(self, n: int) -> bytes:
        self._need(n)
        self._pos += n
        return self._buf[self._pos - n : self._pos]

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        return self._bytes(n).decode("utf-8")

    def _value(self, kind: GGUFValueType, depth: int = 0) -> Any:
        if kind == GGUFValueType.STRING:
            return self._string()
        if kind in _SCALARS:
            return self._unpack("<" + _SCALARS[kind])[0]
        if kind != GGUFValueType.ARRAY:
            raise ValueError(f"unknown metadata type {kind}")
        if depth >= MAX_DEPTH:
            raise ValueError(f"arrays nested deeper than {MAX_DEPTH}")
        item, count = self._unpack("<IQ")
        item = GGUFValueType(item)
        if item in _SCALARS:  # one read for the whole array
            dtype = np.dtype("<" + _SCALARS[item])
            self._claim(count, dtype.itemsize, "array items")
            return np.frombuffer(self._bytes(dtype.itemsize * count), dtype=dtype).tolist()
        self._claim(count, 8 if item == GGUFValueType.STRING else 12, "array items")
        if item == GGUFValueType.STRING:
            return [self._string() for _ in range(count)]
        return [self._value(item, depth + 1) for _ in range(count)]


def tensor_layout(tensors: list[TensorInfo], align: int = GGUF_DEFAULT_ALIGNMENT) -> bytes:
    """A GGUF header (version 3, no metadata) for these tensors (their offsets ignored),
    padded so their data follows it, each at its aligned offset: `offsets` gives them."""
    out = [struct.pack("<IIQQ", GGUF_MAGIC, 3, len(tensors), 0)]
    for info, offset in zip(tensors, offsets(tensors, align), strict=True):
        name = info.name.encode()
        out.append(struct.pack("<Q", len(name)) + name + struct.pack("<I", len(info.shape)))
        out.append(struct.pack(f"<{len(info.shape)}Q", *reversed(info.shape)))
        out.append(struct.pack("<IQ", info.type, offset))
    head = b"".join(out)
    return head + bytes(-len(head) % align)


def offsets(tensors: list[TensorInfo], align: int = GGUF_DEFAULT_ALIGNMENT) -> list[int]:
    """Where each tensor's data starts, from the start of the data section."""
    out, at = [], 0
    for info in tensors:
        out.append(at)
        at += -(-info.n_bytes // align) * align
    return out


# llama.cpp's 4-bit blocks, each one group of 32 codes with w = (q - 8) * scale + zero.
INT4_TYPES = (QType.Q4_0, QType.Q4_1, QType.Q4_K)
# Kept as int8 per row (requantized) under --quantize auto.
INT8_TYPES = (QType.Q5_0, QType.Q5_1, QType.Q5_K, QType.Q6_K, QType.Q8_0)
FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)
MXFP4_TYPES = (QType.MXFP4,)  # kept as they are (node/engine/models/mxfp4.py)


def int4_groups(raw: np.ndarray, kind: QType, rows: int) -> tuple[np.ndarray, ...]:
    """(codes uint8 [rows, K], scales float32 [rows, K/32], zeros float32) of a 4-bit tensor.

    Q4_0: w = d (q - 8); Q4_1: w = d q + m = d (q - 8) + (m + 8 d); Q4_K: 8 sub-blocks of 32
    in 256, w = d sc q - dmin m = d sc (q - 8) + (8 d sc - dmin m), with gguf-py's own unpacking
    of the 6-bit sub-block scales.
    """
    from gguf.quants import Q4_K

    block, size = GGML_QUANT_SIZES[kind]
    b = raw.reshape(-1, size)
    d = b[:, :2].copy().view(np.float16).astype(np.float32)
    if kind == QType.Q4_K:
        dmin = b[:, 2:4].copy().view(np.float16).astype(np.float32)
        sc, m = Q4_K.get_scale_min(b[:, 4:16].copy())
        qs = b[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        codes = (qs & 15).reshape(-1, block)
        scale = d * sc.astype(np.float32)
        zero = 8 * scale - dmin * m.astype(np.float32)
    else:
        qs = b[:, -16:]
        codes = np.concatenate([qs & 15, qs >> 4], axis=1)
        scale = d
        zero = np.zeros_like(d)
        if kind == QType.Q4_1:
            zero = b[:, 2:4].copy().view(np.float16) + 8 * d
    return codes.reshape(rows, -1), scale.reshape(rows, -1), zero.reshape(rows, -1)
