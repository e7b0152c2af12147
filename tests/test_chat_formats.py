"""Chat formats from the models' own templates: Qwen3's and gpt-oss's real templates rendered
by us against transformers, and their replies split into thought and answer however the
text arrives."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from node.engine.reasoning import (
    CONTENT,
    HARMONY,
    PLAIN,
    REASONING,
    THINK,
    THINKING,
    ReplySplitter,
    reply_format,
    split_reply,
)
from node.engine.tokenizer import (
    MAX_TEMPLATE_TEXT,
    MAX_TEMPLATE_VARS,
    BadTemplateVariables,
    TextStream,
    Tokenizer,
    template_variables,
)
from node.errors import RinginferError

TEMPLATES = Path(__file__).resolve().parent / "data" / "templates"
QWEN3, GPT_OSS = "Qwen-Qwen3-0.6B.jinja", "openai-gpt-oss-120b.jinja"
HARMONY_TOKENS = ["<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>", "<|call|>",
                  "<|constrain|>"]  # fmt: skip
EMPTY_THOUGHT = "<think>\n\n</think>\n\n"

REPLIES = [  # (format, reply text, thought, answer)
    (THINK, "<think>\nLet me see.\nParis, surely.\n</think>\n\nParis.",
     "Let me see.\nParis, surely.", "Paris."),
    (THINK, "Paris, without a thought.", "", "Paris, without a thought."),
    (THINK, "\n\n  Paris after blank lines", "", "Paris after blank lines"),
    (THINK, "<thinker> is a word, not a block", "", "<thinker> is a word, not a block"),
    (THINK, "<think>\ncut off by max_tokens  \n", "cut off by max_tokens", ""),
    (THINK, "<think>a </thin b < / think></think>c </think> d", "a </thin b < / think>",
     "c </think> d"),
    (THINK, "<think></think>", "", ""),
    (THINK, "<thi", "", "<thi"),
    (THINKING, "I was asked to think.\n</think>\n\nAnswer", "I was asked to think.", "Answer"),
    (THINKING, "only thought, then the end", "only thought, then the end", ""),
    (HARMONY, "<|channel|>analysis<|message|>Think: 2+2.<|end|><|start|>assistant<|channel|>"
     "final<|message|>It is 4.<|return|>", "Think: 2+2.", "It is 4."),
    (HARMONY, "<|channel|>final<|message|>Only an answer<|return|>ignored after the end", "",
     "Only an answer"),
    (HARMONY, "<|channel|>analysis<|message|>a tool?<|end|><|start|>assistant<|channel|>"
     "commentary to=functions.f <|constrain|>json<|message|>{\"x\": 1}<|call|>more", "a tool?"
     "{\"x\": 1}", ""),  # no tools offered: a call is thought (tests/test_tool_calls.py)
    (HARMONY, "<|channel|>final<|message|>a <|en b <| c <|start", "", "a <|en b <| c <|start"),
    (HARMONY, "<|channel|>analysis<|message|>T<|end|>\n<|start|>assistant<|chan", "T", ""),
    (HARMONY, "<|channel|>final<|message|>cut by a stop token", "", "cut by a stop token"),
    (HARMONY, "Not harmony at all", "", "Not harmony at all"),
    (PLAIN, "  <think>x</think> y\n", "", "  <think>x</think> y\n"),
]  # fmt: skip


def streamed(fmt: str, pieces: list[str]) -> list[tuple[str, str]]:
    splitter = ReplySplitter(fmt)
    parts = [p for piece in pieces for p in splitter.push(piece)] + splitter.flush()
    assert all(text for _, text in parts), parts  # no empty deltas
    return parts


def joined(parts: list[tuple[str, str]]) -> tuple[str, str]:
    return tuple("".join(t for k, t in parts if k == kind) for kind in (REASONING, CONTENT))


@pytest.mark.parametrize(("fmt", "reply", "thought", "answer"), REPLIES)
def test_a_reply_splits_the_same_however_its_text_is_cut(fmt, reply, thought, answer):  # noqa: ANN001
    assert split_reply(fmt, reply) == (thought, answer)
    assert joined(streamed(fmt, list(reply))) == (thought, answer)  # a character at a time
    for cut in range(1, len(reply)):  # every place a marker can be split across two deltas
        assert joined(streamed(fmt, [reply[:cut], "", reply[cut:]])) == (thought, answer), cut


def test_the_thought_streams_before_the_answer_and_as_it_comes():
    splitter = ReplySplitter(THINK)
    assert splitter.push("<think>\nStep one") == [(REASONING, "Step one")]
    assert splitter.push(", two.\n</th") == [(REASONING, ", two.")]  # "\n</th" held back
    assert splitter.push("ink>\n\nFour") == [(CONTENT, "Four")]
    assert splitter.flush() == []
    harmony = ReplySplitter(HARMONY)
    assert harmony.push("<|channel|>analysis<|message|>hm") == [(REASONING, "hm")]
    assert harmony.push("<|end|><|start|>assistant<|channel|>final<|message|>Yes<|ret") == [
        (CONTENT, "Yes")
    ]
    assert not harmony.done
    assert harmony.push("urn|>") == [] and harmony.done
    assert harmony.push("text after the end") == [] and harmony.flush() == []


def test_an_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown reply format"):
        ReplySplitter("markdown")


# ---------------------------------------------------------------- templates


def template_dir(src: Path, dst: Path, template: str, harmony: bool = False) -> Path:
    """A tokenizer directory (SmolLM2's vocabulary) with one of the real templates, and with
    gpt-oss's harmony tokens added as special tokens when `harmony`."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    if harmony:
        tok = HFTokenizer.from_file(str(dst / "tokenizer.json"))
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in HARMONY_TOKENS])  # fmt: skip
        tok.save(str(dst / "tokenizer.json"))
    (dst / "chat_template.jinja").write_text((TEMPLATES / template).read_text())
    return dst


def both(path: Path) -> tuple[Tokenizer, object]:
    from transformers import AutoTokenizer

    return Tokenizer.from_hf_dir(path, {}), AutoTokenizer.from_pretrained(path)


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\nFour."},
        {"role": "user", "content": "And 3+3?"},
    ],
]


@pytest.mark.parametrize(
    ("template", "variables"),
    [(QWEN3, {}), (QWEN3, {"enable_thinking": False}), (QWEN3, {"enable_thinking": True}),
     (GPT_OSS, {}), (GPT_OSS, {"reasoning_effort": "high", "model_identity": "You are a ring."})],
)  # fmt: skip
def test_real_templates_render_as_transformers_renders_them(
    llama_with_tokenizer, tmp_path, template, variables
):  # noqa: ANN001
    path = template_dir(llama_with_tokenizer, tmp_path / "tok", template)
    ours, theirs = both(path)
    for messages in CONVERSATIONS:
        text = theirs.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **variables
        )
        ids = ours.encode_chat(messages, variables)
        assert ours.decode(ids) == text
        assert ids == theirs(text, add_special_tokens=False)["input_ids"]
        if template == QWEN3:  # the switch: an empty thought written for the model; earlier
            off = variables.get("enable_thinking") is False  # turns' thoughts are dropped
            assert text.endswith("<|im_start|>assistant\n" + EMPTY_THOUGHT) == off
            assert text.count("<think>") == off
        else:
            assert text.endswith("<|start|>assistant")
            assert f"Reasoning: {variables.get('reasoning_effort', 'medium')}\n" in text
            assert ("You are a ring." in text) == ("model_identity" in variables)


def test_qwen3_omits_the_empty_thought_unless_thinking_is_off(llama_with_tokenizer, tmp_path):  # noqa: ANN001
    ours, _ = both(template_dir(llama_with_tokenizer, tmp_path / "tok", QWEN3))
    question = [{"role": "user", "content": "Hi"}]
    for variables, empty in [(None, False), ({"enable_thinking": True}, False),
                             ({"enable_thinking": False}, True)]:  # fmt: skip
        text = ours.decode(ours.encode_chat(question, variables))
        assert (EMPTY_THOUGHT in text) == empty, variables
        assert ("<think>" in text) == empty, variables
        assert reply_format(ours, ours.encode_chat(question, variables)) == THINK


@pytest.mark.parametrize("template", [QWEN3, GPT_OSS])
def test_what_the_template_teaches_a_reply_to_be_splits_back(
    llama_with_tokenizer, tmp_path, template
):  # noqa: ANN001
    """The template's own rendering of an answered turn (thought and answer) minus its
    rendering of the question is the reply the model was taught: it splits back."""
    harmony = template == GPT_OSS
    ours, theirs = both(template_dir(llama_with_tokenizer, tmp_path / "tok", template, harmony))
    question = [{"role": "user", "content": "What is 2+2?"}]
    answered = [*question, {"role": "assistant", "content": "It is 4.",
                            "reasoning_content": "Two and two.\nThat makes four."}]  # fmt: skip
    prompt = theirs.apply_chat_template(question, add_generation_prompt=True, tokenize=False)
    whole = theirs.apply_chat_template(answered, tokenize=False)
    assert whole.startswith(prompt)
    reply = whole[len(prompt) :].removesuffix("<|im_end|>\n")  # Qwen3 stops on <|im_end|>
    prompt_ids = ours.encode_chat(question)
    fmt = reply_format(ours, prompt_ids)
    assert fmt == (HARMONY if harmony else THINK)
    assert split_reply(fmt, reply) == ("Two and two.\nThat makes four.", "It is 4.")
    # As the model's tokens would arrive, decoded a token at a time (harmony's markers are
    # single special tokens, Qwen3's <think> several tokens of this vocabulary):
    stream = TextStream(ours)
    pieces = [stream.push(t) for t in ours.encode(reply, add_special=False)]
    assert joined(streamed(fmt, pieces)) == split_reply(fmt, reply)


def test_harmony_vocabularies_stop_at_the_end_of_the_reply_not_of_a_message(
    llama_with_tokenizer, tmp_path  # noqa: ANN001
):  # fmt: skip
    ours, theirs = both(template_dir(llama_with_tokenizer, tmp_path / "tok", GPT_OSS, True))
    ids = {t: theirs.convert_tokens_to_ids(t) for t in HARMONY_TOKENS}
    assert ours.harmony
    assert {ids["<|return|>"], ids["<|call|>"]} <= ours.stop_ids
    assert ids["<|end|>"] not in ours.stop_ids  # it ends the thought; the answer follows
    plain = Tokenizer.from_hf_dir(template_dir(llama_with_tokenizer, tmp_path / "q", QWEN3), {})
    assert not plain.harmony


def test_a_template_that_opens_the_thought_starts_the_reply_in_it(llama_with_tokenizer, tmp_path):  # noqa: ANN001
    path = template_dir(llama_with_tokenizer, tmp_path / "tok", QWEN3)
    opened = (
        (TEMPLATES / QWEN3)
        .read_text()
        .replace("{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant\\n<think>\\n' }}")
    )
    assert opened != (TEMPLATES / QWEN3).read_text()
    (path / "chat_template.jinja").write_text(opened)
    ours = Tokenizer.from_hf_dir(path, {})
    assert reply_format(ours, ours.encode_chat([{"role": "user", "content": "Hi"}])) == THINKING


BAD_VARIABLES = [  # (chat_template_kwargs, words of the error)
    ([1], "must be an object"),
    ("enable_thinking", "must be an object"),
    ({f"v{i}": 1 for i in range(MAX_TEMPLATE_VARS + 1)}, f"at most {MAX_TEMPLATE_VARS} names"),
    ({"": True}, "is not a name"),
    ({"a-b": True}, "is not a name"),
    ({"_private": True}, "is not a name"),
    ({"x" * 65: True}, "is not a name"),
    ({"messages": "x"}, "not the request's to set"),
    ({"add_generation_prompt": False}, "not the request's to set"),
    ({"namespace": 1}, "not the request's to set"),
    ({"enable_thinking": {"nested": True}}, "must be a string, number, boolean or null"),
    ({"enable_thinking": [False]}, "must be a string, number, boolean or null"),
    ({"model_identity": "x" * (MAX_TEMPLATE_TEXT + 1)}, f"at most {MAX_TEMPLATE_TEXT} char"),
    ({"n": 2**60}, "out of range"),
    ({"n": float("nan")}, "out of range"),
    ({"n": float("inf")}, "out of range"),
]


@pytest.mark.parametrize(("value", "words"), BAD_VARIABLES)
def test_bad_template_variables_are_one_line_errors(value, words):  # noqa: ANN001
    with pytest.raises(BadTemplateVariables) as e:
        template_variables(value)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith("chat_template_kwargs")
    assert len(str(e.value)) < 200


def test_good_template_variables_pass_through():
    good = {"enable_thinking": False, "reasoning_effort": "low", "n": 3, "t": 0.5, "z": None}
    assert template_variables(good) == good
    assert template_variables(json.loads(json.dumps(good))) == good
    assert template_variables(None) == {}


def test_a_template_failing_on_a_variable_is_a_one_line_error(llama_with_tokenizer, tmp_path):  # noqa: ANN001
    path = template_dir(llama_with_tokenizer, tmp_path / "tok", GPT_OSS)
    ours = Tokenizer.from_hf_dir(path, {})
    question = [{"role": "user", "content": "Hi"}]
    with pytest.raises(RinginferError, match="chat template failed") as e:
        ours.encode_chat(question, {"reasoning_effort": 3})  # "Reasoning: " + 3: a TypeError
    assert "\n" not in str(e.value)
    tagged = {"role": "assistant", "content": "<|channel|>final<|message|>x"}
    with pytest.raises(RinginferError, match=re.escape("containing <|channel|> tags")):
        ours.encode_chat([*question, tagged, *question])  # the template's own check
