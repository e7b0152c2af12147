"""Who may say what: each message that came in over the ring's ROUTER is tied to the CURVE
key of the connection it came on (its User-Id, set by the ZAP handler), and that key to a role.

- the client credential's key: generate, score, status; nothing a member says;
- a member's key: proven by the HMAC in its first HELLO (or a joining daemon's MANIFEST),
  then bound to the node id of its first HELLO. A key speaks for its own id only (HELLO,
  BYE, PING, PLAN, PLAN_ACK name their sender), and an id bound to one key is refused to
  another: one member cannot leave, plan or heartbeat in another's name;
- any other key: nothing but a proving HELLO or MANIFEST is read, and nothing is answered.

A daemon that restarts forgets these bindings and learns them again from the next HELLOs
(a member keeps its key across restarts: it lives in its data dir); a member lost (left or
silent) frees its id.
"""

from __future__ import annotations

from typing import Any

from node.cluster.secret import ClusterKeys
from protocol.wire import Kind, Message

CLIENT_KINDS = frozenset({Kind.GENERATE, Kind.SCORE, Kind.STATUS})
PROVING_KINDS = frozenset({Kind.HELLO, Kind.MANIFEST})
SPEAKER = {Kind.HELLO: "id", Kind.BYE: "id", Kind.PING: "id", Kind.PLAN: "from",
           Kind.PLAN_ACK: "id"}  # fmt: skip
UNAUTHENTICATED = "unauthenticated"
FORBIDDEN = "forbidden"
MAX_KEYS = 4096  # proven keys remembered: members (and joining daemons) only


def speaker(kind: Kind, body: dict[str, Any]) -> str | None:
    """The node id a member message says it comes from; None for kinds that name none."""
    field = SPEAKER.get(kind)
    return str(body.get(field, "")) if field else None


def decide(
    kind: Kind, claimed: str | None, is_client: bool, bound: str | None, proved: bool,
    owner: str | None,
) -> tuple[str, str] | None:  # fmt: skip
    """Why a message is refused, as (error code, reason); None: it is let through.

    `bound`: the id the sender's key speaks for (None: key not proven; '': proven, no HELLO
    yet); `proved`: the message carries a valid proof of its key; `owner`: the key the
    claimed id is bound to, when it is bound ('self' when it is the sender's own).
    """
    if is_client:
        return None if kind in CLIENT_KINDS else (
            FORBIDDEN, f"a client credential cannot send {kind.value}")  # fmt: skip
    if bound is None and not (kind in PROVING_KINDS and proved):
        return UNAUTHENTICATED, f"{kind.value} from a key that is not a member's"
    if claimed is None:
        return None
    if owner not in (None, "self"):
        return FORBIDDEN, f"{kind.value} in the name of {claimed}, whose key is another"
    if not bound and kind is not Kind.HELLO:
        return FORBIDDEN, f"{kind.value} in the name of {claimed} before its HELLO"
    if bound and claimed != bound:
        return FORBIDDEN, f"{kind.value} in the name of {claimed} from the key of {bound}"
    return None


class Identities:
    """Member keys proven and the ids they are bound to."""

    def __init__(self, keys: ClusterKeys) -> None:
        self.keys = keys
        self.client = keys.client_public.decode()
        self.ids: dict[str, str] = {}  # proven key -> the id it speaks for ('' before HELLO)
        self.owners: dict[str, str] = {}  # node id -> its key

    def is_member(self, key: str) -> bool:
        return key in self.ids

    def forget(self, node_id: str) -> None:
        """A member gone (left, or silent past the dead bound): its id may come back with
        another key (a data dir whose node.key was remade)."""
        key = self.owners.pop(node_id, None)
        if key is not None:
            self.ids[key] = ""

    def check(self, key: str, msg: Message) -> tuple[str, str] | None:
        """Refusal of `msg` from a connection with this key, or None (binding what a first
        proven HELLO claims)."""
        claimed = speaker(msg.kind, msg.body)
        bound = self.ids.get(key)
        proved = bound is None and self.keys.verify(key, msg.body.get("proof"))
        owner = self.owners.get(claimed) if claimed is not None else None
        refusal = decide(msg.kind, claimed, key == self.client, bound, proved,
                         "self" if owner == key else owner)  # fmt: skip
        if refusal is None and key != self.client:
            if bound is None:
                if len(self.ids) >= MAX_KEYS:  # fresh keys must not crowd bound ones out
                    self.ids = {k: i for k, i in self.ids.items() if i}
                if len(self.ids) >= MAX_KEYS:
                    return FORBIDDEN, f"{MAX_KEYS} member keys are bound already"
                self.ids[key] = ""
            if msg.kind is Kind.HELLO and claimed and not self.ids.get(key):
                self.ids[key], self.owners[claimed] = claimed, key
        return refusal
