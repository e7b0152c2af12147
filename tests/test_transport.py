"""The transport alone: two or three of them in one process over real loopback sockets,
with CurveZMQ, the ZAP handler and each member's own key, and what dispatch makes of bad
frames and failing handlers."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import zmq

from node.cluster.secret import ClusterKeys, new_secret
from node.cluster.status import Stats
from node.cluster.transport import Transport, listen
from protocol.wire import Kind, Message, ProtocolError, encode, message
from tests.daemons import free_port


class Endpoint:
    """A transport listening on loopback that records what its handlers were given."""

    def __init__(self, keys: ClusterKeys | None, fail: type[Exception] | None = None) -> None:
        self.port = free_port()
        self.got: list[tuple[Message, str]] = []
        self.refused: list[tuple[str, str]] = []
        self.fail = fail
        handlers = {kind: self.handle for kind in (Kind.PING, Kind.ERROR, Kind.PONG, Kind.HELLO,
                                                   Kind.BYE)}  # fmt: skip
        self.transport = Transport(
            listen("127.0.0.1", self.port, keys), keys, handlers, Stats(), 1 << 20,
            lambda msg, code, text: self.refused.append((msg.kind.value, code)),
        )  # fmt: skip
        self.transport.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def handle(self, identity: bytes, msg: Message, host: str) -> None:
        if self.fail:
            raise self.fail("boom")
        self.got.append((msg, host))
        if msg.kind == Kind.PING:
            await self.transport.reply(identity, message(Kind.PONG, body={"id": "a", "t": 0.0}))


def ping() -> Message:
    return message(Kind.PING, body={"id": "b", "t": time.monotonic()})


def member(keys: ClusterKeys) -> ClusterKeys:
    """A daemon's keys: the cluster's, with a key pair of its own."""
    return keys.member(*zmq.curve_keypair())


def hello(keys: ClusterKeys, node_id: str = "b") -> Message:
    """What the transport checks of a HELLO: its sender's id and the proof of its key."""
    return message(Kind.HELLO, body={
        "id": node_id, "name": node_id, "port": 1, "model": "m", "fingerprint": "f", "memory": 1,
        "state": "ready", "members": [], "cluster": "default", "caps": {}, "rtt": {},
        "proof": keys.proof()})  # fmt: skip


async def until(condition, timeout: float = 5.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def run(coro) -> None:  # noqa: ANN001
    asyncio.run(coro)


def test_members_with_the_secret_talk_and_a_wrong_key_is_never_heard():
    async def main() -> None:
        keys = ClusterKeys.of(new_secret())
        b_keys = member(keys)
        a, b = Endpoint(member(keys)), Endpoint(b_keys)
        rival = Endpoint(member(ClusterKeys.of(new_secret())))
        ends = [a, b, rival]
        try:
            b.transport.send_to(a.address, hello(b_keys))
            b.transport.send_to(a.address, ping())
            assert await until(lambda: len(a.got) == 2), "a member's HELLO and PING did not arrive"
            msg, host = a.got[1]
            assert msg.kind == Kind.PING and host == "127.0.0.1"
            # the reply goes back over the ROUTER to b's link, where b's handler sees it
            assert await until(lambda: any(m.kind == Kind.PONG for m, _ in b.got))

            # another secret: its handshake is to another server key, and dies undecrypted
            rival.transport.send_to(a.address, ping())
            # the server's public key and a key of its own, but no proof of it: its PING and
            # its HELLO (a proof made with another secret) go unread and unanswered
            other = replace(member(ClusterKeys.of(new_secret())), server_public=keys.server_public)
            half = Endpoint(other)
            ends.append(half)
            half.transport.send_to(a.address, ping())
            half.transport.send_to(a.address, hello(other, "c"))
            assert await until(lambda: a.transport.strangers), "the stranger was not noticed"
            await asyncio.sleep(1.0)
            assert len(a.got) == 2, "a frame from a wrong key reached a handler"
            assert a.transport.stats.errors["unauthenticated"] >= 1
            assert not rival.got and not half.got, "a stranger heard something back"
        finally:
            for e in ends:
                await e.transport.close()

    run(main())


def test_a_plain_zeromq_peer_cannot_reach_a_secured_transport():
    async def main() -> None:
        a, plain = Endpoint(member(ClusterKeys.of(new_secret()))), Endpoint(None)
        try:
            plain.transport.send_to(a.address, hello(ClusterKeys.of(new_secret())))
            await asyncio.sleep(1.0)
            assert not a.got and not plain.got
        finally:
            await a.transport.close()
            await plain.transport.close()

    run(main())


def test_bad_frames_are_answered_with_an_error_and_handler_bugs_do_not_stop_it():
    async def main() -> None:
        a, b = Endpoint(None), Endpoint(None)
        try:
            await a.transport.dispatch(b"", [b"not a header"], "10.0.0.9")
            assert a.transport.stats.errors["malformed"] == 1
            # a kind nobody handles here: refused, and its sender told
            frames = encode(message(Kind.PLAN, epoch=1, body={"plan": {}, "phase": "live"}))
            await a.transport.dispatch(b"", frames, "10.0.0.9")
            assert a.refused == [("plan", "unexpected")]

            broken = Endpoint(None, fail=RuntimeError)
            b.transport.send_to(broken.address, ping())
            assert await until(lambda: broken.transport.stats.errors["internal"] == 1)
            assert await until(lambda: any(m.kind == Kind.ERROR for m, _ in b.got))
            error = next(m for m, _ in b.got if m.kind == Kind.ERROR)
            assert error.body["code"] == "internal"
            b.transport.send_to(broken.address, ping())  # still serving
            assert await until(lambda: broken.transport.stats.errors["internal"] == 2)
            await broken.transport.close()

            async def refuse(identity: bytes, msg: Message, host: str) -> None:
                raise ProtocolError("busy", "full")

            a.transport.handlers[Kind.PING] = refuse
            b.transport.send_to(a.address, ping())
            assert await until(lambda: a.refused[-1:] == [("ping", "busy")])
        finally:
            await a.transport.close()
            await b.transport.close()

    run(main())


def test_a_member_speaks_for_its_own_id_only_and_a_client_for_no_member():
    """Each refusal is counted, logged once, unanswered for members, and handled nowhere."""

    async def main() -> None:
        keys = ClusterKeys.of(new_secret())
        b_keys, c_keys = member(keys), member(keys)
        a, b, c = Endpoint(member(keys)), Endpoint(b_keys), Endpoint(c_keys)
        client = Endpoint(keys)  # no daemon's pair: it connects with the client credential
        ends = [a, b, c, client]
        try:
            b.transport.send_to(a.address, hello(b_keys, "b"))
            assert await until(lambda: len(a.got) == 1)
            c.transport.send_to(a.address, hello(c_keys, "c"))
            assert await until(lambda: len(a.got) == 2)
            for _ in range(2):  # c, a member, speaks as b: refused (twice, logged once)
                c.transport.send_to(a.address, hello(c_keys, "b"))
                c.transport.send_to(a.address, message(Kind.BYE, body={"id": "b"}))
                c.transport.send_to(a.address, ping())  # a PING in b's name
            client.transport.send_to(a.address, message(Kind.BYE, body={"id": "b"}))
            assert await until(lambda: a.transport.stats.errors["forbidden"] == 7)
            assert await until(lambda: any(m.kind == Kind.ERROR for m, _ in client.got))
            await asyncio.sleep(0.5)
            ids = [(m.kind, m.body["id"]) for m, _ in a.got]
            assert ids == [(Kind.HELLO, "b"), (Kind.HELLO, "c")], "a refused message was handled"
            assert not c.got, "a member was answered for a refused message"
            assert len(a.transport.told) == 4  # hello, bye, ping in b's name; the client's bye
            # b's own key still speaks for b
            b.transport.send_to(a.address, message(Kind.BYE, body={"id": "b"}))
            assert await until(lambda: a.got[-1][0].kind == Kind.BYE and len(a.got) == 3)
        finally:
            for e in ends:
                await e.transport.close()

    run(main())
