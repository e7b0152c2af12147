"""Thousands of mutated frames against each stage of a live ring: every daemon stays up,
keeps its plan, fails nothing as an internal error, logs within its budget, and then
generates exactly what --local does.

Membership and plan messages (HELLO, BYE, PLAN) may change the cluster when well formed
(a member saying goodbye is obeyed): they are fuzzed second, as a member holding the secret
could send them, and the cluster must come back to one live plan that computes exactly.
A stranger without the secret gets nothing through at all (tests/test_secret.py).
"""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

from node.cluster.transfer import IN_FLIGHT, bytes_message
from protocol.wire import VERSION, Kind, Message, decode, encode, message
from tests.conftest import run_cli
from tests.daemons import EXACT_RING, Cluster

FRAMES_PER_NODE = 1200
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    c = Cluster(tmp_path_factory.mktemp("fuzz"), 3, EXACT_RING)
    yield c
    c.stop()


def templates(rng: random.Random, status: dict, node: dict) -> list[list[bytes]]:
    """Well-formed messages of every other type, addressed to `node`'s stage."""
    epoch, first = status["epoch"], node["layers"][0] == 0
    members = [n["id"] for n in status["nodes"]]
    x = torch.tensor([1, 2, 3, 4]) if first else torch.randn(4, 576)
    opening = {"req": "f1", "step": 0, "start": 0, "count": 3, "end": 3,
               "requester": rng.choice([*members, "nobody"]), "capacity": 8,
               "sampling": {"temperature": 0.7, "top_k": 5}}  # fmt: skip
    decoding = {"req": "f2", "step": 1, "start": 3, "count": 1, "end": 4, "requester": members[0]}
    logits, ids = torch.randn(16), torch.arange(16)
    msgs = [
        message(Kind.FORWARD, (x[:3],), epoch=epoch, body={"parts": [opening]}),
        message(Kind.FORWARD, (x,), epoch=epoch, body={"parts": [opening, decoding]}),
        message(Kind.RESULT, (logits, ids), req="r1", epoch=epoch, step=1),
        message(Kind.END, req="f1", epoch=epoch),
        message(Kind.ERROR, req="r1", body={"code": "node-gone", "message": "x"}),
        message(Kind.PING, body={"id": members[0], "t": 1.0}),
        message(Kind.PONG, body={"id": members[-1], "t": time.monotonic()}),
        message(Kind.PLAN_ACK, epoch=epoch, body={"id": members[0], "phase": "load"}),
        message(Kind.STATUS),
        message(Kind.GENERATE, body={"prompt": "hi", "max_tokens": 2, "sampling": {}}),
        message(Kind.SCORE, body={"text": "a b c d", "context": 4}),
        message(Kind.TOKEN, body={"token": 1, "text": "x"}),
        *transfer_messages("0" * 32, "blk.0.attn_q.weight", 0, 64),
    ]  # fmt: skip
    return [encode(m) for m in msgs]


def transfer_messages(fingerprint: str, tensor: str, start: int, size: int) -> list:
    """The weight-sharing messages, a FETCH of bytes `start`+`size` of `tensor` first."""
    return [
        message(Kind.FETCH, body={"fingerprint": fingerprint, "tensor": tensor, "start": start,
                                  "size": size}),
        message(Kind.MANIFEST),
        bytes_message(Kind.CHUNK, b"\0" * 64, body={"tensor": tensor, "start": start}),
        bytes_message(Kind.MANIFEST_REPLY, b"{}", b"GGUF", body={"fingerprint": fingerprint}),
    ]  # fmt: skip


def any_json(rng: random.Random, depth: int = 0) -> object:
    choices = [None, True, -1, 0, 2**63, 1e308, float("nan"), "", "x" * rng.randint(0, 80),
               [], {}]  # fmt: skip
    if depth < 2:
        choices += [[any_json(rng, depth + 1)], {"requester": any_json(rng, depth + 1)}]
    return rng.choice(choices)


def mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    frames = list(frames)
    how = rng.randrange(7)
    if how == 0:  # flip bytes of the header
        head = bytearray(frames[0])
        for _ in range(rng.randint(1, 4)):
            head[rng.randrange(len(head))] = rng.randrange(256)
        frames[0] = bytes(head)
    elif how in (1, 2):  # a header or body field becomes any JSON
        head = json.loads(frames[0])
        target = head if how == 1 or not head.get("body") else head["body"]
        if target is head.get("body") and target.get("parts") and rng.random() < 0.7:
            target = rng.choice(target["parts"])  # one request of a forward
        key = rng.choice([*target, "extra"])
        target[key] = any_json(rng)
        frames[0] = json.dumps(head).encode()
    elif how == 3 and len(frames) > 1:  # a tensor frame of the wrong size or content
        i = rng.randrange(1, len(frames))
        frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)] + rng.randbytes(
            rng.choice([0, 0, 2, 8]))  # fmt: skip
    elif how == 4:  # tensor specs that lie
        head = json.loads(frames[0])
        head["tensors"] = [{"dtype": rng.choice(["float32", "int64", "float16", "bool"]),
                            "shape": [rng.choice([0, 1, 3, 576, 2**40]) for _ in
                                      range(rng.randint(0, 5))]}]  # fmt: skip
        frames[0] = json.dumps(head).encode()
    elif how == 5:  # frames added or dropped
        extra = [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(0, 5))]
        frames = frames[: rng.randint(1, len(frames))] + extra
    else:  # nested or huge headers
        frames[0] = rng.choice([b"[" * 50000, b'{"v":%d,"type":"ping","t":%s}' % (
            VERSION, b"9" * 6000), rng.randbytes(rng.randint(0, 70000))])  # fmt: skip
    return frames


def test_mutated_frames_of_every_type_leave_the_ring_serving_exactly(cluster):  # noqa: ANN001
    rng = random.Random(11)
    before = [d.status() for d in cluster.nodes]
    ctx = zmq.Context()
    sent = 0
    try:
        for d, status in zip(cluster.nodes, before, strict=True):
            me = next(n for n in status["nodes"] if n["id"] == status["node"])
            base = templates(rng, status, me)
            sock = dealer(ctx, d.address)
            for _ in range(FRAMES_PER_NODE):
                sock.send_multipart(mutate(rng, rng.choice(base)))
                sent += 1
            time.sleep(1.0)  # let the daemon work through them while we are still here
            sock.close()
    finally:
        ctx.destroy(linger=0)
    time.sleep(2.0)
    assert sent == 3 * FRAMES_PER_NODE
    for d, old in zip(cluster.nodes, before, strict=True):
        assert d.proc.poll() is None, d.text()[-3000:]
        now = d.status()
        assert now["live"] and now["epoch"] == old["epoch"], now
        assert now["stats"]["errors"].get("internal", 0) == 0, d.text()[-3000:]
        assert sum(now["stats"]["errors"].values()) > FRAMES_PER_NODE / 2
        assert "Traceback" not in d.text()
        refusals = d.text().count(" refused ")
        assert refusals <= 20 * 4, refusals  # the log budget: 20 lines per 10 s
    generates_exactly(cluster)


def generates_exactly(cluster: Cluster) -> None:
    local = run_cli("generate", "--local", "--json", "--max-tokens", "16", PROMPT)
    for d in cluster.nodes:
        ring = run_cli("generate", "--node", d.address, "--json", "--max-tokens", "16", PROMPT)
        assert ring.returncode == 0, ring.stderr
        assert json.loads(ring.stdout)["tokens"] == json.loads(local.stdout)["tokens"]


def membership_templates(rng: random.Random, status: dict) -> list[list[bytes]]:
    """HELLOs of a node that does not exist, BYEs, and plans in every phase."""
    members = [n["id"] for n in status["nodes"]]
    stages = [[n["id"], *n["layers"]] for n in status["nodes"] if n["layers"]]
    plan = {"model": status["model"], "epoch": status["epoch"] + rng.randint(-1, 2),
            "stages": stages}  # fmt: skip
    hello = {
        "id": "fuzz" + str(rng.randrange(4)), "name": "fuzz", "port": 9, "model": status["model"],
        "fingerprint": "elsewhere", "memory": 1 << 30, "state": "ready", "cluster": "default",
        "members": [{"id": members[0], "address": "127.0.0.1:9"}], "caps": {}, "rtt": {},
        "pin": [0, 1], "epoch": 1, "seen": 1, "boot": "b",
    }  # fmt: skip
    msgs = [
        message(Kind.HELLO, body=hello),
        message(Kind.BYE, body={"id": rng.choice(["fuzz0", "nobody", *members])}),
        *(message(Kind.PLAN, epoch=plan["epoch"],
                  body={"plan": plan, "phase": phase, "from": members[0]})
          for phase in ("prepare", "load", "live", "nonsense")),
    ]  # fmt: skip
    return [encode(m) for m in msgs]


def test_mutated_membership_and_plan_messages_leave_one_exact_cluster(cluster):  # noqa: ANN001
    rng = random.Random(12)
    status = cluster.nodes[0].status()
    ctx = zmq.Context()
    try:
        for d in cluster.nodes:
            base = membership_templates(rng, status)
            sock = dealer(ctx, d.address)
            for _ in range(FRAMES_PER_NODE // 2):
                sock.send_multipart(mutate(rng, rng.choice(base)))
            time.sleep(1.0)
            sock.close()
    finally:
        ctx.destroy(linger=0)
    time.sleep(8.0)  # the made-up members go silent past the dead bound
    for d in cluster.nodes:
        assert d.proc.poll() is None, d.text()[-3000:]
        now = d.status()
        assert now["stats"]["errors"].get("internal", 0) == 0, d.text()[-3000:]
        assert "Traceback" not in d.text()
    cluster.wait_live(3)
    generates_exactly(cluster)


def dealer(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 30_000)
    sock.connect(f"tcp://{address}")
    return sock


def transfer_socket(ctx: zmq.Context, address: str) -> tuple[str, int]:
    """The model fingerprint and transfer port the daemon at `address` tells a MANIFEST."""
    sock = dealer(ctx, address)
    sock.send_multipart(encode(message(Kind.MANIFEST)))
    manifest = decode(sock.recv_multipart())
    sock.close()
    return manifest.body["fingerprint"], manifest.body["transfer"]


def test_mutated_fetches_get_one_answer_each_and_leave_the_transfer_socket_serving(cluster):  # noqa: ANN001
    """A peer's transfer socket answers every frame sent to it, an error or bytes that are
    exactly the file's at the place the reply names (gguf-py reads the oracle), and serves
    each intact FETCH among the mutated ones."""
    from gguf import GGUFReader

    from node.engine.weights import default_model_path

    truth = {t.name: np.ascontiguousarray(t.data).view(np.uint8).ravel().tobytes()
             for t in GGUFReader(default_model_path()).tensors}  # fmt: skip
    rng = random.Random(13)
    d = cluster.nodes[1]
    ctx = zmq.Context()
    try:
        fingerprint, port = transfer_socket(ctx, d.address)
        sock = dealer(ctx, f"127.0.0.1:{port}")
        base, intact = [], set()
        for name in rng.sample(sorted(truth), 20):
            start = rng.randrange(len(truth[name]))
            size = min(4096, len(truth[name]) - start)
            base.append([encode(m) for m in transfer_messages(fingerprint, name, start, size)])
        # Before a tensor's start, past its end, of an unknown tensor: refused.
        bad = [("output_norm.weight", -8, 16), ("output_norm.weight", 0, 10**6),
               ("output_norm.weight", -(2**70), 16), ("no.such.tensor", 0, 16)]  # fmt: skip
        frames = [encode(transfer_messages(fingerprint, *b)[0]) for b in bad]
        for i in range(FRAMES_PER_NODE):
            messages = rng.choice(base)
            if i % 10:
                frames.append(mutate(rng, rng.choice(messages)))
            else:
                frames.append(messages[0])
                intact.add(json.loads(messages[0][0])["body"]["tensor"])
        served = set()
        for at in range(0, len(frames), IN_FLIGHT):  # as many at once as a fetch asks
            batch = frames[at : at + IN_FLIGHT]
            for f in batch:
                sock.send_multipart(f)
            for _ in batch:
                reply = decode(sock.recv_multipart())
                assert reply.kind in (Kind.CHUNK, Kind.ERROR), reply
                if reply.kind == Kind.CHUNK:
                    name, start, data = (reply.body["tensor"], reply.body["start"],
                                         reply.frames[0])  # fmt: skip
                    assert data == truth[name][start : start + len(data)], (name, start)
                    served.add(name)
        assert intact <= served
        sock.close()
    finally:
        ctx.destroy(linger=0)
    assert d.proc.poll() is None, d.text()[-3000:]
    assert "Traceback" not in d.text() and "never retrieved" not in d.text()
    generates_exactly(cluster)


def test_a_peer_that_never_reads_its_chunks_costs_bounded_memory(cluster):  # noqa: ANN001
    """300 chunks of 4 MiB asked for and never read: the daemon keeps a few queued for that
    peer, not 1.2 GB, and goes on serving another peer at once."""
    d = cluster.nodes[1]

    def rss_mib() -> float:
        status = Path(f"/proc/{d.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    ctx = zmq.Context()
    try:
        fingerprint, port = transfer_socket(ctx, d.address)
        before = rss_mib()
        stuck = ctx.socket(zmq.DEALER)  # its own queue holds one reply, its kernel's little
        stuck.setsockopt(zmq.RCVHWM, 1)
        stuck.setsockopt(zmq.RCVBUF, 4096)
        stuck.connect(f"tcp://127.0.0.1:{port}")
        ask = transfer_messages(fingerprint, "token_embd.weight", 0, 4 << 20)[0]
        for _ in range(300):
            stuck.send_multipart(encode(ask))
        time.sleep(5.0)
        other = dealer(ctx, f"127.0.0.1:{port}")
        other.send_multipart(encode(ask))
        assert decode(other.recv_multipart()).kind == Kind.CHUNK
        assert rss_mib() - before < 400, (before, rss_mib())
    finally:
        ctx.destroy(linger=0)
    assert d.proc.poll() is None and "Traceback" not in d.text()


def out_of_range(status: dict, node: dict) -> list[list[bytes]]:
    """Frames whose numbers JSON allows but nothing can use (1e400 reads as inf, Infinity,
    NaN, integers past int64, positions past any context) and tensors whose shapes hide
    huge sizes behind a zero, each to `node`'s stage."""
    epoch, members = status["epoch"], [n["id"] for n in status["nodes"]]
    first = node["layers"][0] == 0
    head = {"v": VERSION, "req": "h1", "epoch": epoch, "step": 0, "pos": [0, 0], "tensors": []}

    def raw(kind: str, body: str, **fields: object) -> list[bytes]:
        h = json.dumps({**head, "type": kind, **fields, "body": "BODY"})
        return [h.replace('"BODY"', body).encode()]

    frames = []
    for number in ("1e400", "-1e400", "Infinity", "-Infinity", "NaN", str(2**64), "1e308"):
        frames += [
            raw("ping", f'{{"id":"{members[0]}","t":{number}}}'),
            raw("pong", f'{{"id":"{members[-1]}","t":{number}}}'),
            raw("generate", f'{{"prompt":"hi","max_tokens":{number},"sampling":{{}}}}'),
            raw("generate", '{"prompt":"hi","max_tokens":2,"sampling":{"temperature":%s,'
                '"top_k":%s,"top_p":%s,"seed":%s}}' % ((number,) * 4)),
            raw("score", f'{{"text":"a b c d e f","context":{number}}}'),
            raw("end", "{}", epoch=number),
            raw("forward", '{"parts":[]}', pos=[number, 1]),
            raw("fetch", f'{{"fingerprint":"x","tensor":"t","start":{number},"size":16}}'),
        ]
    opening = {"req": "h2", "step": 0, "start": 0, "count": 3, "end": 3,
               "requester": members[0], "capacity": 8, "sampling": {"temperature": 0.7}}
    x = torch.tensor([1, 2, 3]) if first else torch.full((3, 576), float("nan"))
    forward = encode(message(Kind.FORWARD, (x,), epoch=epoch, body={"parts": [opening]}))
    frames.append(forward)  # NaN hidden states into a middle or last stage
    for shape in ([0, 2**62], [2**40, 0], [0, 2**63 - 1, 2**63 - 1], [3, -576], [3, 2**63]):
        h = json.loads(forward[0])
        h["tensors"] = [{"dtype": "float32", "shape": shape}]
        frames.append([json.dumps(h).encode(), b""])
    for start in (2**40, 2**63 - 1, -1):
        h = json.loads(forward[0])
        h["body"]["parts"][0].update(start=start, end=start + 3)
        frames.append([json.dumps(h).encode(), forward[1]])
    return frames


def test_numbers_and_shapes_out_of_range_are_refused_and_the_ring_serves(cluster):  # noqa: ANN001
    """Issue 23: frames carrying 1e400, Infinity, NaN or shapes like [0, 2**62] were
    OverflowErrors and TypeErrors, answered with a C++ trace, and a 64 MiB frame was read
    whole. Now the big frame is dropped unread and the rest refused with a code and one
    short line; nothing is an internal error, and the ring computes exactly."""
    before = [d.status() for d in cluster.nodes]
    ctx = zmq.Context()
    replies: list[Message] = []
    try:
        for d, status in zip(cluster.nodes, before, strict=True):
            me = next(n for n in status["nodes"] if n["id"] == status["node"])
            big = dealer(ctx, d.address)  # past ZMQ_MAXMSGSIZE: its connection is dropped
            big.send_multipart([encode(message(Kind.STATUS))[0], bytes(64 << 20)])
            big.send_multipart(encode(message(Kind.STATUS)))  # once reconnected: answered
            assert decode(big.recv_multipart()).kind == Kind.STATUS_REPLY
            assert not big.poll(500)  # nothing else came: the big one was never read
            big.close()
            sock = dealer(ctx, d.address)
            for frames in out_of_range(status, me):
                sock.send_multipart(frames)
            while sock.poll(1000):
                replies.append(decode(sock.recv_multipart()))
            sock.close()
    finally:
        ctx.destroy(linger=0)
    errors = [m.body for m in replies if m.kind == Kind.ERROR]
    assert errors and all(
        "\n" not in e["message"] and len(e["message"]) <= 200 for e in errors), errors
    assert not [e for e in errors if e["code"] == "internal"], errors
    for d, old in zip(cluster.nodes, before, strict=True):
        assert d.proc.poll() is None, d.text()[-3000:]
        now = d.status()
        assert now["live"] and now["epoch"] == old["epoch"], now
        assert now["stats"]["errors"].get("internal", 0) == 0, d.text()[-3000:]
        assert "Traceback" not in d.text() and "Exception raised from" not in d.text()
    generates_exactly(cluster)
