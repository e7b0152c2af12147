"""`ringinfer plan`: model shapes from a path, the hub cache or the built-in table, planned
over a described cluster. Shapes are checked against transformers' own parameter counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from node.engine.shapes import find_shape
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


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])
def test_shapes_count_what_transformers_counts(tiny_models, family):  # noqa: ANN001
    name, shape, source, fmt = find_shape(str(tiny_models[family]), torch.float32)
    assert fmt == "none"
    model = hf_model(tiny_models[family])
    hf_bytes = sum(p.numel() for p in model.parameters()) * 4
    ours = shape.n_layers * shape.layer_bytes + shape.embed_bytes + shape.head_bytes
    tied = model.config.tie_word_embeddings
    copy = model.get_output_embeddings().weight.numel() * 4 if tied else 0
    assert ours == hf_bytes + copy  # a tied head is a second copy on the last stage
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    assert shape.kv_bytes == 2 * heads * head_dim * 4


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
