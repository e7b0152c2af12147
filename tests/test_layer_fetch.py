"""One machine has the model: the others, started without --model, fetch only their own
layers from it. Four network namespaces on one bridge, real mDNS (no --peer), real daemons.

The model is the default GGUF with another name in its header: a model only the first host
has (the embedded default, installed everywhere here, must not be what the others serve).
The oracle for the generation is `generate --local` on that file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from node.engine.manifest import build
from node.engine.weights import GGUFCheckpoint, stage_tensors
from tests.conftest import run_cli
from tests.daemons import Cluster, Daemon, renamed_model
from tests.lan import Lan, module_lan
from tests.test_discovery import MEMORY, PORT, PROMPT

PINS = [(0, 8), (8, 16), (16, 23), (23, 30)]


def start(lan: Lan, root: Path, i: int, *args: str) -> Daemon:
    a, b = PINS[i]
    # Pinned: the rest can plan nothing without a leaving node, which so waits briefly.
    flags = [*MEMORY, "--layers", f"{a}:{b}", "--leave-timeout", "3", *args]
    return Daemon(root, f"n{i + 1}", PORT, flags, netns=lan.hosts[i], host=lan.address(i))


def cache_bytes(d: Daemon) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (d.data_dir / "cache").rglob("*") if p.is_file()}


lan = module_lan(4)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return renamed_model(tmp_path_factory.mktemp("model") / "only-here.gguf")


@pytest.fixture(scope="module")
def cluster(lan: Lan, model: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("fetch")
    first = start(lan, root, 0, "--model", str(model))
    deadline = time.monotonic() + 60  # up (and advertising) before the others ask
    while first.cli("status", "--node", first.address, timeout=30).returncode != 0:
        assert time.monotonic() < deadline and first.proc.poll() is None, first.text()
        time.sleep(0.5)
    others = [start(lan, root, i) for i in range(1, 4)]
    cluster = Cluster(root, 4, [], nodes=[first, *others])
    yield cluster
    cluster.stop()


def test_each_node_fetches_exactly_its_own_layers(cluster: Cluster, model: Path) -> None:
    ckpt = GGUFCheckpoint(model, "only-here")
    manifest = build(model, "only-here")
    assert not (cluster.nodes[0].data_dir / "cache").exists()  # it holds the file: no fetch
    for d, (a, b) in zip(cluster.nodes[1:], PINS[1:], strict=True):
        assert f"serving the cluster's model {model}" in d.text()
        assert f"layers {a}-{b} built as their tensors came" in d.text()  # not in the pause
        need = manifest.header_bytes + sum(
            manifest.tensors[n].n_bytes for n in stage_tensors(ckpt, a, b)
        )
        held = sum(cache_bytes(d).values()) - len(json.dumps(manifest.to_json()))
        assert need <= held <= need * 1.02, (d.name, need, held)
        assert held < model.stat().st_size / 2  # never the whole file
        groups = {p.stem for p in (d.data_dir / "cache").rglob("blk.*.gguf")}
        assert groups == {f"blk.{i}" for i in range(a, b)}


def test_a_generation_from_the_last_equals_local(cluster: Cluster, model: Path) -> None:
    args = [PROMPT, "--max-tokens", "24", "--ignore-eos", "--json"]
    ring = cluster.nodes[3].cli("generate", "--node", cluster.nodes[3].address, *args)
    assert ring.returncode == 0, ring.stderr
    local = run_cli("generate", "--local", "--model", str(model), *args)
    assert local.returncode == 0, local.stderr
    assert json.loads(ring.stdout)["tokens"] == json.loads(local.stdout)["tokens"]


def test_restarted_nodes_fetch_nothing_again(cluster: Cluster, lan: Lan) -> None:
    before = [cache_bytes(d) for d in cluster.nodes[1:]]
    root = cluster.nodes[0].log.parent
    for d in cluster.nodes[1:]:
        assert d.stop() == 0
    cluster.nodes[1:] = [start(lan, root, i) for i in range(1, 4)]
    cluster.wait_live(4)
    for d, was in zip(cluster.nodes[1:], before, strict=True):
        assert "fetching" not in d.text(), d.text()
        assert cache_bytes(d) == was
