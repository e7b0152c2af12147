"""The planner as a pure function: coverage, proportions, memory caps and pins."""

from __future__ import annotations

import pytest

from node.errors import RinginferError
from node.planner import ModelShape, NodeSpec, Plan, make_plan

GIB = 2**30
SHAPE = ModelShape(n_layers=30, layer_bytes=GIB // 10, edge_bytes=GIB // 10)


def ranges(plan: Plan) -> list[tuple[str, int, int]]:
    return [(s.node, s.start, s.end) for s in plan.stages]


def test_equal_memory_splits_evenly_in_id_order():
    nodes = [NodeSpec(i, 8 * GIB) for i in ("c", "a", "b")]
    assert ranges(make_plan("m", 1, SHAPE, nodes)) == [("a", 0, 10), ("b", 10, 20), ("c", 20, 30)]


def test_layers_follow_free_memory():
    plan = make_plan("m", 1, SHAPE, [NodeSpec("a", 4 * GIB), NodeSpec("b", 2 * GIB)])
    assert ranges(plan) == [("a", 0, 20), ("b", 20, 30)]


def test_a_node_never_gets_more_than_fits():
    # in proportion "a" would get 5 layers, but fits only 4: (0.6 GiB * 0.9 - 0.1 GiB) / 0.1 GiB
    tight = make_plan("m", 1, SHAPE, [NodeSpec("a", GIB * 6 // 10), NodeSpec("b", 3 * GIB)])
    assert ranges(tight) == [("a", 0, 4), ("b", 4, 30)]


def test_model_too_big_is_one_clear_error():
    with pytest.raises(RinginferError, match="do not fit"):
        make_plan("m", 1, SHAPE, [NodeSpec("a", GIB), NodeSpec("b", GIB)])


def test_pins_are_honoured_and_gaps_filled():
    nodes = [NodeSpec("a", 8 * GIB), NodeSpec("b", 8 * GIB, pin=(5, 12)), NodeSpec("c", 8 * GIB)]
    assert ranges(make_plan("m", 1, SHAPE, nodes)) == [("a", 0, 5), ("b", 5, 12), ("c", 12, 30)]
    all_pinned = [NodeSpec("x", GIB, (0, 3)), NodeSpec("y", GIB, (3, 30))]
    assert ranges(make_plan("m", 1, SHAPE, all_pinned)) == [("x", 0, 3), ("y", 3, 30)]


@pytest.mark.parametrize(
    "nodes, match",
    [
        ([NodeSpec("a", GIB, (0, 10)), NodeSpec("b", GIB, (5, 30))], "overlapping"),
        ([NodeSpec("a", GIB, (0, 31))], "outside"),
        ([NodeSpec("a", GIB, (2, 10)), NodeSpec("b", GIB, (12, 30))], "pinned to no node"),
    ],
)
def test_impossible_pins_are_refused(nodes, match):  # noqa: ANN001
    with pytest.raises(RinginferError, match=match):
        make_plan("m", 1, SHAPE, nodes)


def test_every_layer_exactly_once_for_many_memory_mixes():
    for n in range(1, 7):
        for seed in range(20):
            nodes = [NodeSpec(f"n{i}", (4 + (seed * 7 + i * 13) % 9) * GIB) for i in range(n)]
            plan = make_plan("m", 3, SHAPE, nodes)
            assert Plan.from_json(plan.to_json(), SHAPE.n_layers) == plan


@pytest.mark.parametrize(
    "stages",
    [[["a", 0, 10], ["b", 11, 30]], [["a", 0, 10]], [["a", 0, 30], ["a", 30, 30]], "x", []],
)
def test_plans_from_peers_must_cover_every_layer_once(stages):  # noqa: ANN001
    with pytest.raises(RinginferError):
        Plan.from_json({"model": "m", "epoch": 1, "stages": stages}, 30)
