"""Which node runs which layers: a pure function of the model's shape and the members."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from node.errors import RinginferError

HEADROOM = 0.9  # share of a node's free memory the planner will fill with weights


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a model: its layers and their weight bytes."""

    n_layers: int
    layer_bytes: int  # one decoder layer's weights at the compute dtype
    edge_bytes: int  # embedding + final norm + LM head (first and last stage)


@dataclass(frozen=True)
class NodeSpec:
    id: str
    memory: int  # bytes this node can give to weights
    pin: tuple[int, int] | None = None  # layers fixed by hand (`--layers START:END`)


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


def layers_that_fit(node: NodeSpec, shape: ModelShape) -> int:
    """How many layers `node` can hold, counting the embedding and head as if it had both."""
    room = int(node.memory * HEADROOM) - shape.edge_bytes
    return max(0, room // max(1, shape.layer_bytes))


def make_plan(model: str, epoch: int, shape: ModelShape, nodes: Sequence[NodeSpec]) -> Plan:
    """Layers in proportion to each node's free memory, never more than fits; pins honoured.

    Pinned nodes keep their ranges. The layers between pins (the gaps) go to the unpinned
    nodes in id order: each gap gets a share of the nodes in proportion to its length, and
    within a gap layers are water-filled by memory. Nodes given no layers are left out.
    """
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
    shares = _apportion(len(free) - len(gaps), [b - a for a, b in gaps])
    taken = 0
    for (a, b), extra in zip(gaps, shares, strict=True):
        group = free[taken : taken + 1 + extra]
        taken += len(group)
        counts = _water_fill(b - a, group, shape)
        for n, c in zip(group, counts, strict=True):
            if c:
                stages.append(StageSpec(n.id, a, a + c))
                a += c
    return Plan(model, epoch, tuple(sorted(stages, key=lambda s: s.start)))


def _apportion(total: int, weights: Sequence[float]) -> list[int]:
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


def _water_fill(layers: int, group: Sequence[NodeSpec], shape: ModelShape) -> list[int]:
    """`layers` over `group` in proportion to memory, capped at what each node fits."""
    caps = [layers_that_fit(n, shape) for n in group]
    if sum(caps) < layers:
        need = layers * shape.layer_bytes + shape.edge_bytes
        have = ", ".join(f"{n.id}: {n.memory / 2**30:.1f} GiB" for n in group)
        raise RinginferError(
            f"{layers} layers ({need / 2**30:.2f} GiB with embedding and head) do not fit on {have}"
        )
    counts = [0] * len(group)
    open_ = [i for i in range(len(group)) if caps[i] > 0]
    left = layers
    while left:
        share = _apportion(left, [group[i].memory for i in open_])
        for i, s in zip(open_, share, strict=True):
            counts[i] += s
        over = sum(max(0, counts[i] - caps[i]) for i in open_)
        for i in open_:
            counts[i] = min(counts[i], caps[i])
        open_ = [i for i in open_ if counts[i] < caps[i]]
        left = over
    return counts
