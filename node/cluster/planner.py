"""Which node runs which layers: a pure function of the model's shape, the nodes and the links.

The planner predicts the time per token of every candidate assignment from what each node
measured (matmul FLOP/s and the rate at which it streams weights, see
`discovery/capabilities.py`) and the links' round trips, and keeps the fastest:

- objective "latency" (default): one request's time per output token, the sum over stages
  of layers x per-layer time, the LM head on the last stage, and one hop per stage around
  the ring. Adding a node adds a hop, so a node is left out when it would not pay for it:
  a single node that fits the model is always a candidate, so a plan is never predicted
  slower than the best machine alone.
- objective "throughput": the slowest stage, which paces a pipeline full of concurrent
  requests; stages are balanced and hops overlap with compute.

Memory bounds every candidate: weights, plus a KV cache budget of `context` positions per
layer, within HEADROOM of what the node offers; the first stage also holds the embedding,
the last the final norm and LM head.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from node.errors import RinginferError

HEADROOM = 0.9  # share of a node's memory the planner fills (weights + KV budget)
DEFAULT_CONTEXT = 4096  # KV positions per layer every stage must have room for
DEFAULT_FLOPS = 1e11  # a node that measured nothing: a modest laptop CPU
DEFAULT_BANDWIDTH = 1e10  # bytes/s of weights streamed in a matrix-vector product
DEFAULT_RTT_S = 1e-3  # a round trip on a LAN, when none was measured
HOP_OVERHEAD_S = 3e-4  # encoding, sending and decoding one activation message
LAYER_OVERHEAD_S = 5e-5  # per layer per step: kernel launches and Python dispatch
LINK_BYTES_PER_S = 125e6  # 1 Gb/s Ethernet
EXHAUSTIVE = 8  # up to this many candidate nodes, every subset of them is tried
# Plans predicted within this fraction of the best count as equal, and the one that moves
# the fewest weights between nodes wins: a transfer is paid once, and measured layer times
# of alike machines differ by about this much anyway.
REUSE_SLACK = 0.05
OBJECTIVES = ("latency", "throughput")


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a model at one compute dtype, and what status
    shows of it.

    A mixture-of-experts layer holds all its experts but a decode step reads only those a
    token routes to: memory follows `layer_bytes`, time `layer_read`. An MoE model's few
    dense layers (`dense_layers`) are counted apart, so totals and stage times are exact;
    how many layers a node takes is bounded by the larger kind, so it never overfills.
    """

    n_layers: int
    layer_bytes: int  # one decoder layer's weights (an MoE model's: an MoE layer, all experts)
    embed_bytes: int  # what the first stage adds: token (and position) embeddings
    head_bytes: int  # what the last stage adds: final norm and LM head
    kv_bytes: int = 0  # one layer's keys and values for one position
    state_bytes: int = 0  # one layer's fixed state for one request (recurrent layers')
    hidden: int = 0  # activation width: a decode step sends hidden x wire_bytes per hop
    dtype_bytes: float = 2  # bytes per layer weight (int4: 0.625), to count FLOPs from bytes
    wire_bytes: int = 2
    layer_read: int = 0  # of layer_bytes, what one decode step reads (0: all of it)
    head_read: int = 0  # of head_bytes, likewise (a quantized head's refining table: a few rows)
    tied_bytes: int = 0  # of head_bytes, what a stage holding the embedding too shares with it
    dense_layers: tuple[int, ...] = ()  # an MoE model's layers with a dense MLP instead
    dense_bytes: int = 0  # one of those: held and read whole
    # Shown, not planned with: config.json's model_type (a GGUF's architecture), parameters
    # of the whole model and of one token's path through it, routed experts per MoE layer.
    architecture: str = ""
    params: int = 0
    active_params: int = 0
    experts: int = 0
    experts_used: int = 0
    layer_kinds: str = ""  # where the layers differ from plain attention + MLP (shapes.py)

    def layer_slot(self, context: int) -> int:
        """Bytes one layer takes on a node at most: weights and one request's cache."""
        return max(self.layer_bytes, self.dense_bytes) + self.cache_bytes(1, context)

    def cache_bytes(self, layers: int, context: int) -> int:
        """What one request of `context` positions holds in `layers` layers: keys and values
        that grow with it, and recurrent states that do not (means over the layers)."""
        return layers * (self.kv_bytes * context + self.state_bytes)

    def dense_count(self, start: int, end: int) -> int:
        return sum(start <= i < end for i in self.dense_layers)

    def ends(self, first: bool, last: bool) -> int:
        """What a stage adds to its layers as the first and/or last: the embedding, the head,
        less what they share when one stage holds both (a tied int8 table's codes)."""
        both = first and last
        return first * self.embed_bytes + last * self.head_bytes - both * self.tied_bytes

    def held(self, start: int, end: int) -> int:
        """The weights of layers [start, end)."""
        dense = self.dense_count(start, end)
        return (end - start - dense) * self.layer_bytes + dense * self.dense_bytes

    def read(self, start: int, end: int) -> int:
        """What one decode step reads of layers [start, end)."""
        dense, each = self.dense_count(start, end), self.layer_read or self.layer_bytes
        return (end - start - dense) * each + dense * self.dense_bytes

    def summary(self) -> str:
        """'qwen3_moe · 128 experts, 8 active · 3.4B active of 30.5B' or 'llama · 135M
        parameters' (and the layers' kinds where they differ): what a user recognises the
        model by."""
        parts = [self.architecture] if self.architecture else []
        if self.experts:
            parts.append(f"{self.experts} experts, {self.experts_used} active")
            parts.append(f"{_amount(self.active_params)} active of {_amount(self.params)}")
        elif self.params:
            parts.append(f"{_amount(self.params)} parameters")
        if self.layer_kinds:
            parts.append(self.layer_kinds)
        return " · ".join(parts)


def _amount(n: int) -> str:
    """30.5B, 135M, 98K: parameter counts as model cards write them."""
    for unit, size in (("B", 1e9), ("M", 1e6)):
        if n >= size:
            return f"{n / size:.1f}{unit}" if unit == "B" else f"{n / size:.0f}{unit}"
    return f"{n / 1e3:.0f}K"


@dataclass(frozen=True)
class NodeSpec:
    id: str
    memory: int  # bytes this node can give to weights and caches
    pin: tuple[int, int] | None = None  # layers fixed by hand (`--layers START:END`)
    flops: float = DEFAULT_FLOPS  # measured matmul throughput, FLOP/s
    bandwidth: float = DEFAULT_BANDWIDTH  # measured weight-streaming rate, bytes/s
    layer_overhead_s: float = LAYER_OVERHEAD_S  # measured fixed cost of one layer's kernels
    layer_s: float = 0.0  # one layer of this model timed on the node; 0: use the roofline
    # What it has: "blk.N" for layer N, "embed" and "head" for the first and last stage's
    # other weights (see Transfers.plan_holds); None: all of them.
    holds: frozenset[str] | None = None

    def missing_bytes(self, shape: ModelShape, start: int, end: int) -> int:
        """Weights it would have to fetch to serve layers [start, end)."""
        if self.holds is None:
            return 0
        held = self.holds
        out = sum(shape.held(i, i + 1) for i in range(start, end) if f"blk.{i}" not in held)
        if start == 0 and "embed" not in held:
            out += shape.embed_bytes
        if end == shape.n_layers and "head" not in held:
            out += shape.head_bytes
        return out


@dataclass(frozen=True)
class StageSpec:
    node: str
    start: int
    end: int


@dataclass(frozen=True)
class Plan:
    """One epoch's assignment: stages in ring order, covering every layer exactly once."""

    model: str
    epoch: int
    stages: tuple[StageSpec, ...]

    def stage_of(self, node: str) -> StageSpec | None:
        return next((s for s in self.stages if s.node == node), None)

    def next_node(self, node: str) -> str | None:
        nodes = [s.node for s in self.stages]
        i = nodes.index(node)
        return nodes[i + 1] if i + 1 < len(nodes) else None

    @property
    def nodes(self) -> list[str]:
        return [s.node for s in self.stages]

    def to_json(self) -> dict[str, Any]:
        stages = [[s.node, s.start, s.end] for s in self.stages]
        return {"model": self.model, "epoch": self.epoch, "stages": stages}

    @classmethod
    def from_json(cls, data: dict[str, Any], n_layers: int) -> Plan:
        """A plan received from a peer, refused unless it covers 0..n_layers exactly once."""
        try:
            stages = tuple(StageSpec(str(n), int(a), int(b)) for n, a, b in data["stages"])
            plan = cls(str(data["model"]), int(data["epoch"]), stages)
        except (KeyError, TypeError, ValueError):
            raise RinginferError("malformed plan") from None
        bounds = [0, *(b for s in stages for b in (s.start, s.end)), n_layers]
        if not stages or any(a != b for a, b in zip(bounds[::2], bounds[1::2], strict=True)):
            raise RinginferError(f"plan does not cover layers 0-{n_layers} exactly once")
        if any(s.start >= s.end for s in stages) or len(set(plan.nodes)) != len(stages):
            raise RinginferError("plan has an empty stage or a node twice")
        return plan


Links = Mapping[tuple[str, str], float]  # measured round trips in seconds, either direction


@dataclass(frozen=True)
class Prediction:
    tpot_s: float  # one request's time per output token: every stage and hop in turn
    bottleneck_s: float  # the slowest stage: with requests pipelined, one token per this
    stage_s: tuple[float, ...]  # each stage's compute and send, in ring order

    def to_json(self) -> dict[str, Any]:
        return {
            "tpot_ms": round(self.tpot_s * 1e3, 3),
            "tokens_per_s": round(1 / self.tpot_s, 2),
            "pipelined_tokens_per_s": round(1 / self.bottleneck_s, 2),
            "stage_ms": [round(s * 1e3, 3) for s in self.stage_s],
        }


def layer_time(node: NodeSpec, shape: ModelShape) -> float:
    """One layer, one decode position: as timed on the node, else the weights a step reads
    streamed or their FLOPs done, whichever is slower, plus the kernels' fixed cost. Of an
    MoE model, an MoE layer: its attention, router, shared expert and the experts used."""
    if node.layer_s > 0:
        return node.layer_s
    return _roofline(node, shape, shape.layer_read or shape.layer_bytes) + node.layer_overhead_s


def layers_time(node: NodeSpec, shape: ModelShape, start: int, end: int) -> float:
    """Layers [start, end), one decode position, an MoE model's dense layers at their own
    size (a measured layer time stands for every layer)."""
    dense = 0 if node.layer_s > 0 else shape.dense_count(start, end)
    dense_s = _roofline(node, shape, shape.dense_bytes) + node.layer_overhead_s
    return (end - start - dense) * layer_time(node, shape) + dense * dense_s


def head_time(node: NodeSpec, shape: ModelShape) -> float:
    return _roofline(node, shape, shape.head_read or shape.head_bytes)


def _roofline(node: NodeSpec, shape: ModelShape, weight_bytes: int) -> float:
    flops = 2 * weight_bytes / shape.dtype_bytes
    return max(weight_bytes / node.bandwidth, flops / node.flops)


def send_time(shape: ModelShape) -> float:
    """A stage's cost of passing one position on, which a pipeline cannot overlap."""
    return HOP_OVERHEAD_S + shape.hidden * shape.wire_bytes / LINK_BYTES_PER_S


def hop_time(a: str, b: str, shape: ModelShape, links: Links) -> float:
    if a == b:
        return 0.0
    rtt = links.get((a, b), links.get((b, a), DEFAULT_RTT_S))
    return rtt / 2 + send_time(shape)


def stage_bytes(stage: StageSpec, shape: ModelShape) -> int:
    """The weights a stage holds: its layers, with the embedding or head at the ends."""
    return shape.held(stage.start, stage.end) + shape.ends(stage.start == 0,
                                                          stage.end == shape.n_layers)


def capacity(node: NodeSpec, shape: ModelShape, context: int, first: bool, last: bool) -> int:
    """How many layers `node` holds as a stage, with the embedding / head when it has them."""
    room = node.memory * HEADROOM - shape.ends(first, last)
    return max(0, int(room // max(1, shape.layer_slot(context))))


def predict(
    plan_stages: Sequence[StageSpec], shape: ModelShape, nodes: Mapping[str, NodeSpec],
    links: Links | None = None,
) -> Prediction:  # fmt: skip
    links = links or {}
    k = len(plan_stages)
    compute = [
        layers_time(nodes[s.node], shape, s.start, s.end)
        + (head_time(nodes[s.node], shape) if s.end == shape.n_layers else 0.0)
        for s in plan_stages
    ]
    ring = [s.node for s in plan_stages]
    hops = [hop_time(ring[i], ring[(i + 1) % k], shape, links) for i in range(k)]
    stage_s = tuple(c + (send_time(shape) if k > 1 else 0.0) for c in compute)
    return Prediction(sum(compute) + sum(hops), max(stage_s), stage_s)


def make_plan(
    model: str, epoch: int, shape: ModelShape, nodes: Sequence[NodeSpec],
    objective: str = "latency", links: Links | None = None, context: int = DEFAULT_CONTEXT,
) -> Plan:  # fmt: skip
    """The assignment with the best predicted `objective`; pins are honoured.

    Pinned nodes keep their ranges; the layers between pins (the gaps) go to the unpinned
    nodes, split among the gaps in id order in proportion to their lengths. Deterministic:
    the same input gives the same plan (ties go to fewer stages, then smaller ids).
    """
    if objective not in OBJECTIVES:
        raise RinginferError(f"unknown objective '{objective}' (use {' or '.join(OBJECTIVES)})")
    links = links or {}
    pinned = sorted((n for n in nodes if n.pin), key=lambda n: n.pin)
    free = sorted((n for n in nodes if not n.pin), key=lambda n: n.id)
    stages: list[StageSpec] = []
    cursor = 0
    gaps: list[tuple[int, int]] = []
    for n in pinned:
        start, end = n.pin  # type: ignore[misc]
        if not 0 <= start < end <= shape.n_layers:
            raise RinginferError(
                f"node {n.id} pins layers {start}:{end} outside 0:{shape.n_layers}"
            )
        if start < cursor:
            raise RinginferError(f"node {n.id} pins layers {start}:{end}, overlapping another pin")
        if start > cursor:
            gaps.append((cursor, start))
        stages.append(StageSpec(n.id, start, end))
        cursor = end
    if cursor < shape.n_layers:
        gaps.append((cursor, shape.n_layers))
    if len(free) < len(gaps):
        raise RinginferError(
            f"layers {', '.join(f'{a}:{b}' for a, b in gaps)} are pinned to no node and only "
            f"{len(free)} unpinned node(s) can take them"
        )
    shares = largest_remainder(len(free) - len(gaps), [b - a for a, b in gaps])
    taken = 0
    for (a, b), extra in zip(gaps, shares, strict=True):
        group = free[taken : taken + 1 + extra]
        taken += len(group)
        segment = _Segment(a, b - a, shape, context, objective, links)
        for node, count in segment.best(group):
            stages.append(StageSpec(node.id, a, a + count))
            a += count
    return Plan(model, epoch, tuple(sorted(stages, key=lambda s: s.start)))


@dataclass(frozen=True)
class _Segment:
    """A run of consecutive layers to place on some of a group of nodes."""

    start: int
    layers: int
    shape: ModelShape
    context: int
    objective: str
    links: Links

    @property
    def has_embed(self) -> bool:
        return self.start == 0

    @property
    def has_head(self) -> bool:
        return self.start + self.layers == self.shape.n_layers

    def best(self, group: Sequence[NodeSpec]) -> list[tuple[NodeSpec, int]]:
        """The best assignment; of those within REUSE_SLACK of it, the one moving fewest
        weights to nodes that lack them."""
        found: list[tuple[tuple, int, list[tuple[NodeSpec, int]]]] = []
        for subset in _subsets(group, self.shape):
            for order in _orders(subset):
                counts = self._assign(order)
                if counts is not None:
                    found.append((self._score(order, counts), self._moved(order, counts),
                                  list(zip(order, counts, strict=True))))  # fmt: skip
        if not found:
            raise RinginferError(self._does_not_fit(group))
        best = min(key[0] for key, _, _ in found)
        near = [f for f in found if f[0][0] <= best * (1 + REUSE_SLACK)]
        return min(near, key=lambda f: (f[1], f[0]))[2]

    def _moved(self, order: Sequence[NodeSpec], counts: list[int]) -> int:
        at, out = self.start, 0
        for n, c in zip(order, counts, strict=True):
            out += n.missing_bytes(self.shape, at, at + c)
            at += c
        return out

    def _caps(self, order: Sequence[NodeSpec]) -> list[int]:
        last = len(order) - 1
        return [
            capacity(n, self.shape, self.context, self.has_embed and i == 0,
                     self.has_head and i == last)
            for i, n in enumerate(order)
        ]  # fmt: skip

    def _assign(self, order: Sequence[NodeSpec]) -> list[int] | None:
        """Layers per node (each at least one), or None when they do not fit."""
        caps = self._caps(order)
        if min(caps) < 1 or sum(caps) < self.layers or len(order) > self.layers:
            return None
        cost = [layer_time(n, self.shape) for n in order]
        if self.objective == "latency":  # linear in the counts: fill the fastest first
            counts = [1] * len(order)
            left = self.layers - len(order)
            for i in sorted(range(len(order)), key=lambda i: cost[i]):
                add = min(caps[i] - 1, left)
                counts[i] += add
                left -= add
            return counts
        return self._balance(order, caps, cost)

    def _balance(self, order: Sequence[NodeSpec], caps: list[int], cost: list[float]) -> list[int]:
        """Counts minimising the slowest stage: bisect its time, then trim the surplus."""
        extra = self._extras(order)
        lo, hi = 0.0, max(e + c * cap for e, c, cap in zip(extra, cost, caps, strict=True))

        def counts_at(t: float) -> list[int]:
            return [
                max(1, min(cap, math.floor((t - e) / c)))
                for e, c, cap in zip(extra, cost, caps, strict=True)
            ]

        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if sum(counts_at(mid)) >= self.layers else (mid, hi)
        counts = counts_at(hi)
        while sum(counts) > self.layers:
            slowest = max(
                (i for i in range(len(order)) if counts[i] > 1),
                key=lambda i: (extra[i] + counts[i] * cost[i], -i),
            )
            counts[slowest] -= 1
        return counts

    def _extras(self, order: Sequence[NodeSpec]) -> list[float]:
        head = [self.has_head and i == len(order) - 1 for i in range(len(order))]
        send = send_time(self.shape)
        return [head_time(n, self.shape) * h + send for n, h in zip(order, head, strict=True)]

    def _score(self, order: Sequence[NodeSpec], counts: list[int]) -> tuple:
        """(predicted objective, the other metric, stages, ids): smaller is better."""
        stages, at = [], self.start
        for n, c in zip(order, counts, strict=True):
            stages.append(StageSpec(n.id, at, at + c))
            at += c
        p = predict(stages, self.shape, {n.id: n for n in order}, self.links)
        ids = [n.id for n in order]
        if self.objective == "latency":
            return (p.tpot_s, p.bottleneck_s, len(order), ids)
        return (p.bottleneck_s, p.tpot_s, len(order), ids)

    def _does_not_fit(self, group: Sequence[NodeSpec]) -> str:
        s, gib, end = self.shape, 2**30, self.start + self.layers
        need = s.held(self.start, end) + s.cache_bytes(self.layers, self.context)
        need += s.ends(True, True)
        have = ", ".join(f"{n.id}: {n.memory / gib:.2f} GiB" for n in group)
        experts = ""
        if s.experts:
            experts = (f"; a layer holds all its {s.experts} experts ({s.layer_bytes / gib:.2f} "
                       f"GiB) though a token reads {s.experts_used} of them")  # fmt: skip
        return (
            f"{self.layers} layers ({need / gib:.2f} GiB with embedding, head and a "
            f"{self.context}-position KV budget) do not fit on {have}{experts}"
        )


def _subsets(group: Sequence[NodeSpec], shape: ModelShape) -> Iterable[tuple[NodeSpec, ...]]:
    """Every subset of a small group; for a big one, the fastest-first and largest-first
    prefixes (a heuristic: 2^n subsets would take too long)."""
    if len(group) <= EXHAUSTIVE:
        for k in range(1, len(group) + 1):
            yield from itertools.combinations(group, k)
        return
    seen: set[tuple[str, ...]] = set()
    fast = sorted(group, key=lambda n: (layer_time(n, shape), n.id))
    big = sorted(group, key=lambda n: (-n.memory, n.id))
    for ranking in (fast, big):
        for k in range(1, len(group) + 1):
            subset = tuple(sorted(ranking[:k], key=lambda n: n.id))
            if tuple(n.id for n in subset) not in seen:
                seen.add(tuple(n.id for n in subset))
                yield subset


def _orders(subset: Sequence[NodeSpec]) -> Iterable[tuple[NodeSpec, ...]]:
    """Ring orders worth telling apart: which node takes the embedding and which the head
    (both matter for memory, the head for time); the rest in id order."""
    if len(subset) == 1:
        yield tuple(subset)
        return
    for last in subset:
        for first in subset:
            if first is not last:
                middle = [n for n in subset if n is not first and n is not last]
                yield (first, *middle, last)


def largest_remainder(total: int, weights: Sequence[float]) -> list[int]:
    """Split an integer `total` in proportion to `weights` (largest remainder)."""
    whole = sum(weights)
    if total <= 0 or whole <= 0:
        return [0] * len(weights)
    exact = [total * w / whole for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: counts[i] - exact[i])
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts
