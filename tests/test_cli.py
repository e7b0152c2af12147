"""The command line as real processes: `generate --local` end to end, and one-line errors."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from tests.conftest import hf_greedy, hf_model, run_cli
from tests.daemons import Daemon, free_port


def generate_json(*args: str) -> dict:
    proc = run_cli("generate", "--local", "--json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_default_model_knows_paris():
    out = generate_json("The capital of France is", "--max-tokens", "8")
    assert out["text"].strip().startswith("Paris"), out
    assert out["model"] == "SmolLM2-135M-Instruct"
    assert out["prompt_tokens"] == 5 and len(out["tokens"]) == 8
    assert out["ttft_s"] > 0 and out["tpot_s"] > 0 and out["decode_tokens_per_s"] > 0


def test_default_model_greedy_equals_transformers():
    from transformers import AutoModelForCausalLM

    from node.engine.weights import open_checkpoint

    ckpt = open_checkpoint(None)
    prompt = "The capital of France is"
    model = AutoModelForCausalLM.from_pretrained(ckpt.path.parent, gguf_file=ckpt.path.name)
    expected = hf_greedy(model.eval(), ckpt.tokenizer().encode(prompt), 24)
    out = generate_json(prompt, "--max-tokens", "24", "--split", "10,20", "--quantize", "none")
    assert out["tokens"] == expected and out["quantization"] == "float32"


def test_chat_template_answers_and_stops():
    out = generate_json("What is the capital of France?", "--chat", "--max-tokens", "40")
    assert "Paris" in out["text"]
    assert out["finish_reason"] == "stop" and "<|im_end|>" not in out["text"]


def test_plain_output_streams_the_same_text(tiny_models):  # noqa: ANN001
    args = ("Hello there, general", "--model", str(tiny_models["gpt2"]), "--max-tokens", "12")
    plain = run_cli("generate", "--local", *args)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout == generate_json(*args)["text"] + "\n"


@pytest.mark.parametrize("split", ["1", "2", "1,2,3"])
def test_split_gpt2_equals_transformers(tiny_models, split):  # noqa: ANN001
    import tiktoken  # noqa: F401  (the CLI tokenizes with tiktoken; so do we, through it)

    from node.engine.tokenizer import Tokenizer

    path = tiny_models["gpt2"]
    prompt = "Once upon a time"
    expected = hf_greedy(hf_model(path), Tokenizer.gpt2().encode(prompt), 16)
    out = generate_json(prompt, "--model", str(path), "--split", split, "--max-tokens", "16")
    assert out["tokens"] == expected


def test_sampling_with_seed_is_reproducible(tiny_models):  # noqa: ANN001
    args = (
        "Hi",
        "--model",
        str(tiny_models["gpt2"]),
        "--temperature",
        "1.0",
        "--top-k",
        "50",
        "--top-p",
        "0.9",
        "--max-tokens",
        "16",
    )
    a = generate_json(*args, "--seed", "1")["tokens"]
    assert a == generate_json(*args, "--seed", "1")["tokens"]
    assert a != generate_json(*args, "--seed", "2")["tokens"]


def _corrupt_gguf(tmp: Path) -> Path:
    path = tmp / "corrupt.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    return path


def _bad_config(tmp: Path) -> Path:
    (tmp / "badjson").mkdir()
    (tmp / "badjson" / "config.json").write_text("{not json")
    return tmp / "badjson"


def _bert(tmp: Path) -> Path:
    (tmp / "bert").mkdir()
    (tmp / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    return tmp / "bert"


def _mamba_gguf(tmp: Path) -> Path:
    """A well-formed GGUF of an architecture we lack."""
    import gguf
    import numpy as np

    path = tmp / "mamba.gguf"
    w = gguf.GGUFWriter(path, "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _truncated_weights(tmp: Path, tiny_models: dict) -> Path:  # noqa: ANN001
    import shutil

    dst = tmp / "truncated"
    shutil.copytree(tiny_models["gpt2"], dst)
    weights = dst / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return dst


def _config_disagrees(tmp: Path, tiny_models: dict) -> Path:  # noqa: ANN001
    import shutil

    dst = tmp / "disagrees"
    shutil.copytree(tiny_models["gpt2"], dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "n_inner": 128}))
    return dst


BAD_MODELS = {
    "missing path": (lambda tmp, m: tmp / "nope.gguf", "does not exist"),
    "corrupt gguf": (lambda tmp, m: _corrupt_gguf(tmp), "not a readable GGUF"),
    "bad config": (lambda tmp, m: _bad_config(tmp), "not valid JSON"),
    "unsupported architecture": (lambda tmp, m: _bert(tmp),
                                 "unsupported architecture 'bert' (supported: deepseek_v3, "),
    "unsupported gguf architecture": (lambda tmp, m: _mamba_gguf(tmp),
                                      "unsupported GGUF architecture 'mamba' (supported: "),
    "truncated weights": (_truncated_weights, "cannot read"),
    "config disagrees with weights": (_config_disagrees, "does not fit the model's config"),
    "no tokenizer": (lambda tmp, m: m["llama"], "no tokenizer.json"),
    "hub id offline": (lambda tmp, m: "someone/not-cached-model", "not in the local Hugging Face"),
}


@pytest.mark.parametrize("case", BAD_MODELS)
def test_bad_model_is_one_line_exit_2(tiny_models, tmp_path, case):  # noqa: ANN001
    make, message = BAD_MODELS[case]
    proc = run_cli("generate", "--local", "hi", "--model", str(make(tmp_path, tiny_models)))
    assert_one_line_error(proc, message)


BAD_FLAGS = {
    "negative temperature": (["--temperature", "-1"], "temperature"),
    "top-p zero": (["--top-p", "0"], "top-p"),
    "max tokens zero": (["--max-tokens", "0"], "positive integer"),
    "split out of range": (["--split", "9"], "split points"),
    "split not numbers": (["--split", "a,b"], "layer indices"),
    "unknown device": (["--device", "tpu"], "unknown device"),
    "unknown dtype": (["--dtype", "int3"], "unknown dtype"),
    "unknown flag": (["--frobnicate"], "unrecognized arguments"),
}


@pytest.mark.parametrize("case", BAD_FLAGS)
def test_bad_flags_are_one_line_exit_2(tiny_models, case):  # noqa: ANN001
    flags, message = BAD_FLAGS[case]
    proc = run_cli("generate", "--local", "hi", "--model", str(tiny_models["gpt2"]), *flags)
    assert_one_line_error(proc, message)


def test_prompt_longer_than_context_is_refused_before_compute(tiny_models):  # noqa: ANN001
    proc = run_cli("generate", "--local", "word " * 100, "--model", str(tiny_models["gpt2"]))
    assert_one_line_error(proc, "context holds 64")


def test_without_a_daemon_says_what_to_do():
    address = f"127.0.0.1:{free_port()}"
    proc = run_cli("generate", "hi", "--node", address, "--wait", "1")
    assert_one_line_error(proc, f"no answer from the daemon at {address}")
    assert "ringinfer daemon" in proc.stderr


def test_engine_flags_without_local_are_refused():
    assert_one_line_error(run_cli("generate", "hi", "--split", "3"), "--split apply to --local")


def test_daemon_start_errors_are_one_line(tmp_path, tiny_models):  # noqa: ANN001
    model = ["--model", str(tiny_models["gpt2"])]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        proc = run_cli("daemon", "--host", "127.0.0.1", "--port", port, "--data-dir",
                       str(tmp_path / "a"), "--api", "off", *model)  # fmt: skip
        assert_one_line_error(proc, f"cannot listen on 127.0.0.1:{port}")
    proc = run_cli("daemon", "--layers", "3:2", *model)
    assert_one_line_error(proc, "START < END")
    proc = run_cli("daemon", "--data-dir", str(tmp_path / "b"), "--model", str(tmp_path / "none"),
                   "--api", "off")  # fmt: skip
    assert_one_line_error(proc, "none")


def test_two_daemons_never_share_a_data_dir(tmp_path, tiny_models):  # noqa: ANN001
    first = Daemon(
        tmp_path, "first", free_port(), ["--model", str(tiny_models["gpt2"]), "--no-mdns"]
    )
    try:
        first.status(wait=60)  # up and holding its data dir (a loaded machine: slow to start)
        proc = run_cli("daemon", "--data-dir", str(tmp_path / "first"), "--port",
                       str(free_port()), "--model", str(tiny_models["gpt2"]))  # fmt: skip
        assert_one_line_error(proc, "another daemon is using data dir")
    finally:
        assert first.stop() == 0


def assert_one_line_error(proc, fragment: str) -> None:  # noqa: ANN001
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("ringinfer: error: ") and fragment in lines[0], lines[0]
