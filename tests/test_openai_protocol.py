"""OpenAI request bodies and stop strings, as pure functions."""

from __future__ import annotations

import pytest

from node.engine.stop_strings import StopStrings
from protocol.openai import Answer, APIError, parse_request

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
IMAGE = [{"type": "image_url", "image_url": {"url": "data:,"}}]


def test_a_full_chat_body_is_read_field_by_field():
    req = parse_request(
        {**CHAT, "max_completion_tokens": 9, "max_tokens": 3, "temperature": 0.5, "top_p": 0.9,
         "seed": 4, "stop": "x", "stream": True, "stream_options": {"include_usage": True},
         "n": 1, "frequency_penalty": 0, "user": "someone", "unknown_field": [1, 2]},
        chat=True,
    )  # fmt: skip
    assert (req.max_tokens, req.temperature, req.top_p, req.seed) == (9, 0.5, 0.9, 4)
    assert req.stop == ["x"] and req.stream and req.include_usage
    assert req.messages == [{"role": "user", "content": "hi"}]


def test_defaults_and_content_parts():
    body = {"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None},
    ]}  # fmt: skip
    req = parse_request(body, chat=True)
    assert req.model is None and req.max_tokens is None and req.temperature == 1.0
    assert [m["role"] for m in req.messages] == ["system", "user", "assistant"]
    assert [m["content"] for m in req.messages] == ["be brief", "ab", ""]
    assert parse_request({"prompt": ["once"], "top_p": 0}, chat=False).temperature == 0


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": IMAGE}]}, "messages[0].content"),
        ({**CHAT, "model": 3}, "model"),
        ({**CHAT, "n": 2}, "n"),
        ({**CHAT, "max_tokens": -1}, "max_tokens"),
        ({**CHAT, "max_tokens": 2.5}, "max_tokens"),
        ({**CHAT, "max_tokens": True}, "max_tokens"),
        ({**CHAT, "temperature": "hot"}, "temperature"),
        ({**CHAT, "temperature": 3}, "temperature"),
        ({**CHAT, "top_p": 1.5}, "top_p"),
        ({**CHAT, "seed": "7"}, "seed"),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({**CHAT, "stop": [1]}, "stop"),
        ({**CHAT, "stream": "yes"}, "stream"),
        ({**CHAT, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
        ({**CHAT, "logprobs": True}, "logprobs"),
        ({**CHAT, "tools": [{"type": "function"}]}, "tools[0]"),
        ({**CHAT, "tools": {"type": "function"}}, "tools"),
        ({**CHAT, "tools": [{"type": "function", "function": {"name": "a b"}}]},
         "tools[0].function.name"),
        ({**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "tools[1]"),
        ({**CHAT, "tool_choice": "required"}, "tool_choice"),  # and no tools
        ({**CHAT, "tool_choice": "always"}, "tool_choice"),
        ({**CHAT, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {
            "name": "f", "arguments": "{oops"}}]}]},
         "messages[0].tool_calls[0].function.arguments"),
        ({"messages": [{"role": "assistant", "tool_calls": [{"type": "function"}]}]},
         "messages[0].tool_calls[0]"),
        ({**CHAT, "chat_template_kwargs": [1]}, "chat_template_kwargs"),
        ({**CHAT, "chat_template_kwargs": "enable_thinking"}, "chat_template_kwargs"),
    ],
)
def test_bad_chat_bodies_are_400s_naming_the_field(body, param):  # noqa: ANN001
    with pytest.raises(APIError) as e:
        parse_request(body, chat=True)
    assert e.value.status == 400 and e.value.param == param
    assert e.value.to_json()["error"]["type"] == "invalid_request_error"


def test_bad_completion_prompts():
    for prompt in (None, 3, ["a", "b"], [1, 2]):
        with pytest.raises(APIError, match="prompt"):
            parse_request({"prompt": prompt}, chat=False)


def test_chunks_have_openai_shapes():
    answer = Answer(chat=True, model="m")
    first = answer.chunk("", usage=True, first=True)
    assert first["object"] == "chat.completion.chunk" and first["usage"] is None
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    end = answer.chunk(None, "stop")
    assert end["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert "usage" not in end and end["id"] == first["id"]
    assert Answer(chat=False, model="m").usage_chunk({"total_tokens": 1})["choices"] == []
    thought = answer.chunk("hm", reasoning=True)["choices"][0]["delta"]
    assert thought == {"reasoning_content": "hm"}


def test_a_chat_answer_carries_its_thought_only_when_it_had_one():
    answer, use = Answer(chat=True, model="m"), {"total_tokens": 1}
    message = answer.whole("4", "stop", use, "2+2")["choices"][0]["message"]
    assert message == {"role": "assistant", "content": "4", "reasoning_content": "2+2"}
    assert "reasoning_content" not in answer.whole("4", "stop", use)["choices"][0]["message"]
    body = {**CHAT, "chat_template_kwargs": {"enable_thinking": False}}
    assert parse_request(body, chat=True).template_kwargs == {"enable_thinking": False}
    assert parse_request(CHAT, chat=True).template_kwargs == {}


def feed(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    s = StopStrings(stops)
    out = [s.push(p) for p in pieces]
    if not s.hit:
        out.append(s.flush())
    return out, s.hit


def test_stop_strings_cut_across_pieces_and_hold_back_only_what_may_start_one():
    assert feed(["\n\n"], ["Paris.", "\n", "\n", "More"]) == (["Paris.", "", "", ""], True)
    assert feed(["END"], ["a E", "N", "d"]) == (["a ", "", "ENd", ""], False)
    assert feed(["xyz", "b"], ["aaxy", "zb"]) == (["aa", ""], True)
    assert feed(["b", "ab"], ["cab"]) == (["c"], True)  # the earliest stop wins
    assert feed([], ["a", "b"]) == (["a", "b", ""], False)
