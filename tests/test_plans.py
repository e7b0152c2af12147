"""The plan agreement's pure parts: acks kept only for the proposals under way, and which
member's model a node serving the embedded default for want of another gives way to."""

from __future__ import annotations

from node.cluster.cluster_model import to_follow
from node.cluster.members import Member
from node.cluster.plans import Acks


def test_acks_are_kept_only_while_their_proposal_is_under_way() -> None:
    acks = Acks()
    for epoch in range(1, 1001):  # a long-lived coordinator's proposals
        acks.propose(epoch)
        for phase in ("fetch", "prepare", "load"):
            assert acks.add(epoch, phase, "a") and acks.add(epoch, phase, "b")
            assert acks.of(epoch, phase) == {"a", "b"}
        acks.end(epoch)
    assert acks.open == {}


def test_acks_for_no_proposal_under_way_are_dropped() -> None:
    acks = Acks()
    acks.propose(7)
    assert not acks.add(6, "prepare", "a")  # a late ack of an older proposal
    assert not acks.add(123456, "fetch", "a")  # an epoch nobody proposed
    assert not acks.add(7, "x" * 100, "a")  # no such phase
    assert acks.open == {7: {}} and acks.of(6, "prepare") == set()


def member(node_id: str, fingerprint: str) -> Member:
    return Member(node_id, node_id, f"10.0.0.1:{7710}", "m", fingerprint, 1 << 30, "ready")


def test_a_default_follows_the_model_most_members_serve() -> None:
    assert to_follow("default", []) is None
    assert to_follow("default", [member("a", "default")]) is None
    members = [member("a", "default"), member("d", "x"), member("b", "y"), member("c", "x")]
    assert to_follow("default", members).id == "c"  # x: two members; c: the smaller id
    assert to_follow("default", members[:3]).id == "b"  # a tie: the smaller id's model
