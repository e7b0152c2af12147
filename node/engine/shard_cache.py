"""The shard cache: tensors fetched from peers, kept in their original form (quantized).

Under <data dir>/cache/<fingerprint>/ a model has its manifest, its header and one file
per group (a layer's tensors, or the embedding, the head, a norm alone), in the model's
format:
- GGUF: `header.gguf` (metadata, tokenizer, the whole tensor table) and `<group>.gguf`
  files, which gguf-py and llama.cpp read like any GGUF. Our loader reads the model through
  `CachedGGUF`: the header's tensor table, each tensor's bytes from its group's file.
- Hugging Face: `header.json` (the directory's small files, bundled), those files unpacked
  beside it (config.json, tokenizer...), and `<group>.safetensors` files: the directory is
  a Hugging Face model directory whose tensors lie in group files.

A group is fetched into `<group>.<format>.part` (its layout written first, tensors written
in place as chunks arrive); `<group>.<format>.done` lists the tensors verified against the
manifest so far, so a dropped transfer resumes without fetching those again. The complete
file is renamed into place; a `.done` record is a hint, each tensor it lists is hashed
again before it counts. The cache is bounded (`--cache-size`): least recently used groups,
and the `.part` files of fetches given up, go first, never those a stage uses now; the open
files of an evicted group are closed. Every path it opens lies inside the cache's directory.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from node.data_dir import CACHE_SIZE
from node.engine.gguf_file import GGUFFile, TensorInfo, offsets, tensor_layout
from node.engine.manifest import Manifest, TensorEntry, unbundle
from node.engine.safetensors_file import SafetensorsFile
from node.engine.safetensors_file import layout as safetensors_layout
from node.engine.weights import Checkpoint, GGUFCheckpoint, HFCheckpoint
from node.errors import RinginferError
from node.json_file import read_json, write_json

HEADERS = {"gguf": "header.gguf", "safetensors": "header.json"}


class CachedTensors:
    """A cached model's tensors, each read from its group's file (what a member serves).

    Group files stay open between reads; eviction closes them (`forget`), since an open
    file keeps its disk space after it is removed."""

    def __init__(self, cache: ShardCache, manifest: Manifest) -> None:
        self.cache, self.manifest = cache, manifest
        self.groups: dict[str, GGUFFile | SafetensorsFile] = {}
        self.lock = threading.Lock()  # reads on worker threads, eviction on the event loop
        cache.readers.add(self)

    def read_bytes(self, name: str, start: int, size: int) -> np.ndarray:
        group = self.manifest.tensors[name].group
        with self.lock:
            file = self.groups.get(group)
            if file is None:
                path = self.cache.group_path(self.manifest, group)
                if not path.exists():
                    raise RinginferError(f"tensor '{name}' is not in the shard cache (not fetched)")
                os.utime(path)  # least recently used goes first
                opener = GGUFFile if self.manifest.format == "gguf" else SafetensorsFile
                file = self.groups[group] = opener(path)
            return file.read_bytes(name, start, size)

    def forget(self, paths: set[Path]) -> None:
        """Close the files of these (evicted) paths."""
        with self.lock:
            for group, file in list(self.groups.items()):
                if file.path in paths:
                    file.close()
                    del self.groups[group]

    def open_paths(self) -> set[Path]:
        with self.lock:
            return {f.path for f in self.groups.values()}


class CachedGGUF(GGUFFile):
    """A model's GGUF header, whose tensors' bytes come from the cache's group files."""

    def __init__(self, cache: ShardCache, manifest: Manifest) -> None:
        super().__init__(cache.header_path(manifest), header_only=True)
        self.cached = CachedTensors(cache, manifest)

    def read_bytes(self, name: str, start: int, size: int) -> np.ndarray:
        return self.cached.read_bytes(name, start, size)


@dataclass
class GroupWriter:
    """A group's file being fetched: chunks written in place, tensors verified one by one."""

    path: Path  # the .part file
    infos: dict[str, TensorInfo]  # where each tensor's data lies in it
    entries: dict[str, TensorEntry]
    verified: set[str]

    fd: int = -1  # the .part file, open while chunks come
    opening: threading.Lock = field(default_factory=threading.Lock)  # chunks write at once

    def write(self, name: str, start: int, data: bytes) -> None:
        if start < 0 or start + len(data) > self.entries[name].n_bytes:
            raise ValueError(f"chunk {start}+{len(data)} outside tensor '{name}'")
        with self.opening:
            if self.fd < 0:
                self.fd = os.open(self.path, os.O_WRONLY)
        view, at = memoryview(data), self.infos[name].offset + start
        while view:
            n = os.pwrite(self.fd, view, at)
            view, at = view[n:], at + n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def verify(self, name: str, whole: bytes | memoryview | None = None) -> bool:
        """Whether the tensor's bytes as written (or `whole`, all of them as just written)
        match the manifest; recorded if they do."""
        if not self._matches(name, whole):
            return False
        self.verified.add(name)
        with open(self._record(), "a") as f:  # a line per tensor: a crash loses at most one
            f.write(name + "\n")
        return True

    def recheck(self, listed: set[str]) -> None:
        """Count as verified those of a `.done` record's tensors whose bytes still match:
        the record is a file beside the data, not a proof of it (a crash between a write
        and its record, a disk, a hand may have changed either). The record is rewritten."""
        self.verified = {n for n in sorted(listed) if self._matches(n)}
        self._record().write_text("".join(n + "\n" for n in sorted(self.verified)))

    def _matches(self, name: str, whole: bytes | memoryview | None = None) -> bool:
        entry, info = self.entries[name], self.infos[name]
        h = hashlib.sha256()
        if whole is not None:
            h.update(whole)
        else:
            self._hash_written(h, info.offset, entry.n_bytes)
        return h.hexdigest() == entry.sha256

    def _hash_written(self, h: hashlib._Hash, offset: int, n_bytes: int) -> None:
        with open(self.path, "rb") as f:
            f.seek(offset)
            left = n_bytes
            while left:
                block = f.read(min(left, 16 << 20))
                if not block:
                    return  # short: the hash will not match
                h.update(block)
                left -= len(block)

    def missing(self) -> list[TensorEntry]:
        return [e for n, e in self.entries.items() if n not in self.verified]

    def finish(self) -> Path:
        """The complete group's file, in place; call once nothing is missing."""
        self.close()
        done = self.path.with_suffix("")  # <group>.<format>
        self.path.replace(done)
        self._record().unlink(missing_ok=True)
        return done

    def _record(self) -> Path:
        return self.path.with_suffix(".done")


class ShardCache:
    def __init__(self, root: Path, limit: int = CACHE_SIZE) -> None:
        self.root, self.limit = root, limit
        self.readers: weakref.WeakSet[CachedTensors] = weakref.WeakSet()  # what evict closes

    def model_dir(self, fingerprint: str) -> Path:
        return self.root / fingerprint

    def group_path(self, manifest: Manifest, group: str) -> Path:
        return self.inside(self.model_dir(manifest.fingerprint) / f"{group}.{manifest.format}")

    def inside(self, path: Path) -> Path:
        """`path`, if it resolves to a place inside the cache's directory: whatever a peer's
        manifest names (manifest.tensor_name_ok refuses paths already), nothing outside it
        is ever read, written or removed (a `..`, an absolute path, a symbolic link)."""
        if not path.resolve().is_relative_to(self.root.resolve()):
            raise RinginferError(f"'{path.name}' is not a file of the shard cache {self.root}")
        return path

    def header_path(self, manifest: Manifest) -> Path:
        return self.model_dir(manifest.fingerprint) / HEADERS[manifest.format]

    def checkpoint(self, manifest: Manifest) -> Checkpoint:
        """The cached model, opened as our loader opens a model: its layers load once their
        groups are here."""
        d = self.model_dir(manifest.fingerprint)
        if manifest.format == "safetensors":  # a Hugging Face directory whose weights are groups
            files = {n: self.group_path(manifest, e.group).name
                     for n, e in manifest.tensors.items()}  # fmt: skip
            return HFCheckpoint(d, manifest.name, files)
        try:
            header = CachedGGUF(self, manifest)
        except Exception as e:  # as GGUFCheckpoint says of a file: ValueError, OSError, UTF-8
            raise RinginferError(
                f"the cached model header {self.header_path(manifest)} is not a readable GGUF "
                f"header ({e})"
            ) from None
        return GGUFCheckpoint(self.header_path(manifest), manifest.name, header)

    def store_model(self, manifest: Manifest, header: bytes) -> None:
        """Keep a model's manifest and header (checked against the manifest), and unpack a
        Hugging Face directory's small files."""
        if len(header) != manifest.header_bytes or (
            hashlib.sha256(header).hexdigest() != manifest.header_sha256
        ):
            raise RinginferError("the model header does not match its manifest")
        d = self.model_dir(manifest.fingerprint)
        d.mkdir(parents=True, exist_ok=True)
        files = unbundle(header) if manifest.format == "safetensors" else {}
        files = {n: b for n, b in files.items()  # never one of the cache's own files
                 if n != "manifest.json" and Path(n).suffix[1:] not in HEADERS}  # fmt: skip
        for name, data in {**files, HEADERS[manifest.format]: header}.items():
            tmp = d / f"{name}.tmp"
            tmp.write_bytes(data)
            tmp.replace(d / name)
        write_json(d / "manifest.json", manifest.to_json())

    def manifest(self, fingerprint: str) -> Manifest | None:
        """The cached model's manifest, if its header is here too."""
        d = self.model_dir(fingerprint)
        if not (d / "manifest.json").exists():
            return None
        try:
            m = Manifest.from_json(read_json(d / "manifest.json"))
        except RinginferError:
            return None
        ok = m.fingerprint == fingerprint and self.header_path(m).exists()
        return m if ok else None

    def held(self, fingerprint: str) -> set[str]:
        """The groups whose files are complete."""
        files = [p for f in HEADERS for p in self.model_dir(fingerprint).glob(f"*.{f}")]
        return {p.stem for p in files} - {"header"}

    def writer(self, manifest: Manifest, group: str) -> GroupWriter:
        """The group's file being fetched: resumed where a previous transfer left it."""
        entries = {e.name: e for e in manifest.groups()[group]}
        infos = [TensorInfo(e.name, e.shape, e.type, 0, e.n_bytes) for e in entries.values()]
        if manifest.format == "gguf":
            head, starts = tensor_layout(infos), offsets(infos)
        else:
            head, starts = safetensors_layout(infos)
        placed = {
            i.name: TensorInfo(i.name, i.shape, i.type, len(head) + at, i.n_bytes)
            for i, at in zip(infos, starts, strict=True)
        }
        final = self.group_path(manifest, group)
        path = final.with_name(final.name + ".part")
        record = path.with_suffix(".done")
        writer = GroupWriter(path, placed, entries, set())
        if path.exists() and record.exists():
            writer.recheck(set(record.read_text(errors="replace").splitlines()) & set(entries))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            last = infos[-1]
            with open(path, "wb") as f:
                f.write(head)
                f.truncate(placed[last.name].offset + last.n_bytes)
            record.unlink(missing_ok=True)
        return writer

    def models(self) -> list[dict]:
        """What `ringinfer cache` lists: each model's name, groups, bytes, last use."""
        out = []
        for d in sorted(self.root.glob("*/")):
            files = [p for p in d.iterdir() if p.is_file()]
            m = self.manifest(d.name)
            out.append({
                "fingerprint": d.name, "name": m.name if m else "?",
                "groups": len(self.held(d.name)), "of": len(m.groups()) if m else 0,
                "bytes": sum(p.stat().st_size for p in files),
                "used": max((p.stat().st_mtime for p in files), default=0.0),
            })  # fmt: skip
        return out

    def clear(self, fingerprint: str | None = None) -> int:
        """Remove one model's files (or all); the bytes freed. A fingerprint names a model
        in the cache, never a path (`..` must not reach beyond it)."""
        dirs = list(self.root.glob("*/"))
        if fingerprint is not None:
            dirs = [d for d in dirs if d.name == fingerprint]
            if not dirs:
                raise RinginferError(
                    f"no model {fingerprint} in the shard cache {self.root} (`ringinfer cache` "
                    "lists them)"
                )
        freed = 0
        for d in dirs:
            if d.is_dir():
                freed += sum(p.stat().st_size for p in d.iterdir() if p.is_file())
                shutil.rmtree(d)
        return freed

    def evict(self, keep: set[Path], room: int = 0) -> list[Path]:
        """Remove least recently used group files and `.part` files (with their records)
        until the cache plus `room` bytes fits the limit; never those of groups in `keep`
        (a live stage's), headers or manifests. Open files of what is removed are closed."""
        stats = {p: p.stat() for p in self.root.glob("*/*") if p.is_file()}
        files = {p: (st.st_size, st.st_mtime) for p, st in stats.items()}
        removed = eviction(files, keep, self.limit - room)
        for p in removed:
            p.unlink(missing_ok=True)
        for reader in list(self.readers):
            reader.forget(set(removed))
        return removed


def _group_of(path: Path) -> Path | None:
    """The group file `path` is or is being fetched into (`x.gguf` for `x.gguf.part` and
    its `x.gguf.done`); None for headers, manifests and anything else."""
    if path.suffix in (".part", ".done"):
        path = path.with_suffix("")
    if path.suffix[1:] in HEADERS and path.name not in HEADERS.values():
        return path
    return None


def eviction(files: dict[Path, tuple[int, float]], keep: set[Path], limit: int) -> list[Path]:
    """Which of `files` (path: size, mtime) go so that the rest fits `limit` bytes: every
    file counts (`.part` files too, at their full size), groups go least recently used
    first with their `.part` and `.done`, and never a group in `keep` nor a file that is
    not a group's."""
    total = sum(size for size, _ in files.values())
    by_group: dict[Path, list[Path]] = {}
    used: dict[Path, float] = {}
    for p, (_, mtime) in files.items():
        group = _group_of(p)
        if group is not None and group not in keep:
            by_group.setdefault(group, []).append(p)
            used[group] = max(used.get(group, mtime), mtime)
    out: list[Path] = []
    for group in sorted(by_group, key=lambda g: (used[g], str(g))):
        if total <= limit:
            break
        for p in sorted(by_group[group]):
            total -= files[p][0]
            out.append(p)
    return out
