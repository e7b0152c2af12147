"""`ringinfer doctor`: what stops this machine from joining a cluster, each with a fix.

Checks, in order: the interfaces mDNS would use, whether multicast goes out and comes back
(a probe advert heard by a second, independent mDNS socket), the ringinfer nodes heard on
the LAN and whether their ports answer, version / cluster mismatches and duplicate ids
among them, and the local daemon's own view (its plan and the problems it reports).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from dataclasses import asdict, dataclass

from discovery.interfaces import Interface, all_interfaces, is_loopback, lan_interfaces
from discovery.mdns import PROBE_SERVICE, SERVICE, Advert, Discovery
from node import __version__
from node.cluster.client import Client
from node.cluster.secret import TAG, ClusterKeys
from node.errors import RinginferError
from protocol.wire import VERSION


@dataclass(frozen=True)
class Check:
    level: str  # ok, warn or fail
    topic: str
    detail: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def render(checks: list[Check]) -> str:
    marks = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}
    lines = []
    for c in checks:
        lines.append(f"[{marks[c.level]}] {c.topic}: {c.detail}")
        if c.fix:
            lines.append(f"       fix: {c.fix}")
    return "\n".join(lines)


def diagnose(
    node: str, cluster: str | None, listen_s: float, asked: list[str] | None,
    keys: ClusterKeys | None = None,
) -> list[Check]:  # fmt: skip
    checks: list[Check] = []
    daemon = _daemon_status(node, keys)
    if cluster is None:
        cluster = daemon["cluster"] if daemon else "default"
    interfaces = _interfaces(asked, checks)
    adverts = asyncio.run(_listen(interfaces, listen_s, checks)) if interfaces else []
    key = TAG if keys or (daemon or {}).get("secret") else ""  # what adverts can tell
    checks += _peers(adverts, cluster, daemon, key)
    checks += _daemon_checks(node, daemon)
    return checks


def _interfaces(asked: list[str] | None, checks: list[Check]) -> list[Interface]:
    try:
        lan = lan_interfaces(asked)
    except RinginferError as e:
        checks.append(Check("fail", "interfaces", str(e), "name an interface that exists"))
        return []
    skipped = [i for i in all_interfaces() if i not in lan]
    if not lan:
        checks.append(Check(
            "fail", "interfaces",
            "no LAN interface: only " + ", ".join(f"{i.name} {i.address}" for i in skipped),
            "connect to a network, or pass --mdns-interface NAME (and --peer HOST:PORT)",
        ))  # fmt: skip
        return []
    names = ", ".join(f"{i.name} {i.address}/{i.prefix}" for i in lan)
    note = f" (skipping {', '.join(i.name for i in skipped)})" if skipped else ""
    checks.append(Check("ok", "interfaces", f"mDNS uses {names}{note}"))
    return lan


async def _listen(interfaces: list[Interface], listen_s: float, checks: list[Check]) -> list:
    """Adverts heard in `listen_s`; the probe proves multicast leaves and comes back."""
    probe_id = "doctor-" + secrets.token_hex(4)
    probe = Advert(probe_id, "doctor", __version__, VERSION, 9, "doctor-probe", "cpu", 0, 0,
                   0.0, 0.0, ())  # fmt: skip
    heard: dict[str, Advert] = {}
    speaker = Discovery(probe, interfaces, lambda a: None, service=PROBE_SERVICE, browse=())
    listener = Discovery(None, interfaces, lambda a: heard.__setitem__(a.instance, a),
                         browse=(SERVICE, PROBE_SERVICE))  # fmt: skip
    try:
        await speaker.start()
        await listener.start()
        await asyncio.sleep(listen_s)
    except OSError as e:
        checks.append(Check("fail", "multicast", f"cannot open mDNS sockets: {e}",
                            "allow UDP port 5353 (another mDNS responder may hold it "
                            "exclusively)"))  # fmt: skip
        return []
    finally:
        await listener.close()
        await speaker.close()
    if any(a.id == probe_id for a in heard.values()):
        checks.append(Check("ok", "multicast", "a probe advert was sent and heard back"))
    else:
        checks.append(Check(
            "fail", "multicast", f"our own probe advert was not heard in {listen_s:.0f}s",
            "allow multicast UDP 224.0.0.251:5353 in the firewall, or use --peer HOST:PORT",
        ))  # fmt: skip
    return [a for a in heard.values() if a.id != probe_id]


def _peers(adverts: list[Advert], cluster: str, daemon: dict | None, key: str) -> list[Check]:
    checks = []
    ours = [a for a in adverts if a.cluster == cluster]
    if not adverts:
        checks.append(Check(
            "warn", "peers", "no ringinfer node heard on the LAN",
            "start `ringinfer daemon` on the other machines; if they run, multicast does not "
            "cross between you (Wi-Fi client isolation, VLANs): use --peer HOST:PORT",
        ))  # fmt: skip
    else:
        names = ", ".join(f"{a.name} ({a.endpoint})" for a in ours) or "none"
        checks.append(Check("ok", "peers", f"{len(ours)} node(s) of cluster '{cluster}': {names}"))
    for a in adverts:
        if a.cluster != cluster:
            checks.append(Check(
                "warn", "cluster", f"{a.name} at {a.endpoint} is in cluster '{a.cluster}', "
                f"not '{cluster}'", f"start it with --cluster {cluster} if it should join",
            ))  # fmt: skip
        elif a.key != key:
            checks.append(Check(
                "fail", "secret", f"{a.name} at {a.endpoint} is in cluster '{cluster}' but holds "
                f"{'another' if a.key else 'no'} cluster secret{'' if key else ' (we have none)'}",
                "give every machine the same --secret-file (`ringinfer secret > cluster.key` "
                "once, then copy it)",
            ))  # fmt: skip
        elif a.protocol != VERSION or a.version != __version__:
            checks.append(Check(
                "fail" if a.protocol != VERSION else "warn", "version",
                f"{a.name} at {a.endpoint} runs ringinfer {a.version} (protocol {a.protocol}); "
                f"this is {__version__} (protocol {VERSION})",
                "install the same ringinfer version on every node",
            ))  # fmt: skip
    by_id: dict[str, list[Advert]] = {}
    for a in adverts:
        by_id.setdefault(a.id, []).append(a)
    if daemon:
        by_id.setdefault(daemon["node"], [])
    for node_id, same in by_id.items():
        endpoints = sorted({a.endpoint for a in same})
        if len(endpoints) > 1:
            checks.append(Check(
                "fail", "duplicate id", f"{', '.join(endpoints)} all use node id {node_id}",
                "a copied data dir: delete node_id in the --data-dir of all but one, restart",
            ))  # fmt: skip
    for a in ours:
        checks.append(_reachable(a.name, a.address, a.port))
    return checks


def _reachable(name: str, host: str, port: int) -> Check:
    endpoint = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=2):
            return Check("ok", "port", f"{name} answers on {endpoint}")
    except OSError as e:
        return Check(
            "fail", "port", f"cannot connect to {name} at {endpoint}: {e.strerror or e}",
            f"open TCP port {port} in its firewall, or start its daemon with --host 0.0.0.0",
        )  # fmt: skip


def _daemon_status(node: str, keys: ClusterKeys | None) -> dict | None:
    try:
        with Client(node, keys) as client:
            return client.status(timeout_s=3)
    except RinginferError:
        return None


def _daemon_checks(node: str, daemon: dict | None) -> list[Check]:
    if daemon is None:
        return [
            Check(
                "warn",
                "daemon",
                f"no daemon answers at {node}",
                "start one with `ringinfer daemon` (or pass --node HOST:PORT)",
            )
        ]
    me = next(n for n in daemon["nodes"] if n["id"] == daemon["node"])
    plan = f"plan epoch {daemon['epoch']}" if daemon["live"] else "no live plan"
    discovery = "mDNS on" if daemon.get("mdns") else (
        "mDNS off (--no-mdns, no LAN interface, or listening on loopback)")
    checks = [Check(
        "ok", "daemon", f"{me['name']} at {me['address']}: {me['state']}, {plan}, "
        f"{len(daemon['nodes'])} node(s) in cluster '{daemon['cluster']}', {discovery}",
    )]  # fmt: skip
    host, _, port = me["address"].rpartition(":")
    if is_loopback(host):
        checks.append(Check(
            "warn", "port", f"the daemon listens on {me['address']}: other machines cannot "
            "reach it", "give the cluster a secret (`ringinfer secret > cluster.key`, then "
            "--secret-file on every machine): the daemon then listens on every address",
        ))  # fmt: skip
    else:
        checks.append(_reachable(me["name"], host, int(port)))
    for p in daemon["problems"]:
        checks.append(Check(p["level"], "daemon", p["problem"], p["fix"]))
    return checks
