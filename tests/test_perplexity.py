"""`ringinfer perplexity`: llama.cpp's windows, against transformers' logits, and the
default model kept quantized within 1% of its float32 perplexity."""

from __future__ import annotations

import json
import math

import pytest
import torch

from node.engine.perplexity import score, windows
from node.errors import RinginferError
from tests.conftest import TEXT, run_cli

CONTEXT = "256"


def perplexity(*args: str) -> dict:
    proc = run_cli("perplexity", str(TEXT), "--local", "--context", CONTEXT, "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_windows_score_the_second_half_of_each_full_window():
    wins = windows(list(range(100, 110)), 4, bos=1)
    assert [w.ids for w in wins] == [[1, 101, 102, 103], [1, 105, 106, 107]]  # 108, 109 dropped
    assert [w.targets for w in wins] == [[103], [107]]  # positions 2 predict 3
    assert windows(list(range(8)), 4, bos=None)[1].ids == [4, 5, 6, 7]
    with pytest.raises(RinginferError, match="shorter than one window"):
        windows([1, 2, 3], 4, bos=None)


def test_score_is_the_targets_log_softmax():
    logits = torch.randn(5, 7)
    got = score(logits, [3, 6])  # positions 2 and 3 predict them; position 4 predicts nothing
    expected = torch.stack([logits[2].log_softmax(0)[3], logits[3].log_softmax(0)[6]])
    torch.testing.assert_close(got, expected)


@pytest.fixture(scope="module")
def float32() -> dict:
    return perplexity("--quantize", "none")


def test_float32_perplexity_equals_transformers_logits(float32):  # noqa: ANN001
    """The same windows scored on transformers' own logits of the same GGUF weights."""
    from transformers import AutoModelForCausalLM

    from node.engine.weights import open_checkpoint

    ckpt = open_checkpoint(None)
    tok = ckpt.tokenizer()
    model = AutoModelForCausalLM.from_pretrained(ckpt.path.parent, gguf_file=ckpt.path.name)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for w in windows(tok.encode(TEXT.read_text()), int(CONTEXT), tok.bos_id):
            logprobs = score(model.eval()(torch.tensor([w.ids])).logits[0], w.targets)
            nll, count = nll - float(logprobs.double().sum()), count + len(w.targets)
    assert float32["tokens"] == count and float32["quantization"] == "float32"
    assert float32["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_default_model_kept_quantized_within_one_percent(float32):  # noqa: ANN001
    auto = perplexity()  # int4 layers from the file's Q4_1, int8 table from its Q8_0
    assert auto["quantization"] == "int4+int8" and auto["tokens"] == float32["tokens"]
    assert abs(auto["perplexity"] / float32["perplexity"] - 1) < 0.01, (auto, float32)
    assert set(auto) >= {"perplexity", "tokens", "seconds", "model", "quantization"}


def test_bad_inputs_are_one_line(tmp_path):  # noqa: ANN001
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    for args in (["--context", "256", str(short)], [str(tmp_path / "missing.txt")]):
        proc = run_cli("perplexity", "--local", *args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith("ringinfer: error: ")
