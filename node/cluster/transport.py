"""The daemon's sockets: one ROUTER takes everything in (peers' DEALERs and local clients), one
DEALER per peer sends out. With a cluster secret every connection is CurveZMQ, a ZAP handler
names each connection by its key, and every message is checked against what that key may
say (node/cluster/identities.py). Each frame is decoded, checked and handed to its handler
here; a bad one gets an error reply, never a crash.

An address heard of only from an mDNS advert (which anyone can send) is dialled on
probation: a few connection attempts backing off, at most UNPROVEN_MAX such links at once,
and the link is closed for good unless a member answers from there within UNPROVEN_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import zmq
import zmq.asyncio

from node.cluster.identities import UNAUTHENTICATED, Identities
from node.cluster.in_flight import InFlight
from node.cluster.log_budget import LogBudget
from node.cluster.secret import TRANSFER_DOMAIN, ZAP_DOMAIN, ZAP_ENDPOINT, ClusterKeys, zap_reply
from node.cluster.status import Stats
from node.cluster.transfer import TRANSFER_QUEUE
from node.errors import RinginferError
from protocol.wire import Kind, Message, ProtocolError, decode, encode, error, frame_bound

log = logging.getLogger("ringinfer")

UNPROVEN_MAX = 8  # links open at once to addresses only an mDNS advert named
UNPROVEN_S = 10.0  # how long such an address has to answer as a member
GIVEN_UP_S = 600.0  # an address that never answered is not dialled on an advert's word again
RECONNECT_MS = (250, 4000)  # a probation link's first reconnection interval, its ceiling
# What may come back on a link we dialled: replies to what we sent. Everything a member says
# on its own behalf comes in on our ROUTER, where its key is checked; a PONG only ever
# answers our PING, so on the ROUTER it would name no speaker.
LINK_REPLIES = frozenset({Kind.PONG, Kind.ERROR})
REPLY_S = 10.0  # a peer that reads none of its replies for this long is gone
YIELD_EVERY = 64  # frames read in a row before the loop lets heartbeats run

Handler = Callable[[bytes, Message, str], Awaitable[None]]  # (client identity, message, host)
Refused = Callable[[Message, str, str], None]  # a refused message, its error code and text


class ClientGone(Exception):
    """The client a reply was for has disconnected."""


@dataclass
class Listening:
    """The daemon's ROUTER, its transfer socket (weights for peers, node/cluster/transfer.py)
    and with a cluster secret the ZAP socket that vets both sockets' handshakes."""

    ctx: zmq.asyncio.Context
    router: zmq.asyncio.Socket
    zap: zmq.asyncio.Socket | None
    transfer: zmq.asyncio.Socket
    transfer_port: int


def listen(
    host: str, port: int, keys: ClusterKeys | None = None, transfer_port: int = 0
) -> Listening:
    """The daemon's ROUTERs, bound before anything slow so a taken port fails at once (the
    transfer socket's port 0: any free one). With `keys` they are CURVE servers, and
    handshakes wait for the ZAP handler (bound first, so no connection is ever admitted
    unchecked)."""
    # Its own: the ZAP endpoint is bound once per context. Each connection's encryption
    # runs on one of its I/O threads: transfers of several connections take several.
    ctx = zmq.asyncio.Context(io_threads=min(4, os.cpu_count() or 1))
    zap = None
    if keys:
        zap = ctx.socket(zmq.REP)
        zap.setsockopt(zmq.LINGER, 0)
        zap.bind(ZAP_ENDPOINT)
    router, transfer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    bound = []
    for sock, at, flag in ((router, port, "--port"), (transfer, transfer_port, "--transfer-port")):
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # Headers only (the transfer socket takes FETCHes): the ring's rises to the model's
        # largest frame in Transport, once the model is known (bound_again).
        sock.setsockopt(zmq.MAXMSGSIZE, frame_bound())
        sock.setsockopt(zmq.LINGER, 0)
        if sock is transfer:  # chunks for a peer that stops reading are dropped, not hoarded
            sock.setsockopt(zmq.SNDHWM, TRANSFER_QUEUE)
        if keys:
            keys.serve(sock, TRANSFER_DOMAIN if sock is transfer else ZAP_DOMAIN)
        try:
            if at:
                sock.bind(f"tcp://{host}:{at}")
            else:
                at = sock.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError as e:
            ctx.destroy(linger=0)
            raise RinginferError(
                f"cannot listen on {host}:{at}: {os.strerror(e.errno)} (another daemon there? "
                f"pass {flag})"
            ) from None
        bound.append(int(at))
    return Listening(ctx, router, zap, transfer, bound[1])


def bound_again(sock: zmq.Socket, max_frame: int) -> None:
    """ZMQ_MAXMSGSIZE (per frame: ZeroMQ drops the connection, not the daemon) on a bound
    socket: its listener copied the options when it bound, so it binds again, on the same
    address (a connection made meanwhile reconnects, as after any drop)."""
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    sock.unbind(endpoint)
    sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
    for _ in range(100):  # the old listener closes on an I/O thread: its port frees soon
        try:
            sock.bind(endpoint)
            return
        except zmq.ZMQError as e:
            if e.errno != errno.EADDRINUSE:
                raise
            time.sleep(0.01)
    sock.bind(endpoint)


class Transport:
    """Sending to addresses, replying to clients, and dispatching what comes in."""

    def __init__(
        self,
        listening: Listening,
        keys: ClusterKeys | None,
        handlers: dict[Kind, Handler],
        stats: Stats,
        max_tensor_bytes: int,
        refused: Refused,
    ) -> None:
        self.ctx, self.router, self.zap = listening.ctx, listening.router, listening.zap
        self.keys, self.handlers, self.stats = keys, handlers, stats
        self.max_tensor_bytes, self.refused = max_tensor_bytes, refused
        self.max_frame = frame_bound(max_tensor_bytes)  # the model's largest, on every link
        bound_again(self.router, self.max_frame)
        self.identities = Identities(keys) if keys else None
        self.links: dict[str, zmq.asyncio.Socket] = {}
        self.link_tasks: dict[str, asyncio.Task] = {}  # each link's receive loop
        self.unproven: dict[str, float] = {}  # address dialled on an advert's word -> deadline
        self.given_up: dict[str, float] = {}  # address that never answered -> when
        self.told: set[tuple[str, str]] = set()  # (key, refusal) already logged
        self.tasks: list[asyncio.Task] = []  # the receive loops and the ZAP handler
        self.dispatching: set[asyncio.Task] = set()  # a task per message being handled
        self.in_flight = InFlight()  # of those, per connection: past its cap, refused
        self.strangers: dict[str, float] = {}  # address -> when it failed the handshake
        self.refusals, self.internal_errors = LogBudget(), LogBudget(burst=5)

    def start(self) -> None:
        self.tasks.append(asyncio.ensure_future(self._receive(self.router, None)))
        if self.zap is not None:
            self.tasks.append(asyncio.ensure_future(self._authenticate()))

    async def close(self) -> None:
        tasks = [*self.tasks, *self.link_tasks.values(), *self.dispatching]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.ctx.destroy(linger=0)

    def _link(self, address: str) -> zmq.asyncio.Socket:
        sock = self.links.get(address)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 200)
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_frame)
            if address in self.unproven:  # a few attempts, backing off, until it expires
                sock.setsockopt(zmq.RECONNECT_IVL, RECONNECT_MS[0])
                sock.setsockopt(zmq.RECONNECT_IVL_MAX, RECONNECT_MS[1])
            if self.keys:
                self.keys.connect_as_client(sock)
            sock.connect(f"tcp://{address}")
            self.links[address] = sock
            # Replies on a link are errors about what we sent (a version mismatch, say).
            self.link_tasks[address] = asyncio.ensure_future(self._receive(sock, address))
        return sock

    def close_link(self, address: str) -> None:
        sock, task = self.links.pop(address, None), self.link_tasks.pop(address, None)
        if task is not None:
            task.cancel()
        if sock is not None:
            sock.close(linger=0)

    def send_on_advert(self, address: str, msg: Message) -> None:
        """Send to an address an mDNS advert named: on probation unless already linked."""
        now = time.monotonic()
        if may_dial_advert(address, now, set(self.links), self.unproven, self.given_up):
            if address not in self.links:
                self.unproven[address] = now + UNPROVEN_S
            self.send_to(address, msg)

    def expire_unproven(self, answered: set[str]) -> list[str]:
        """Close, for good, links dialled on an advert's word whose address never answered
        as a member (`answered`: members' addresses), and say which; keep those that did."""
        now, closed = time.monotonic(), []
        for address, deadline in list(self.unproven.items()):
            if address in answered:
                del self.unproven[address]
            elif now >= deadline:
                del self.unproven[address]
                self.given_up[address] = now
                self.close_link(address)
                closed.append(address)
        self.given_up = {a: t for a, t in self.given_up.items() if now - t < GIVEN_UP_S}
        return closed

    def send_to(self, address: str, msg: Message) -> None:
        """Queue a message for a peer; ZeroMQ connects (and reconnects) in the background."""
        frames = encode(msg)
        try:
            self._link(address).send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:
            log.warning("could not send %s to %s: %s", msg.kind.value, address, e.strerror)
            return
        self.stats.sent(msg.kind, frames)

    async def reply(self, identity: bytes, msg: Message) -> None:
        """To the client (or peer DEALER) with this ROUTER identity; b'': ourselves, dropped."""
        if not identity:
            return
        frames = encode(msg)
        try:  # bounded: a peer that never reads must not hold a task (and its slot) forever
            await asyncio.wait_for(self.router.send_multipart([identity, *frames], copy=False),
                                   REPLY_S)  # fmt: skip
        except asyncio.TimeoutError:
            raise ClientGone from None
        except zmq.ZMQError as e:
            if e.errno == errno.EHOSTUNREACH:
                raise ClientGone from None
            raise
        self.stats.sent(msg.kind, frames)

    def deliver(self, msg: Message) -> None:
        """A message to this daemon itself, handled as if it had come in over the wire."""
        self._dispatch_later(b"", encode(msg), "self")

    def _dispatch_later(
        self, identity: bytes, frames: list[bytes], host: str, key: str | None = None,
        link: str | None = None,
    ) -> None:  # fmt: skip
        """Handle a message in a task of its own, within its connection's cap (a ROUTER
        identity, or the link it came in on; b"" is ourselves). Past the cap it is dropped
        unread and counted: a task per refusal would be the unbounded growth the cap stops."""
        who = identity or (f"link {link}".encode() if link else b"")
        if who and not self.in_flight.take(who):
            self.stats.errors["overloaded"] += 1
            if self.may_log(self.refusals):
                log.warning("dropped a message from %s: %d of its messages are being handled",
                            host or link or "?", self.in_flight.cap)  # fmt: skip
            return
        task = asyncio.ensure_future(self.dispatch(identity, frames, host, key, link))
        self.dispatching.add(task)
        task.add_done_callback(self.dispatching.discard)
        if who:
            task.add_done_callback(lambda _: self.in_flight.release(who))

    async def _receive(self, sock: zmq.asyncio.Socket, link: str | None) -> None:
        """Read the ROUTER (`link` None) or the link we dialled to `link`, for ever."""
        for n in itertools.count(1):
            frames = await sock.recv_multipart(copy=False)
            if link is None:
                identity, frames = frames[0].bytes, frames[1:]
            else:
                identity = b""
            host, key = _property(frames, "Peer-Address"), None
            if link is None and self.identities is not None:
                key = _property(frames, "User-Id")  # the sender's CURVE key (ZAP set it)
            # Each message is its own task: a FORWARD waits for compute, and the socket must
            # keep being read meanwhile (status, heartbeats, other requests).
            self._dispatch_later(identity, [f.bytes for f in frames], host, key, link)
            if n % YIELD_EVERY == 0:  # frames already queued are read without yielding
                await asyncio.sleep(0)

    async def _authenticate(self) -> None:
        """The ZAP handler: names each connection by its key (see secret.zap_reply)."""
        assert self.zap is not None and self.keys is not None and self.identities is not None
        while True:
            frames = await self.zap.recv_multipart()
            reply, admitted, address = zap_reply(frames, self.keys, self.identities.ids)
            await self.zap.send_multipart(reply)
            if not admitted:
                self.stats.errors["unauthenticated"] += 1
                self.strangers[address] = time.monotonic()
                if self.may_log(self.refusals):
                    log.warning("refused a connection from %s: not this cluster's secret", address)

    async def dispatch(
        self, identity: bytes, frames: list[bytes], host: str, key: str | None = None,
        link: str | None = None,
    ) -> None:  # fmt: skip
        """Decode, validate and handle one message; a bad one gets an error reply, never a
        crash. `key`: the sender's CURVE key, whose rights are checked (None: no check);
        `link`: the address of the link it came back on (None: the ROUTER)."""
        msg: Message | None = None
        try:
            msg = decode(frames, self.max_tensor_bytes)
            if not self._routed_right(msg, identity, link, host):
                return
            if key is not None and not await self._may_say(key, msg, host, identity):
                return
            handler = self.handlers.get(msg.kind)
            if handler is None:
                raise ProtocolError(
                    "unexpected", f"{msg.kind.value} is sent by daemons, not to them"
                )
            await handler(identity, msg, host)
        except ProtocolError as e:
            self.stats.errors[e.code] += 1
            what = msg.kind.value if msg else "frame"
            if self.may_log(self.refusals):
                log.warning("refused %s from %s: %s: %s", what, host or "self", e.code, e)
            with contextlib.suppress(ClientGone, zmq.ZMQError):
                await self.reply(identity, error(e.code, str(e), msg.req if msg else ""))
            if msg:
                self.refused(msg, e.code, str(e))
        except ClientGone:
            pass
        except Exception as e:  # a bug must not take the daemon down with everyone's requests
            self.stats.errors["internal"] += 1
            if self.may_log(self.internal_errors):
                log.exception("internal error handling %s", msg.kind.value if msg else "frame")
            with contextlib.suppress(ClientGone, zmq.ZMQError):
                await self.reply(identity, error("internal", f"{type(e).__name__}: {e}"))

    def _routed_right(self, msg: Message, identity: bytes, link: str | None, host: str) -> bool:
        """Whether the message came in where its kind may: on a link, only replies (whoever
        holds the server key could answer there, so nothing said there speaks for a member);
        on the ROUTER, no PONG. Else it is dropped and counted, within the log budget."""
        if link is not None:
            wrong = msg.kind not in LINK_REPLIES
        else:
            wrong = bool(identity) and msg.kind == Kind.PONG
        if wrong:
            self.stats.errors["misrouted"] += 1
            if self.may_log(self.refusals):
                log.warning("dropped %s from %s: not a reply to us", msg.kind.value,
                            link or host or "?")  # fmt: skip
        return not wrong

    async def _may_say(self, key: str, msg: Message, host: str, identity: bytes) -> bool:
        """Whether this key may send this message; a refusal is counted, logged once per
        key and reason (strangers' within the log budget), and changes nothing. Only a
        client is answered (it waits for a reply, sent within this message's slot of the
        cap); a stranger learns nothing."""
        assert self.identities is not None
        refusal = self.identities.check(key, msg)
        if refusal is None:
            return True
        code, why = refusal
        self.stats.errors[code] += 1
        if code == UNAUTHENTICATED:
            self.strangers[host or "?"] = time.monotonic()
            if self.may_log(self.refusals):
                log.warning("refused %s from %s: %s", msg.kind.value, host or "?", why)
            return False
        if (key, why) not in self.told and len(self.told) < 4096:
            self.told.add((key, why))
            log.warning("refused %s from %s: %s", msg.kind.value, host or "?", why)
        if key == self.identities.client:
            with contextlib.suppress(ClientGone, zmq.ZMQError):
                await self.reply(identity, error(code, why, msg.req))
        return False

    def may_log(self, budget: LogBudget) -> bool:
        """Whether a refusal or an internal error may be logged now, saying what was held back."""
        ok, held = budget.take(time.monotonic())
        if held:
            log.warning("%d more like it in %.0fs not logged (status counts them: stats.errors)",
                        held, budget.window_s)  # fmt: skip
        return ok

    def forget_strangers(self, after_s: float = 60.0) -> None:
        now = time.monotonic()
        self.strangers = {a: t for a, t in self.strangers.items() if now - t < after_s}


def _property(frames: list[zmq.Frame], name: str) -> str:
    """A connection property of a received message ('' where there is none)."""
    try:
        return frames[0].get(name) if frames else ""
    except zmq.ZMQError:
        return ""


def may_dial_advert(
    address: str, now: float, linked: set[str], unproven: dict[str, float],
    given_up: dict[str, float],
) -> bool:  # fmt: skip
    """Whether an mDNS advert's address may be sent to: a link already open (a member's, or
    on probation) yes; an address that never answered, or one more than UNPROVEN_MAX links
    on probation, no."""
    if address in linked:
        return True
    if now - given_up.get(address, float("-inf")) < GIVEN_UP_S:
        return False
    return len(unproven) < UNPROVEN_MAX
