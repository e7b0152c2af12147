"""A model's manifest: every tensor's name, layer, type, size and SHA-256, and the fingerprint
they make together. Members that hold a model publish it, so that a member without the
model fetches exactly the tensors its layers need and checks each one before use.

The fingerprint hashes the file's header (metadata, tokenizer, tensor table) and every
tensor's hash: nodes serve the same model exactly when their fingerprints match, whatever the
file's name or path. Hashing reads the whole file once; the result is kept in the data dir,
keyed by the file's path, size and modification time.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from node.engine.gguf_file import GGUFFile
from node.errors import RinginferError
from node.json_file import read_json, write_json

READ_BYTES = 16 << 20  # hashing reads this much at a time
_LAYER = re.compile(r"^blk\.(\d+)\.")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    layer: int | None  # the decoder layer it belongs to; None: embedding, head, norms
    type: int  # GGML quantization type
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
        return {"name": self.name, "header_bytes": self.header_bytes,
                "header_sha256": self.header_sha256,
                "tensors": [e.to_json() for e in self.tensors.values()]}  # fmt: skip

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """A manifest from a peer or the cache, refused whole unless every field is sane."""
        try:
            tensors = {}
            for name, layer, kind, shape, n_bytes, sha in data["tensors"]:
                ok = (
                    isinstance(name, str) and 0 < len(name) <= 256
                    and (layer is None or (type(layer) is int and 0 <= layer < 1 << 16))
                    and type(kind) is int and isinstance(shape, list) and len(shape) <= 4
                    and all(type(d) is int and d > 0 for d in shape)
                    and type(n_bytes) is int and 0 < n_bytes < 1 << 40
                    and isinstance(sha, str) and _HEX64.match(sha) and name not in tensors
                )  # fmt: skip
                if not ok:
                    raise ValueError(name)
                tensors[name] = TensorEntry(name, layer, kind, tuple(shape), n_bytes, sha)
            manifest = cls(str(data["name"])[:256], int(data["header_bytes"]),
                           str(data["header_sha256"]), tensors)  # fmt: skip
        except (KeyError, TypeError, ValueError) as e:
            raise RinginferError(f"malformed model manifest ({e})") from None
        if not (0 < manifest.header_bytes < 1 << 32 and _HEX64.match(manifest.header_sha256)):
            raise RinginferError("malformed model manifest (header)")
        return manifest


def layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def sha256_of(file: GGUFFile, name: str, n_bytes: int) -> str:
    h = hashlib.sha256()
    for at in range(0, n_bytes, READ_BYTES):
        h.update(file.read_bytes(name, at, min(READ_BYTES, n_bytes - at)))
    return h.hexdigest()


def build(path: Path, name: str, progress: Callable[[int, int], None] | None = None) -> Manifest:
    """Hash a GGUF file's header and tensors (`progress(bytes done, bytes total)`)."""
    file = GGUFFile(path)
    try:
        total = file.data_start + sum(t.n_bytes for t in file.tensors.values())
        with open(path, "rb") as f:
            header = f.read(file.data_start)
        done = len(header)
        tensors = {}
        for info in sorted(file.tensors.values(), key=lambda t: t.offset):
            sha = sha256_of(file, info.name, info.n_bytes)
            tensors[info.name] = TensorEntry(info.name, layer_of(info.name), int(info.type),
                                             info.shape, info.n_bytes, sha)  # fmt: skip
            done += info.n_bytes
            if progress:
                progress(done, total)
    finally:
        file.close()
    return Manifest(name, len(header), hashlib.sha256(header).hexdigest(), tensors)


def load_or_build(
    path: Path, name: str, data_dir: Path, progress: Callable[[int, int], None] | None = None
) -> Manifest:
    """The manifest of a GGUF file, hashed once per file version and then kept in the data
    dir (under manifests/, by path, size and modification time)."""
    st = path.resolve().stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
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
