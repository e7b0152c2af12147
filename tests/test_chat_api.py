"""Qwen3's thinking switch end to end: chat_template_kwargs through a real daemon's API and
`generate --no-think` reach the model's template, and the reply's thought comes back apart
from its answer (reasoning_content), against `generate --local` and transformers.

The model is a tiny random Llama with SmolLM2's vocabulary and Qwen3's real template, made
to open the thought in the prompt unless enable_thinking is false (as Qwen3's thinking-only
models do): a random model never writes <think> itself, but its whole reply is then thought.
"""

from __future__ import annotations

import http.client
import json
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from node.engine.tokenizer import MAX_TEMPLATE_VARS
from tests.conftest import run_cli
from tests.daemons import EXACT_RING, Cluster
from tests.test_api import post
from tests.test_chat_formats import QWEN3, TEMPLATES

ASK = "What is 2+2?"
QUESTION = [{"role": "user", "content": ASK}]
TOKENS = 12
OFF = {"enable_thinking": False}


@pytest.fixture(scope="module")
def model(llama_with_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("thinking") / "model"
    shutil.copytree(llama_with_tokenizer, path)
    qwen3 = (TEMPLATES / QWEN3).read_text()
    empty = "{{- '<think>\\n\\n</think>\\n\\n' }}\n"
    opened = qwen3.replace(empty, empty + "    {%- else %}\n        {{- '<think>\\n' }}\n")
    assert opened != qwen3
    (path / "chat_template.jinja").write_text(opened)
    return path


@pytest.fixture(scope="module")
def cluster(model: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    c = Cluster(tmp_path_factory.mktemp("chat-api"), 1, [*EXACT_RING, "--model", str(model)])
    yield c
    c.stop()


def local(model: Path, *args: str) -> dict:
    proc = run_cli("generate", "--local", "--json", "--chat", ASK, "--model", str(model),
                   "--max-tokens", str(TOKENS), *args)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def prompt_tokens(model: Path, **variables: object) -> int:
    """transformers' own count of the rendered prompt's tokens."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    text = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False,
                                   **variables)  # fmt: skip
    return len(tok(text, add_special_tokens=False)["input_ids"])


def stream(url: str, body: dict) -> list[dict]:
    """The events of one streamed chat completion, without [DONE]."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    conn.request("POST", parts.path, body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})  # fmt: skip
    response = conn.getresponse()
    assert response.status == 200, response.read()
    lines = response.read().decode().splitlines()
    conn.close()
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_the_thinking_switch_reaches_the_template_and_the_thought_comes_apart(cluster, model):  # noqa: ANN001
    url = cluster.nodes[0].api + "/v1/chat/completions"
    body = {"messages": QUESTION, "max_tokens": TOKENS,
            "temperature": 0}  # fmt: skip
    for variables in ({}, {"enable_thinking": True}, OFF):
        thinking = variables != OFF
        want = local(model, *([] if thinking else ["--no-think"]))
        assert want["prompt_tokens"] == prompt_tokens(model, **variables)
        got, whole, _ = post(url, {**body, "chat_template_kwargs": variables})
        assert got == 200, whole
        message = whole["choices"][0]["message"]
        assert whole["usage"]["prompt_tokens"] == want["prompt_tokens"]
        assert whole["usage"]["completion_tokens"] == len(want["tokens"]) == TOKENS
        if thinking:  # the prompt opened the thought and the model never closed it
            assert message["reasoning_content"] == want["reasoning_content"]
            assert message["reasoning_content"] == want["text"].strip() != ""
            assert message["content"] == want["content"] == ""
        else:
            assert "reasoning_content" not in message and want["reasoning_content"] is None
            assert message["content"] == want["content"] == want["text"].lstrip() != ""
        events = stream(url, {**body, "chat_template_kwargs": variables})
        deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
        assert deltas[0] == {"role": "assistant", "content": ""}
        field = "reasoning_content" if thinking else "content"
        text = [d for d in deltas[1:] if d]
        assert text and all(set(d) == {field} for d in text), deltas
        assert "".join(d[field] for d in text) == message[field]
    on, off = (prompt_tokens(model, **v) for v in ({}, OFF))
    assert off > on  # the empty thought written into the prompt


def test_the_cli_through_a_daemon_sends_no_think_and_shows_the_thought_on_request(
    cluster, model  # noqa: ANN001
):  # fmt: skip
    node = cluster.nodes[0]
    args = ("generate", ASK, "--chat", "--node", node.address, "--max-tokens", str(TOKENS))
    for flags in ([], ["--no-think"]):
        want = local(model, *flags)
        proc = node.cli(*args, "--json", *flags)
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout)
        assert got["prompt_tokens"] == want["prompt_tokens"]
        for key in ("content", "reasoning_content"):
            assert got[key] == want[key], key
    thought = local(model)["reasoning_content"]
    quiet = node.cli(*args)
    assert quiet.returncode == 0 and quiet.stdout == "\n" and thought not in quiet.stderr
    shown = node.cli(*args, "--show-thinking")
    assert shown.returncode == 0 and shown.stdout == "\n" and thought in shown.stderr
    answer = local(model, "--no-think")["content"]
    plain = node.cli(*args, "--no-think")
    assert plain.returncode == 0 and plain.stdout == answer + "\n"


BAD_KWARGS = [
    [1, 2],
    "enable_thinking=false",
    {"enable_thinking": {"really": False}},
    {"enable_thinking": [False]},
    {f"v{i}": True for i in range(MAX_TEMPLATE_VARS + 1)},
    {"messages": []},
    {"add_generation_prompt": False},
    {"bad name": True},
    {"model_identity": "x" * 5000},
]


def test_structured_output_of_a_thinking_template_is_the_answer(cluster):  # noqa: ANN001
    """The prompt opens the thought and the grammar has no "</think>": the reply is made to
    close the thought first, so the kept-to output is the answer, not a thought."""
    url = cluster.nodes[0].api + "/v1/chat/completions"
    body = {"messages": QUESTION, "max_tokens": 8, "temperature": 0,
            "grammar": 'root ::= "yes" | "no"'}  # fmt: skip
    got, whole, _ = post(url, body)
    assert got == 200, whole
    message = whole["choices"][0]["message"]
    assert message["content"] in ("yes", "no") and not message.get("reasoning_content")
    deltas = [e["choices"][0]["delta"] for e in stream(url, body) if e["choices"]]
    assert not any(d.get("reasoning_content") for d in deltas), deltas
    assert "".join(d.get("content") or "" for d in deltas) == message["content"]


def test_anthropic_thinking_blocks_carry_the_thought_when_asked(cluster, model):  # noqa: ANN001
    """/v1/messages: with thinking enabled the thought comes back as a thinking block
    (streamed as thinking deltas, which the official client puts together), equal to the
    reasoning_content of `generate --local`; without it, no thought is shown; disabled, the
    template is told (enable_thinking false), as --no-think tells it."""
    import anthropic

    c = anthropic.Anthropic(base_url=cluster.nodes[0].api, api_key="unused", max_retries=0)
    kw = dict(model="any", max_tokens=TOKENS, messages=QUESTION,
              extra_body={"temperature": 0})  # fmt: skip
    want = local(model)
    shown = c.messages.create(**kw, thinking={"type": "enabled", "budget_tokens": 1024})
    assert [b.type for b in shown.content] == ["thinking"]
    assert shown.content[0].thinking == want["reasoning_content"] != ""
    with c.messages.stream(**kw, thinking={"type": "enabled", "budget_tokens": 1024}) as s:
        assert s.get_final_message().content[0].thinking == want["reasoning_content"]
    assert c.messages.create(**kw).content == []  # all of this reply is thought
    off = c.messages.create(**kw, thinking={"type": "disabled"})
    answer = local(model, "--no-think")
    assert [b.text for b in off.content if b.type == "text"] == [answer["content"]]


def test_bad_chat_template_kwargs_are_a_400_with_one_line(cluster):  # noqa: ANN001
    url = cluster.nodes[0].api + "/v1/chat/completions"
    body = {"messages": QUESTION, "max_tokens": 2}
    for bad in BAD_KWARGS:
        got, payload, _ = post(url, {**body, "chat_template_kwargs": bad})
        assert got == 400, (bad, payload)
        error = payload["error"]
        assert error["param"] == "chat_template_kwargs", error
        assert error["message"].startswith("chat_template_kwargs"), error
        assert "\n" not in error["message"] and len(error["message"]) < 200, error
        good, answer, _ = post(url, body)
        assert good == 200 and answer["choices"][0]["message"]["content"] is not None
    for flag in ("--no-think", "--show-thinking"):
        proc = run_cli("generate", "--local", "hi", flag)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr == f"ringinfer: error: {flag} needs --chat\n"
