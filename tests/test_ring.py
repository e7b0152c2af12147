"""Three daemons as real processes on loopback against `generate --local`, the oracle."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import zmq

from protocol.wire import VERSION, Kind, encode, message
from tests.conftest import TEXT, run_cli, with_tokenizer
from tests.daemons import EXACT_RING, Cluster
from tests.test_gguf import write_gguf

PROMPTS = ["The capital of France is", "Once upon a time"]
TOKENS = 24
SAMPLED = [  # top-k; top-p; temperature alone, which sends the whole vocabulary's logits
    ("--temperature", "0.8", "--top-k", "40"),
    ("--temperature", "1.0", "--top-p", "0.9"),
    ("--temperature", "0.7"),
]


def local(prompt: str, *args: str) -> list[int]:
    proc = run_cli("generate", "--local", "--json", prompt, "--max-tokens", str(TOKENS), *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["tokens"]


def remote(node: str, prompt: str, *args: str) -> dict:
    proc = run_cli("generate", "--node", node, "--json", prompt, "--max-tokens", str(TOKENS), *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def streaming(address: str) -> subprocess.Popen:
    """A long generation through `address`, once its first tokens have arrived."""
    cmd = [sys.executable, "-m", "node.cli", "generate", "--node", address,
           "Tell me a long story", "--max-tokens", "400", "--ignore-eos"]  # fmt: skip
    client = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert client.stdout.read(10)
    return client


def stop_while_streaming(cluster: Cluster, requester: int, stopped: int) -> str:
    """SIGTERM one daemon during a generation: the generation completes (the daemon leaves
    once a plan without it is live, or its own request is done), and it exits 0."""
    client = streaming(cluster.nodes[requester].address)
    assert cluster.nodes[stopped].stop(signal.SIGTERM) == 0
    assert "stopped" in cluster.nodes[stopped].text()
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err
    return out


def kill_while_streaming(cluster: Cluster, requester: int, killed: int) -> str:
    """SIGKILL one stage during a generation: the requester replays it into the nodes left,
    and the client sees it complete."""
    client = streaming(cluster.nodes[requester].address)
    cluster.nodes[killed].stop(signal.SIGKILL)
    out, err = client.communicate(timeout=120)
    assert client.returncode == 0, err
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    c = Cluster(tmp_path_factory.mktemp("ring"), 3, EXACT_RING)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def expected() -> dict[str, list[int]]:
    return {p: local(p) for p in PROMPTS}


def test_status_shows_one_plan_over_three_nodes(cluster):  # noqa: ANN001
    status = cluster.nodes[2].status()
    assert status["live"] and status["model"] == "SmolLM2-135M-Instruct"
    nodes = status["nodes"]
    assert {n["name"] for n in nodes} == {"node1", "node2", "node3"}
    assert {n["address"] for n in nodes} == {d.address for d in cluster.nodes}
    assert covers(status, 3)
    assert all(n["state"] == "ready" and len(n["id"]) == 16 for n in nodes)
    assert all(n["device"] == "cpu" and n["flops"] > 0 and n["memory_total"] > 0 for n in nodes)
    assert sum(n["rtt_ms"] is None for n in nodes) == 1  # the node asked has no RTT to itself
    assert status["cluster"] == "default" and status["predicted"]["tpot_ms"] > 0
    assert status["problems"] == []
    assert status["node"] == next(n["id"] for n in nodes if n["name"] == "node3")
    # Quantized stages: int4 layers from the file's Q4_1, the ends' int8 table from its Q8_0.
    by_start = {n["layers"][0]: n["quantization"] for n in nodes}
    assert by_start[0] == "int8+int4" and set(by_start.values()) <= {"int8+int4", "int4"}


def covers(status: dict, stages: int) -> bool:
    """The plan has `stages` stages, each on a listed node, covering the model once."""
    layers = sorted(n["layers"] for n in status["nodes"] if n["layers"])
    flat = [b for a in layers for b in a]
    return (
        len(layers) == stages
        and flat[0] == 0
        and flat[-1] == 30
        and all(flat[i] == flat[i + 1] for i in range(1, len(flat) - 1, 2))
    )


def test_every_node_generates_what_local_generates(cluster, expected):  # noqa: ANN001
    for d in cluster.nodes:
        out = remote(d.address, PROMPTS[0])
        assert out["tokens"] == expected[PROMPTS[0]], d.name
        starts = sorted(n["layers"][0] for n in d.status()["nodes"])
        assert [s["start"] for s in out["plan"]] == starts
    plain = run_cli("generate", "--node", cluster.nodes[0].address, PROMPTS[0],
                    "--max-tokens", str(TOKENS))  # fmt: skip
    assert plain.stdout == out["text"] + "\n"


def test_perplexity_through_the_ring_equals_local(cluster):  # noqa: ANN001
    """Every window crosses three stages and is scored on the last."""
    args = ("perplexity", str(TEXT), "--context", "128", "--json")
    local = run_cli(*args, "--local")
    through = cluster.nodes[1].cli(*args, "--node", cluster.nodes[1].address)
    assert local.returncode == 0 and through.returncode == 0, (local.stderr, through.stderr)
    want, got = json.loads(local.stdout), json.loads(through.stdout)
    assert got["tokens"] == want["tokens"] and got["windows"] == want["windows"] > 3
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-6), (got, want)
    assert got["quantization"] in ("int8+int4, int4", "int4, int8+int4")


def test_status_answers_during_a_long_prefill(cluster):  # noqa: ANN001
    nodes = cluster.nodes[0].status()["nodes"]
    first_stage = next(n["address"] for n in nodes if n["layers"][0] == 0)
    prompt = "word " * 3000  # a prefill of seconds on each stage
    cmd = [sys.executable, "-m", "node.cli", "generate", "--node", cluster.nodes[2].address,
           prompt, "--max-tokens", "2"]  # fmt: skip
    client = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    slowest, busy = 0.0, 0
    try:
        while client.poll() is None:
            began = time.monotonic()
            busy += raw_status(first_stage)["stats"]["cached_requests"]
            slowest = max(slowest, time.monotonic() - began)
            time.sleep(0.05)
    finally:
        client.kill()
    assert client.returncode == 0, client.stderr.read()
    assert busy >= 5 and slowest < 0.5, (busy, slowest)


def test_two_prompts_from_two_nodes_at_once(cluster, expected):  # noqa: ANN001
    results: dict[str, dict] = {}

    def run(node: str, prompt: str) -> None:
        results[prompt] = remote(node, prompt)

    threads = [
        threading.Thread(target=run, args=(cluster.nodes[i].address, p))
        for i, p in zip((0, 2), PROMPTS, strict=True)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in PROMPTS:
        assert results[p]["tokens"] == expected[p]


def test_a_killed_client_frees_every_stage(cluster):  # noqa: ANN001
    client = streaming(cluster.nodes[1].address)
    held = [d.status()["stats"]["cached_requests"] for d in cluster.nodes]
    assert held == [1, 1, 1]
    client.kill()
    client.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = [d.status()["stats"] for d in cluster.nodes]
        if all(s["cached_requests"] == 0 and s["requests_in_flight"] == 0 for s in stats):
            break
        time.sleep(0.2)
    assert all(s["cached_requests"] == 0 and s["requests_in_flight"] == 0 for s in stats), stats
    assert "client went away" in cluster.nodes[1].text()


def raw_status(address: str) -> dict:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{address}")
    try:
        sock.send_multipart(encode(message(Kind.STATUS)))
        assert sock.poll(5000), "no status reply"
        return json.loads(sock.recv_multipart()[0])["body"]["status"]
    finally:
        ctx.destroy(linger=0)


def raw_exchange(address: str, frames: list[bytes]) -> dict:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{address}")
    try:
        sock.send_multipart(frames)
        assert sock.poll(5000), "no reply"
        header = json.loads(sock.recv_multipart()[0])
        assert header["type"] == "error"
        return header["body"]
    finally:
        ctx.destroy(linger=0)


def frames(tensor: bytes = b"", part: dict | None = None, **fields: object) -> list[bytes]:
    """A FORWARD of one request to the second stage (hidden size 576), with `part` overriding
    the request's piece and `fields` the header."""
    piece = {"req": "x1", "step": 0, "start": 0, "count": 1, "end": 1, "requester": "nobody",
             "capacity": 8, "sampling": {}, **(part or {})}  # fmt: skip
    header = {
        "v": VERSION, "type": "forward", "epoch": 1, "body": {"parts": [piece]},
        "tensors": [{"dtype": "float16", "shape": [1, 576]}],
    }  # fmt: skip
    return [json.dumps({**header, **fields}).encode(), tensor]


def test_bad_frames_get_errors_and_the_daemon_still_serves(cluster, expected):  # noqa: ANN001
    status = cluster.nodes[0].status()
    middle = next(n["address"] for n in status["nodes"] if 0 < n["layers"][0] < 20)
    target = next(d for d in cluster.nodes if d.address == middle)
    epoch = status["epoch"]
    hidden = bytes(576 * 2)
    bad_request = {"prompt": "hi", "max_tokens": 4, "sampling": {"temperature": -1}}
    cases = [
        ([b"\x00\x01garbage"], "malformed"),
        (frames(hidden, v=VERSION + 1), "version"),
        (frames(hidden, type="shutdown"), "unknown-type"),
        (frames(hidden[:-2], epoch=epoch), "bad-tensor"),  # truncated
        # claims 64 MiB (a 64 MiB frame itself is dropped by ZMQ_MAXMSGSIZE: test_bounds.py)
        (frames(hidden, tensors=[{"dtype": "float32", "shape": [16 << 20]}]), "too-large"),
        (frames(hidden, epoch=epoch + 100), "wrong-epoch"),
        (frames(hidden, {"step": 3}, epoch=epoch), "unknown-request"),
        (
            frames(bytes(14), epoch=epoch, tensors=[{"dtype": "float16", "shape": [1, 7]}]),
            "bad-tensor",
        ),  # fmt: skip
        (frames(hidden, {"end": 9}, epoch=epoch), "bad-positions"),  # past its capacity
        (frames(hidden, {"count": 2, "end": 2}, epoch=epoch), "bad-tensor"),  # rows != counts
        (frames(hidden, {"req": ""}, epoch=epoch), "malformed"),
        (encode(message(Kind.TOKEN, body={"token": 1, "text": "x"})), "unexpected"),
        (encode(message(Kind.GENERATE, body=bad_request)), "bad-request"),
    ]
    for case, code in cases:
        assert raw_exchange(target.address, case)["code"] == code, code
    status = target.status()
    assert sum(status["stats"]["errors"].values()) >= len(cases)
    assert status["stats"]["cached_requests"] == 0
    assert f"protocol version {VERSION + 1} received; this node speaks {VERSION}" in target.text()
    assert remote(target.address, PROMPTS[0])["tokens"] == expected[PROMPTS[0]]


def test_stopped_node_gives_a_new_epoch_that_still_generates(cluster, expected):  # noqa: ANN001
    before = cluster.nodes[0].status()["epoch"]
    # a generation running while a stage stops cleanly completes; the stage leaves after it
    stop_while_streaming(cluster, requester=0, stopped=2)
    assert "leaving: waiting up to" in cluster.nodes[2].text()
    status = cluster.wait_live(2)
    assert status["epoch"] > before
    assert covers(status, 2)
    assert remote(cluster.nodes[1].address, PROMPTS[1])["tokens"] == expected[PROMPTS[1]]


def test_a_killed_stage_is_replayed_around_and_the_rest_replan(cluster, expected):  # noqa: ANN001
    out = kill_while_streaming(cluster, requester=0, killed=1)
    assert len(out) > 100  # the generation went on (tests/test_replay.py checks its tokens)
    assert "replaying" in cluster.nodes[0].text() and "node2" in cluster.nodes[0].text()
    status = cluster.wait_live(1)
    assert [n["layers"] for n in status["nodes"]] == [[0, 30]]
    assert cluster.nodes[0].status()["stats"]["cached_requests"] == 0
    assert remote(cluster.nodes[0].address, PROMPTS[0])["tokens"] == expected[PROMPTS[0]]


def test_stopping_a_requester_finishes_its_request_first(cluster):  # noqa: ANN001
    out = stop_while_streaming(cluster, requester=0, stopped=0)
    assert len(out) > 100


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3_moe", "deepseek_v3", "qwen3_next"])
def test_tiny_random_models_on_the_ring_equal_local(
    tiny_models,
    llama_with_tokenizer,
    tmp_path,
    family,  # noqa: ANN001
):
    model = {
        "llama": lambda: llama_with_tokenizer,
        "gpt2": lambda: tiny_models["gpt2"],
        # Experts kept as int4 from a GGUF's Q4_0 blocks, stacked as llama.cpp stacks them.
        "qwen3_moe": lambda: write_gguf(tiny_models["qwen3_moe"], tmp_path / "moe.gguf", "Q4_0"),
        # Latent attention's one-vector caches and grouped experts across three stages.
        "deepseek_v3": lambda: with_tokenizer("deepseek_v3", tmp_path / "deepseek"),
        # DeltaNet layers' recurrent states carried across prompt chunks and decode steps.
        "qwen3_next": lambda: with_tokenizer("qwen3_next", tmp_path / "qwen3_next"),
    }[family]()
    model = str(model)
    # GPT-2: the default float16 wire, the third node first. The others: a float32 wire,
    # which makes the ring bit-exact, so (Llama) seeded sampling must draw the same tokens
    # as --local. Pinned: the planner would keep a model this small on one node.
    order = ["1:3", "3:4", "0:1"] if family == "gpt2" else ["0:1", "1:2", "2:4"]
    pins = {i: ["--layers", r] for i, r in enumerate(order)}
    wire = ["--wire-dtype", "float32"] if family != "gpt2" else []
    c = Cluster(tmp_path, 3, ["--model", model, *wire], pins)
    try:
        nodes = c.nodes[0].status()["nodes"]
        by_name = {n["name"]: n["layers"] for n in nodes}
        assert by_name == {f"node{i + 1}": [int(x) for x in r.split(":")]
                           for i, r in enumerate(order)}  # fmt: skip
        for prompt in PROMPTS:
            want = local(prompt, "--model", model)
            assert remote(c.nodes[1].address, prompt)["tokens"] == want
        for sampling in SAMPLED if family == "llama" else []:
            args = (*sampling, "--seed", "5")
            want = local(PROMPTS[1], "--model", model, *args)
            assert remote(c.nodes[2].address, PROMPTS[1], *args)["tokens"] == want, sampling
    finally:
        c.stop()


def test_an_abandoned_request_is_freed_after_the_idle_timeout(tiny_models, tmp_path):  # noqa: ANN001
    model = str(tiny_models["gpt2"])
    pins = {0: ["--layers", "0:2"], 1: ["--layers", "2:4"]}
    c = Cluster(tmp_path, 2, ["--model", model, "--request-timeout", "2"], pins)
    try:
        status = c.nodes[0].status()
        first = next(n for n in status["nodes"] if n["layers"][0] == 0)
        last = next(n for n in status["nodes"] if n["layers"][0] != 0)
        # a prefill whose requester never asks again: no END will ever come
        ids = bytes(8 * 3)  # token ids 0, 0, 0
        piece = {"req": "abandoned", "step": 0, "start": 0, "count": 3, "end": 3,
                 "requester": last["id"], "capacity": 8, "sampling": {}}  # fmt: skip
        header = {
            "v": VERSION, "type": "forward", "epoch": status["epoch"], "body": {"parts": [piece]},
            "tensors": [{"dtype": "int64", "shape": [3]}],
        }  # fmt: skip
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(f"tcp://{first['address']}")
        sock.send_multipart([json.dumps(header).encode(), ids])
        ctx.destroy(linger=1000)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            held = [raw_status(n["address"])["stats"]["cached_requests"] for n in (first, last)]
            if held == [1, 1]:
                break
        assert held == [1, 1]
        time.sleep(5)
        held = [raw_status(n["address"])["stats"]["cached_requests"] for n in (first, last)]
        assert held == [0, 0]
        assert all("idle for 2s: cache freed" in d.text() for d in c.nodes)
    finally:
        c.stop()
