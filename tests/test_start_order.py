"""Daemons start in any order: three started at once on a LAN of network namespaces, only
the first given --model. The other two find nobody yet (the first is still opening its model
and measuring itself), so they serve the embedded default; once they hear that a member
serves another model they start again on it, fetch their layers from it, and the three
converge on one plan that generates what `generate --local` does on that model.

The given model is the default GGUF with another name in its header (tests/daemons.py): the
same weights, another fingerprint. The two others have their capabilities cached (they start
fast); the first measures its own, as on a fresh machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.daemons import Cluster, Daemon, renamed_model, seed_capabilities
from tests.lan import Lan, module_lan
from tests.test_discovery import MEMORY, PORT, PROMPT

PINS = [(0, 10), (10, 20), (20, 30)]

lan = module_lan(3)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return renamed_model(tmp_path_factory.mktemp("model") / "given.gguf")


@pytest.fixture(scope="module")
def cluster(lan: Lan, model: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("order")
    for i in (1, 2):
        seed_capabilities(root / f"n{i + 1}")
    nodes = []
    for i, (a, b) in enumerate(PINS):
        given = ["--model", str(model)] if i == 0 else []
        flags = [*MEMORY, "--layers", f"{a}:{b}", "--leave-timeout", "3", *given]
        nodes.append(Daemon(root, f"n{i + 1}", PORT, flags, netns=lan.hosts[i],
                            host=lan.address(i)))  # fmt: skip
    cluster = Cluster(root, 3, [], nodes=nodes)
    yield cluster
    cluster.stop()


def test_the_defaults_give_way_to_the_given_model(cluster: Cluster, model: Path) -> None:
    first = cluster.nodes[0]
    assert "given with --model" in first.text()
    for d in cluster.nodes[1:]:
        log = d.text()
        assert "no member answered: serving the embedded default" in log, log
        assert f"switching to model {model}" in log, log
        assert "serving the cluster's model" in log, log
        assert d.proc.poll() is None  # the same process, started again on the model
    statuses = [d.status() for d in cluster.nodes]
    assert {s["model"] for s in statuses} == {statuses[0]["model"]}, statuses


def test_they_generate_what_local_does(cluster: Cluster, model: Path) -> None:
    args = [PROMPT, "--max-tokens", "24", "--ignore-eos", "--json"]
    last = cluster.nodes[2]
    ring = last.cli("generate", "--node", last.address, *args)
    assert ring.returncode == 0, ring.stderr
    local = run_cli("generate", "--local", "--model", str(model), *args)
    assert local.returncode == 0, local.stderr
    assert json.loads(ring.stdout)["tokens"] == json.loads(local.stdout)["tokens"]
