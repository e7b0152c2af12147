"""The HTTP API of three loopback daemons, through the official `openai` client and raw HTTP,
against `generate --local` as the oracle."""

from __future__ import annotations

import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest

from node.engine.tool_calls import HERMES, call_grammar, forced_start, prepared
from tests.conftest import run_cli
from tests.daemons import EXACT_RING, Cluster, Daemon, free_port, seed_capabilities

MODEL = "SmolLM2-135M-Instruct"
KEY = "s3cret-key-of-the-api"
QUESTION = "What is the capital of France?"
PROMPTS = ["The capital of France is", "Once upon a time"]
TOKENS = 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    root = tmp_path_factory.mktemp("api")
    (root / "key").write_text(KEY + "\n")
    c = Cluster(root, 3, EXACT_RING, per_node={2: ["--api-key-file", str(root / "key")]})
    yield c
    c.stop()


def local(prompt: str, *args: str) -> dict:
    proc = run_cli("generate", "--local", "--json", prompt, *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def expected() -> dict[str, dict]:
    """Greedy answers of --local: the chat question, and each plain prompt."""
    out = {QUESTION: local(QUESTION, "--chat", "--max-tokens", "48")}
    out.update({p: local(p, "--max-tokens", str(TOKENS)) for p in PROMPTS})
    return out


def client(node: Daemon, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{node.api}/v1", api_key=key, max_retries=0, timeout=120)


def ask(c: openai.OpenAI, question: str = QUESTION, **kw: object) -> object:
    messages = [{"role": "user", "content": question}]
    return c.chat.completions.create(model=MODEL, messages=messages, **kw)


def test_models_lists_the_served_model(cluster):  # noqa: ANN001
    models = client(cluster.nodes[0]).models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].context_length == 8192


def test_chat_greedy_equals_local_streamed_or_not_on_every_node(cluster, expected):  # noqa: ANN001
    want = expected[QUESTION]
    assert want["text"] == "The capital of France is Paris."
    for i, node in enumerate(cluster.nodes):
        c = client(node, KEY if i == 2 else "unused")
        whole = ask(c, max_tokens=48, temperature=0)
        assert whole.choices[0].message.content == want["text"]
        assert whole.choices[0].finish_reason == "stop"
        assert whole.usage.prompt_tokens == want["prompt_tokens"]
        assert whole.usage.completion_tokens == len(want["tokens"])
        assert whole.usage.total_tokens == want["prompt_tokens"] + len(want["tokens"])
        chunks = list(ask(c, max_tokens=48, temperature=0, stream=True,
                          stream_options={"include_usage": True}))  # fmt: skip
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == want["text"]
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
        assert len({ch.id for ch in chunks}) == 1


def test_completions_greedy_equal_local_and_stop_at_the_length(cluster, expected):  # noqa: ANN001
    c = client(cluster.nodes[1])
    for prompt in PROMPTS:
        want = expected[prompt]
        whole = c.completions.create(model=MODEL, prompt=prompt, max_tokens=TOKENS, temperature=0)
        assert whole.choices[0].text == want["text"]
        assert whole.choices[0].finish_reason == want["finish_reason"] == "length"
        assert whole.usage.prompt_tokens == want["prompt_tokens"]
        assert whole.usage.completion_tokens == TOKENS
        streamed = c.completions.create(
            model=MODEL, prompt=prompt, max_tokens=TOKENS, temperature=0, stream=True
        )
        assert "".join(ch.choices[0].text for ch in streamed) == want["text"]


def test_seeded_sampling_is_reproducible_and_equals_local(cluster):  # noqa: ANN001
    want = local(PROMPTS[1], "--max-tokens", str(TOKENS), "--temperature", "0.9", "--seed", "7")
    c = client(cluster.nodes[0])
    texts = {
        c.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=TOKENS, temperature=0.9,
                             seed=7).choices[0].text
        for _ in range(2)
    }  # fmt: skip
    assert texts == {want["text"]}
    other = c.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=TOKENS,
                                 temperature=0.9, seed=8).choices[0].text  # fmt: skip
    assert other != want["text"]


def test_stop_strings_cut_the_text(cluster, expected):  # noqa: ANN001
    full = expected[PROMPTS[1]]["text"]
    stop = full[12:16]  # in the middle of the greedy text, maybe across tokens
    assert full.index(stop) == 12
    c = client(cluster.nodes[2], KEY)
    for stream in (False, True):
        answer = c.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=TOKENS,
                                      temperature=0, stop=["zzz", stop], stream=stream)  # fmt: skip
        chunks = list(answer) if stream else [answer]
        assert "".join(ch.choices[0].text for ch in chunks) == full[:12]
        assert chunks[-1].choices[0].finish_reason == "stop"


def post(url: str, body: object, headers: dict | None = None, raw: bytes | None = None,
         method: str = "POST") -> tuple[int, dict, dict]:  # fmt: skip
    """(status, JSON body, headers) of one plain HTTP request."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    data = raw if raw is not None else json.dumps(body).encode()
    conn.request(method, parts.path, body=data if method == "POST" else None,
                 headers={"Content-Type": "application/json", **(headers or {})})  # fmt: skip
    response = conn.getresponse()
    payload = response.read()
    conn.close()
    return response.status, json.loads(payload), dict(response.getheaders())


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
BAD = [  # (what, path, body or raw bytes, expected status)
    ("bad JSON", "/v1/chat/completions", b'{"messages": [', 400),
    ("not an object", "/v1/chat/completions", [1, 2], 400),
    ("no messages", "/v1/chat/completions", {"model": MODEL}, 400),
    ("a role we lack", "/v1/chat/completions", {**CHAT, "messages": [{"role": "robot"}]}, 400),
    ("a tool message with nothing", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "tool"}]}, 400),
    ("a tool without a name", "/v1/chat/completions",
     {**CHAT, "tools": [{"type": "function", "function": {}}]}, 400),
    ("a tool's parameters not a schema", "/v1/chat/completions",
     {**CHAT, "tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, 400),
    ("129 tools", "/v1/chat/completions", {**CHAT, "tools": [
        {"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, 400),
    ("tool_choice naming no tool", "/v1/chat/completions", {**CHAT, "tools": [
        {"type": "function", "function": {"name": "f"}}], "tool_choice": {
        "type": "function", "function": {"name": "g"}}}, 400),
    ("tools on completions", "/v1/completions", {"prompt": "a", "tools": []}, 400),
    ("temperature as text", "/v1/chat/completions", {**CHAT, "temperature": "hot"}, 400),
    ("n=2", "/v1/chat/completions", {**CHAT, "n": 2}, 400),
    ("negative max_tokens", "/v1/chat/completions", {**CHAT, "max_tokens": -5}, 400),
    ("five stop strings", "/v1/chat/completions", {**CHAT, "stop": list("abcde")}, 400),
    ("stream as text", "/v1/completions", {"prompt": "a", "stream": "yes"}, 400),
    ("prompt as a number", "/v1/completions", {"prompt": 7}, 400),
    ("unknown model", "/v1/chat/completions", {**CHAT, "model": "gpt-5"}, 404),
    ("prompt too long", "/v1/completions", {"prompt": "hello " * 9000}, 413),
    ("body too big", "/v1/completions", {"prompt": "x" * (17 << 20)}, 413),
    ("no such route", "/v1/embeddings", {"input": "a"}, 404),
]


def test_bad_requests_get_openai_errors_and_the_next_good_one_works(cluster):  # noqa: ANN001
    node = cluster.nodes[0]
    for what, path, body, status in BAD:
        raw = body if isinstance(body, bytes) else None
        got, payload, _ = post(node.api + path, body, raw=raw)
        assert got == status, (what, payload)
        error = payload["error"]
        assert set(error) == {"message", "type", "param", "code"}, what
        assert error["message"] and "Traceback" not in error["message"], what
        good, answer, _ = post(node.api + "/v1/chat/completions", CHAT)
        assert good == 200 and answer["choices"][0]["message"]["content"], what
    _, payload, _ = post(node.api + "/v1/chat/completions", {**CHAT, "n": 2})
    assert "only 1" in payload["error"]["message"] and payload["error"]["param"] == "n"
    got, payload, _ = post(node.api + "/v1/chat/completions", None, method="GET")
    assert got == 405 and "POST" in payload["error"]["message"]


def test_the_api_key_is_asked_for_and_checked(cluster):  # noqa: ANN001
    keyed = cluster.nodes[2]
    url = keyed.api + "/v1/chat/completions"
    for headers, code in [({}, "missing_api_key"), ({"Authorization": "Bearer nope"},
                                                    "invalid_api_key")]:  # fmt: skip
        got, payload, _ = post(url, CHAT, headers)
        assert got == 401 and payload["error"]["code"] == code
        assert post(keyed.api + "/v1/models", None, headers, method="GET")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        ask(client(keyed, "wrong"), max_tokens=2)
    good, answer, _ = post(url, CHAT, {"Authorization": f"Bearer {KEY}"})
    assert good == 200
    assert post(keyed.api + "/health", None, method="GET")[0] == 200  # probes need no key


def cluster_idle(cluster: Cluster, timeout: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        stats = [d.status()["stats"] for d in cluster.nodes]
        idle = all(s["cached_requests"] == 0 and s["requests_in_flight"] == 0 for s in stats)
        if idle or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def test_a_client_gone_mid_stream_frees_every_stage(cluster):  # noqa: ANN001
    node = cluster.nodes[1]
    parts = urlsplit(node.api)
    body = json.dumps({"prompt": "Tell me a long story", "max_tokens": 2000, "ignore_eos": True,
                       "stream": True}).encode()  # fmt: skip
    sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (len(body), body))  # fmt: skip
    seen = b""
    while seen.count(b"data: ") < 5:
        seen += sock.recv(65536)
    held = [d.status()["stats"]["cached_requests"] for d in cluster.nodes]
    assert held == [1, 1, 1]
    sock.close()
    stats = cluster_idle(cluster)
    assert all(s["cached_requests"] == 0 and s["requests_in_flight"] == 0 for s in stats), stats
    assert "client went away" in node.text()


def test_eight_clients_at_once_are_all_answered_right(cluster, expected):  # noqa: ANN001
    def one(i: int) -> tuple[str, str]:
        node = cluster.nodes[i % 3]
        prompt = PROMPTS[i % 2]
        c = client(node, KEY if i % 3 == 2 else "unused")
        kw = dict(model=MODEL, prompt=prompt, max_tokens=TOKENS, temperature=0)
        if i % 4 < 2:
            return prompt, c.completions.create(**kw).choices[0].text
        return prompt, "".join(ch.choices[0].text for ch in c.completions.create(**kw, stream=True))

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(8)))
    for prompt, text in answers:
        assert text == expected[prompt]["text"]
    assert cluster_idle(cluster)


def test_without_a_live_plan_requests_get_503_with_retry_after(tmp_path: Path):
    seed_capabilities(tmp_path / "alone")
    node = Daemon(tmp_path, "alone", free_port(), ["--no-mdns", "--max-memory", "1M"])
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                got, payload, headers = post(node.api + "/health", None, method="GET")
                if "do not fit" in payload["error"]["message"] or time.monotonic() > deadline:
                    break
            except OSError:
                assert node.proc.poll() is None, node.text()
            time.sleep(0.3)
        got, payload, headers = post(node.api + "/v1/chat/completions", CHAT)
        assert got == 503 and headers["Retry-After"] == "5", payload
        assert payload["error"]["code"] == "no_live_plan"
        assert "do not fit" in payload["error"]["message"]  # why: the plan's own error
    finally:
        node.stop()


def test_the_api_refuses_to_start_unsafe_or_on_a_taken_port(tmp_path: Path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    cases = [
        (["--api", f"127.0.0.1:{port}"], "cannot serve the API on"),
        (["--api", "0.0.0.0:7799"], "--api-key-file"),
        (["--api", "7700"], "expected HOST:PORT or off"),
        (["--api", "0.0.0.0:7799", "--api-key-file", str(tmp_path / "none")], "cannot read"),
    ]
    try:
        for args, words in cases:
            proc = run_cli("daemon", "--port", str(free_port()), "--no-mdns", "--data-dir",
                           str(tmp_path / "d"), *args, timeout=60)  # fmt: skip
            assert proc.returncode == 2, proc.stderr
            assert proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr
    finally:
        taken.close()


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}  # fmt: skip
ABOUT_PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]


def local_reply(messages: list[dict], forced: str | None = None, tokens: int = 48,
                tools: tuple = (WEATHER,)) -> tuple:  # fmt: skip
    """The oracle: the default model in this process (`generate --local`'s engine), greedy
    from the same prompt: the tools offered as the API offers them (prepared); a `forced`
    call's start after it, and its arguments kept to the tool's schema by the same grammar.
    Its (answer, [(name, arguments)]) as our parser reads them."""
    from node.engine.grammar import Constraint, grammar_of
    from node.engine.local import LocalPipeline, generate
    from node.engine.reasoning import PLAIN, split_calls
    from node.engine.sampling import SamplingParams
    from node.engine.weights import open_checkpoint

    ckpt = open_checkpoint(None)
    tok = ckpt.tokenizer()
    chat, offered = prepared(messages, list(tools), tok.chat_template)
    prompt = tok.encode_chat(chat, None, offered)
    start, constraint = "", None
    if forced:
        start = forced_start(HERMES, forced)
        prompt += tok.encode(start, add_special=False)
        grammar = grammar_of("tools", call_grammar(HERMES, list(tools), forced))
        constraint = Constraint(grammar, tok.backend, ckpt.config.vocab_size, tok.stop_ids)
    params = SamplingParams(temperature=0.0, whole=constraint is not None)
    pipeline = LocalPipeline(ckpt, quantize="auto")
    out = []
    for t in generate(pipeline.session(len(prompt) + tokens, params), prompt, tokens, params,
                      tok.stop_ids, None, constraint):  # fmt: skip
        if t in tok.stop_ids:
            break
        out.append(t)
    _, answer, calls = split_calls(PLAIN, start + tok.decode(out), HERMES)
    return answer, [(c.name, json.loads(c.arguments)) for c in calls]


def calls_of(message: object) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments))
            for c in message.tool_calls or []]  # fmt: skip


def streamed_calls(chunks: list) -> tuple[str, list[tuple[str, dict]], str]:
    """(content, calls, finish reason) of a stream, its tool-call deltas put together."""
    text, calls, finish = "", {}, None
    for ch in chunks:
        delta = ch.choices[0].delta
        text += delta.content or ""
        for d in delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"name": "", "arguments": ""})
            entry["name"] += (d.function.name or "") if d.function else ""
            entry["arguments"] += (d.function.arguments or "") if d.function else ""
            assert d.id is None or d.id.startswith("call_")
        finish = ch.choices[0].finish_reason or finish
    return text, [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())], finish


def test_a_named_tool_choice_is_called_streamed_or_not_as_local(cluster):  # noqa: ANN001
    """SmolLM2's template has no tools: they reach the model in Qwen's system prompt, the
    reply is made to begin the named call, and the call is read back out of it."""
    want = local_reply(ABOUT_PARIS, "get_weather")
    assert want[1] and want[1][0][0] == "get_weather"
    c = client(cluster.nodes[0])
    choice = {"type": "function", "function": {"name": "get_weather"}}
    whole = ask(c, ABOUT_PARIS[0]["content"], tools=[WEATHER], tool_choice=choice,
                temperature=0, max_tokens=48)  # fmt: skip
    answer = whole.choices[0]
    assert answer.finish_reason == "tool_calls"
    assert (answer.message.content or "", calls_of(answer.message)) == want
    assert answer.message.tool_calls[0].id.startswith("call_")
    chunks = list(ask(c, ABOUT_PARIS[0]["content"], tools=[WEATHER], tool_choice=choice,
                      temperature=0, max_tokens=48, stream=True))  # fmt: skip
    assert streamed_calls(chunks) == (*want, "tool_calls")


def test_a_tool_result_turn_and_tool_choice_none_answer_as_local(cluster, expected):  # noqa: ANN001
    """A conversation holding a call and its result (as the openai client sends them back)
    is answered as the same conversation is locally; tools with tool_choice none are not
    offered at all: the plain chat's answer."""
    c = client(cluster.nodes[1])
    turn = [*ABOUT_PARIS,
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C"}]  # fmt: skip
    whole = c.chat.completions.create(model=MODEL, messages=turn, tools=[WEATHER],
                                      temperature=0, max_tokens=48)  # fmt: skip
    parsed = [{**m, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]} if m.get("tool_calls") else m
        for m in turn]  # fmt: skip
    answer, calls = local_reply([{**m, "content": m["content"] or ""} for m in parsed])
    assert (whole.choices[0].message.content or "", calls_of(whole.choices[0].message)) == (
        answer, calls)
    plain = ask(c, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=48)
    assert plain.choices[0].message.content == expected[QUESTION]["text"]
    assert plain.choices[0].message.tool_calls is None


def claude(node: Daemon, key: str = "unused") -> object:
    import anthropic

    return anthropic.Anthropic(base_url=node.api, api_key=key, max_retries=0, timeout=120)


GREEDY = {"temperature": 0}  # the 2026 client has no sampling arguments of its own
CLAUDE_WEATHER = {"name": "get_weather", "description": "The weather in a city",
                  "input_schema": WEATHER["function"]["parameters"]}  # fmt: skip


def test_anthropic_messages_greedy_equal_local_streamed_or_not(cluster, expected):  # noqa: ANN001
    """The official `anthropic` client (x-api-key on the keyed node) asking under a Claude
    model name, as Claude Code does: the served model answers, as --local does."""
    want = expected[QUESTION]
    c = claude(cluster.nodes[2], KEY)
    kw = dict(model="claude-sonnet-4-5", max_tokens=48, extra_body=GREEDY,
              messages=[{"role": "user", "content": QUESTION}])  # fmt: skip
    whole = c.messages.create(**kw)
    assert [b.type for b in whole.content] == ["text"] and whole.content[0].text == want["text"]
    assert (whole.role, whole.model, whole.stop_reason) == ("assistant", MODEL, "end_turn")
    assert whole.usage.input_tokens == want["prompt_tokens"]
    assert whole.usage.output_tokens == len(want["tokens"])
    events = list(c.messages.create(**kw, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    assert "".join(e.delta.text for e in events[2:-3]) == want["text"]
    assert events[-2].delta.stop_reason == "end_turn"
    assert events[-2].usage.output_tokens == len(want["tokens"])
    with c.messages.stream(**kw) as s:  # the client's own accumulation of the events
        assert s.get_final_message().content[0].text == want["text"]
    assert c.messages.count_tokens(model="claude-sonnet-4-5", messages=kw["messages"]
                                   ).input_tokens == want["prompt_tokens"]  # fmt: skip


def test_anthropic_stop_sequences_and_errors(cluster, expected):  # noqa: ANN001
    import anthropic

    c = claude(cluster.nodes[0])
    cut = c.messages.create(model=MODEL, max_tokens=48, extra_body=GREEDY,
                            stop_sequences=["Paris"],
                            messages=[{"role": "user", "content": QUESTION}])  # fmt: skip
    assert cut.content[0].text == expected[QUESTION]["text"].partition("Paris")[0]
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", "Paris")
    status, body, _ = post(cluster.nodes[0].api + "/v1/messages", {  # the client needs it
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and body["type"] == "error" and "max_tokens" in body["error"]["message"]
    bad = [dict(max_tokens=8, messages=[{"role": "user", "content": [
               {"type": "image", "source": {"type": "base64", "data": "AA=="}}]}]),
           dict(max_tokens=8, messages=[{"role": "system", "content": "hi"}]),
           dict(max_tokens=8, messages=[{"role": "user", "content": "hi"}],
                tools=[CLAUDE_WEATHER], tool_choice={"type": "tool", "name": "nope"})]  # fmt: skip
    for body in bad:
        with pytest.raises(anthropic.BadRequestError) as e:
            c.messages.create(model=MODEL, **body)
        assert e.value.body["type"] == "error", body
        assert e.value.body["error"]["type"] == "invalid_request_error", body
    with pytest.raises(anthropic.AuthenticationError) as e:
        claude(cluster.nodes[2], "wrong-key-wrong-key").messages.create(
            model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["error"]["type"] == "authentication_error"


def test_anthropic_tool_use_round_trip_as_local(cluster):  # noqa: ANN001
    """A forced tool_use (tool_choice tool) comes back as a tool_use block, streamed or not;
    its tool_result sent back is answered as the same conversation is locally."""
    want = local_reply(ABOUT_PARIS, "get_weather")
    c = claude(cluster.nodes[1])
    kw = dict(model=MODEL, max_tokens=48, extra_body=GREEDY, tools=[CLAUDE_WEATHER],
              tool_choice={"type": "tool", "name": "get_weather"}, messages=ABOUT_PARIS)
    whole = c.messages.create(**kw)
    [use] = [b for b in whole.content if b.type == "tool_use"]
    text = "".join(b.text for b in whole.content if b.type == "text")
    assert (text, [(use.name, use.input)]) == want and whole.stop_reason == "tool_use"
    assert use.id.startswith("toolu_")
    with c.messages.stream(**kw) as s:
        final = s.get_final_message()
    [streamed] = [b for b in final.content if b.type == "tool_use"]
    assert (streamed.name, streamed.input) == (use.name, use.input)
    assert final.stop_reason == "tool_use"
    turn = [*ABOUT_PARIS, {"role": "assistant", "content": [
        {"type": "tool_use", "id": use.id, "name": use.name, "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": "Sunny, 24 C"}]}]  # fmt: skip
    answer = c.messages.create(model=MODEL, max_tokens=48, extra_body=GREEDY,
                               tools=[CLAUDE_WEATHER], messages=turn)  # fmt: skip
    same = [*ABOUT_PARIS, {"role": "assistant", "content": "", "tool_calls": [{
        "id": use.id, "type": "function", "function": {"name": use.name,
                                                        "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": use.id, "content": "Sunny, 24 C"}]  # fmt: skip
    text = "".join(b.text for b in answer.content if b.type == "text")
    calls = [(b.name, b.input) for b in answer.content if b.type == "tool_use"]
    assert (text, calls) == local_reply(same)


def test_ollama_chat_generate_and_tags_through_the_ollama_client(cluster, expected):  # noqa: ANN001
    """The official `ollama` client: chat streamed (its default) and not, generate (the
    prompt through the chat template, as Ollama does; raw: as is), the model list and its
    card; greedy answers equal --local's."""
    import ollama

    want = expected[QUESTION]
    c = ollama.Client(host=cluster.nodes[0].api)
    greedy = {"temperature": 0, "num_predict": 48}
    messages = [{"role": "user", "content": QUESTION}]
    whole = c.chat(model=MODEL, messages=messages, options=greedy, stream=False)
    assert whole.message.content == want["text"] and whole.done_reason == "stop"
    assert (whole.prompt_eval_count, whole.eval_count) == (want["prompt_tokens"],
                                                          len(want["tokens"]))  # fmt: skip
    parts = list(c.chat(model=f"{MODEL}:latest", messages=messages, options=greedy, stream=True))
    assert "".join(p.message.content for p in parts) == want["text"]
    assert [p.done for p in parts].count(True) == 1 and parts[-1].done
    made = c.generate(model=MODEL, prompt=QUESTION, options=greedy)
    assert made.response == want["text"]
    raw = c.generate(model=MODEL, prompt=PROMPTS[0], raw=True,
                     options={"temperature": 0, "num_predict": TOKENS})  # fmt: skip
    assert raw.response == expected[PROMPTS[0]]["text"] and raw.done_reason == "length"
    [listed] = c.list().models
    assert listed.model == MODEL and listed.details.family == "llama" and listed.size > 0
    card = c.show(MODEL)
    assert card.details.family == "llama" and "im_start" in card.template
    with pytest.raises(ollama.ResponseError) as e:
        c.chat(model="llama3.2", messages=messages, stream=False)
    assert e.value.status_code == 404 and "not served here" in e.value.error
    status, version, _ = post(cluster.nodes[0].api + "/api/version", None, method="GET")
    assert status == 200 and version["version"]


def test_ollama_tool_calls_as_local(cluster):  # noqa: ANN001
    import ollama

    # The tool as the client writes it (its schema model puts "required" first): the
    # prompt is then the same one as locally.
    parameters = {"type": "object", "required": ["city"],
                  "properties": {"city": {"type": "string"}}}  # fmt: skip
    tool = {"type": "function", "function": {**WEATHER["function"], "parameters": parameters}}
    want = local_reply(ABOUT_PARIS, tools=(tool,))  # auto: what the model does locally
    c = ollama.Client(host=cluster.nodes[1].api)
    whole = c.chat(model=MODEL, messages=ABOUT_PARIS, tools=[tool], stream=False,
                   options={"temperature": 0, "num_predict": 48})  # fmt: skip
    calls = [(t.function.name, dict(t.function.arguments)) for t in whole.message.tool_calls or []]
    assert (whole.message.content, calls) == want
    # A call and its result sent back in Ollama's own shapes (arguments an object, the
    # result named by its tool): answered as the same conversation is locally.
    turn = [*ABOUT_PARIS, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_name": "get_weather", "content": "Sunny, 24 C"}]  # fmt: skip
    same = [*ABOUT_PARIS, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "", "type": "function", "function": {"name": "get_weather",
                                                    "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": "get_weather", "content": "Sunny, 24 C"}]  # fmt: skip
    answer = c.chat(model=MODEL, messages=turn, tools=[tool], stream=False,
                    options={"temperature": 0, "num_predict": 48})  # fmt: skip
    assert (answer.message.content, []) == local_reply(same, tools=(tool,))


RESPONSES_WEATHER = {"type": "function", **WEATHER["function"]}  # the Responses API's shape


def test_responses_api_text_streamed_or_not_as_local(cluster, expected):  # noqa: ANN001
    want = expected[QUESTION]
    c = client(cluster.nodes[0])
    whole = c.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=48)
    assert whole.output_text == want["text"] and whole.status == "completed"
    assert (whole.usage.input_tokens, whole.usage.output_tokens) == (want["prompt_tokens"],
                                                                    len(want["tokens"]))
    events = list(c.responses.create(model=MODEL, input=QUESTION, temperature=0,
                                     max_output_tokens=48, stream=True))  # fmt: skip
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == want[
        "text"]
    assert events[-1].response.output_text == want["text"]
    cut = c.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=3)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"


def test_responses_api_function_calls_round_trip_as_local(cluster):  # noqa: ANN001
    want = local_reply(ABOUT_PARIS, "get_weather")
    c = client(cluster.nodes[1])
    kw = dict(model=MODEL, input=ABOUT_PARIS[0]["content"], tools=[RESPONSES_WEATHER],
              tool_choice={"type": "function", "name": "get_weather"}, temperature=0,
              max_output_tokens=48)  # fmt: skip
    whole = c.responses.create(**kw)
    calls = [(o.name, json.loads(o.arguments)) for o in whole.output if o.type == "function_call"]
    assert (whole.output_text, calls) == want
    events = list(c.responses.create(**kw, stream=True))
    done = [e.item for e in events if e.type == "response.output_item.done"
            and e.item.type == "function_call"]  # fmt: skip
    assert [(i.name, json.loads(i.arguments)) for i in done] == calls
    call_id = next(o.call_id for o in whole.output if o.type == "function_call")
    turn = [*ABOUT_PARIS, {"type": "function_call", "call_id": call_id, "name": "get_weather",
                           "arguments": '{"city": "Paris"}'},
            {"type": "function_call_output", "call_id": call_id, "output": "Sunny, 24 C"}]
    answer = c.responses.create(model=MODEL, input=turn, tools=[RESPONSES_WEATHER],
                                temperature=0, max_output_tokens=48)  # fmt: skip
    same = [*ABOUT_PARIS, {"role": "assistant", "content": "", "tool_calls": [{
        "id": call_id, "type": "function", "function": {"name": "get_weather",
                                                        "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "Sunny, 24 C"}]  # fmt: skip
    calls = [(o.name, json.loads(o.arguments)) for o in answer.output if o.type == "function_call"]
    assert (answer.output_text, calls) == local_reply(same)
    with pytest.raises(openai.BadRequestError):
        c.responses.create(model=MODEL, input="hi", previous_response_id=whole.id)


FORECAST = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 20},
    "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "sky": {"enum": ["sunny", "cloudy", "rain"]}},
    "required": ["city", "days", "sky"], "additionalProperties": False}  # fmt: skip
FORECAST_ASK = "Give me a weather forecast request for Paris as JSON."


def test_structured_output_parses_and_validates_on_every_sampled_run(cluster):  # noqa: ANN001
    """response_format json_schema with sampling on (temperature 1, five seeds, streamed
    and not): every reply is JSON that jsonschema accepts. The grammar works at the
    requester's sampler over whole rows of logits from the last stage."""
    import jsonschema

    c = client(cluster.nodes[0])
    fmt = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": FORECAST,
                                                   "strict": True}}  # fmt: skip
    for seed in range(5):
        kw = dict(response_format=fmt, temperature=1.0, seed=seed, max_tokens=120)
        reply = ask(c, FORECAST_ASK, **kw).choices[0]
        assert reply.finish_reason == "stop", reply
        jsonschema.validate(json.loads(reply.message.content), FORECAST)
        chunks = list(ask(c, FORECAST_ASK, stream=True, **kw))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == reply.message.content  # seeded: the same draws
    # Any object, greedy (sampled, an object with no schema may run past max_tokens: then
    # finish_reason says length, and the text is cut like any other)
    anything = ask(c, "What is the capital of France? Answer in JSON.", temperature=0,
                   response_format={"type": "json_object"}, max_tokens=120).choices[0]
    assert anything.finish_reason == "stop"
    assert json.loads(anything.message.content) == {"city": "Paris"}


def test_a_grammar_keeps_the_reply_to_it_and_bad_ones_are_a_400(cluster):  # noqa: ANN001
    """llama.cpp's `grammar` extension (GBNF), greedy: the reply is one of the grammar's;
    the Ollama route's `format` takes a schema too. A malformed schema, one no value can
    satisfy, a grammar naming a rule it lacks and a schema over 256 KiB: one 400 each."""
    c = client(cluster.nodes[1])
    verdict = ask(c, "Is Paris in France?", temperature=0, max_tokens=8,
                  extra_body={"grammar": 'root ::= "yes" | "no"'})  # fmt: skip
    assert verdict.choices[0].message.content in ("yes", "no")
    import jsonschema
    import ollama

    made = ollama.Client(host=cluster.nodes[1].api).chat(
        model=MODEL, messages=[{"role": "user", "content": FORECAST_ASK}], format=FORECAST,
        stream=False, options={"temperature": 0.8, "seed": 1, "num_predict": 120})
    jsonschema.validate(json.loads(made.message.content), FORECAST)
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(20000)}}
    for fmt in [{"type": "objectx"}, {"type": "string", "minLength": 5, "maxLength": 2}, big]:
        status, body, _ = post(cluster.nodes[1].api + "/v1/chat/completions", {
            **CHAT, "response_format": {"type": "json_schema", "json_schema": {
                "name": "x", "schema": fmt}}})  # fmt: skip
        assert status == 400 and body["error"]["param"] == "response_format", body
    status, body, _ = post(cluster.nodes[1].api + "/v1/chat/completions",
                           {**CHAT, "grammar": "root ::= undefined_rule"})  # fmt: skip
    assert status == 400 and "undefined_rule" in body["error"]["message"]


def test_logprobs_are_the_models_log_softmax_streamed_or_not(cluster, expected):  # noqa: ANN001
    """Chat `logprobs` with top_logprobs, and the legacy completions form: each token's
    log-probability and its alternatives equal log_softmax of the engine's whole logits
    row, decoded here a step at a time as the ring decodes (the ring's last stage sends only
    the logsumexp and the top few); sampled (temperature 0.7) they are still the raw
    model's."""
    import torch

    from node.engine.local import LocalPipeline
    from node.engine.sampling import SamplingParams
    from node.engine.weights import open_checkpoint

    ckpt = open_checkpoint(None)
    tok = ckpt.tokenizer()
    pipeline = LocalPipeline(ckpt, quantize="auto")

    def reference(prompt: list[int], tokens: list[int]) -> list[torch.Tensor]:
        """Each step's log_softmax: a temperature of 1 and no cut hand back the whole row."""
        step = pipeline.session(len(prompt) + len(tokens) + 1, SamplingParams(temperature=1.0))
        rows, at = [], len(prompt)
        rows.append(step(torch.tensor([prompt]), torch.arange(at)).logits)
        for t in tokens[:-1]:
            rows.append(step(torch.tensor([[t]]), torch.tensor([at])).logits)
            at += 1
        return [torch.log_softmax(r.float(), -1) for r in rows]

    c = client(cluster.nodes[0])
    prompt = tok.encode_chat([{"role": "user", "content": QUESTION}])
    for kw in (dict(temperature=0), dict(temperature=0.7, seed=4)):
        whole = ask(c, max_tokens=12, logprobs=True, top_logprobs=3, **kw).choices[0]
        content = whole.logprobs.content
        tokens = tok.encode(whole.message.content, add_special=False)[: len(content)]
        assert "".join(e.token for e in content) == whole.message.content[: len(
            "".join(e.token for e in content))]  # fmt: skip
        want = reference(prompt, tokens)
        for i, (e, row) in enumerate(zip(content, want, strict=False)):
            assert abs(e.logprob - float(row[tokens[i]])) < 1e-4, (i, e)
            top = torch.topk(row, 3)
            assert [t.logprob for t in e.top_logprobs] == pytest.approx(
                top.values.tolist(), abs=1e-4)  # fmt: skip
        chunks = list(ask(c, max_tokens=12, logprobs=True, top_logprobs=3, stream=True, **kw))
        streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs
                    for e in ch.choices[0].logprobs.content]  # fmt: skip
        assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
            (e.token, round(e.logprob, 4)) for e in content]
    legacy = c.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0,
                                  logprobs=2).choices[0]  # fmt: skip
    lp = legacy.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert "".join(lp.tokens) == legacy.text and all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert max(lp.top_logprobs[0].values()) == pytest.approx(lp.token_logprobs[0])  # greedy
