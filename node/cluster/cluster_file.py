"""A described cluster for `ringinfer plan`: nodes' memory, compute and links, no daemons.

A JSON object {"nodes": [...], "rtt_ms": 1.0, "links": [{"a", "b", "rtt_ms"}]} or just the
list of nodes. Each node: "name" (or "id"), "memory" (bytes or "16G"), and optionally
"flops" (FLOP/s, or "2T"), "bandwidth" (bytes/s, or "100G"), "layers" ("0:20", a pin),
"rtt_ms", "layer_ms" (one layer of the model as timed on that node, which `status --json`
reports; without it the layer time is predicted from FLOP/s and bandwidth).
`ringinfer status --json` output is a valid cluster file: size a cluster you already have.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node.cluster.planner import DEFAULT_BANDWIDTH, DEFAULT_FLOPS, DEFAULT_RTT_S, Links, NodeSpec
from node.errors import RinginferError
from node.json_file import read_json

BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_DECIMAL = {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15}
SIZE_SUFFIXES = ("B", "I")  # 16G, 16GB, 16GiB
_RATE_SUFFIXES = ("FLOP/S", "/S", *SIZE_SUFFIXES)  # 4T, 4TFLOP/s, 100GB/s


def parse_amount(
    value: Any, units: dict[str, float], what: str, suffixes: tuple[str, ...] = SIZE_SUFFIXES
) -> float:
    """A positive number, or a string like '16G' / '1.5T' in `units`, with `suffixes` (in
    that order) ignored."""
    if type(value) in (int, float) and value > 0:
        return float(value)
    if isinstance(value, str):
        t = value.strip().upper()
        for suffix in suffixes:
            t = t.removesuffix(suffix)
        try:
            number = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
        except ValueError:
            number = 0.0
        if number > 0:
            return number
    raise RinginferError(f"{what}: expected a positive amount like 16G, got {value!r}")


@dataclass(frozen=True)
class DescribedCluster:
    nodes: list[NodeSpec]
    names: dict[str, str]  # id -> name to show
    links: Links


def read_cluster(path: Path) -> DescribedCluster:
    data = read_json(path)
    items = data.get("nodes") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise RinginferError(f'{path}: expected a list of nodes or {{"nodes": [...]}}')
    default_rtt = DEFAULT_RTT_S
    if isinstance(data, dict) and "rtt_ms" in data:
        default_rtt = parse_amount(data["rtt_ms"], {}, f"{path}: rtt_ms") / 1e3
    nodes, names, rtts = [], {}, {}
    for i, item in enumerate(items):
        where = f"{path}: node {i + 1}"
        if not isinstance(item, dict):
            raise RinginferError(f"{where}: expected an object")
        node_id = str(item.get("id") or item.get("name") or "")
        if not node_id:
            raise RinginferError(f"{where}: needs a name")
        if node_id in names:
            raise RinginferError(f"{where}: the name '{node_id}' is used twice")
        names[node_id] = str(item.get("name") or node_id)
        pin = None
        if isinstance(item.get("layers"), str):  # a pin; status --json's lists are not
            start, _, end = item["layers"].partition(":")
            if not (start.isdigit() and end.isdigit()):
                raise RinginferError(f"{where}: layers must be 'START:END'")
            pin = (int(start), int(end))
        layer_s = 0.0  # timed by a daemon (status --json carries it), else predicted
        if item.get("layer_ms"):
            layer_s = parse_amount(item["layer_ms"], {}, f"{where}: layer_ms") / 1e3
        if "memory" not in item:
            raise RinginferError(f"{where}: needs memory (bytes or like '16G')")
        nodes.append(NodeSpec(
            id=node_id,
            memory=int(parse_amount(item["memory"], BINARY, f"{where}: memory")),
            pin=pin,
            flops=parse_amount(item.get("flops", DEFAULT_FLOPS), _DECIMAL, f"{where}: flops",
                               _RATE_SUFFIXES),
            bandwidth=parse_amount(item.get("bandwidth", DEFAULT_BANDWIDTH), _DECIMAL,
                                   f"{where}: bandwidth", _RATE_SUFFIXES),
            layer_s=layer_s,
        ))  # fmt: skip
        if item.get("rtt_ms") is not None:
            rtts[node_id] = parse_amount(item["rtt_ms"], {}, f"{where}: rtt_ms") / 1e3
    links: dict[tuple[str, str], float] = {}
    ids = list(names)
    for a in ids:
        for b in ids:
            if a < b:
                links[(a, b)] = max(rtts.get(a, default_rtt), rtts.get(b, default_rtt))
    for link in data.get("links", []) if isinstance(data, dict) else []:
        try:
            a, b = str(link["a"]), str(link["b"])
            links[(min(a, b), max(a, b))] = parse_amount(link["rtt_ms"], {}, "link rtt_ms") / 1e3
        except (KeyError, TypeError):
            raise RinginferError(f"{path}: each link needs a, b and rtt_ms") from None
    return DescribedCluster(nodes, names, links)
