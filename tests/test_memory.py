"""A stage's peak memory grows with its share of the layers, not with the model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_model

BENCH = Path(__file__).resolve().parent.parent / "bench" / "engine_bench.py"


def peak_growth_kib(model: str, layers: str, quantize: str = "none") -> int:
    """The benchmark's own measurement, in a fresh process: peak RSS growth while loading."""
    cmd = [sys.executable, str(BENCH), "--child", "rss", "--layers", layers, "--quantize", quantize]
    out = subprocess.run(
        cmd + (["--model", model] if model else []), capture_output=True, text=True, check=True
    )
    return int(json.loads(out.stdout.strip().splitlines()[-1])["load_peak_growth_mib"] * 1024)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """12 layers of ~17 MB each: big enough to stand out from allocator noise."""
    path = tmp_path_factory.mktemp("wide") / "llama"
    return str(
        make_model(
            "llama",
            path,
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=12,
            num_attention_heads=8,
            num_key_value_heads=8,
        )
    )


@pytest.mark.parametrize("model,third,whole", [("wide", "4:8", "0:12"), ("", "10:20", "0:30")])
def test_middle_third_peaks_well_below_whole_model(wide_model, model, third, whole):  # noqa: ANN001
    path = wide_model if model == "wide" else model  # "" is the default GGUF model
    part, full = peak_growth_kib(path, third), peak_growth_kib(path, whole)
    assert full > 100 * 1024, full  # the whole model really was loaded
    assert part < 0.45 * full, (part, full)


def test_default_model_stays_as_small_as_its_file():
    """Kept quantized, the default model's peak while loading is at most 1.3x the GGUF's
    tensor bytes (float32 was 7x), and a middle third at most 0.45x of the whole."""
    from node.engine.gguf_file import GGUFFile
    from node.engine.weights import default_model_path

    file_kib = sum(t.n_bytes for t in GGUFFile(default_model_path()).tensors.values()) / 1024
    whole, third = peak_growth_kib("", "0:30", "auto"), peak_growth_kib("", "10:20", "auto")
    assert whole <= 1.3 * file_kib, (whole, file_kib)
    assert third <= 0.45 * whole, (third, whole)
