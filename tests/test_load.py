"""Bounded load: a stage admits requests while their caches fit the memory it offered;
beyond that a request waits in its requester's bounded queue, told its place, and past the
queue gets `busy` (one line; a 503 through the API), never an OOM. And a long request (its
client stopped with Ctrl-Z) holds a new plan back for --plan-deadline at most."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cli
from tests.daemons import Cluster, Daemon, seed_capabilities
from tests.ports import free_port

# The default model's weights and one 4096-position KV budget fit (the planner's rule), so
# one request of 3000 positions is admitted and a second one is not.
BIG = ["--max-tokens", "3000", "--ignore-eos"]
MEMORY = ["--max-memory", "320M"]
DEADLINE = ["--plan-deadline", "3"]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    c = Cluster(tmp_path_factory.mktemp("load"), 1, [*MEMORY, "--max-queue", "1", *DEADLINE])
    yield c.nodes[0]
    c.stop()


def streaming(address: str, prompt: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "node.cli", "generate", "--node", address, prompt, *BIG]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_beyond_the_offered_memory_a_request_queues_then_past_the_queue_is_busy(node):  # noqa: ANN001
    first = streaming(node.address, "Once")
    assert first.stdout.read(5)  # admitted, generating
    second = streaming(node.address, "Twice")
    try:
        assert second.stderr.readline().startswith("queued: 1 of 1 waiting"), "not queued"
        assert node.status()["stats"]["queued"] == 1
        proc = run_cli("generate", "--node", node.address, "Thrice", *BIG)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "[busy]" in proc.stderr and "is full" in proc.stderr
        assert "--max-queue" in proc.stderr
        host, port = node.api.removeprefix("http://").split(":")
        for stream in (False, True):
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            body = {"prompt": "Thrice", "max_tokens": 3000, "ignore_eos": True, "stream": stream}
            conn.request("POST", "/v1/completions", json.dumps(body),
                         {"Content-Type": "application/json"})  # fmt: skip
            response = conn.getresponse()
            error = json.loads(response.read())["error"]
            assert response.status == 503 and response.getheader("Retry-After") == "5"
            assert error["code"] == "busy"
        small = run_cli("generate", "--node", node.address, "Small", "--max-tokens", "4")
        assert small.returncode == 0, small.stderr  # what fits beside it is still served
        first.kill()  # the first client goes: its caches free, and the queued one runs
        assert second.stdout.read(5), second.stderr.read()
        assert node.status()["stats"]["queued"] == 0
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + 10
    while node.status()["stats"]["cached_requests"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert node.status()["stats"]["cached_requests"] == 0
    assert node.proc.poll() is None


def joiner(root: Path, node: Daemon, name: str, *args: str, node_id: str = "") -> Daemon:
    """A daemon joining `node`'s cluster; with `node_id` as its id (ids order coordinators)."""
    seed_capabilities(root / name)
    if node_id:
        (root / name / "node_id").write_text(node_id)
    flags = [*MEMORY, "--no-mdns", "--peer", node.address, *args]
    return Daemon(root, name, free_port(), flags)


def stopped_client(node: Daemon) -> subprocess.Popen:
    """A long generation through `node` whose client is then stopped (SIGSTOP: Ctrl-Z)."""
    client = streaming(node.address, "Once")
    assert client.stdout.read(5)  # admitted, generating
    client.send_signal(signal.SIGSTOP)
    return client


def test_a_stopped_client_holds_a_new_plan_back_only_until_the_deadline(node, tmp_path_factory):  # noqa: ANN001
    """A second node, a stage, leaves while a client stopped with SIGSTOP holds a long
    generation open: the plan without it goes live at the deadline (3 s here), the
    generation still running (replayed into it), not once the generation ends."""
    root = tmp_path_factory.mktemp("leaver")
    leaver = joiner(root, node, "leaver", *DEADLINE, "--layers", "15:30", "--leave-timeout", "120")
    client = None
    try:
        Cluster(root, 2, [], nodes=[node, leaver]).wait_live(2)
        client = stopped_client(node)
        began = time.monotonic()
        assert leaver.stop() == 0  # it leaves once a plan without it is live
        assert time.monotonic() - began < 30, node.text()[-3000:]
        status = node.status()
        while len(status["nodes"]) > 1 and time.monotonic() - began < 30:  # its BYE on its way
            time.sleep(0.2)
            status = node.status()
        assert status["live"] and len(status["nodes"]) == 1
        assert status["stats"]["requests_in_flight"] == 1  # still generating
        assert "still running after 3s go on in it" in node.text()
    finally:
        if client:
            client.kill()
            client.wait()
        leaver.stop(signal.SIGKILL)


def test_a_member_silent_past_the_deadline_is_planned_without(node, tmp_path_factory):  # noqa: ANN001
    """A member that never acks (its client stopped, its own deadline 1000 s) while a third
    node joins: 13 s on, the coordinator (deadline 3 s) plans without it, and it follows."""
    root = tmp_path_factory.mktemp("silent")
    slow = joiner(root, node, "slow", "--plan-deadline", "1000", node_id="f" * 16)
    late = None
    client = None
    try:
        cluster = Cluster(root, 2, [], nodes=[node, slow])
        client = stopped_client(slow)
        late = joiner(root, node, "late", *DEADLINE)
        cluster.nodes.append(late)
        status = cluster.wait_live(3)
        assert [n["layers"] for n in status["nodes"] if n["name"] == "slow"] == [None], status
        assert "slow silent: planned without for 60s" in node.text() + late.text()
        assert slow.status()["stats"]["requests_in_flight"] == 1  # still generating
    finally:
        if client:
            client.kill()
            client.wait()
        for d in (late, slow):
            if d:
                d.stop(signal.SIGKILL)
