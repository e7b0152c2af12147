"""Manifests and the shard cache, against gguf-py's reader of the default model's file and
the safetensors library's of Hugging Face directories."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import struct

import numpy as np
import pytest
import torch
from gguf import GGUF_MAGIC

from node.engine.gguf_file import GGUFFile
from node.engine.manifest import Manifest, build, bundle, load_or_build, unbundle
from node.engine.safetensors_file import SafetensorsDir
from node.engine.shard_cache import CachedGGUF, CachedTensors, ShardCache
from node.engine.weights import (
    GGUFCheckpoint,
    default_model_path,
    load_stage,
    open_checkpoint,
    stage_tensors,
)
from node.errors import RinginferError

CHUNK = 100_000  # not a divisor of any tensor: chunks end mid-block


@pytest.fixture(scope="module")
def source():
    path = default_model_path()
    return path, GGUFFile(path), build(path, "smollm2")


def fill(
    cache: ShardCache, manifest: Manifest, file: GGUFFile | SafetensorsDir, names: set[str]
) -> None:
    """What a fetch does, from a local file: every group of `names`, chunks in reverse."""
    for group in manifest.groups(names):
        w = cache.writer(manifest, group)
        for e in w.missing():
            for at in reversed(range(0, e.n_bytes, CHUNK)):
                chunk = file.read_bytes(e.name, at, min(CHUNK, e.n_bytes - at))
                w.write(e.name, at, chunk.tobytes())
            assert w.verify(e.name)
        w.finish()


def test_manifest_hashes_every_tensor_as_gguf_py_reads_it(source, tmp_path):
    from gguf import GGUFReader

    path, _, manifest = source
    reader = GGUFReader(path)
    assert len(manifest.tensors) == len(reader.tensors) == 272
    for t in reader.tensors:
        e = manifest.tensors[t.name]
        data = np.ascontiguousarray(t.data).view(np.uint8).ravel()
        assert (e.n_bytes, e.type) == (data.nbytes, int(t.tensor_type))
        assert e.sha256 == hashlib.sha256(data).hexdigest()
    assert manifest.tensors["blk.7.ffn_up.weight"].layer == 7
    assert manifest.tensors["token_embd.weight"].layer is None
    # The fingerprint is the content's: another name, path or hashing run gives the same.
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(path.read_bytes())
    again = load_or_build(copy, "other name", tmp_path)
    assert again.fingerprint == manifest.fingerprint
    assert load_or_build(copy, "other name", tmp_path) == again  # from the data dir's memo
    with open(copy, "r+b") as f:  # one byte of one tensor changed: another model
        f.seek(GGUFFile(copy).tensors["blk.3.attn_q.weight"].offset + 5)
        f.write(b"\x7f")
    os.utime(copy, ns=(1, 1))
    assert load_or_build(copy, "other name", tmp_path).fingerprint != manifest.fingerprint


def test_manifest_json_round_trips_and_refuses_malformed(source):
    manifest = source[2]
    wire = json.loads(json.dumps(manifest.to_json()))
    assert Manifest.from_json(wire).fingerprint == manifest.fingerprint
    bad = [
        {**wire, "tensors": [["x", None, 0, [4], -1, "0" * 64]]},
        {**wire, "tensors": [["x", "3", 0, [4], 16, "0" * 64]]},
        {**wire, "tensors": [["x", None, 0, [4], 16, "nothex"]]},
        {**wire, "tensors": [["x", None, 0, [4], 16, "0" * 64]] * 2},
        {**wire, "tensors": [["x", None, 0, [4], 17, "0" * 64]]},  # not 4 float32s
        {**wire, "tensors": [["x", None, 2, [30], 18, "0" * 64]]},  # Q4_0 rows are of 32
        {**wire, "format": "safetensors", "tensors": [["x", None, "Q9", [4], 16, "0" * 64]]},
        {**wire, "format": "safetensors", "tensors": [["x", None, 0, [4], 16, "0" * 64]]},
        {**wire, "format": "tar"},
        {**wire, "header_sha256": "x"},
        {**wire, "header_bytes": float("inf")},  # a peer's 1e400, as json.loads reads it
        {**wire, "header_bytes": float("nan")},
        {"name": "x"},
        [],
    ]
    for data in bad:
        with pytest.raises(RinginferError, match="malformed model manifest"):
            Manifest.from_json(data)
    hf = {**wire, "format": "safetensors", "tensors": [["x", None, "BF16", [2, 3], 12, "0" * 64]]}
    assert Manifest.from_json(hf).tensors["x"].n_bytes == 12


def test_cached_layers_load_exactly_as_from_the_file(source, tmp_path):
    from gguf import GGUFReader

    path, file, manifest = source
    cache = ShardCache(tmp_path)
    with open(path, "rb") as f:
        cache.store_model(manifest, f.read(manifest.header_bytes))
    whole = GGUFCheckpoint(path, "smollm2")
    names = stage_tensors(whole, 27, 30)
    fill(cache, manifest, file, names)
    assert cache.held(manifest.fingerprint) == {"blk.27", "blk.28", "blk.29", "token_embd.weight",
                                                "output_norm.weight"}  # fmt: skip
    held = sum(p.stat().st_size for p in cache.model_dir(manifest.fingerprint).glob("*.gguf"))
    need = manifest.header_bytes + sum(manifest.tensors[n].n_bytes for n in names)
    assert need <= held < need * 1.01  # only those tensors, never the whole file
    group = GGUFReader(cache.group_path(manifest, "blk.28"))  # a GGUF like any
    assert {t.name for t in group.tensors} == {n for n in names if n.startswith("blk.28.")}

    cached = GGUFCheckpoint(path, "smollm2", CachedGGUF(cache, manifest))
    assert cached.config == whole.config
    ours = load_stage(cached, 27, 30, torch.device("cpu"), torch.float32, quantize="auto")
    theirs = load_stage(whole, 27, 30, torch.device("cpu"), torch.float32, quantize="auto")
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RinginferError, match="not in the shard cache"):
        load_stage(cached, 0, 2, torch.device("cpu"), torch.float32)


def test_a_corrupt_chunk_fails_its_tensor_and_a_transfer_resumes(source, tmp_path):
    _, file, manifest = source
    cache = ShardCache(tmp_path)
    w = cache.writer(manifest, "blk.4")
    entries = w.missing()
    first, second = entries[1], entries[2]
    for e in (first, second):
        w.write(e.name, 0, file.read_bytes(e.name, 0, e.n_bytes).tobytes())
    assert w.verify(first.name)
    w.write(second.name, 10, b"\x00\x01")  # corrupted in transit
    assert not w.verify(second.name)
    # A new writer (the daemon restarted) keeps what was verified, and only that.
    w = cache.writer(manifest, "blk.4")
    assert w.verified == {first.name}
    assert [e.name for e in w.missing()] == [e.name for e in entries if e is not first]
    with pytest.raises(ValueError, match="outside tensor"):
        w.write(first.name, first.n_bytes - 1, b"ab")


def test_eviction_goes_least_recently_used_first_and_spares_what_a_stage_uses(source, tmp_path):
    _, file, manifest = source
    cache = ShardCache(tmp_path)
    layers = ("blk.1.", "blk.2.", "blk.3.")
    fill(cache, manifest, file, {n for n in manifest.tensors if n.startswith(layers)})
    paths = {g: cache.group_path(manifest, g) for g in ("blk.1", "blk.2", "blk.3")}
    for age, g in enumerate(("blk.3", "blk.1", "blk.2")):  # blk.3 used longest ago
        os.utime(paths[g], (1000 + age, 1000 + age))
    size = paths["blk.1"].stat().st_size
    cache.limit = 2 * size + 10_000
    assert cache.evict(keep={paths["blk.3"]}) == [paths["blk.1"]]
    assert cache.held(manifest.fingerprint) == {"blk.2", "blk.3"}
    assert cache.models()[0]["groups"] == 2
    for wrong in ("..", "nope"):  # a fingerprint is a cached model's, never a path
        with pytest.raises(RinginferError, match="no model .* in the shard cache"):
            cache.clear(wrong)
    assert cache.clear() == 2 * size and cache.models() == []


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_hugging_face_directory_is_cached_by_groups_and_loads_exactly(
    tiny_models, family, tmp_path
):
    from safetensors import safe_open

    path = tiny_models[family]
    whole = open_checkpoint(str(path))
    manifest = build(path, family)
    n = whole.n_layers
    assert manifest.format == "safetensors"
    assert {e.layer for e in manifest.tensors.values()} == {None, *range(n)}
    with safe_open(path / "model.safetensors", "pt") as f:  # the library's view: the oracle
        for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
            raw = f.get_tensor(name).contiguous().view(-1).view(torch.uint8).numpy()
            assert manifest.tensors[name].sha256 == hashlib.sha256(raw).hexdigest()
    copy = tmp_path / "copy"  # the same model elsewhere: the same fingerprint
    shutil.copytree(path, copy)
    assert load_or_build(copy, "another name", tmp_path).fingerprint == manifest.fingerprint
    (copy / "config.json").write_text((copy / "config.json").read_text() + " ")
    assert build(copy, family).fingerprint != manifest.fingerprint  # its config is its own

    cache = ShardCache(tmp_path / "cache")
    cache.store_model(manifest, bundle(path))
    assert (cache.model_dir(manifest.fingerprint) / "config.json").read_bytes() == (
        path / "config.json"
    ).read_bytes()
    names = stage_tensors(whole, 1, n)
    fill(cache, manifest, SafetensorsDir(path, whole.files), names)
    assert cache.held(manifest.fingerprint) == manifest.groups(names).keys()
    layer = next(g for g in manifest.groups(names) if g == "blk.1")
    with safe_open(cache.group_path(manifest, layer), "pt") as f:  # readable like any
        assert set(f.keys()) == {e.name for e in manifest.groups()[layer]}

    cached = cache.checkpoint(manifest)
    assert cached.config == whole.config
    ours = load_stage(cached, 1, n, torch.device("cpu"), torch.float32)
    theirs = load_stage(whole, 1, n, torch.device("cpu"), torch.float32)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RinginferError):
        load_stage(cached, 0, 1, torch.device("cpu"), torch.float32)


def test_bundled_files_from_a_peer_must_be_plain_names():
    ok = b'{"config.json": "e30=", "tokenizer.json": "e30="}'
    assert unbundle(ok) == {"config.json": b"{}", "tokenizer.json": b"{}"}
    for bad in (b'{"../config.json": "e30=", "config.json": "e30="}', b'{"tokenizer.json": ""}',
                b'{"config.json": "!!"}', b"[]", b"\xff"):  # fmt: skip
        with pytest.raises(RinginferError, match="malformed model files"):
            unbundle(bad)


HOSTILE_NAMES = ["../x", "../../etc/passwd", "/etc/passwd", "a/b", "a\x00b", "x\n", "..",
                 "header", "blk.0.weight.part", ".hidden", ""]  # fmt: skip


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_manifest_naming_a_path_is_refused(source, name):  # noqa: ANN001
    wire = json.loads(json.dumps(source[2].to_json()))
    wire["tensors"].append([name, None, 0, [4], 16, "0" * 64])
    with pytest.raises(RinginferError, match="malformed model manifest"):
        Manifest.from_json(wire)


def test_cache_paths_never_leave_the_cache_dir(source, tmp_path):
    """Even a manifest built past from_json's checks: nothing is written or read outside."""
    _, _, manifest = source
    cache = ShardCache(tmp_path / "cache")
    (tmp_path / "x.gguf").write_bytes(b"outside")
    entry = next(iter(manifest.tensors.values()))
    bad = dataclasses.replace(entry, name="../../x", layer=None)
    hostile = dataclasses.replace(manifest, tensors={bad.name: bad})
    with pytest.raises(RinginferError, match="not a file of the shard cache"):
        cache.writer(hostile, bad.group)
    with pytest.raises(RinginferError, match="not a file of the shard cache"):
        CachedTensors(cache, hostile).read_bytes(bad.name, 0, 4)
    assert (tmp_path / "x.gguf").read_bytes() == b"outside"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]  # no cache dir made


def test_a_done_record_is_not_trusted_without_hashing(source, tmp_path):
    _, file, manifest = source
    cache = ShardCache(tmp_path)
    w = cache.writer(manifest, "blk.4")
    first, second = w.missing()[:2]
    w.write(first.name, 0, file.read_bytes(first.name, 0, first.n_bytes).tobytes())
    assert w.verify(first.name)
    w.close()
    with open(w.path.with_suffix(".done"), "a") as f:  # claims a tensor never written
        f.write(second.name + "\n")
    resumed = cache.writer(manifest, "blk.4")
    assert resumed.verified == {first.name}
    w.write(first.name, 0, b"\xff" * 8)  # the verified one changed on disk since
    w.close()
    assert cache.writer(manifest, "blk.4").verified == set()


def _open_fds() -> set[str]:
    return {os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
            if os.path.exists(f"/proc/self/fd/{fd}")}  # fmt: skip


def test_eviction_closes_open_files_and_counts_and_evicts_part_files(source, tmp_path):
    _, file, manifest = source
    cache = ShardCache(tmp_path)
    fill(cache, manifest, file, {n for n in manifest.tensors if n.startswith(("blk.1.", "blk.2."))})
    paths = {g: cache.group_path(manifest, g) for g in ("blk.1", "blk.2")}
    reader = CachedTensors(cache, manifest)
    name = next(n for n in manifest.tensors if n.startswith("blk.1."))
    reader.read_bytes(name, 0, 16)
    assert str(paths["blk.1"]) in _open_fds()
    part = cache.writer(manifest, "blk.3")  # a fetch given up: its .part stays behind
    e = part.missing()[0]
    part.write(e.name, 0, file.read_bytes(e.name, 0, e.n_bytes).tobytes())
    assert part.verify(e.name)
    part.close()
    gone = [paths["blk.2"], part.path, part.path.with_suffix(".done")]
    for age, p in enumerate([*gone, paths["blk.1"]]):
        os.utime(p, (1000 + age, 1000 + age))
    assert part.path.stat().st_size >= paths["blk.2"].stat().st_size  # at its full size
    total = sum(p.stat().st_size for p in cache.model_dir(manifest.fingerprint).iterdir())
    cache.limit = total - sum(p.stat().st_size for p in gone)  # room for all but blk.1's
    assert set(cache.evict(keep=set())) == set(gone)
    cache.limit = 0
    assert cache.evict(keep=set()) == [paths["blk.1"]]
    assert str(paths["blk.1"]) not in _open_fds() and not reader.groups
    assert not [p for p in cache.model_dir(manifest.fingerprint).iterdir() if
                p.name.startswith("blk.")]  # fmt: skip


def test_a_hostile_header_from_a_peer_is_one_line(source, tmp_path):
    """A member with the secret may send any header its manifest hashes: a GGUF header
    claiming a 2**40-byte string is a RinginferError, before any allocation."""
    _, _, manifest = source
    header = struct.pack("<IIQQQ", GGUF_MAGIC, 3, 0, 1, 1 << 40) + b"k" + bytes(64)
    hostile = dataclasses.replace(manifest, header_bytes=len(header),
                                  header_sha256=hashlib.sha256(header).hexdigest())  # fmt: skip
    cache = ShardCache(tmp_path)
    cache.store_model(hostile, header)
    with pytest.raises(RinginferError, match="not a readable GGUF header") as e:
        cache.checkpoint(hostile)
    assert "\n" not in str(e.value)
