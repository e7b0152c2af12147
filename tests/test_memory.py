"""A stage's peak memory grows with its share of the layers, not with the model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import make_model

# Peak RSS from /proc, reset once the checkpoint is open, so it counts the load alone
# (ru_maxrss would also hold the pytest parent's peak, inherited over exec).
MEASURE = """
import json, sys, torch
from node.weights import load_stage, open_checkpoint
def kib(field):
    status = open("/proc/self/status").read()
    return int(status.split(field + ":")[1].split()[0])
ckpt = open_checkpoint(sys.argv[1] or None)
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
before = kib("VmRSS")
start, end = (int(x) for x in sys.argv[2].split(":"))
stage = load_stage(ckpt, start, end, torch.device("cpu"), torch.float32)
sum(float(p.sum()) for p in stage.parameters())  # page in weights that may be file-mapped
print(json.dumps(kib("VmHWM") - before))
"""


def peak_growth_kib(model: str, layers: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, model, layers], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


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
