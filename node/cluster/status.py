"""What a daemon reports of the cluster (`ringinfer status`, the API's /v1/status, the page,
`doctor`): its view of the nodes, the plan and its prediction, links, counters, and the
problems a user should fix, each with how."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from discovery.interfaces import is_loopback
from node import __version__
from node.cluster.planner import predict, stage_bytes
from protocol.wire import VERSION, Kind

if TYPE_CHECKING:
    from node.cluster.daemon import Daemon


@dataclass
class Stats:
    """Counters shown in status: refusals by code, traffic by message kind, stage compute."""

    errors: Counter = field(default_factory=Counter)
    bytes_sent: Counter = field(default_factory=Counter)
    messages_sent: Counter = field(default_factory=Counter)
    compute_s: float = 0.0  # stage compute, as the event loop waits for it
    steps: int = 0
    decode_compute_s: float = 0.0  # the part spent on passes of one-position steps only
    decode_steps: int = 0
    rows: int = 0  # positions computed, over all passes

    def sent(self, kind: Kind, frames: list[bytes]) -> None:
        self.messages_sent[kind.value] += 1
        self.bytes_sent[kind.value] += sum(len(f) for f in frames)


CORRUPT_SHOWN_S = 3600.0  # how long a member that sent a corrupt tensor stays a problem
LOAD_FIELDS = ("batch", "tokens_per_s", "waiting", "queued")


def load(d: Daemon) -> dict[str, float]:
    """How busy this node is, for status and its HELLOs: its stage's mean decode batch and
    decode tokens/s lately, the steps waiting for its stage, requests queued for room."""
    stage = d.stage.load.to_json()
    return {**stage, "waiting": len(d.stage.waiting), "queued": len(d.requester.queue)}


def status(d: Daemon) -> dict[str, Any]:
    """The cluster as this daemon sees it: what `ringinfer status`, the API and the page show."""
    plan = d.plans.plan
    caps = d.cfg.caps
    me = {
        "id": d.id, "name": d.cfg.name, "address": d.address,
        "state": d.plans.state(), "memory": d.cfg.memory,
        "requests": len(d.stage.shard.requests) if d.stage.shard else 0,
        "device": caps.device, "device_name": caps.device_name,
        "memory_total": caps.memory_total, "flops": caps.flops, "bandwidth": caps.bandwidth,
        "layer_ms": round(caps.layer_s * 1e3, 4), "rtt_ms": None, "version": __version__,
        "quantization": d.quantization, **load(d),
    }  # fmt: skip
    members = [
        {"id": m.id, "name": m.name, "address": m.address, "state": m.state,
         "memory": m.memory, "requests": m.requests, "device": m.caps.device,
         "device_name": m.caps.device_name, "memory_total": m.caps.memory_total,
         "flops": m.caps.flops, "bandwidth": m.caps.bandwidth,
         "layer_ms": round(m.caps.layer_s * 1e3, 4),
         "rtt_ms": round(m.rtt * 1e3, 3) if m.rtt is not None else None,
         "version": m.version, "quantization": m.quant,
         **{k: m.load.get(k, 0) for k in LOAD_FIELDS}}
        for m in d.membership.members
    ]  # fmt: skip
    nodes = []
    for node in sorted([me, *members], key=lambda n: n["id"]):
        stage = plan.stage_of(node["id"]) if plan else None
        nodes.append({
            **node, "layers": [stage.start, stage.end] if stage else None,
            "weights": stage_bytes(stage, d.shape) if stage else 0,
        })  # fmt: skip
    predicted = None
    specs = {n.id: n for n in d.plans.candidates()}
    if plan and all(s.node in specs for s in plan.stages):
        predicted = predict(plan.stages, d.shape, specs, d.plans.links()).to_json()
    stats = d.stats
    shape = d.shape
    return {
        "epoch": plan.epoch if plan else 0,
        "model": d.ckpt.name,
        "architecture": shape.architecture,
        "params": shape.params,
        "active_params": shape.active_params,
        "experts": shape.experts,  # routed experts per MoE layer (0: a dense model)
        "experts_used": shape.experts_used,
        "model_summary": shape.summary(),
        "n_layers": d.ckpt.n_layers,
        "context": d.ckpt.config.max_seq_len,
        "live": plan is not None,
        "plan_error": d.plans.error,
        "node": d.id,
        "cluster": d.cfg.cluster,
        "objective": d.cfg.objective,
        "protocol": VERSION,
        "mdns": d.membership.discovery is not None,
        "secret": d.key or None,  # the cluster key's fingerprint
        "predicted": predicted,
        "problems": problems(d),
        "nodes": nodes,
        "links": [
            {"from": a, "to": b, "rtt_ms": round(rtt * 1e3, 3)}
            for (a, b), rtt in sorted(d.plans.links().items())
        ],
        "api": d.api.listener.address if d.api else None,
        "stats": {
            "requests_in_flight": len(d.requester.requests),
            "queued": len(d.requester.queue),
            "cached_requests": me["requests"],
            "errors": dict(stats.errors),
            "bytes_sent": dict(stats.bytes_sent),
            "messages_sent": dict(stats.messages_sent),
            "compute_s": round(stats.compute_s, 6),
            "steps": stats.steps,
            "decode_compute_s": round(stats.decode_compute_s, 6),
            "decode_steps": stats.decode_steps,
            "rows": stats.rows,
        },
    }


MAX_FOREIGN_SHOWN = 16  # nodes heard of but not members, in one status reply


def problems(d: Daemon) -> list[dict[str, str]]:
    """What a user should fix, each with how and how bad: shown by `status` and `doctor`."""
    out = []
    now = time.monotonic()
    if d.cfg.keys is None and not is_loopback(d.cfg.host):
        out.append({
            "level": "warn",
            "problem": f"no cluster secret on {d.cfg.host}:{d.cfg.port} (--insecure): "
                       "anyone on the network can join, send frames and read activations",
            "fix": "`ringinfer secret > cluster.key`, copy it to every machine, restart each "
                   "daemon with --secret-file cluster.key",
        })  # fmt: skip
    if d.api and d.api.listener.key_in_clear:
        out.append({
            "level": "warn",
            "problem": f"the API on {d.api.listener.address} takes its key over plain HTTP: "
                       "anyone on the network path can read it",
            "fix": "restart the daemon with --api-tls-cert FILE --api-tls-key FILE, or serve "
                   "the API on loopback behind a TLS proxy",
        })  # fmt: skip
    for address, t in d.transport.strangers.items():
        if now - t < 60:
            out.append({
                "level": "warn",
                "problem": f"a process at {address} tried to connect without this cluster's "
                           "secret (nothing it sent was read)",
                "fix": "if it is one of yours, give it the cluster's --secret-file",
            })  # fmt: skip
    for address, t in d.membership.impostors.items():
        if now - t < d.cfg.dead_after_s:
            out.append({
                "level": "fail",
                "problem": f"the node at {address} uses this node's id {d.id}",
                "fix": "a copied data dir: on one of the two machines stop the daemon, "
                       "delete node_id in its --data-dir, and start it again",
            })  # fmt: skip
    for node_id, addresses in d.membership.members.clashes().items():
        out.append({
                "level": "fail",
            "problem": f"nodes at {', '.join(addresses)} share the id {node_id}",
            "fix": "delete node_id in the --data-dir of all but one of them and restart it",
        })  # fmt: skip
    foreign = list(d.membership.foreign.values())
    if len(foreign) > MAX_FOREIGN_SHOWN:  # adverts are anyone's: the reply must stay small
        out.append({
            "level": "warn",
            "problem": f"{len(foreign)} nodes that are not members advertise on this network; "
                       f"the {MAX_FOREIGN_SHOWN} heard of last follow",
            "fix": "if they are not yours, something on the network is sending mDNS adverts",
        })  # fmt: skip
        foreign = sorted(foreign, key=lambda f: f["seen"])[-MAX_FOREIGN_SHOWN:]
    for f in foreign:
        if f["cluster"] == d.cfg.cluster and f["key"] != d.key:
            out.append({
                "level": "fail",
                "problem": f"{f['name']} at {f['address']} is in cluster '{f['cluster']}' "
                           f"but holds {'another' if f['key'] else 'no'} cluster secret",
                "fix": "give every machine of the cluster the same --secret-file "
                       "(made once with `ringinfer secret > cluster.key`)",
            })  # fmt: skip
        elif f["cluster"] != d.cfg.cluster:
            out.append({
                "level": "warn",
                "problem": f"{f['name']} at {f['address']} is in cluster '{f['cluster']}', "
                           f"not '{d.cfg.cluster}'",
                "fix": f"start it with --cluster {d.cfg.cluster} if it should join",
            })  # fmt: skip
        else:
            out.append({
                "level": "fail",
                "problem": f"{f['name']} at {f['address']} runs ringinfer {f['version']} "
                           f"(protocol {f['protocol']}, ours {VERSION})",
                "fix": "run the same ringinfer version on every node",
            })  # fmt: skip
    others = [m for m in d.membership.members if m.fingerprint != d.fingerprint]
    for m in others:
        out.append({
                "level": "fail",
            "problem": f"{m.name} serves {m.model}, not {d.ckpt.name}",
            "fix": "start every daemon of one cluster with the same --model",
        })  # fmt: skip
    for name, (t, tensor) in sorted(d.transfers.corrupt.items()):
        if now - t < CORRUPT_SHOWN_S:
            out.append({
                "level": "warn",
                "problem": f"{name} sent tensor {tensor} corrupt (it failed its SHA-256; it "
                           "was fetched again from another member)",
                "fix": f"on {name}: `ringinfer cache --clear` if it serves from its shard "
                       "cache, else check its model file and disk",
            })  # fmt: skip
    if d.plans.error:
        out.append({
            "level": "fail", "problem": d.plans.error,
            "fix": "add a node or memory (--max-memory), or use a smaller model",
        })  # fmt: skip
    return out
