"""A Hugging Face model shared by layers: one daemon serves it from its hub cache (a
snapshot of symlinks into blobs, as huggingface_hub lays it out), the other starts without
--model and fetches only its own layers' tensors and the model's config and tokenizer
files. Real daemons on loopback; the oracle is `generate --local` on the hub model."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from node.engine.manifest import build
from node.engine.weights import HFCheckpoint, stage_tensors
from tests.conftest import run_cli
from tests.daemons import Cluster, Daemon, free_port, seed_capabilities
from tests.test_discovery import MEMORY, PROMPT

REPO = "acme/tiny-llama"


def hub_cache(root: Path, model: Path) -> Path:
    """`model`'s files in a hub cache under `root`: blobs by hash, a snapshot of links."""
    repo = root / f"models--{REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in model.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    return snapshot


@pytest.fixture(scope="module")
def ring(llama_with_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("hf-fetch")
    snapshot = hub_cache(root / "hub", llama_with_tokenizer)
    env = {"HF_HUB_CACHE": str(root / "hub")}
    port = free_port()
    peer = ["--no-mdns", "--peer", f"127.0.0.1:{port}"]
    for name in ("h1", "h2"):
        seed_capabilities(root / name)
    os.environ.update(env)  # the holder's hub cache; the other never sees the model
    try:
        h1 = Daemon(root, "h1", port, [*MEMORY, *peer, "--model", REPO, "--layers", "0:2"])
    finally:
        del os.environ["HF_HUB_CACHE"]
    deadline = time.monotonic() + 60
    while h1.cli("status", "--node", h1.address, timeout=30).returncode != 0:
        assert time.monotonic() < deadline and h1.proc.poll() is None, h1.text()
        time.sleep(0.5)
    h2 = Daemon(root, "h2", free_port(), [*MEMORY, *peer, "--layers", "2:4"])
    cluster = Cluster(root, 2, [], nodes=[h1, h2])
    yield cluster, snapshot, env
    cluster.stop()


def test_the_member_without_the_model_holds_only_its_layers(ring) -> None:
    cluster, snapshot, _ = ring
    h2 = cluster.nodes[1]
    assert f"serving the cluster's model {REPO}" in h2.text()
    manifest = build(snapshot, REPO)
    cached = h2.data_dir / "cache" / manifest.fingerprint
    groups = {p.stem for p in cached.glob("*.safetensors")}
    need = stage_tensors(HFCheckpoint(snapshot, REPO), 2, 4)
    assert groups == set(manifest.groups(need))  # layers 2-3, the final norm, the head
    assert {"blk.2", "blk.3"} <= groups and "blk.0" not in groups
    held = sum(p.stat().st_size for p in cached.glob("*.safetensors"))
    want = sum(manifest.tensors[n].n_bytes for n in need)
    assert want <= held <= want * 1.02 + 4096 * len(groups)  # tensors and their headers
    for f in ("config.json", "tokenizer.json"):  # what opening the model needs
        assert (cached / f).read_bytes() == (snapshot / f).read_bytes()
    listed = h2.cli("cache", "--data-dir", str(h2.data_dir), "--json")
    assert listed.returncode == 0, listed.stderr
    [entry] = json.loads(listed.stdout)
    assert (entry["name"], entry["groups"], entry["of"]) == (
        REPO, len(groups), len(manifest.groups()))  # fmt: skip


def test_a_generation_from_it_equals_local(ring) -> None:
    cluster, _, env = ring
    h2 = cluster.nodes[1]
    args = [PROMPT, "--max-tokens", "16", "--ignore-eos", "--json"]
    ring_out = h2.cli("generate", "--node", h2.address, *args)
    assert ring_out.returncode == 0, ring_out.stderr
    local = run_cli("generate", "--local", "--model", REPO, *args, env=env)
    assert local.returncode == 0, local.stderr
    assert json.loads(ring_out.stdout)["tokens"] == json.loads(local.stdout)["tokens"]
