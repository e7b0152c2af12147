"""Membership as a pure structure: restarts versus two processes claiming one id."""

from __future__ import annotations

from node.cluster.members import Member, Members


def hello(node_id: str, boot: str, address: str, at: float) -> Member:
    return Member(node_id, "n", address, "m", "fp", 1, "ready", boot=boot, last_seen=at)


def test_a_restart_is_a_change_not_a_clash():
    members = Members(dead_after_s=6)
    assert members.update(hello("a", "boot1", "10.0.0.1:7710", 0.0))
    assert not members.update(hello("a", "boot1", "10.0.0.1:7710", 1.0))
    assert members.update(hello("a", "boot2", "10.0.0.1:7710", 2.0))  # restarted
    assert not members.update(hello("a", "boot2", "10.0.0.1:7710", 3.0))
    assert not members.clashing("a") and "a" in members.by_id


def test_two_live_processes_with_one_id_are_dropped_and_reported_until_one_stops():
    members = Members(dead_after_s=6)
    members.update(hello("a", "boot1", "10.0.0.1:7710", 0.0))
    members.update(hello("a", "boot2", "10.0.0.2:7710", 0.5))  # looks like a restart ...
    assert members.update(hello("a", "boot1", "10.0.0.1:7710", 1.0))  # ... until both talk
    assert members.clashing("a") and "a" not in members.by_id
    assert members.clashes() == {"a": ["10.0.0.1:7710", "10.0.0.2:7710"]}
    assert not members.update(hello("a", "boot2", "10.0.0.2:7710", 1.5))
    assert "a" not in members.by_id  # not merged while both run
    # boot1's process stops: once it has been silent past the dead bound, boot2 is let in
    assert members.update(hello("a", "boot2", "10.0.0.2:7710", 8.0))
    assert members.by_id["a"].address == "10.0.0.2:7710" and not members.clashes()


def test_round_trips_are_kept_across_heartbeats():
    members = Members()
    members.update(hello("a", "b", "x:1", 0.0))
    for rtt in (0.003, 0.001, 0.002):
        members.rtt_sample("a", rtt)
    members.update(hello("a", "b", "x:1", 1.0))
    assert members.by_id["a"].rtt == 0.002
