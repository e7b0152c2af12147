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
        ({**CHAT, "logprobs": 1}, "logprobs"),
        ({**CHAT, "top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
        ({**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
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
        ({**CHAT, "response_format": {"type": "yaml"}}, "response_format.type"),
        ({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
         "response_format.json_schema.schema"),
        ({**CHAT, "response_format": "json"}, "response_format"),
        ({**CHAT, "grammar": 7}, "grammar"),
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


ANTHROPIC = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
RESPONSES = {"model": "m", "input": "hi"}
OLLAMA = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("api", "body", "param"),
    [
        ("anthropic", {**ANTHROPIC, "max_tokens": None}, "max_tokens"),
        ("anthropic", {**ANTHROPIC, "messages": []}, "messages"),
        ("anthropic", {**ANTHROPIC, "messages": [{"role": "system", "content": "x"}]},
         "messages[0].role"),
        ("anthropic", {**ANTHROPIC, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {}}]}]}, "messages[0].content[0]"),
        ("anthropic", {**ANTHROPIC, "system": [{"type": "image"}]}, "system[0]"),
        ("anthropic", {**ANTHROPIC, "tool_choice": {"type": "sometimes"}}, "tool_choice"),
        ("anthropic", {**ANTHROPIC, "tools": [{"name": "a b"}]}, "tools[0].function.name"),
        ("anthropic", {**ANTHROPIC, "stop_sequences": list("abcde")}, "stop"),
        ("anthropic", {**ANTHROPIC, "temperature": 1.5}, "temperature"),
        ("anthropic", {**ANTHROPIC, "messages": [{"role": "user"}]}, "messages[0].content"),
        ("anthropic", {**ANTHROPIC, "tools": [{"name": "f"}], "tool_choice": {"type": []}},
         "tool_choice"),
        ("anthropic", {**ANTHROPIC, "tools": [{"name": "f"}], "tool_choice": {
            "type": "tool", "name": {}}}, "tool_choice"),
        ("anthropic", {**ANTHROPIC, "messages": [{"role": "user", "content": "x"}] * 4097},
         "messages"),
        ("responses", {**RESPONSES, "tools": [{"type": "function", "name": "f"}],
                       "tool_choice": {"type": "function", "name": [1]}}, "tool_choice"),
        ("responses", {**RESPONSES, "input": [{"type": "function_call", "call_id": "c",
                       "name": "f", "arguments": "[" * 5000}]},
         "messages[0].tool_calls[0].function.arguments"),
        ("responses", {**RESPONSES, "previous_response_id": "resp_1"}, "previous_response_id"),
        ("responses", {**RESPONSES, "text": {"format": {"type": "json_schema"}}}, "text.format"),
        ("responses", {**RESPONSES, "input": []}, "input"),
        ("responses", {**RESPONSES, "input": [{"type": "image_generation_call"}]}, "input[0]"),
        ("responses", {**RESPONSES, "input": [{"role": "user", "content": [
            {"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
        ("responses", {**RESPONSES, "max_output_tokens": 0}, "max_output_tokens"),
        ("ollama", {**OLLAMA, "format": 7}, "format"),
        ("ollama", {**OLLAMA, "messages": [{"role": "user", "content": "x", "images": ["a"]}]},
         "messages[0]"),
        ("ollama", {**OLLAMA, "options": {"num_predict": "8"}}, "num_predict"),
        ("ollama", {**OLLAMA, "model": 7}, "model"),
    ],
)  # fmt: skip
def test_bad_bodies_of_the_other_apis_are_400s_naming_the_field(api, body, param):  # noqa: ANN001
    from protocol import anthropic, ollama, responses

    read = {"anthropic": anthropic.parse_messages, "responses": responses.parse_responses,
            "ollama": lambda b: ollama.parse_chat(b, chat=True)}[api]  # fmt: skip
    with pytest.raises(APIError) as e:
        read(body)
    assert e.value.status == 400 and e.value.param == param, str(e.value)


def test_the_other_apis_read_into_the_chat_request():
    """What each API's conversation becomes: the chat messages the template is given."""
    from protocol import anthropic, ollama, responses

    claude = anthropic.parse_messages({**ANTHROPIC, "system": "Be brief.", "messages": [
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": [{"type": "text", "text": "Looking."}, {
            "type": "tool_use", "id": "toolu_1", "name": "f", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": "sunny"}, {"type": "text", "text": "So?"}]}]})
    assert claude.messages == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": "Looking.", "tool_calls": [{"id": "toolu_1",
         "type": "function", "function": {"name": "f", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        {"role": "user", "content": "So?"}]
    assert claude.max_tokens == 8 and claude.tool_choice == "none"
    codex = responses.parse_responses({**RESPONSES, "instructions": "Be brief.", "input": [
        {"role": "user", "content": [{"type": "input_text", "text": "Paris?"}]},
        {"type": "reasoning", "summary": []},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{\"a\": 1}"},
        {"type": "function_call_output", "call_id": "c1", "output": "x"}],
        "tools": [{"type": "function", "name": "f"}], "tool_choice": "required"})
    assert [m["role"] for m in codex.messages] == ["system", "user", "assistant", "tool"]
    assert [c["id"] for c in codex.messages[2]["tool_calls"]] == ["c1", "c2"]
    assert codex.tool_choice == "required" and codex.tools[0]["function"]["name"] == "f"
    chat = ollama.parse_chat({**OLLAMA, "options": {"temperature": 0, "num_predict": 5,
                                                    "stop": ["x"]}}, chat=True)  # fmt: skip
    assert (chat.temperature, chat.max_tokens, chat.stop, chat.stream) == (0.0, 5, ["x"], True)
    made = ollama.parse_chat({"model": "m:latest", "prompt": "hi", "system": "S"}, chat=False)
    assert made.model == "m" and made.messages == [{"role": "system", "content": "S"},
                                                   {"role": "user", "content": "hi"}]
    raw = ollama.parse_chat({"model": "m", "prompt": "hi", "raw": True}, chat=False)
    assert not raw.chat and raw.prompt == "hi"
