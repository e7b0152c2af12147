"""What status says of the served model: its family, experts and active parameters, from the
daemon's own shape, in `status --json` and the table's header (the page shows the same)."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import hf_model
from tests.daemons import Cluster


def test_status_shows_the_family_experts_and_active_parameters(
    tmp_path: Path, tiny_models: dict[str, Path], llama_with_tokenizer: Path
) -> None:
    model = tmp_path / "tiny-moe"  # 8 experts of which 2 a token, layer 2 dense
    shutil.copytree(tiny_models["qwen3_moe"], model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama_with_tokenizer / name, model / name)
    hf = hf_model(model)
    params = dict(hf.named_parameters())
    total = sum(p.numel() for p in params.values())
    routed = sum(p.numel() for n, p in params.items() if ".experts." in n)
    active = total - routed * 6 // 8
    cluster = Cluster(tmp_path, 1, ["--model", str(model)])
    try:
        node = cluster.nodes[0]
        status = node.status()
        table = node.cli("status", "--node", node.address).stdout
    finally:
        cluster.stop()
    assert (status["architecture"], status["experts"], status["experts_used"]) == (
        "qwen3_moe", 8, 2
    )
    assert (status["params"], status["active_params"]) == (total, active)
    summary = (f"qwen3_moe · 8 experts, 2 active · {active // 1000}K active of "
               f"{total // 1000}K · 1 dense + 3 MoE layers")  # fmt: skip
    assert status["model_summary"] == summary
    assert table.startswith(f"model {model} ({summary}) · cluster "), table
