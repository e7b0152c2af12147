"""Tool calls in chat replies (node/engine/tool_calls.py): the calls a model's own chat
template writes (Qwen3's, gpt-oss's, rendered by transformers) parse back into the same
calls, whole or however the text is cut; each other format from its documented syntax; text
that is no call stays the answer; tools offered to templates that have no place for them."""

from __future__ import annotations

import json

import pytest

from node.engine.reasoning import HARMONY, PLAIN, THINK, ReplySplitter, reply_format, split_calls
from node.engine.tool_calls import (
    CALL,
    CONTENT,
    DEEPSEEK,
    HERMES,
    KIMI,
    LLAMA3,
    MISTRAL,
    call_format,
    forced_start,
    prepared,
    renders_tools,
)
from node.engine.weights import open_checkpoint
from tests.test_chat_formats import GPT_OSS, QWEN3, both, template_dir

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}  # fmt: skip
CALLS = [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Lyon", "days": 2})]


def streamed(fmt: str, calls: str | None, pieces: list[str]) -> list[tuple[str, object]]:
    splitter = ReplySplitter(fmt, calls)
    return [p for piece in pieces for p in splitter.push(piece)] + splitter.flush()


def summary(parts: list[tuple[str, object]]) -> tuple[str, list[tuple[str, dict]]]:
    answer = "".join(t for k, t in parts if k == CONTENT)
    return answer, [(c.name, json.loads(c.arguments)) for k, c in parts if k == CALL]


def assert_any_cut(fmt: str, calls: str | None, reply: str, answer: str, expected: list) -> None:
    """The same answer and calls whole, a character at a time, and cut anywhere in two."""
    thought, text, whole = split_calls(fmt, reply, calls)
    assert (text, [(c.name, json.loads(c.arguments)) for c in whole]) == (answer, expected)
    assert summary(streamed(fmt, calls, list(reply))) == (answer, expected)
    for cut in range(1, len(reply)):
        assert summary(streamed(fmt, calls, [reply[:cut], reply[cut:]])) == (answer, expected)


@pytest.mark.parametrize("template", [QWEN3, GPT_OSS])
def test_the_calls_a_models_template_writes_parse_back(llama_with_tokenizer, tmp_path, template):  # noqa: ANN001
    """Oracle: the model's own template (rendered by transformers) writing an assistant turn
    of two calls; what follows the generation prompt is the reply the model was taught."""
    harmony = template == GPT_OSS
    ours, theirs = both(template_dir(llama_with_tokenizer, tmp_path / "tok", template, harmony))
    ask = [{"role": "user", "content": "Weather in Paris and Lyon?"}]
    turn = {"role": "assistant", "content": "" if harmony else "Checking both.",
            "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}}
                           for n, a in CALLS]}  # fmt: skip
    if harmony:  # gpt-oss's template writes one call a turn (a message to its recipient)
        turn["tool_calls"] = turn["tool_calls"][:1]
    prompt = theirs.apply_chat_template(ask, tools=[WEATHER], add_generation_prompt=True,
                                        tokenize=False)  # fmt: skip
    whole = theirs.apply_chat_template([*ask, turn], tools=[WEATHER], tokenize=False)
    assert whole.startswith(prompt)
    reply = whole[len(prompt) :].removesuffix("<|im_end|>\n")
    fmt = call_format(ours.chat_template, ours.harmony)
    assert fmt == (HARMONY if harmony else HERMES) and renders_tools(ours.chat_template)
    assert ours.encode_chat(ask, tools=[WEATHER]) == theirs.encode(prompt, add_special_tokens=False)
    shape = reply_format(ours, ours.encode_chat(ask, tools=[WEATHER]))
    expected = CALLS[:1] if harmony else CALLS
    assert_any_cut(shape, fmt, reply, "" if harmony else "Checking both.", expected)


REPLIES = [  # (format, reply, answer, calls)
    (HERMES, 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
     "</tool_call>", "Sure.", CALLS[:1]),
    (HERMES, "<tool_call>\n<function=get_weather>\n<parameter=city>\nLyon\n</parameter>\n"
     "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>", "", CALLS[1:]),
    (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>',
     "", CALLS[:1]),  # the call's own brace left open, as small models do
    (HERMES, "<tool_call>{not json}</tool_call> and on", "<tool_call>{not json}</tool_call> and on",
     []),
    (HERMES, "a <tool_ca and <tool", "a <tool_ca and <tool", []),
    (HERMES, "Use <tool_call> tags, then </tool_call> more", "Use <tool_call> tags, then "
     "</tool_call> more", []),  # no call: the text as written, its spaces too
    (HERMES, '<tool_call>{"name": "get_weather", "arguments": {"city": "Par', '<tool_call>{"name": '
     '"get_weather", "arguments": {"city": "Par', []),  # cut by max_tokens
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", CALLS[:1]),
    (LLAMA3, '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
     '{"name": "get_weather", "parameters": {"city": "Lyon", "days": 2}}', "", CALLS),
    (LLAMA3, '{"a": 1} is JSON, not a call', '{"a": 1} is JSON, not a call', []),
    (LLAMA3, "Paris is sunny.", "Paris is sunny.", []),
    (MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', "",
     CALLS[:1]),
    (MISTRAL, 'Let me look.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_weather'
     '[ARGS]{"city": "Lyon", "days": 2}', "Let me look.", CALLS),
    (DEEPSEEK, "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
     '```json\n{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', "", CALLS[:1]),
    (DEEPSEEK, "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>"
     '{"city": "Paris"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>', "", CALLS[:1]),  # V3.1
    (KIMI, "<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
     '<|tool_call_argument_begin|>{"city": "Paris"}<|tool_call_end|><|tool_call_begin|>'
     'functions.get_weather:1<|tool_call_argument_begin|>{"city": "Lyon", "days": 2}'
     "<|tool_call_end|><|tool_calls_section_end|>", "", CALLS),
]  # fmt: skip


@pytest.mark.parametrize(("fmt", "reply", "answer", "calls"), REPLIES)
def test_each_format_parses_however_its_text_is_cut(fmt, reply, answer, calls):  # noqa: ANN001
    assert_any_cut(PLAIN, fmt, reply, answer, calls)


def test_a_thought_then_calls_and_harmony_calls_as_they_come():
    parts = streamed(THINK, HERMES, ["<think>\nweather?\n</think>\n\n<tool_call>\n",
                                     '{"name": "get_weather", "arguments": {"city": "Paris"}}',
                                     "\n</tool_call>"])  # fmt: skip
    assert parts[0] == ("reasoning", "weather?") and summary(parts) == ("", CALLS[:1])
    harmony = ReplySplitter(HARMONY, HARMONY)
    head = "<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
    assert harmony.push(head + '{"city": ') == []  # a call is given whole
    [(kind, c)] = harmony.push('"Paris"}<|call|>')
    assert kind == CALL and (c.name, json.loads(c.arguments)) == CALLS[0] and harmony.done
    assert c.id.startswith("call_")  # ids as OpenAI's look


def test_without_calls_the_answer_is_untouched():
    """No tools offered: a hermes call is text, a harmony message to a function thought."""
    reply = '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>'
    assert split_calls(PLAIN, reply, None) == ("", reply, [])
    harmony = '<|channel|>commentary to=functions.f <|constrain|>json<|message|>{"a": 1}<|call|>'
    assert split_calls(HARMONY, harmony, None) == ('{"a": 1}', "", [])
    assert split_calls(HARMONY, harmony, HARMONY)[2][0].name == "f"


def test_a_long_call_is_searched_once_and_deep_nesting_is_text():
    """A call streamed in many small pieces costs each piece's own length (the end marker is
    looked for in new text only); JSON nested past Python's recursion is no call."""
    import time

    for fmt, head, tail in ((HERMES, '<tool_call>\n{"name": "f", "arguments": {"s": "',
                             '"}}\n</tool_call>'),
                            (HARMONY, "<|channel|>commentary to=functions.f <|message|>{\"s\": \"",
                             '"}<|call|>')):  # fmt: skip
        splitter = ReplySplitter(PLAIN if fmt == HERMES else HARMONY, fmt)
        began = time.perf_counter()
        parts = splitter.push(head)
        for _ in range(40000):
            parts += splitter.push("abcd")
        parts += splitter.push(tail) + splitter.flush()
        assert time.perf_counter() - began < 5, fmt  # quadratic: over a minute here
        [(kind, c)] = parts
        assert kind == CALL and len(json.loads(c.arguments)["s"]) == 160000
    deep = "<tool_call>" + "[" * 5000 + "</tool_call>"
    assert split_calls(PLAIN, deep, HERMES) == ("", deep, [])


def test_tools_reach_a_template_without_them_as_qwens_system_prompt():
    """SmolLM2's template has no tools: they go into the system message, earlier calls
    into the assistant's text and results into a user's <tool_response>, and the model is
    asked for hermes calls, which the reply is then read for."""
    template = open_checkpoint(None).tokenizer().chat_template
    assert not renders_tools(template) and call_format(template, False) == HERMES
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type":
                "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]  # fmt: skip
    messages, tools = prepared(history, [WEATHER], template)
    assert tools is None and [m["role"] for m in messages] == ["system", "user", "assistant",
                                                               "user"]  # fmt: skip
    assert messages[0]["content"].startswith("Be brief.\n\n# Tools\n")
    assert json.dumps(WEATHER) in messages[0]["content"]
    assert messages[2]["content"] == ('<tool_call>\n{"name": "get_weather", "arguments": '
                                      '{"city": "Paris"}}\n</tool_call>')  # fmt: skip
    assert messages[3]["content"] == "<tool_response>\nsunny\n</tool_response>"
    assert prepared(history[:2], [], template) == (history[:2], None)


def test_a_forced_call_begins_the_reply_with_the_formats_opening():
    assert forced_start(HERMES, None) == "<tool_call>\n"
    assert forced_start(HERMES, "f") == '<tool_call>\n{"name": "f", "arguments": '
    assert forced_start(LLAMA3, "f") == '{"name": "f", "parameters": '
    assert forced_start(HARMONY, "f").endswith("to=functions.f <|constrain|>json<|message|>")
    assert forced_start(DEEPSEEK, "f") == ""  # no forced start known: the model is asked only
    forced = forced_start(HERMES, "get_weather") + '{"city": "Paris"}}\n</tool_call>'
    assert split_calls(PLAIN, forced, HERMES)[2][0].name == "get_weather"
