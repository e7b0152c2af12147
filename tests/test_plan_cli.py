"""`ringinfer plan`: model shapes from a path, the hub cache or the built-in table, planned
over a described cluster. Shapes are checked against transformers' own parameter counts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from node.engine.shapes import BUILT_IN, find_shape
from tests.conftest import hf_model, run_cli

GIB = 2**30
LAPTOPS = {
    "rtt_ms": 1.5,
    "nodes": [
        *({"name": f"laptop{i}", "memory": "128G", "flops": "4T", "bandwidth": "100G"}
          for i in range(7)),
        {"name": "old-netbook", "memory": "8GiB", "flops": "50GFLOP/s", "bandwidth": "5GB/s"},
    ],
}  # fmt: skip


# qwen3_moe has a dense layer 2 (mlp_only_layers), qwen2_moe every other layer dense.
@pytest.mark.parametrize(
    "family",
    ["llama", "gpt2", "qwen3", "qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss", "gemma3"],
)
def test_shapes_count_what_transformers_counts(tiny_models, family):  # noqa: ANN001
    name, shape, source, fmt = find_shape(str(tiny_models[family]), torch.float32)
    assert fmt == "none"
    model = hf_model(tiny_models[family])
    params = dict(model.named_parameters())
    hf_bytes = sum(p.numel() for p in params.values()) * 4
    ours = shape.held(0, shape.n_layers) + shape.embed_bytes + shape.head_bytes
    tied = model.config.tie_word_embeddings
    copy = model.get_output_embeddings().weight.numel() * 4 if tied else 0
    assert ours == hf_bytes + copy  # a tied head is a second copy on the last stage
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert shape.kv_bytes == 2 * heads * head_dim * 4
    # A token computes with all but the experts it is not routed to.
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", 0)
    routed = sum(p.numel() for n, p in params.items() if ".experts." in n)
    unused = routed * (1 - cfg.num_experts_per_tok / experts) if experts else 0
    assert (shape.architecture, shape.params) == (cfg.model_type, hf_bytes // 4)
    assert shape.active_params == round(hf_bytes // 4 - unused)
    assert (shape.experts, shape.experts_used) == (experts, experts and cfg.num_experts_per_tok)
    assert shape.read(0, shape.n_layers) == sum(
        p.numel() * 4 * (cfg.num_experts_per_tok / experts if ".experts." in n else 1)
        for n, p in params.items() if re.search(r"\.\d+\.", n)  # a decoder layer's
    )  # fmt: skip


def by_hand(c: dict) -> tuple[int, int]:
    """(all, active) parameters of a Qwen-MoE or Mixtral config.json, from its fields:
    attention (with Qwen2's q/k/v bias or Qwen3's q/k norms), two norms, router, experts,
    the shared expert with its gate; embedding, final norm and head."""
    h, n_heads, n_kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head_dim = c.get("head_dim", h // n_heads)
    q, kv = n_heads * head_dim, n_kv * head_dim
    attention = h * (q + 2 * kv) + q * h + (q + 2 * kv) * (c["model_type"] == "qwen2_moe")
    attention += 2 * head_dim * (c["model_type"] == "qwen3_moe")
    experts = c.get("num_experts") or c["num_local_experts"]
    expert = 3 * h * c.get("moe_intermediate_size", c["intermediate_size"])
    shared = c.get("shared_expert_intermediate_size", 0)
    always = attention + 2 * h + experts * h + (3 * h * shared + h if shared else 0)
    edges = 2 * c["vocab_size"] * h + h
    layers = c["num_hidden_layers"]
    return (edges + layers * (always + experts * expert),
            edges + layers * (always + c["num_experts_per_tok"] * expert))  # fmt: skip


# (total, active) parameters as the model cards state them, in billions
CARDS = {"Qwen3-30B-A3B": (30.5, 3.3), "Qwen3-235B-A22B": (235, 22), "Mixtral-8x7B-v0.1":
         (46.7, 12.9), "Qwen1.5-MoE-A2.7B": (14.3, 2.7), "Qwen2-57B-A14B": (57, 14)}  # fmt: skip


@pytest.mark.parametrize("model", CARDS)
def test_built_in_moe_shapes_have_the_published_parameter_counts(model: str):
    name, shape, _, _ = find_shape(model, torch.bfloat16)
    config = BUILT_IN[name]
    total, active = by_hand(config)
    assert (shape.params, shape.active_params) == (total, active)
    assert total / 1e9 == pytest.approx(CARDS[model][0], rel=0.02)
    assert active / 1e9 == pytest.approx(CARDS[model][1], rel=0.02)
    # a decode step reads all that is active but the embedding table, of which it looks up
    # one row: 2 bytes a parameter in bfloat16
    read = shape.read(0, shape.n_layers) + shape.head_bytes
    table = config["vocab_size"] * config["hidden_size"]
    assert read == pytest.approx(2 * (active - table), rel=1e-6)


# Total parameters as the cards of the families with their own layers state them (their
# active counts are rounded names: "A3B" is 3.5B with Qwen3.5's 248k-row table and head).
TOTALS = {"DeepSeek-V3": 671, "Qwen3-Next-80B-A3B-Instruct": 80, "Qwen3.5-35B-A3B": 35,
          "Qwen3.5-397B-A17B": 397, "gemma-3-27b-it": 27}  # fmt: skip


@pytest.mark.parametrize("model", TOTALS)
def test_built_in_hybrid_and_latent_shapes_have_the_published_totals(model: str):
    assert find_shape(model, torch.bfloat16)[1].params / 1e9 == pytest.approx(TOTALS[model],
                                                                              rel=0.01)


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_built_in_shape_builds(name: str):
    _, shape, source, _ = find_shape(name, torch.bfloat16, "int4")
    config = BUILT_IN[name]
    assert shape.n_layers == config.get("num_hidden_layers", config.get("n_layer"))
    assert source == "built-in table" and shape.architecture == config["model_type"]


def test_the_largest_moe_shape_builds_fast():
    began = time.perf_counter()
    _, shape, _, _ = find_shape("Qwen3-235B-A22B", torch.bfloat16, "int4")
    assert time.perf_counter() - began < 1.0  # one layer of 128 experts: 256 Linear modules
    assert shape.experts == 128


def plan(tmp_path: Path, cluster: object, *args: str) -> subprocess.CompletedProcess:
    path = tmp_path / "nodes.json"
    path.write_text(json.dumps(cluster))
    return run_cli("plan", "--cluster-file", str(path), *args)


def test_405b_over_laptops_fits_in_memory_and_leaves_the_netbook_out(tmp_path):  # noqa: ANN001
    proc = plan(tmp_path, LAPTOPS, "--model", "meta-llama/Llama-3.1-405B-Instruct", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["source"] == "built-in table" and out["n_layers"] == 126
    stages = out["stages"]
    assert stages[0]["start"] == 0 and stages[-1]["end"] == 126
    assert all(a["end"] == b["start"] for a, b in zip(stages, stages[1:], strict=False))
    assert all(s["memory_used"] <= 0.9 * s["memory"] for s in stages)
    assert out["left_out"] == ["old-netbook"]
    assert out["predicted"]["tpot_ms"] > 1000  # 0.76 TB of weights at 100 GB/s per stage
    text = plan(tmp_path, LAPTOPS, "--model", "llama-3.1-405b").stdout
    assert "predicted" in text and "left out: old-netbook" in text
    busy = plan(tmp_path, LAPTOPS, "--model", "llama-3.1-405b", "--objective", "throughput")
    assert busy.returncode == 0


def machines(count: int, memory: str) -> dict:
    return {"rtt_ms": 0.5, "nodes": [{"name": f"m{i}", "memory": memory, "flops": "1T",
                                      "bandwidth": "40G"} for i in range(count)]}  # fmt: skip


def test_qwen3_235b_in_int4_is_sized_as_held_and_timed_by_the_experts_used(tmp_path):  # noqa: ANN001
    # 235.1B parameters at 0.625 bytes (4-bit codes, a scale and a zero per 32) are 136.8 GiB,
    # beside a Q4_K_M GGUF's 132.9 GiB: more than four 32 GB machines hold, with or without
    # the 10% the planner leaves them. The token table keeps float32 scales and zeros (0.75
    # bytes), and the head both its kernel's layout and such a table for refining.
    args = ("--model", "Qwen3-235B-A22B", "--quantize", "int4")
    refused = plan(tmp_path, machines(4, "32G"), *args)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    need = float(re.search(r"94 layers \(([\d.]+) GiB", refused.stderr)[1])
    kv = 94 * 4096 * 2 * 4 * 128 * 2  # 4096 positions of 4 KV heads of 128 in bfloat16
    c = BUILT_IN["Qwen/Qwen3-235B-A22B"]
    table = c["vocab_size"] * c["hidden_size"]
    weights = (by_hand(c)[0] - 2 * table) * 0.625 + table * (0.75 + 0.625 + 0.75)
    assert need == pytest.approx((weights + kv) / GIB, rel=0.002)
    assert "a layer holds all its 128 experts (1.45 GiB) though a token reads 8" in refused.stderr
    proc = plan(tmp_path, machines(5, "32G"), *args, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["weights"] == "int4" and (out["experts"], out["experts_used"]) == (128, 8)
    assert out["weight_bytes"] == pytest.approx(weights, rel=0.002)
    assert [s["end"] - s["start"] for s in out["stages"]] == [19, 19, 19, 19, 18]
    assert all(s["memory_used"] <= 0.9 * s["memory"] for s in out["stages"])
    # a token streams the 94 layers' active weights and the head at 40 GB/s: 20.9B of
    # 22.2B active parameters, 0.34 s; all they hold would take 3.7 s
    streamed = (out["active_params"] - 151936 * 4096) * 0.625 / 40e9
    assert streamed < out["predicted"]["tpot_ms"] / 1e3 < streamed * 1.05
    text = plan(tmp_path, machines(5, "32G"), *args).stdout
    assert "qwen3_moe · 128 experts, 8 active · 22.2B active of 235.1B: 137.4 GiB held" in text


@pytest.mark.parametrize("model,total,active", [("gpt-oss-20b", 20.9, 3.6),
                                                ("gpt-oss-120b", 116.8, 5.1)])  # fmt: skip
def test_gpt_oss_has_its_published_size_and_120b_fits_three_32gb_machines(
    tmp_path, model, total, active,  # noqa: ANN001
):  # fmt: skip
    """Model card counts (billions, all and active per token, where the card leaves the
    embedding table out); gpt-oss-120b's 117B at 0.625 bytes (int4) is 68 GiB: three 32 GB
    machines hold it, two do not."""
    _, shape, _, _ = find_shape(model, torch.bfloat16)
    assert shape.params / 1e9 == pytest.approx(total, rel=0.01)
    table = 201088 * 2880
    assert (shape.active_params - table) / 1e9 == pytest.approx(active, rel=0.02)
    if model != "gpt-oss-120b":
        return
    args = ("--model", model, "--quantize", "int4")
    assert plan(tmp_path, machines(2, "32G"), *args).returncode == 2
    proc = plan(tmp_path, machines(3, "32G"), *args, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["stages"]) == 3 and out["stages"][-1]["end"] == 36
    assert (out["experts"], out["experts_used"]) == (128, 4)
    assert 0 < out["predicted"]["tpot_ms"] < 1000


def test_throughput_spreads_a_small_model_that_latency_keeps_on_one_node(tmp_path):  # noqa: ANN001
    runs = {}
    for objective in ("latency", "throughput"):
        proc = plan(tmp_path, LAPTOPS, "--model", "llama-3.1-8b", "--objective", objective,
                    "--json")  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        runs[objective] = json.loads(proc.stdout)
    assert len(runs["latency"]["stages"]) == 1
    assert len(runs["throughput"]["stages"]) > 1
    fast, busy = runs["latency"]["predicted"], runs["throughput"]["predicted"]
    assert fast["tpot_ms"] < busy["tpot_ms"]
    assert busy["pipelined_tokens_per_s"] > fast["pipelined_tokens_per_s"]


def test_a_layer_time_measured_by_a_daemon_replaces_the_roofline(tmp_path):  # noqa: ANN001
    timed = {"nodes": [{"name": "box", "memory": "64G", "flops": "1T", "bandwidth": "50G",
                        "layer_ms": 10}]}  # fmt: skip
    proc = plan(tmp_path, timed, "--model", "llama-3.1-8b", "--json")
    assert proc.returncode == 0, proc.stderr
    assert 320 < json.loads(proc.stdout)["predicted"]["tpot_ms"] < 400  # 32 layers x 10 ms


def test_a_model_in_the_hub_cache_is_planned_without_a_download(tmp_path, tiny_models):  # noqa: ANN001
    snapshot = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((tiny_models["gpt2"] / "config.json").read_text())
    (tmp_path / "hub" / "models--acme--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    (tmp_path / "nodes.json").write_text(json.dumps(LAPTOPS))
    proc = subprocess.run(
        [sys.executable, "-m", "node.cli", "plan", "--model", "acme/tiny", "--cluster-file",
         str(tmp_path / "nodes.json"), "--json"],
        capture_output=True, text=True,
        env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["source"].endswith("config.json") and out["n_layers"] == 4


@pytest.mark.parametrize(
    "cluster, args, fragment",
    [
        (LAPTOPS, ["--model", "llama-9000"], "unknown model 'llama-9000'"),
        ({"nodes": [{"name": "a"}]}, [], "needs memory"),
        ({"nodes": [{"name": "a", "memory": "lots"}]}, [], "expected a positive amount"),
        ({"nodes": [{"name": "a", "memory": "1G"}, {"name": "a", "memory": "1G"}]}, [],
         "used twice"),
        ({"nodes": [{"name": "a", "memory": "8G"}]}, ["--model", "llama-3.1-70b"], "do not fit"),
        ("not a cluster", [], "expected a list of nodes"),
    ],
)  # fmt: skip
def test_bad_cluster_files_and_models_get_one_line(tmp_path, cluster, args, fragment):  # noqa: ANN001
    proc = plan(tmp_path, cluster, *(args or ["--model", "gpt2"]))
    assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_the_default_model_is_sized_as_its_stages_hold_it():
    """One stage of every layer holds the tied int8 table's codes once, for the table and
    the head (load_stage converts them once): the planner counts them once there, and once
    on each of two stages that hold the ends apart."""
    from node.engine.models.quantized import holdings
    from node.engine.weights import load_stage, open_checkpoint

    _, shape, _, _ = find_shape(None, torch.float32)
    ckpt = open_checkpoint(None)

    def held(start: int, end: int) -> int:
        stage = load_stage(ckpt, start, end, torch.device("cpu"), torch.float32, quantize="auto")
        norms = sum(p.nbytes for p in stage.parameters() if p.ndim == 1)
        return sum(holdings(stage).values()) + norms

    n = shape.n_layers
    assert shape.tied_bytes > 0
    assert shape.held(0, n) + shape.ends(True, True) == pytest.approx(held(0, n), rel=0.01)
    apart = shape.held(0, n) + shape.ends(True, False) + shape.ends(False, True)
    assert apart == pytest.approx(held(0, 15) + held(15, n), rel=0.01)
