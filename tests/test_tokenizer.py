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


def o200k_pattern() -> str:
    """tiktoken's own o200k pattern, read from its source without its download."""
    from unittest import mock

    import tiktoken_ext.openai_public as openai_public

    with mock.patch.object(openai_public, "load_tiktoken_bpe", return_value={}):
        return openai_public.o200k_base()["pat_str"]


# Kimi K2's pattern as its tokenization_kimi.py gives it to tiktoken.
KIMI_K2 = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""", r""" ?[^\s\p{L}\p{N}]+[\r\n]*""", r"""\s*[\r\n]+""", r"""\s+(?!\S)""",
    r"""\s+""",
])  # fmt: skip


@pytest.mark.parametrize("pre", ["gpt-4o", "kimi-k2"])
def test_gguf_tiktoken_pre_tokenizers_equal_tiktoken(tmp_path, pre):  # noqa: ANN001
    """gpt-oss's GGUF tokenizer (pre "gpt-4o") and Kimi K2's ("kimi-k2"): a byte-level
    vocabulary with a few merges, written as llama.cpp's converter writes one, encodes as
    tiktoken does with the same ranks and the model's own pattern: its splits (contractions
    in any case, digits in threes, punctuation runs with their newlines; K2: Han runs apart
    from other letters) and whole pre-tokens taken before merging."""
    import gguf
    import tiktoken
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    merged = [b"th", b"the", b" t", b" the", b"in", b"ing", b"12", b"123", b"'s", b"'S",
              b"xyz", b"!\n", b"\xc3\xa9"]  # fmt: skip
    ranks = {bytes([b]): b for b in range(256)} | {t: 256 + i for i, t in enumerate(merged)}

    def text(t: bytes) -> str:
        return "".join(byte_chars[b] for b in t)

    tokens = sorted(ranks, key=ranks.get)
    merges = [f"{text(a)} {text(t[len(a):])}" for t in merged if t != b"xyz"
              for a in [max((p for p in ranks if t.startswith(p) and p != t
                             and t[len(p):] in ranks), key=len)]]  # fmt: skip
    path = tmp_path / f"{pre}.gguf"
    w = gguf.GGUFWriter(path, "gpt-oss")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([text(t) for t in tokens])
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(merges)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from node.engine.gguf_file import GGUFFile

    ours = Tokenizer.from_gguf(GGUFFile(path).metadata, path)
    pattern = o200k_pattern() if pre == "gpt-4o" else KIMI_K2
    theirs = tiktoken.Encoding(f"{pre}-test", pat_str=pattern, mergeable_ranks=ranks,
                               special_tokens={})  # fmt: skip
    samples = ["The theing 1234567 it's IT'S Xyz xyz", "xyz the thing!!\n\nwow/ ok",
               "  café   12\r\nDON'T don'T 99 bottles", "naïve Ünïcödé 日本 🤖!\n",
               "the中文thing IT'S日本語xyz かなカナ 한국어the\n\n 123456"]
    for sample in samples:
        assert ours.encode(sample, add_special=False) == theirs.encode(sample), sample


def test_deepseek_v3_pre_tokenizer_splits_as_llama_cpp():
    """llama.cpp's "deepseek-v3" pre-tokenizer (DeepSeek V3's tokenizer.json has the same
    three splits): digits by threes, a CJK run alone, a letter run with one leading
    non-letter, punctuation with a leading space, newlines together."""
    from tokenizers import Regex, pre_tokenizers

    from node.engine.tokenizer import _GGUF_PRE

    split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(p), behavior="isolated")
                                     for p in _GGUF_PRE["deepseek-v3"]])  # fmt: skip
    pieces = [t for t, _ in split.pre_tokenize_str("Hello12345 世界abc!? .NET\n\n  x")]
    assert pieces == ["Hello", "123", "45", " ", "世界", "abc", "!?", " .", "NET", "\n\n", " ",
                      " x"]  # fmt: skip


def test_qwen35_pre_tokenizer_splits_as_qwen35s_own_regex():
    """llama.cpp's "qwen35" pre-tokenizer against the regex of Qwen3.5's tokenizer.json (its
    case-insensitive contractions spelled out): combining marks stay inside a word, where
    Qwen2's pattern cuts the word at them."""
    from tokenizers import Regex, pre_tokenizers

    from node.engine.tokenizer import _GGUF_PRE

    theirs = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}|"
              r" ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip

    def pieces(patterns: list[str], text: str) -> list[str]:
        split = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(p), behavior="isolated")
                                         for p in patterns])  # fmt: skip
        return [t for t, _ in split.pre_tokenize_str(text)]

    decomposed = "nai\u0308ve cafe\u0301 IT'S 1234\n\n  x!?"
    for text in [decomposed, "Hello 世界 don'T   done.\r\n ok", "ह\u093fन\u094dदी 42"]:
        assert pieces(_GGUF_PRE["qwen35"], text) == pieces([theirs], text), text
    assert pieces(_GGUF_PRE["qwen35"], decomposed)[:2] == ["nai\u0308ve", " cafe\u0301"]
    assert pieces(_GGUF_PRE["qwen2"], decomposed) != pieces(_GGUF_PRE["qwen35"], decomposed)
