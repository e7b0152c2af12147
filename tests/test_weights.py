"""Where weights come from: sharded safetensors, the Hugging Face cache, only a stage's share."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from node.engine.local import LocalPipeline
from node.engine.weights import HFCheckpoint, open_checkpoint
from tests.conftest import hf_model, make_model

PROMPT = [3, 17, 101, 5, 42, 250, 7]


def test_sharded_checkpoint_equals_transformers(tmp_path):  # noqa: ANN001
    path = make_model("qwen2", tmp_path / "qwen2")
    hf_model(path).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 3
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    pipeline = LocalPipeline(open_checkpoint(str(tmp_path / "sharded")), (2,))
    with torch.inference_mode():
        got = pipeline.forward(torch.tensor([PROMPT]), torch.arange(7), pipeline.new_caches(7))
        expected = hf_model(path)(torch.tensor([PROMPT])).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_stage_reads_only_its_own_tensors(tiny_models, monkeypatch):  # noqa: ANN001
    read = []
    original = HFCheckpoint.tensor
    monkeypatch.setattr(
        HFCheckpoint, "tensor", lambda self, n, fmt: read.append(n) or original(self, n, fmt)
    )
    from node.engine.weights import load_stage

    load_stage(open_checkpoint(str(tiny_models["llama"])), 1, 3, torch.device("cpu"), torch.float32)
    layers = {int(n.split(".")[2]) for n in read if n.startswith("model.layers.")}
    assert layers == {1, 2}
    assert not any("embed" in n or "lm_head" in n or n == "model.norm.weight" for n in read)


def test_hub_id_resolves_from_the_local_cache_offline(tiny_models, tmp_path):  # noqa: ANN001
    """A model laid out as huggingface_hub caches it is found by id, with the hub unreachable."""
    snapshot = tmp_path / "hub" / "models--tiny--gpt2" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_models["gpt2"], snapshot)
    (tmp_path / "hub" / "models--tiny--gpt2" / "refs").mkdir()
    (tmp_path / "hub" / "models--tiny--gpt2" / "refs" / "main").write_text("a" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "node.cli",
        "generate",
        "--local",
        "hi",
        "--model",
        "tiny/gpt2",
        "--max-tokens",
        "3",
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert '"model": "tiny/gpt2"' in proc.stdout


def test_gguf_directory_opens_its_single_file():
    gguf_file = open_checkpoint(None).path
    ckpt = open_checkpoint(str(Path(gguf_file).parent))
    assert ckpt.path == gguf_file and ckpt.n_layers == 30
