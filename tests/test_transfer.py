"""Fetching tensors from members over real ZeroMQ sockets (CurveZMQ), into the shard cache:
several sources at once, one that vanishes, one whose file is corrupt, and a resumed fetch."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import zmq
import zmq.asyncio

from node.cluster import transfer
from node.cluster.secret import ZAP_ENDPOINT, ClusterKeys, zap_reply
from node.cluster.transfer import (
    CHUNK_BYTES,
    IN_FLIGHT,
    Fetch,
    Source,
    TransferServer,
    plan_holds,
    stage_ends,
)
from node.engine.gguf_file import GGUFFile
from node.engine.manifest import build
from node.engine.shard_cache import ShardCache
from node.engine.weights import GGUFCheckpoint, default_model_path, open_checkpoint
from node.errors import RinginferError

KEYS = ClusterKeys.of("a cluster secret for these tests only")


@pytest.fixture(scope="module")
def model():
    path = default_model_path()
    return path, build(path, "smollm2")


class Member:
    """A member's transfer socket on loopback, serving one file (with the ZAP handler)."""

    def __init__(self, ctx: zmq.asyncio.Context, manifest, path, busy_rate=1e12) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        KEYS.serve(self.sock)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.address = f"127.0.0.1:{port}"
        self.server = TransferServer(self.sock, manifest, GGUFFile(path), lambda g: True,
                                     lambda: True, busy_rate)  # fmt: skip
        self.task = asyncio.ensure_future(self.server.serve())

    def kill(self) -> None:
        self.task.cancel()
        self.sock.close(linger=0)


async def zap(ctx: zmq.asyncio.Context) -> None:
    sock = ctx.socket(zmq.REP)
    sock.bind(ZAP_ENDPOINT)
    try:
        while True:
            await sock.send_multipart(zap_reply(await sock.recv_multipart(), KEYS)[0])
    finally:
        sock.close(linger=0)


def layers(manifest, *numbers: int) -> set[str]:
    return {n for n, e in manifest.tensors.items() if e.layer in numbers}


def run(coro):
    async def main():
        ctx = zmq.asyncio.Context()
        handler = asyncio.ensure_future(zap(ctx))
        try:
            return await coro(ctx)
        finally:
            handler.cancel()
            await asyncio.gather(handler, return_exceptions=True)
            ctx.destroy(linger=0)

    return asyncio.run(main())


def test_a_fetch_takes_from_every_member_and_survives_one_vanishing(model, tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "CHUNK_TIMEOUT_S", 2.0)
    path, manifest = model
    names = layers(manifest, *range(30)) | {"token_embd.weight"}
    total = sum(manifest.tensors[n].n_bytes for n in names)

    async def body(ctx):
        a = Member(ctx, manifest, path, busy_rate=40e6)  # both slowed so the kill lands mid-way
        b = Member(ctx, manifest, path, busy_rate=40e6)
        fetch = Fetch(ctx, KEYS, ShardCache(tmp_path), manifest, names,
                      [Source("a", a.address, None), Source("b", b.address, None)])  # fmt: skip
        task = asyncio.ensure_future(fetch.run())
        while fetch.progress.done < total // 3:
            await asyncio.sleep(0.05)
        assert a.server.sent and b.server.sent  # both were giving
        a.kill()
        progress = await task
        b.kill()
        return a.server.sent, b.server.sent, progress

    sent_a, sent_b, progress = run(body)
    assert progress.done == total and not progress.bad
    assert total <= sent_a + sent_b <= total + IN_FLIGHT * CHUNK_BYTES  # a's lost chunks only
    cache = ShardCache(tmp_path)
    groups = {f"blk.{i}" for i in range(30)} | {"token_embd.weight"}
    assert cache.held(manifest.fingerprint) == groups


def test_a_corrupt_member_is_reported_and_its_tensor_fetched_again(model, tmp_path):
    path, manifest = model
    bad_file = tmp_path / "corrupt.gguf"
    shutil.copy(path, bad_file)
    names = layers(manifest, 2)
    with open(bad_file, "r+b") as f:  # every tensor of layer 2: whatever it sends is bad
        for name in names:
            f.seek(GGUFFile(path).tensors[name].offset + 100)
            f.write(b"\xff\xfe")

    async def body(ctx):
        bad, good = Member(ctx, manifest, bad_file), Member(ctx, manifest, path)
        sources = [Source("bad", bad.address, None), Source("good", good.address, None)]
        fetch = Fetch(ctx, KEYS, ShardCache(tmp_path / "cache"), manifest, names, sources)
        progress = await fetch.run()
        bad.kill()
        good.kill()
        return progress, fetch

    progress, fetch = run(body)
    assert "bad" in progress.bad and "good" not in progress.bad  # it sent some: reported
    assert all("good" not in t.banned for t in fetch.tensors.values())
    cache = ShardCache(tmp_path / "cache")
    assert cache.held(manifest.fingerprint) == {"blk.2"}  # and it verified: the good bytes


def test_only_a_corrupt_member_fails_the_fetch_with_one_line(model, tmp_path):
    path, manifest = model
    bad_file = tmp_path / "corrupt.gguf"
    shutil.copy(path, bad_file)
    with open(bad_file, "r+b") as f:
        f.seek(GGUFFile(path).tensors["blk.5.attn_q.weight"].offset)
        f.write(b"\x00" * 64)

    async def body(ctx):
        bad = Member(ctx, manifest, bad_file)
        try:
            await Fetch(ctx, KEYS, ShardCache(tmp_path / "c"), manifest, layers(manifest, 5),
                        [Source("bad", bad.address, None)]).run()  # fmt: skip
        finally:
            bad.kill()

    with pytest.raises(RinginferError, match="blk.5.attn_q.weight failed its SHA-256 3 times"):
        run(body)


def test_a_fetch_cut_short_resumes_without_fetching_verified_tensors_again(model, tmp_path):
    path, manifest = model
    names = layers(manifest, 10, 11, 12, 13)
    total = sum(manifest.tensors[n].n_bytes for n in names)

    async def body(ctx):
        a = Member(ctx, manifest, path, busy_rate=20e6)
        first = Fetch(ctx, KEYS, ShardCache(tmp_path), manifest, names,
                      [Source("a", a.address, None)])  # fmt: skip
        task = asyncio.ensure_future(first.run())
        while first.progress.done < total // 2:
            await asyncio.sleep(0.02)
        task.cancel()  # the daemon stopped mid-way
        await asyncio.gather(task, return_exceptions=True)
        verified = sum(t.entry.n_bytes for t in first.tensors.values()
                       if t.entry.name in t.writer.verified)  # fmt: skip
        again = Fetch(ctx, KEYS, ShardCache(tmp_path), manifest, names,
                      [Source("a", a.address, None)])  # fmt: skip
        sent_before = a.server.sent
        await again.run()
        a.kill()
        return verified, again.progress, a.server.sent - sent_before

    verified, second, sent = run(body)
    assert verified > 0
    assert second.total == total - verified == second.done
    assert sent <= second.done + IN_FLIGHT * CHUNK_BYTES  # the first fetch's last asks, at most
    held = ShardCache(tmp_path).held(model[1].fingerprint)
    assert held == {"blk.10", "blk.11", "blk.12", "blk.13"}


def test_a_member_without_the_cluster_key_gets_nothing(model, tmp_path, monkeypatch):
    monkeypatch.setattr(transfer, "CHUNK_TIMEOUT_S", 1.0)
    path, manifest = model

    async def body(ctx):
        a = Member(ctx, manifest, path)
        stranger = ClusterKeys.of("another cluster's secret, not ours")
        try:
            await Fetch(ctx, stranger, ShardCache(tmp_path), manifest, layers(manifest, 1),
                        [Source("a", a.address, None)]).run()  # fmt: skip
        finally:
            a.kill()
        return a.server.sent

    with pytest.raises(RinginferError, match="no member could send"):
        run(body)


def test_what_a_member_holds_in_the_planners_terms(model, tiny_models):
    path, manifest = model
    ends = stage_ends(GGUFCheckpoint(path, "smollm2"), manifest)
    # SmolLM2 ties its head to the embedding: the last stage holds it too.
    assert ends == {"embed": {"token_embd.weight"},
                    "head": {"output_norm.weight", "token_embd.weight"}}  # fmt: skip
    assert plan_holds(["*"], ends) is None  # the whole model
    assert plan_holds(["blk.28", "blk.29", "output_norm.weight"], ends) == {"blk.28", "blk.29"}
    assert plan_holds(["blk.29", "output_norm.weight", "token_embd.weight"], ends) == {
        "blk.29", "embed", "head"}  # fmt: skip
    llama = tiny_models["llama"]  # a Hugging Face directory: its own names
    ends = stage_ends(open_checkpoint(str(llama)), build(llama, "llama"))
    assert ends == {"embed": {"model.embed_tokens.weight"},
                    "head": {"model.norm.weight", "lm_head.weight"}}  # fmt: skip
