"""Tokenizers from each source against transformers or published ids, chat templates, streams."""

from __future__ import annotations

import pytest

from node.engine.tokenizer import TextStream, Tokenizer
from node.engine.weights import open_checkpoint
from tests.conftest import hf_greedy, hf_model, run_cli

TEXTS = ["Hello world", "Numbers 12345, 3.14!\n\n\tok", "naïve café 日本語 🤖", "it's <|im_end|>"]


def test_gpt2_tiktoken_gives_the_published_ids():
    tok = Tokenizer.gpt2()
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode("<|endoftext|>") == [50256]
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert 50256 in tok.stop_ids


def test_hf_directory_tokenizer_equals_transformers(llama_with_tokenizer):  # noqa: ANN001
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(llama_with_tokenizer)
    ours = open_checkpoint(str(llama_with_tokenizer)).tokenizer()
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], text
    conversations = [
        [{"role": "user", "content": "What is 2+2?"}],
        [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "Four."},
            {"role": "user", "content": "And 3+3?"},
        ],
    ]
    for messages in conversations:
        text = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = ours.encode_chat(messages)
        assert ours.decode(ids) == text
        assert ids == theirs(text, add_special_tokens=False)["input_ids"]
    assert theirs.convert_tokens_to_ids("<|im_end|>") in ours.stop_ids


def test_hf_directory_model_through_cli_equals_transformers(llama_with_tokenizer):  # noqa: ANN001
    import json

    from transformers import AutoTokenizer

    prompt = "The quick brown fox"
    ids = AutoTokenizer.from_pretrained(llama_with_tokenizer)(prompt)["input_ids"]
    expected = hf_greedy(hf_model(llama_with_tokenizer), ids, 10)
    proc = run_cli(
        "generate",
        "--local",
        "--json",
        prompt,
        "--model",
        str(llama_with_tokenizer),
        "--split",
        "2",
        "--max-tokens",
        "10",
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    stop = next((i for i, t in enumerate(expected) if t in (0, 2)), None)  # our stop ids
    assert out["tokens"] == expected[: None if stop is None else stop + 1]


@pytest.mark.parametrize("source", ["gpt2", "gguf"])
def test_text_stream_never_splits_a_character(source):  # noqa: ANN001
    tok = Tokenizer.gpt2() if source == "gpt2" else open_checkpoint(None).tokenizer()
    text = "Emoji 🤖🚀 and accents éà, then 日本語.\n\n  Indented  twice, numbers 1234."
    stream = TextStream(tok)
    pieces = [stream.push(t) for t in tok.encode(text, add_special=False)]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
