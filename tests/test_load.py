"""Bounded load: a stage admits requests while their caches fit the memory it offered;
beyond that a request waits in its requester's bounded queue, told its place, and past the
queue gets `busy` (one line; a 503 through the API), never an OOM."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time

import pytest

from tests.conftest import run_cli
from tests.daemons import Cluster

# The default model's weights and one 4096-position KV budget fit (the planner's rule), so
# one request of 3000 positions is admitted and a second one is not.
BIG = ["--max-tokens", "3000", "--ignore-eos"]


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    c = Cluster(tmp_path_factory.mktemp("load"), 1, ["--max-memory", "320M", "--max-queue", "1"])
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
