"""A request survives the loss of a stage, or a stage's pass that raises: the requester
replays its history into the next plan and the tokens are exactly those of an uninterrupted
run (`generate --local`)."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import run_cli, with_tokenizer
from tests.daemons import EXACT_RING, Cluster, Daemon

PROMPT = "Tell me about the history of Paris"
TOKENS = 250
SEEDED = ("--temperature", "0.9", "--top-p", "0.9", "--seed", "5")
# node2's 10th pass of two or more requests raises (stage_server.py's RINGINFER_FAULT).
FAULT = {1: {"RINGINFER_FAULT": "pass:2:10"}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    c = Cluster(tmp_path_factory.mktemp("replay"), 3, EXACT_RING, env=FAULT)
    yield c
    c.stop()


@functools.cache
def local(*args: str) -> list[int]:
    proc = run_cli("generate", "--local", "--json", PROMPT, "--max-tokens", str(TOKENS),
                   "--ignore-eos", *args)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["tokens"]


def at_token_50(requester: Daemon, *args: str) -> subprocess.Popen:
    """A generation through `requester`, once ~50 of its tokens have come (`args` may set
    --max-tokens again: the last one counts)."""
    steps = requester.status()["stats"]["decode_steps"]  # the requester is the first stage
    cmd = [sys.executable, "-m", "node.cli", "generate", "--node", requester.address, PROMPT,
           "--max-tokens", str(TOKENS), "--ignore-eos", "--json", *args]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **requester.env})  # fmt: skip
    deadline = time.monotonic() + 60
    while requester.status()["stats"]["decode_steps"] - steps < 50:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc


def result_of(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert err == "", err  # the client sees no error
    return json.loads(out)


def kill_at_token_50(requester: Daemon, victim: Daemon, *args: str) -> dict:
    """A generation through `requester`; `victim` SIGKILLed once ~50 tokens have come."""
    proc = at_token_50(requester, *args)
    victim.stop(signal.SIGKILL)
    return result_of(proc)


def test_a_pass_that_raises_mid_batch_is_replayed_exactly(cluster):  # noqa: ANN001
    """Three requests at once (identical rows, so batching changes no rounding); node2's
    pass of two or more of them raises: each is replayed into the same ring, unharmed."""
    want = local()
    first = cluster.nodes[0]
    cmd = [sys.executable, "-m", "node.cli", "generate", "--node", first.address, PROMPT,
           "--max-tokens", str(TOKENS), "--ignore-eos", "--json"]  # fmt: skip
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **first.env})  # fmt: skip
        for _ in range(3)
    ]
    results = [result_of(p) for p in procs]
    assert all(r["tokens"] == want for r in results)
    replayed = [r["replays"] for r in results if "replays" in r]
    assert len(replayed) >= 2 and all("a pass failed" in r[0]["why"] for r in replayed), results
    faulty = cluster.nodes[1].text()
    assert faulty.count("a pass failed") == 1 and "Traceback" not in faulty, faulty[-3000:]


def test_a_killed_middle_stage_is_replayed_around_exactly(cluster):  # noqa: ANN001
    want = local()
    stages = sorted((n["layers"][0], n["name"]) for n in cluster.nodes[0].status()["nodes"])
    by_name = {d.name: d for d in cluster.nodes}
    first, middle, last = (by_name[name] for _, name in stages)
    result = kill_at_token_50(first, middle)
    assert result["tokens"] == want
    [replay] = result["replays"]
    assert middle.name in replay["why"] and 40 <= replay["at_token"] <= 120, replay
    assert "replaying" in first.text()
    cluster.nodes.remove(middle)
    cluster.wait_live(2)


def test_a_killed_last_stage_is_replayed_around_exactly_when_sampling(cluster):  # noqa: ANN001
    want = local(*SEEDED)
    stages = sorted((n["layers"][0], n["name"]) for n in cluster.nodes[0].status()["nodes"])
    by_name = {d.name: d for d in cluster.nodes}
    first, last = (by_name[name] for _, name in stages)
    result = kill_at_token_50(first, last, *SEEDED)
    assert result["tokens"] == want
    assert len(result["replays"]) == 1
    cluster.nodes.remove(last)
    status = cluster.wait_live(1)
    assert status["stats"]["cached_requests"] == 0


def test_in_a_4_node_ring_a_killed_middle_stage_is_replayed_around_exactly(
    tmp_path_factory: pytest.TempPathFactory,
):  # fmt: skip
    want = local()
    cluster = Cluster(tmp_path_factory.mktemp("replay4"), 4, EXACT_RING)
    try:
        stages = sorted((n["layers"][0], n["name"]) for n in cluster.nodes[0].status()["nodes"])
        assert len(stages) == 4, stages
        by_name = {d.name: d for d in cluster.nodes}
        first, third = by_name[stages[0][1]], by_name[stages[2][1]]
        result = kill_at_token_50(first, third)
        assert result["tokens"] == want
        assert len(result["replays"]) == 1 and third.name in result["replays"][0]["why"]
        cluster.nodes.remove(third)
        status = cluster.wait_live(3)
        assert len([n for n in status["nodes"] if n["layers"]]) == 3
    finally:
        cluster.stop()


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen3_next"])
def test_a_killed_stage_of_a_latent_or_recurrent_model_is_replayed_around_exactly(
    tmp_path: pytest.TempPathFactory, family: str
):  # fmt: skip
    """DeepSeek's latent caches and Qwen3-Next's recurrent DeltaNet states (which no pass
    may rewind) are rebuilt in the next plan from the requester's history, as keys and
    values are: the tokens are those of an uninterrupted local run. Tiny random models,
    long enough (900 tokens) that the kill lands mid-generation."""
    model = str(with_tokenizer(family, tmp_path / family, max_position_embeddings=1024))
    longer = ("--max-tokens", "900")
    want = local("--model", model, *longer)
    cluster = Cluster(tmp_path / "ring", 3, ["--model", model, *EXACT_RING])
    try:
        nodes = cluster.nodes[0].status()["nodes"]
        stages = sorted((n["layers"][0], n["name"]) for n in nodes if n["layers"])
        assert len(stages) >= 2, nodes
        by_name = {d.name: d for d in cluster.nodes}
        first, second = by_name[stages[0][1]], by_name[stages[1][1]]
        result = kill_at_token_50(first, second, *longer)
        assert result["tokens"] == want
        [replay] = result["replays"]
        assert second.name in replay["why"] and replay["at_token"] < 900, replay
    finally:
        cluster.stop()
