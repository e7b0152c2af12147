"""A model's manifest: every tensor's name, layer, type, size and SHA-256, and the fingerprint
they make together. Members that hold a model publish it, so that a member without the
model fetches exactly the tensors its layers need and checks each one before use.

A model is a GGUF file or a Hugging Face directory (a hub cache's snapshot is one). Its
header is what a member needs besides tensors: a GGUF's header (metadata, tokenizer, tensor
table), or a directory's small files (config, tokenizer, chat template) bundled as JSON.
The fingerprint hashes the header and every tensor's hash: nodes serve the same model
exactly when their fingerprints match, whatever the file's name or path. Hashing reads the
whole model once; the result is kept in the data dir, keyed by its files' paths, sizes and
modification times.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES

from node.engine.gguf_file import GGUFFile
from node.engine.safetensors_file import DTYPE_BYTES, SafetensorsDir, weight_map
from node.errors import RinginferError
from node.json_file import read_json, write_json

READ_BYTES = 16 << 20  # hashing reads this much at a time
# A layer's tensors: GGUF's blk.N., Llama's model.layers.N., GPT-2's (transformer.)h.N.
_LAYER = re.compile(r"^(?:blk|(?:\w+\.)*?(?:layers|h))\.(\d+)\.")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
FORMATS = ("gguf", "safetensors")
# The largest frame of a MANIFEST_REPLY, its manifest's JSON or its header: a GGUF's (a 262k
# vocabulary's is ~10 MiB) or a directory's small files in base64 (Gemma 3's ~45 MiB).
MANIFEST_FRAME = 256 << 20
_GGML_SIZES = {int(k): v for k, v in GGML_QUANT_SIZES.items()}
# A directory's files a loader reads besides weights (HUB_FILES', less the weights and index).
SMALL_FILES = ("*.json", "*.jinja", "tokenizer*", "*.txt")
NOT_SMALL = ("*.safetensors", "model.safetensors.index.json")
_FILE_NAME = re.compile(r"^[\w][\w.-]{0,127}$")  # a bundled file: a plain name, never a path
# A tensor's name, which names its group's file in the shard cache when it has no layer: a
# plain dotted name (GGUF's `blk.0.attn_q.weight`, Hugging Face's `model.norm.weight`), never
# a path, `..`, NUL or a cache file's own name.
_TENSOR_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,255}")  # fullmatch: no "\n" after
_RESERVED = ("header", "manifest")


def tensor_name_ok(name: object) -> bool:
    """Whether a peer's tensor name may stand for a cache file (see _TENSOR_NAME)."""
    return (
        isinstance(name, str) and bool(_TENSOR_NAME.fullmatch(name)) and ".." not in name
        and not name.endswith((".part", ".done", ".tmp")) and name not in _RESERVED
    )  # fmt: skip


@dataclass(frozen=True)
class TensorEntry:
    name: str
    layer: int | None  # the decoder layer it belongs to; None: embedding, head, norms
    type: int | str  # GGML quantization type, or safetensors dtype
    shape: tuple[int, ...]
    n_bytes: int
    sha256: str

    @property
    def group(self) -> str:
        """What the shard cache keeps in one file: a layer's tensors, or this one alone."""
        return f"blk.{self.layer}" if self.layer is not None else self.name

    def to_json(self) -> list[Any]:
        return [self.name, self.layer, self.type, list(self.shape), self.n_bytes, self.sha256]


@dataclass(frozen=True)
class Manifest:
    name: str  # as its holder reports the model
    header_bytes: int  # the GGUF header: metadata, tokenizer and tensor table
    header_sha256: str
    tensors: dict[str, TensorEntry]
    format: str = "gguf"  # of the header and the tensors' types: gguf or safetensors

    @cached_property
    def fingerprint(self) -> str:
        entries = sorted(self.tensors.values(), key=lambda e: e.name)
        items = [self.header_sha256, *(e.to_json() for e in entries)]
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:32]

    def groups(self, names: set[str] | None = None) -> dict[str, list[TensorEntry]]:
        """Tensors (of `names`, else all) by cache group, in the manifest's order."""
        out: dict[str, list[TensorEntry]] = {}
        for e in self.tensors.values():
            if names is None or e.name in names:
                out.setdefault(e.group, []).append(e)
        return out

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "format": self.format, "header_bytes": self.header_bytes,
                "header_sha256": self.header_sha256,
                "tensors": [e.to_json() for e in self.tensors.values()]}  # fmt: skip

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """A manifest from a peer or the cache, refused whole unless every field is sane."""
        try:
            fmt = data.get("format", "gguf")
            if fmt not in FORMATS:
                raise ValueError(f"format {fmt!r}")
            tensors = {}
            for name, layer, kind, shape, n_bytes, sha in data["tensors"]:
                ok = (
                    tensor_name_ok(name)
                    and (layer is None or (type(layer) is int and 0 <= layer < 1 << 16))
                    and isinstance(shape, list) and 0 < len(shape) <= 4
                    and all(type(d) is int and 0 < d < 1 << 40 for d in shape)
                    and type(n_bytes) is int and 0 < n_bytes < 1 << 40
                    and n_bytes == _size(fmt, kind, shape)  # what the group file's header says
                    and isinstance(sha, str) and _HEX64.match(sha) and name not in tensors
                )  # fmt: skip
                if not ok:
                    raise ValueError(name)
                tensors[name] = TensorEntry(name, layer, kind, tuple(shape), n_bytes, sha)
            manifest = cls(str(data["name"])[:256], int(data["header_bytes"]),
                           str(data["header_sha256"]), tensors, fmt)  # fmt: skip
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise RinginferError(f"malformed model manifest ({e})") from None
        sha = manifest.header_sha256
        if not (0 < manifest.header_bytes <= MANIFEST_FRAME and _HEX64.match(sha)):
            raise RinginferError("malformed model manifest (header)")
        return manifest


def _size(fmt: str, kind: object, shape: list[int]) -> int | None:
    """A tensor's bytes from its type and shape (None for an unknown type)."""
    n = math.prod(shape)
    if fmt == "safetensors":
        return n * DTYPE_BYTES[kind] if isinstance(kind, str) and kind in DTYPE_BYTES else None
    if type(kind) is not int or kind not in _GGML_SIZES:
        return None
    block, block_bytes = _GGML_SIZES[kind]
    return n * block_bytes // block if shape[-1] % block == 0 else None


def layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def sha256_of(file: GGUFFile | SafetensorsDir, name: str, n_bytes: int) -> str:
    h = hashlib.sha256()
    for at in range(0, n_bytes, READ_BYTES):
        h.update(file.read_bytes(name, at, min(READ_BYTES, n_bytes - at)))
    return h.hexdigest()


def small_files(path: Path) -> list[Path]:
    """A model directory's files besides its weights: what `bundle` carries."""
    def small(name: str) -> bool:
        return any(fnmatch.fnmatch(name, p) for p in SMALL_FILES) and not any(
            fnmatch.fnmatch(name, p) for p in NOT_SMALL
        )  # fmt: skip

    return sorted(p for p in path.iterdir() if p.is_file() and small(p.name))


def bundle(path: Path) -> bytes:
    """A model directory's small files as one JSON object {name: base64}: its header."""
    files = {p.name: base64.b64encode(p.read_bytes()).decode() for p in small_files(path)}
    return json.dumps(files, sort_keys=True).encode()


def unbundle(header: bytes) -> dict[str, bytes]:
    """The files of a bundle from a peer; RinginferError unless every name is a plain one."""
    try:
        files = {n: base64.b64decode(b, validate=True) for n, b in json.loads(header).items()}
    except (ValueError, TypeError, AttributeError) as e:
        raise RinginferError(f"malformed model files from a peer ({e})") from None
    if "config.json" not in files or not all(_FILE_NAME.fullmatch(n) for n in files):
        raise RinginferError("malformed model files from a peer (names or no config.json)")
    return files


def open_tensors(path: Path) -> GGUFFile | SafetensorsDir:
    """A GGUF file's, or a Hugging Face directory's, tensors (ValueError if malformed)."""
    return SafetensorsDir(path, weight_map(path)) if path.is_dir() else GGUFFile(path)


def header_of(path: Path, file: GGUFFile | SafetensorsDir) -> bytes:
    if isinstance(file, SafetensorsDir):
        return bundle(path)
    with open(path, "rb") as f:
        return f.read(file.data_start)


def build(path: Path, name: str, progress: Callable[[int, int], None] | None = None) -> Manifest:
    """Hash a model's header and tensors (`progress(bytes done, bytes total)`): a GGUF file
    or a Hugging Face directory."""
    file = open_tensors(path)
    try:
        header = header_of(path, file)
        total = len(header) + sum(t.n_bytes for t in file.tensors.values())
        done = len(header)
        tensors = {}
        for info in file.tensors.values():  # in file order: one pass over the disk
            sha = sha256_of(file, info.name, info.n_bytes)
            kind = info.type if isinstance(info.type, str) else int(info.type)
            tensors[info.name] = TensorEntry(info.name, layer_of(info.name), kind, info.shape,
                                             info.n_bytes, sha)  # fmt: skip
            done += info.n_bytes
            if progress:
                progress(done, total)
    finally:
        file.close()
    fmt = "safetensors" if path.is_dir() else "gguf"
    return Manifest(name, len(header), hashlib.sha256(header).hexdigest(), tensors, fmt)


def _version(path: Path) -> str:
    """What changes when a model's content may have: its files' paths, sizes, mtimes."""
    files = [path] if path.is_file() else sorted(path.iterdir())
    stats = [(str(p.resolve()), p.resolve().stat()) for p in files if p.is_file()]
    return "|".join(f"{p}|{st.st_size}|{st.st_mtime_ns}" for p, st in stats)


def load_or_build(
    path: Path, name: str, data_dir: Path, progress: Callable[[int, int], None] | None = None
) -> Manifest:
    """The manifest of a model, hashed once per version of its files and then kept in the
    data dir (under manifests/, by their paths, sizes and modification times)."""
    key = _version(path)
    memo = data_dir / "manifests" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    if memo.exists():
        try:
            found = read_json(memo)
            if found.get("key") == key:
                return Manifest.from_json({**found["manifest"], "name": name})
        except (RinginferError, AttributeError, KeyError):
            pass  # unreadable: hash again
    manifest = build(path, name, progress)
    memo.parent.mkdir(parents=True, exist_ok=True)
    write_json(memo, {"key": key, "manifest": manifest.to_json()})
    return manifest
