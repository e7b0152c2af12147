"""Weights between peers: serving tensor chunks, and fetching the tensors a plan needs.

Each daemon has a second ROUTER, its transfer socket (its port in HELLO), with the same
CurveZMQ keys as the ring's, so that megabytes of weights never queue in front of a step's
activations. A member serves the tensors it holds: all of them from its model file, or the
groups in its shard cache. While its stage is busy it serves at most `busy_rate` bytes/s.

A fetch asks every member that holds a tensor for chunks of it at once (a few in flight per
member), writes them in place in the shard cache and verifies each tensor against the
manifest when its last chunk lands. A member that stops answering loses its chunks to the
others; a tensor that fails its hash is fetched again from another member, and whoever sent
it is reported. Tensors verified before a drop (or a restart) are not fetched again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import zmq
import zmq.asyncio

from node.cluster.secret import ClusterKeys
from node.engine.gguf_file import GGUFFile
from node.engine.manifest import Manifest, TensorEntry, header_of
from node.engine.safetensors_file import SafetensorsDir
from node.engine.shard_cache import CachedTensors, GroupWriter, ShardCache
from node.engine.weights import Checkpoint, stage_tensors
from node.errors import RinginferError
from protocol.wire import (
    Kind,
    Message,
    ProtocolError,
    TensorSpec,
    decode,
    encode,
    error,
    frame_bound,
    message,
)

if TYPE_CHECKING:
    from node.cluster.daemon import Daemon

log = logging.getLogger("ringinfer")

CHUNK_BYTES = 4 << 20
IN_FLIGHT = 16  # chunks asked on one connection before its first answer
TRANSFER_QUEUE = 2 * IN_FLIGHT  # replies a member queues for one connection, then drops
CONNECTIONS = 2  # to each member: with the secret, each connection's crypto is one thread
CHUNK_TIMEOUT_S = 15.0  # a member silent this long on a chunk is given up
SERVING = 8  # requests a member answers at once
STORE_THREADS = min(4, os.cpu_count() or 1)  # chunks written and tensors hashed at once
STORING = 4 * STORE_THREADS  # chunks received and not yet stored, all members together


def bytes_message(kind: Kind, *frames: bytes | memoryview, **fields: object) -> Message:
    """A message whose tensor frames are raw bytes (uint8), sent without copying them."""
    msg = message(kind, **fields)
    msg.specs = [TensorSpec("uint8", (len(f),)) for f in frames]
    msg.frames = list(frames)
    return msg


class TransferServer:
    """Answers FETCH on the transfer socket from the model file or the shard cache."""

    def __init__(
        self,
        sock: zmq.asyncio.Socket,
        manifest: Manifest,
        file: GGUFFile | SafetensorsDir | CachedTensors,
        holds: Callable[[str], bool],
        busy: Callable[[], bool],
        busy_rate: float,
    ) -> None:
        self.sock, self.manifest, self.file = sock, manifest, file
        self.holds, self.busy, self.busy_rate = holds, busy, busy_rate
        self.reader = ThreadPoolExecutor(1, "transfer")  # disk reads: not the compute thread
        self.sent = 0  # bytes served
        self.paced = 0.0  # while busy: when the bytes sent so far are due at busy_rate

    async def serve(self) -> None:
        """Answer requests a few at a time: one's disk read overlaps another's send."""
        slots = asyncio.Semaphore(SERVING)
        tasks: set[asyncio.Task] = set()
        while True:
            frames = await self.sock.recv_multipart()
            await slots.acquire()
            task = asyncio.ensure_future(self._reply(frames))
            tasks.add(task)
            task.add_done_callback(lambda t: (tasks.discard(t), slots.release()))

    async def _reply(self, frames: list[bytes]) -> None:
        identity, *frames = frames
        try:
            reply = await self._answer(decode(frames))
        except ProtocolError as e:
            reply = error(e.code, str(e))
        if reply.kind == Kind.CHUNK and self.busy():  # running requests keep their speed
            now = time.monotonic()
            self.paced = max(self.paced, now) + len(reply.frames[0]) / self.busy_rate
            await asyncio.sleep(self.paced - now)
        try:  # a peer with TRANSFER_QUEUE replies unread has stopped reading: it asks again
            await self.sock.send_multipart([identity, *encode(reply)], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:
            log.debug("transfer: reply not sent (%s)", e)

    async def _answer(self, msg: Message) -> Message:
        if msg.kind != Kind.FETCH:
            raise ProtocolError("unexpected", "the transfer socket answers FETCH only")
        b = msg.body
        entry = self.manifest.tensors.get(b["tensor"])
        if b["fingerprint"] != self.manifest.fingerprint:
            raise ProtocolError("wrong-model", "this node serves another model")
        if entry is None or not self.holds(entry.group):
            raise ProtocolError("not-held", f"this node does not hold tensor '{b['tensor']}'")
        start, size = b["start"], b["size"]
        if not (start >= 0 and 0 < size <= CHUNK_BYTES and start + size <= entry.n_bytes):
            raise ProtocolError("bad-range", f"bytes {start}+{size} of '{entry.name}'")
        loop = asyncio.get_running_loop()
        try:
            data = await loop.run_in_executor(
                self.reader, self.file.read_bytes, entry.name, start, size
            )
        except (OSError, ValueError, RinginferError) as e:
            raise ProtocolError("unavailable", f"cannot read '{entry.name}': {e}") from None
        self.sent += size
        return bytes_message(Kind.CHUNK, memoryview(data), body={"tensor": entry.name,
                                                                  "start": start})  # fmt: skip


@dataclass
class Source:
    name: str
    address: str  # host:port of its transfer socket
    holds: frozenset[str] | None  # the groups it serves; None: all of them
    alive: Callable[[], bool] = lambda: True  # still a member (heartbeats say so sooner)

    def has(self, group: str) -> bool:
        return self.holds is None or group in self.holds


@dataclass
class Progress:
    """What a fetch has done, for status and logs."""

    total: int = 0
    done: int = 0  # bytes of tensors verified or on their way to it
    received: int = 0  # every byte that came, a tensor fetched again included
    began: float = field(default_factory=time.monotonic)
    bad: dict[str, str] = field(default_factory=dict)  # member -> a tensor it sent corrupt

    @property
    def rate(self) -> float:
        return self.done / max(1e-3, time.monotonic() - self.began)

    def line(self) -> str:
        mib = 2**20
        left = f"{(self.total - self.done) / self.rate:.0f}s left" if self.done else "starting"
        return (
            f"fetching {100 * self.done // max(1, self.total)}% ({self.done / mib:.0f} of "
            f"{self.total / mib:.0f} MiB, {self.rate / mib:.1f} MiB/s, {left})"
        )


@dataclass
class _Tensor:
    entry: TensorEntry
    writer: GroupWriter
    unwritten: int  # chunks not written yet (counted on the disk threads, under the lock)
    senders: set[str] = field(default_factory=set)
    banned: set[str] = field(default_factory=set)  # sent it corrupt once
    failures: int = 0


class Fetch:
    """One fetch of tensors into the shard cache from several members at once."""

    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        keys: ClusterKeys | None,
        cache: ShardCache,
        manifest: Manifest,
        names: set[str],
        sources: list[Source],
    ) -> None:
        self.ctx, self.keys, self.cache, self.manifest = ctx, keys, cache, manifest
        self.sources = sources
        self.tensors: dict[str, _Tensor] = {}
        self.todo: deque[tuple[str, int, int]] = deque()  # (tensor, start, size)
        self.writers = {g: cache.writer(manifest, g) for g in manifest.groups(names)
                        if not cache.group_path(manifest, g).exists()}  # fmt: skip
        for w in self.writers.values():
            for e in w.missing():
                self._queue(_Tensor(e, w, 0))
        self.progress = Progress(total=sum(t.entry.n_bytes for t in self.tensors.values()))
        self.changed = asyncio.Event()
        self.in_flight = 0  # chunks asked and not answered, all members together
        self.failure = ""
        self.dropped: set[str] = set()  # members not asked again
        self.disk = ThreadPoolExecutor(STORE_THREADS, "fetch")  # writes and hashes
        self.lock = threading.Lock()  # the disk threads' counts and group files
        self.storing = asyncio.Semaphore(STORING)  # received chunks waiting for the disk
        self.stores: set[asyncio.Task] = set()

    def _queue(self, t: _Tensor) -> None:
        chunks = [(t.entry.name, at, min(CHUNK_BYTES, t.entry.n_bytes - at))
                  for at in range(0, t.entry.n_bytes, CHUNK_BYTES)]  # fmt: skip
        t.unwritten = len(chunks)
        self.tensors[t.entry.name] = t
        self.todo.extend(chunks)

    async def run(self) -> Progress:
        """Fetch everything; RinginferError if some tensor has no member left to give it."""
        if self.tensors:
            try:
                await asyncio.gather(*(self._worker(s) for s in self.sources
                                       for _ in range(CONNECTIONS)))  # fmt: skip
            finally:
                for task in self.stores:
                    task.cancel()
                self.disk.shutdown(wait=True)
                for w in self.writers.values():
                    w.close()
        missing = [n for n, t in self.tensors.items() if n not in t.writer.verified]
        if missing:
            raise RinginferError(self.failure or f"no member could send {missing[0]}")
        for w in self.writers.values():
            if w.path.exists():
                w.finish()
        return self.progress

    def _drop(self, source: Source, why: str) -> None:
        """Ask a member for nothing more, on any of its connections; logged once."""
        if source.name not in self.dropped:
            self.dropped.add(source.name)
            log.warning("fetch: %s %s", source.name, why)

    def _next(self, source: Source) -> tuple[str, int, int] | None:
        if source.name in self.dropped:
            return None
        for i, (name, start, size) in enumerate(self.todo):
            t = self.tensors[name]
            if source.has(t.entry.group) and source.name not in t.banned:
                del self.todo[i]
                return name, start, size
        return None

    async def _worker(self, source: Source) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, frame_bound(CHUNK_BYTES))  # a CHUNK, at most
        if self.keys:
            self.keys.connect_as_client(sock)
        sock.connect(f"tcp://{source.address}")
        asked: dict[tuple[str, int], int] = {}  # (tensor, start) -> size
        try:
            while True:
                while len(asked) < IN_FLIGHT and (job := self._next(source)):
                    name, start, size = job
                    body = {"fingerprint": self.manifest.fingerprint, "tensor": name,
                            "start": start, "size": size}  # fmt: skip
                    await sock.send_multipart(encode(message(Kind.FETCH, body=body)))
                    asked[(name, start)] = size
                    self.in_flight += 1
                if not asked:
                    if not self.in_flight:  # nothing for us, and nobody can give any back
                        return
                    self.changed.clear()  # others' chunks may come back to the queue
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.changed.wait(), 1.0)
                    continue
                if not await self._answered(sock, source):
                    self._drop(source, "stopped answering; the others take its chunks")
                    return
                try:
                    msg = decode(await sock.recv_multipart())
                except ProtocolError as e:
                    self._drop(source, f"sent a bad frame ({e}); not asking it again")
                    return
                if msg.kind == Kind.ERROR:
                    self._drop(source, f"refused: {msg.body['message']}")
                    return
                key = (msg.body["tensor"], msg.body["start"])
                if msg.kind != Kind.CHUNK or key not in asked or len(msg.frames[0]) != asked[key]:
                    self._drop(source, "sent what was not asked; not asking it again")
                    return
                del asked[key]  # still in flight until stored: a bad hash puts it back
                await self.storing.acquire()
                task = asyncio.ensure_future(self._landed(source, *key, msg.frames[0]))
                self.stores.add(task)
                task.add_done_callback(self.stores.discard)
        finally:
            for (name, start), size in asked.items():  # given to the others
                self.todo.appendleft((name, start, size))
            self.in_flight -= len(asked)
            self.changed.set()
            sock.close(linger=0)

    async def _answered(self, sock: zmq.asyncio.Socket, source: Source) -> bool:
        """Whether an answer came within CHUNK_TIMEOUT_S while the member lived."""
        for _ in range(int(CHUNK_TIMEOUT_S)):
            if await sock.poll(1000):
                return True
            if not source.alive():
                return False
        return False

    def _store(self, t: _Tensor, start: int, data: bytes, whole: bytes | None) -> bool:
        """On a disk thread: write a chunk; False when it completes a tensor that fails its
        hash. A group complete is put in place at once: a stage may be loading it."""
        w = t.writer
        w.write(t.entry.name, start, data)
        with self.lock:
            t.unwritten -= 1
            if t.unwritten:
                return True
        if not w.verify(t.entry.name, whole):  # the tensor's last write: hashed by one thread
            return False
        with self.lock:
            if w.path.exists() and not w.missing():
                w.finish()
        return True

    async def _landed(self, source: Source, name: str, start: int, data: bytes) -> None:
        """A chunk received: stored on the disk threads, while its worker asks for more."""
        t = self.tensors[name]
        t.senders.add(source.name)
        self.progress.done += len(data)
        self.progress.received += len(data)
        whole = data if len(data) == t.entry.n_bytes else None  # hashed as it is, not re-read
        loop = asyncio.get_running_loop()
        try:
            if not await loop.run_in_executor(self.disk, self._store, t, start, data, whole):
                self._refetch(t)
        except OSError as e:  # the disk: full, or gone
            self.failure = f"cannot write to the shard cache: {e}"
        finally:  # after a refetch is queued: workers wait while anything is in flight
            self.in_flight -= 1
            self.storing.release()
            self.changed.set()

    def _refetch(self, t: _Tensor) -> None:
        """A tensor that failed its hash: asked again of another member, its senders named."""
        senders = ", ".join(sorted(t.senders))
        log.warning("fetch: tensor %s from %s failed its SHA-256; fetching it again from "
                    "another member", t.entry.name, senders)  # fmt: skip
        self.progress.bad.update(dict.fromkeys(t.senders, t.entry.name))
        self.progress.done -= t.entry.n_bytes
        t.failures += 1
        blamed = t.banned | t.senders
        if any(s.has(t.entry.group) and s.name not in blamed for s in self.sources):
            t.banned = blamed
        elif t.failures >= 3:
            self.failure = f"tensor {t.entry.name} failed its SHA-256 {t.failures} times"
            return
        t.senders = set()
        self._queue(t)


@dataclass
class ModelFiles:
    """Where this node's model lives: its own whole model, or the shard cache alone."""

    manifest: Manifest
    cache: ShardCache
    whole: GGUFFile | SafetensorsDir | None  # the node's own copy of the whole model

    def reader(self) -> GGUFFile | SafetensorsDir | CachedTensors:
        """What this node serves tensors from."""
        return self.whole or CachedTensors(self.cache, self.manifest)

    def has(self, group: str) -> bool:
        """Whether it has this group: one file's existence, not a listing (asked per chunk)."""
        return bool(self.whole) or self.cache.group_path(self.manifest, group).exists()

    def holds(self) -> list[str]:
        """The groups it has, as HELLO says: ["*"] for all of them."""
        return ["*"] if self.whole else sorted(self.cache.held(self.manifest.fingerprint))

    @functools.cached_property
    def header(self) -> bytes:
        """The model's header, for a member that joins without the model: read (an HF
        directory's files bundled) once, not per MANIFEST."""
        if self.whole:
            return header_of(self.whole.path, self.whole)
        return self.cache.header_path(self.manifest).read_bytes()


class Arriving:
    """A checkpoint whose tensors may still be on their way: reading one waits (on the
    loading thread) until its group is in the shard cache, so a stage loads as it lands."""

    POLL_S = 0.05

    def __init__(self, ckpt: Checkpoint, files: ModelFiles, stop: threading.Event) -> None:
        self.ckpt, self.files, self.stop = ckpt, files, stop

    def __getattr__(self, name: str) -> object:
        return getattr(self.ckpt, name)

    def tensor(self, hf_name: str, fmt: str = "none") -> object:
        tensors = self.files.manifest.tensors
        groups = {tensors[name].group for name in self.ckpt.file_names(hf_name)}
        while not all(self.files.has(g) for g in groups):
            if self.stop.wait(self.POLL_S):
                raise RinginferError("the fetch of this stage's tensors stopped")
        return self.ckpt.tensor(hf_name, fmt)


def held(holds: list[str]) -> frozenset[str] | None:
    """A HELLO's `holds` as a set of groups; None for all of them."""
    return None if holds == ["*"] else frozenset(holds)


def stage_ends(ckpt: Checkpoint, manifest: Manifest) -> dict[str, set[str]]:
    """The groups the first and last stage hold besides their layers ("embed", "head")."""
    n = ckpt.n_layers
    return {
        "embed": set(manifest.groups(stage_tensors(ckpt, 0, 1))) - {"blk.0"},
        "head": set(manifest.groups(stage_tensors(ckpt, n - 1, n))) - {f"blk.{n - 1}"},
    }


def plan_holds(holds: list[str], ends: dict[str, set[str]]) -> frozenset[str] | None:
    """A HELLO's `holds` in the planner's terms: its layers' groups, and "embed" / "head"
    when it has all of that end's groups (`stage_ends`)."""
    groups = held(holds)
    if groups is None:
        return None
    have = {end for end, need in ends.items() if need <= groups}
    return frozenset({g for g in groups if g.startswith("blk.")} | have)


class Transfers:
    """The daemon's side: serving its tensors, and fetching the ones a plan gives it."""

    def __init__(self, node: Daemon, sock: zmq.asyncio.Socket, files: ModelFiles) -> None:
        self.node, self.files = node, files
        self.ctx = node.transport.ctx
        self.corrupt: dict[str, tuple[float, str]] = {}  # member -> (when, tensor it sent bad)
        self.server = TransferServer(sock, files.manifest, files.reader(), files.has,
                                     self._busy, node.cfg.transfer_rate)  # fmt: skip
        self.ends = stage_ends(node.ckpt, files.manifest)

    def _busy(self) -> bool:
        shard = self.node.stage.shard
        return bool(shard and shard.requests)

    async def serve(self) -> None:
        await self.server.serve()

    def missing(self, start: int, end: int) -> set[str]:
        """The tensors layers [start, end) need that this node does not hold."""
        files, manifest = self.files, self.files.manifest
        if files.whole is not None:
            return set()
        names = stage_tensors(self.node.ckpt, start, end)
        return {n for n in names if not files.has(manifest.tensors[n].group)}

    def sources(self) -> list[Source]:
        """Members serving our model's tensors, by their transfer sockets."""
        members = self.node.membership.members.same_model(self.node.fingerprint)
        by_id = self.node.membership.members.by_id
        return [
            Source(m.name, f"{m.address.rpartition(':')[0]}:{m.transfer}", held(m.holds),
                   lambda m=m: m.id in by_id)
            for m in members if m.transfer and m.holds
        ]  # fmt: skip

    async def ensure(self, start: int, end: int, show: Callable[[str], None]) -> None:
        """Fetch what layers [start, end) need and this node lacks, making room in the cache
        (never at the expense of the live stage's groups)."""
        names = self.missing(start, end)
        files, manifest = self.files, self.files.manifest
        if not names:
            return
        shard = self.node.stage.shard
        keep_names = stage_tensors(self.node.ckpt, start, end)
        if shard is not None:
            keep_names |= stage_tensors(self.node.ckpt, shard.start, shard.end)
        keep = {files.cache.group_path(manifest, g)
                for g in manifest.groups(keep_names)}  # fmt: skip
        need = sum(manifest.tensors[n].n_bytes for n in names)
        for path in files.cache.evict(keep, room=need):
            log.info("shard cache full: evicted %s", path.name)
        sources = self.sources()
        if not sources:
            raise RinginferError("no member holds the tensors of this node's layers")
        # Off the event loop: a transfer cut short is resumed by hashing what it verified.
        fetch = await asyncio.to_thread(Fetch, self.ctx, self.node.cfg.keys, files.cache,
                                        manifest, names, sources)  # fmt: skip
        log.info("fetching %.1f MiB for layers %d-%d from %s", fetch.progress.total / 2**20,
                 start, end, ", ".join(s.name for s in sources))  # fmt: skip

        async def report() -> None:
            while True:
                show(fetch.progress.line())
                log.info("%s", fetch.progress.line())
                await asyncio.sleep(2.0)

        reporter = asyncio.ensure_future(report())
        try:
            done = await fetch.run()
        finally:
            reporter.cancel()
            now = time.monotonic()
            self.corrupt.update({m: (now, t) for m, t in fetch.progress.bad.items()})
        if done.bad:
            log.warning("members that sent corrupt tensors: %s", ", ".join(sorted(done.bad)))
        took = time.monotonic() - done.began
        log.info("fetched %.1f MiB in %.2fs (%.1f MiB/s; %.1f MiB received)", done.total / 2**20,
                 took, done.total / 2**20 / max(took, 1e-3), done.received / 2**20)  # fmt: skip

    async def on_manifest(self, identity: bytes, msg: Message, host: str) -> None:
        """MANIFEST: our model's manifest and header, for a daemon joining without one."""
        files = self.files
        manifest_json = json.dumps(files.manifest.to_json()).encode()
        reply = bytes_message(
            Kind.MANIFEST_REPLY, manifest_json, files.header,
            body={"fingerprint": files.manifest.fingerprint,
                  "transfer": self.node.transfer_port, "holds": files.holds()},
        )  # fmt: skip
        await self.node.transport.reply(identity, reply)
