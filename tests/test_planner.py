"""The planner as a pure function: coverage, proportions, memory caps and pins."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from node.cluster.planner import (
    HEADROOM,
    ModelShape,
    NodeSpec,
    Plan,
    capacity,
    make_plan,
    predict,
    stage_bytes,
)
from node.errors import RinginferError

GIB = 2**30
# 30 layers of 0.1 GiB; the embedding and the head small, so layer counts tell the story.
SHAPE = ModelShape(n_layers=30, layer_bytes=GIB // 10, embed_bytes=GIB // 100,
                   head_bytes=GIB // 100, kv_bytes=0, hidden=4096)  # fmt: skip
FAST = dict(flops=1e13, bandwidth=1e11)
SLOW = dict(flops=1e11, bandwidth=1e9)


def ranges(plan: Plan) -> list[tuple[str, int, int]]:
    return [(s.node, s.start, s.end) for s in plan.stages]


def by_id(nodes: list[NodeSpec]) -> dict[str, NodeSpec]:
    return {n.id: n for n in nodes}


def test_latency_keeps_a_model_on_one_node_when_it_fits():
    # a second node only adds hops: the best single machine is the plan
    nodes = [NodeSpec(i, 8 * GIB, **FAST) for i in ("c", "a", "b")]
    assert ranges(make_plan("m", 1, SHAPE, nodes)) == [("a", 0, 30)]


def test_latency_splits_when_memory_requires_and_fills_the_fastest_first():
    nodes = [NodeSpec("a", 2 * GIB, **SLOW), NodeSpec("b", 2 * GIB, **FAST),
             NodeSpec("c", 2 * GIB, **SLOW)]  # fmt: skip
    plan = make_plan("m", 1, SHAPE, nodes)
    counts = {s.node: s.end - s.start for s in plan.stages}
    # b holds all it can: 18 layers in the middle of the ring, where it needs no embedding
    # or head (at an end it would fit 17: the fast layer is worth more than one more hop)
    assert counts["b"] == 18 == capacity(nodes[1], SHAPE, 4096, False, False)
    assert plan.stage_of("b") not in (plan.stages[0], plan.stages[-1])


def test_throughput_balances_equal_nodes():
    nodes = [NodeSpec(i, 8 * GIB, **SLOW) for i in ("c", "a", "b")]
    plan = make_plan("m", 1, SHAPE, nodes, objective="throughput")
    assert sorted(s.end - s.start for s in plan.stages) == [10, 10, 10]
    one = make_plan("m", 1, SHAPE, nodes[:1])
    assert (
        predict(plan.stages, SHAPE, by_id(nodes)).bottleneck_s
        < predict(one.stages, SHAPE, by_id(nodes)).bottleneck_s / 2.5
    )


def test_a_much_slower_node_gets_few_or_no_layers():
    for objective in ("latency", "throughput"):
        nodes = [NodeSpec("a", 8 * GIB, **FAST), NodeSpec("b", 8 * GIB, **FAST),
                 NodeSpec("s", 8 * GIB, flops=1e9, bandwidth=1e7)]  # fmt: skip
        plan = make_plan("m", 1, SHAPE, nodes, objective=objective)
        stage = plan.stage_of("s")
        assert stage is None or stage.end - stage.start <= 1, objective


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


def random_cluster(seed: int) -> list[NodeSpec]:
    rng = random.Random(seed)
    return [
        NodeSpec(f"n{i}", int(rng.uniform(0.5, 6) * GIB), flops=10 ** rng.uniform(10, 13),
                 bandwidth=10 ** rng.uniform(8, 11))
        for i in range(rng.randint(1, 9))
    ]  # fmt: skip


@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_planner_properties_over_random_clusters(objective: str):
    links = {("n0", "n1"): 0.02, ("n2", "n3"): 1e-4}
    planned = 0
    for seed in range(60):
        nodes = random_cluster(seed)
        try:
            plan = make_plan("m", 3, SHAPE, nodes, objective, links, context=1024)
        except RinginferError as e:
            assert "do not fit" in str(e)
            continue
        planned += 1
        # every layer exactly once
        assert Plan.from_json(plan.to_json(), SHAPE.n_layers) == plan
        # memory never exceeded: weights, embedding/head where held, KV budget, headroom
        for s in plan.stages:
            used = (s.end - s.start) * SHAPE.layer_slot(1024)
            used += SHAPE.embed_bytes * (s.start == 0) + SHAPE.head_bytes * (s.end == 30)
            assert used <= by_id(nodes)[s.node].memory * HEADROOM
        # deterministic, whatever order the nodes come in
        again = make_plan("m", 3, SHAPE, nodes[::-1], objective, dict(links), context=1024)
        assert again == plan
        # never predicted slower than the best single node that holds the whole model
        mine = predict(plan.stages, SHAPE, by_id(nodes), links)
        for n in nodes:
            if capacity(n, SHAPE, 1024, True, True) >= 30:
                alone = predict(make_plan("m", 3, SHAPE, [n]).stages, SHAPE, by_id(nodes))
                metric = "tpot_s" if objective == "latency" else "bottleneck_s"
                assert getattr(mine, metric) <= getattr(alone, metric) + 1e-12
    assert planned > 20


@pytest.mark.parametrize(
    "stages",
    [[["a", 0, 10], ["b", 11, 30]], [["a", 0, 10]], [["a", 0, 30], ["a", 30, 30]], "x", []],
)
def test_plans_from_peers_must_cover_every_layer_once(stages):  # noqa: ANN001
    with pytest.raises(RinginferError):
        Plan.from_json({"model": "m", "epoch": 1, "stages": stages}, 30)


def test_layers_a_node_holds_stay_with_it_when_plans_are_about_as_good():
    # Two alike nodes must split the model; b joined without it and fetched 15-30 once.
    cached = frozenset({*(f"blk.{i}" for i in range(15, 30)), "head"})
    a = NodeSpec("a", 2 * GIB, **FAST)
    b = NodeSpec("b", 2 * GIB, **FAST, holds=cached)
    assert ranges(make_plan("m", 1, SHAPE, [a, b], "throughput")) == [("a", 0, 15), ("b", 15, 30)]
    moved_first = NodeSpec("b", 2 * GIB, **FAST, holds=frozenset({"blk.0", "embed"}))
    assert ranges(make_plan("m", 1, SHAPE, [a, moved_first], "throughput"))[0][0] == "b"
    # ... but never at the cost of a plainly worse plan: a slow b gets few layers anyway.
    slow = NodeSpec("b", 2 * GIB, **SLOW, holds=cached)
    plan = make_plan("m", 1, SHAPE, [NodeSpec("a", 8 * GIB, **FAST), slow], "throughput")
    assert sum(s.end - s.start for s in plan.stages if s.node == "b") < 15
    assert NodeSpec("a", GIB).missing_bytes(SHAPE, 0, 30) == 0  # holds=None: everything
    assert b.missing_bytes(SHAPE, 10, 30) == 5 * SHAPE.layer_bytes


# An MoE model: layers of 0.1 GiB (all experts) of which a token reads 0.01 GiB, and two
# dense layers of 0.02 GiB read whole.
MOE = replace(SHAPE, layer_read=GIB // 100, dense_layers=(0, 1), dense_bytes=GIB // 50)
STREAM = dict(flops=1e18, bandwidth=1e9, layer_overhead_s=0.0)  # time: bytes read / 1 GB/s


def test_moe_memory_is_all_experts_and_time_only_the_routed_ones():
    node = NodeSpec("a", 8 * GIB, **STREAM)
    # memory: 0.1 GiB a layer, as a dense model of the same bytes
    assert capacity(node, MOE, 0, False, False) == int(8 * GIB * HEADROOM // (GIB // 10))
    plan = make_plan("m", 1, MOE, [node])
    assert ranges(plan) == [("a", 0, 30)]
    assert stage_bytes(plan.stages[0], MOE) == 28 * (GIB // 10) + 2 * (GIB // 50) + 2 * (GIB // 100)
    # time: 28 MoE layers read 0.01 GiB each, 2 dense ones 0.02 GiB, the head 0.01 GiB
    read = 28 * (GIB // 100) + 2 * (GIB // 50) + GIB // 100
    assert predict(plan.stages, MOE, by_id([node])).tpot_s == pytest.approx(read / 1e9)
    dense = replace(MOE, layer_read=0, dense_layers=())
    assert predict(plan.stages, dense, by_id([node])).tpot_s > 8 * read / 1e9


def test_an_moe_models_dense_layers_count_where_they_are():
    nodes = [NodeSpec("a", 8 * GIB, **STREAM), NodeSpec("b", 8 * GIB, **STREAM)]
    stages = make_plan("m", 1, MOE, nodes, objective="throughput").stages
    assert [(s.start, s.end) for s in stages] == [(0, 15), (15, 30)]
    first, second = predict(stages, MOE, by_id(nodes)).stage_s
    # the first stage's two dense layers read 0.01 GiB more each; the second has the head
    assert first - second == pytest.approx((2 * GIB // 100 - GIB // 100) / 1e9)
    assert NodeSpec("c", GIB, holds=frozenset()).missing_bytes(MOE, 0, 3) == (
        2 * (GIB // 50) + GIB // 10 + GIB // 100
    )
    # the larger kind bounds how many layers a node takes, so none overfills
    bigger = replace(MOE, dense_bytes=GIB // 5)
    assert capacity(nodes[0], bigger, 0, False, False) == int(8 * GIB * HEADROOM // (GIB // 5))


def test_an_moe_model_that_does_not_fit_says_a_layer_holds_every_expert():
    shape = replace(MOE, experts=128, experts_used=8)
    with pytest.raises(RinginferError, match="holds all its 128 experts .* reads 8 of them"):
        make_plan("m", 1, shape, [NodeSpec("a", GIB), NodeSpec("b", GIB)])
