"""The model of a daemon started without --model: the one its cluster serves already.

Before the daemon starts, it asks the members it can find (--peer addresses that accept a
connection, mDNS adverts of its cluster) for their model's manifest and header (a GGUF's,
or a Hugging Face directory's config and tokenizer files). The
first answer names the model; the header goes into the shard cache, and the daemon serves
the model from there, fetching its layers' tensors once a plan gives it some. Nobody
answering means it is alone, or that the others are still starting: it serves the embedded
default model, and gives way to any other model a member turns out to serve (`to_follow`),
since that one was given with --model (the daemon then starts again on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from discovery.interfaces import Interface
from discovery.mdns import Advert, Discovery
from node.cluster.members import Member
from node.cluster.secret import TAG, ClusterKeys
from node.cluster.transfer import Fetch, ModelFiles, Source, held
from node.engine.manifest import MANIFEST_FRAME, Manifest, load_or_build
from node.engine.safetensors_file import SafetensorsDir
from node.engine.shard_cache import ShardCache
from node.engine.weights import (
    DEFAULT_MODEL_NAME,
    Checkpoint,
    GGUFCheckpoint,
    HFCheckpoint,
    default_model_path,
    open_checkpoint,
)
from node.errors import RinginferError
from protocol.wire import VERSION, Kind, ProtocolError, decode, encode, frame_bound, message

log = logging.getLogger("ringinfer")

MDNS_WAIT_S = 3.0  # how long to listen for adverts of the cluster's members
ANSWER_S = 5.0  # how long a member that accepted the connection has to answer
ASK_AT_ONCE = 8  # addresses asked for their manifest at once at start
MAX_ASKED = 32  # advertised addresses asked in all: an advert is a claim anyone can make


@dataclass
class Found:
    manifest: Manifest
    header: bytes
    member: str  # where it came from (its address)
    transfer: str  # that member's transfer socket, host:port
    holds: list[str]


def _accepts(address: str) -> bool:
    host, _, port = address.rpartition(":")
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1.0):
        return True
    return False


async def _ask(ctx: zmq.asyncio.Context, address: str, keys: ClusterKeys | None) -> Found | None:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, frame_bound(MANIFEST_FRAME))
    if keys:
        keys.connect_as_client(sock)
    sock.connect(f"tcp://{address}")
    try:
        # A joining daemon's proof makes its key a member's: it may fetch weights next.
        proof = {"proof": keys.proof()} if keys and keys.holds_secret else {}
        await sock.send_multipart(encode(message(Kind.MANIFEST, body=proof)))
        if not await sock.poll(ANSWER_S * 1000):
            return None
        msg = decode(await sock.recv_multipart())
        if msg.kind != Kind.MANIFEST_REPLY or len(msg.frames) != 2:
            return None
        manifest = Manifest.from_json(json.loads(msg.frames[0]))
        transfer, holds = msg.body.get("transfer"), msg.body.get("holds")
        if manifest.fingerprint != msg.body["fingerprint"] or type(transfer) is not int:
            return None
        host = address.rpartition(":")[0]
        holds = [h for h in holds if isinstance(h, str)] if isinstance(holds, list) else []
        return Found(manifest, bytes(msg.frames[1]), address, f"{host}:{transfer}", holds)
    except (ProtocolError, RinginferError, ValueError, TypeError, KeyError, OverflowError) as e:
        log.warning("%s sent a bad model manifest: %s", address, e)
        return None
    finally:
        sock.close(linger=0)


async def _first_answer(asks: list[Coroutine[Any, Any, Found | None]]) -> Found | None:
    """The first of these askings to find a model; the others are cancelled then."""
    tasks = [asyncio.ensure_future(a) for a in asks]
    try:
        for done in asyncio.as_completed(tasks):
            answer = await done
            if answer:
                return answer
        return None
    finally:
        for task in tasks:
            task.cancel()


async def ask(address: str, keys: ClusterKeys | None) -> Found | None:
    """The manifest and header of the model the member at `address` serves."""
    ctx = zmq.asyncio.Context()
    try:
        return await _ask(ctx, address, keys)
    finally:
        ctx.destroy(linger=0)


def to_follow(ours: str, members: list[Member]) -> Member | None:
    """For a node serving the embedded default for want of another (model `ours`): the
    member whose model it should serve instead, of the model most members serve other than
    ours (the member with the smallest id, on a tie); None while every member serves ours."""
    others = [m for m in members if m.fingerprint != ours]
    if not others:
        return None
    count = {f: sum(m.fingerprint == f for m in others) for f in {m.fingerprint for m in others}}
    return min(others, key=lambda m: (-count[m.fingerprint], m.id))


async def find(
    peers: list[str],
    mdns: list[Interface] | None,
    cluster: str,
    keys: ClusterKeys | None,
    node_id: str,
) -> Found | None:
    """The manifest and header of the model the first member to answer serves."""
    adverts: list[str] = []
    key = TAG if keys else ""  # adverts say only whether a node has a secret

    def found(advert: Advert) -> None:
        ours = (advert.cluster, advert.protocol, advert.key) == (cluster, VERSION, key)
        if ours and advert.id != node_id:
            adverts.append(advert.endpoint)

    discovery = Discovery(None, mdns, found) if mdns else None
    if discovery:
        try:
            await discovery.start()
        except OSError:
            discovery = None
    ctx = zmq.asyncio.Context()
    try:
        loop = asyncio.get_running_loop()
        live = [p for p in peers if await loop.run_in_executor(None, _accepts, p)]
        asked: set[str] = set()
        deadline = time.monotonic() + (MDNS_WAIT_S if discovery else 0.0)
        while True:
            # anyone can advertise: a few addresses at a time, a bounded number in all
            heard = adverts if len(asked) < MAX_ASKED else []
            batch = [a for a in [*live, *heard] if a not in asked][:ASK_AT_ONCE]
            asked.update(batch)
            answer = await _first_answer([_ask(ctx, a, keys) for a in batch])
            if answer:
                return answer
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(0.1)
    finally:
        ctx.destroy(linger=0)
        if discovery:
            await discovery.close()


def open_model(
    spec: str | None,
    data_dir: Path,
    cache: ShardCache,
    found: Found | None,
    keys: ClusterKeys | None,
    show: Callable[[str], None],
) -> tuple[Checkpoint, ModelFiles, bool]:
    """The daemon's model: `spec`; without one the cluster's (`found`), read from the shard
    cache unless it is the embedded default, which is installed here; else the default.
    True with the embedded default served for want of a model given with --model, which
    gives way to any other model a member serves."""
    if spec is None and found is not None:
        fingerprint = found.manifest.fingerprint
        try:
            local = _manifest(default_model_path(), DEFAULT_MODEL_NAME, data_dir, show)
        except RinginferError:
            local = None  # the default model is not installed here
        if local is None or local.fingerprint != fingerprint:
            log.info("no --model: serving the cluster's model %s (fingerprint %s), as %s does",
                     found.manifest.name, fingerprint, found.member)  # fmt: skip
            return _from_cache(found, cache, keys), ModelFiles(found.manifest, cache, None), False
    ckpt = open_checkpoint(spec)
    manifest = _manifest(ckpt.path, ckpt.name, data_dir, show)
    if spec is not None:
        log.info("serving %s (fingerprint %s): given with --model", ckpt.name,
                 manifest.fingerprint)  # fmt: skip
    elif found is not None:
        log.info("no --model: serving the embedded default %s (fingerprint %s), as %s does",
                 ckpt.name, manifest.fingerprint, found.member)  # fmt: skip
    else:
        log.info("no --model and no member answered: serving the embedded default %s "
                 "(fingerprint %s) until a member serves another model", ckpt.name,
                 manifest.fingerprint)  # fmt: skip
    if isinstance(ckpt, GGUFCheckpoint):
        files = ModelFiles(manifest, cache, ckpt.file)
    else:
        assert isinstance(ckpt, HFCheckpoint)
        files = ModelFiles(manifest, cache, SafetensorsDir(ckpt.path, ckpt.files))
    return ckpt, files, spec is None


def _manifest(path: Path, name: str, data_dir: Path, show: Callable[[str], None]) -> Manifest:
    def progress(done: int, total: int) -> None:
        show(f"hashing {path.name} for peers: {100 * done // total}%")

    manifest = load_or_build(path, name, data_dir, progress)
    show("")
    return manifest


def _from_cache(found: Found, cache: ShardCache, keys: ClusterKeys | None) -> Checkpoint:
    """The cluster's model from the shard cache: its header kept there, and the few tensors
    opening it needs (a GGUF's RoPE factors) fetched now; layers come when a plan gives
    them."""
    manifest = found.manifest
    if cache.manifest(manifest.fingerprint) is None:
        cache.store_model(manifest, found.header)
    opening = {n for n in manifest.tensors if n == "rope_freqs.weight"}

    async def fetch() -> None:
        ctx = zmq.asyncio.Context()
        try:
            source = Source(found.member, found.transfer, held(found.holds))
            await Fetch(ctx, keys, cache, manifest, opening, [source]).run()
        finally:
            ctx.destroy(linger=0)

    if opening:
        asyncio.run(fetch())
    return cache.checkpoint(manifest)
