"""The HTTP API against what a hostile web page or client sends, through real sockets to two
live daemons: a keyed API on every address over plain HTTP, and one over HTTPS."""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from node.cluster.api import MAX_CLIENTS, Backoff
from tests.conftest import run_cli
from tests.daemons import EXACT_RING, Cluster, free_port

KEY = "a-key-long-enough-to-keep"
AUTH = {"Authorization": f"Bearer {KEY}"}
JSON = {"Content-Type": "application/json"}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key."""
    root = tmp_path_factory.mktemp("tls")
    cert, key = root / "cert.pem", root / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, certs: tuple[Path, Path]):  # noqa: ANN201
    root = tmp_path_factory.mktemp("guard")
    (root / "key").write_text(KEY)
    ports = [free_port(), free_port()]
    keyed = ["--api-key-file", str(root / "key")]
    c = Cluster(root, 2, EXACT_RING, per_node={
        0: ["--api", f"0.0.0.0:{ports[0]}", "--api-host", "ringinfer.lan", *keyed],
        1: ["--api", f"127.0.0.1:{ports[1]}", "--api-tls-cert", str(certs[0]),
            "--api-tls-key", str(certs[1]), *keyed],
    })  # fmt: skip
    c.ports = ports
    yield c
    c.stop()


def call(
    port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
    tls: ssl.SSLContext | None = None, source: str = "127.0.0.1", timeout: float = 60,
) -> tuple[int, dict, dict]:  # fmt: skip
    """(status, JSON body, headers) of one request, sent with exactly these headers (Host
    too, when given) from `source`."""
    if tls:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=tls)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout,
                                          source_address=(source, 0))  # fmt: skip
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        payload = response.read()
    finally:
        conn.close()
    text = payload.decode(errors="replace")
    data = json.loads(payload) if payload.startswith(b"{") else {"text": text}
    return response.status, data, dict(response.getheaders())


def chat(port: int, body: object = CHAT, **headers: str) -> tuple[int, dict, dict]:
    return call(port, "POST", "/v1/chat/completions", json.dumps(body).encode(),
                {**JSON, **AUTH, **headers})  # fmt: skip


def is_error(payload: dict, code: str | None = None) -> bool:
    """OpenAI's error object, with a message and no trace (and `code`, when given)."""
    error = payload.get("error", {})
    if set(error) != {"message", "type", "param", "code"} or "Traceback" in error["message"]:
        return False
    return bool(error["message"]) and code in (None, error["code"])


def test_a_name_that_is_not_ours_is_misdirected(cluster):  # noqa: ANN001
    """DNS rebinding: a page of attacker.example whose name now resolves to 127.0.0.1."""
    port = cluster.ports[0]
    for path in ("/v1/status", "/v1/models", "/", "/health"):
        got, payload, _ = call(port, "GET", path, headers={"Host": "attacker.example", **AUTH})
        assert got == 421 and is_error(payload, "misdirected_request"), (path, payload)
    got, payload, _ = chat(port, Host=f"attacker.example:{port}")
    assert got == 421 and "attacker.example" in payload["error"]["message"]
    for host in (f"127.0.0.1:{port}", "localhost", f"LOCALHOST:{port}", f"[::1]:{port}",
                 "ringinfer.lan", f"ringinfer.lan:{port}", f"10.0.0.7:{port}"):  # fmt: skip
        got, payload, _ = call(port, "GET", "/v1/models", headers={"Host": host, **AUTH})
        assert got == 200, (host, payload)
    assert chat(port, Host=f"localhost:{port}")[0] == 200


def test_a_page_of_another_origin_is_refused_the_own_page_is_not(cluster):  # noqa: ANN001
    port = cluster.ports[0]
    for origin in ("http://evil.example", f"http://evil.example:{port}", "null",
                   f"http://127.0.0.1:{port + 1}", f"https://127.0.0.1:{port}"):  # fmt: skip
        got, payload, _ = chat(port, Origin=origin)
        assert got == 403 and is_error(payload, "cross_origin"), (origin, payload)
        got, _, _ = call(port, "GET", "/v1/status", headers={"Origin": origin, **AUTH})
        assert got == 403, origin
    assert chat(port, Origin=f"http://127.0.0.1:{port}")[0] == 200  # the page's own requests
    got, _, _ = chat(port, Origin=f"http://localhost:{port}", Host=f"localhost:{port}")
    assert got == 200


def test_a_body_that_is_not_typed_json_is_refused(cluster):  # noqa: ANN001
    """text/plain and forms are what a page may POST anywhere without asking (no CORS
    preflight): their bodies are never read, even when they are JSON."""
    port, body = cluster.ports[0], json.dumps(CHAT).encode()
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                 "text/plain; charset=application/json", None):  # fmt: skip
        headers = {**AUTH, **({"Content-Type": kind} if kind else {})}
        got, payload, _ = call(port, "POST", "/v1/completions", body, headers)
        assert got == 415 and is_error(payload, "unsupported_media_type"), (kind, payload)
    headers = {**AUTH, "Content-Type": "application/json; charset=utf-8"}
    assert call(port, "POST", "/v1/chat/completions", body, headers)[0] == 200


def test_wrong_keys_from_one_address_back_off_and_a_good_one_clears_it(cluster):  # noqa: ANN001
    port, guesser = cluster.ports[0], "127.0.0.2"
    wrong = {"Authorization": "Bearer not-the-key-at-all", **JSON}
    body = json.dumps(CHAT).encode()

    def send(headers: dict) -> tuple[int, dict, dict]:
        return call(port, "POST", "/v1/chat/completions", body, headers, source=guesser)

    assert [send(wrong)[0] for _ in range(5)] == [401] * 5
    got, payload, headers = send({**AUTH, **JSON})  # even the right key waits now
    assert got == 429 and headers["Retry-After"] == "1" and is_error(payload)
    assert chat(port)[0] == 200  # another address is not held up
    time.sleep(1.1)
    assert send(wrong)[0] == 401
    got, _, headers = send(wrong)
    assert got == 429 and headers["Retry-After"] == "2"  # twice as long each time
    time.sleep(2.1)
    assert send({**AUTH, **JSON})[0] == 200
    assert send(wrong)[0] == 401 and send({**AUTH, **JSON})[0] == 200  # forgiven


def test_the_back_off_table_is_bounded():
    backoff = Backoff()
    for i in range(3 * MAX_CLIENTS):
        backoff.failed(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", float(i))
    assert len(backoff.table) == MAX_CLIENTS
    for _ in range(6):
        backoff.failed("192.0.2.1", 0.0)
    assert backoff.wait("192.0.2.1", 0.0) == 2.0


def test_https_serves_and_a_key_in_clear_is_a_problem_in_status(cluster, certs):  # noqa: ANN001
    plain, secure = cluster.ports
    tls = ssl.create_default_context(cafile=str(certs[0]))
    got, payload, _ = call(secure, "GET", "/v1/models", headers=AUTH, tls=tls)
    assert got == 200 and payload["data"], payload
    got, payload, _ = call(secure, "POST", "/v1/chat/completions", json.dumps(CHAT).encode(),
                           {**JSON, **AUTH, "Origin": f"https://127.0.0.1:{secure}"},
                           tls=tls)  # fmt: skip
    assert got == 200 and payload["choices"][0]["message"]["content"], payload
    got, _, _ = call(secure, "GET", "/v1/models", headers={**AUTH, "Origin": "http://127.0.0.1"},
                     tls=tls)  # fmt: skip
    assert got == 403
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        call(secure, "GET", "/v1/models", headers=AUTH)  # plain HTTP to the TLS port
    assert "https://127.0.0.1" in cluster.nodes[1].text()
    problems = [p["problem"] for p in cluster.nodes[0].status()["problems"]]
    assert any("plain HTTP" in p for p in problems), problems
    problems = [p["problem"] for p in cluster.nodes[1].status()["problems"]]
    assert not any("plain HTTP" in p for p in problems), problems


HOSTILE_NUMBERS = [  # (what, raw body): each a 400 naming why, never a 500
    ("1e400", b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": 1e400}'),
    ("-1e400", b'{"messages": [{"role": "user", "content": "Hi"}], "top_p": -1e400}'),
    ("Infinity", b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": Infinity}'),
    ("NaN", b'{"messages": [{"role": "user", "content": "Hi"}], "top_p": NaN}'),
    ("1e400 in kwargs", b'{"messages": [{"role": "user", "content": "Hi"}], '
                        b'"chat_template_kwargs": {"x": 1e400}}'),
    ("seed 2^64", b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, '
                  b'"seed": 18446744073709551616}'),
    ("seed -2^64", b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, '
                   b'"seed": -18446744073709551616}'),
    ("max_tokens 1e30", b'{"messages": [{"role": "user", "content": "Hi"}], '
                        b'"max_tokens": 1000000000000000000000000000000}'),
    ("top_k 1e30", b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, '
                   b'"top_k": 1000000000000000000000000000000}'),
    ("5000 digits", b'{"messages": [{"role": "user", "content": "Hi"}], "seed": 1'
                    + b"0" * 5000 + b"}"),
    ("nested 100k", b"[" * 100_000 + b"]" * 100_000),
    ("nested in a message", b'{"messages": [{"role": "user", "content": '
                            + b"[" * 100_000 + b"]" * 100_000 + b"}]}"),
    ("4097 messages", json.dumps({"messages": [{"role": "user", "content": "a"}] * 4097})
                      .encode()),
    ("a long stop string", json.dumps({**CHAT, "stop": "x" * 1001}).encode()),
]  # fmt: skip


def test_hostile_numbers_and_nesting_are_400s_never_internal_errors(cluster):  # noqa: ANN001
    port, node = cluster.ports[0], cluster.nodes[0]
    for what, raw in HOSTILE_NUMBERS:
        got, payload, _ = call(port, "POST", "/v1/chat/completions", raw, {**JSON, **AUTH})
        assert got == 400 and is_error(payload), (what, payload)
        assert len(payload["error"]["message"]) < 300, what
        assert chat(port)[0] == 200, what
    log = node.text()
    assert "internal error" not in log and "Traceback" not in log


def test_health_and_heartbeats_keep_time_while_huge_requests_arrive(cluster):  # noqa: ANN001
    """16 MiB prompts, 300k- and 400k-message chats and 16 MiB of empty arrays, all at once,
    refused while /health, asked every 20 ms from another thread, answers within 0.5 s and
    no peer drops the node."""
    port, node = cluster.ports[0], cluster.nodes[0]
    epoch = node.status()["epoch"]
    prompt = json.dumps({"prompt": "x" * ((16 << 20) - 64)}).encode()
    assert len(prompt) <= 16 << 20

    def messages(n: int) -> bytes:
        return json.dumps({"messages": [{"role": "user", "content": "a"}] * n}).encode()

    hostile = [
        ("/v1/completions", prompt, 413), ("/v1/completions", prompt, 413),
        ("/v1/chat/completions", messages(400_000), 400),
        ("/v1/chat/completions", messages(300_000), 400),  # parsed, then over 4096 messages
        ("/v1/chat/completions", b"[" + b"[]," * ((16 << 20) // 3 - 1) + b"[]]", 400),
    ]  # fmt: skip
    latencies: list[float] = []
    done = threading.Event()

    def probe() -> None:
        while not done.is_set():
            began = time.perf_counter()
            got, _, _ = call(port, "GET", "/health", timeout=30)
            latencies.append(time.perf_counter() - began)
            assert got == 200
            time.sleep(0.02)

    def attack(case: tuple[str, bytes, int]) -> tuple[int, dict, float]:
        path, body, _ = case
        began = time.perf_counter()
        got, payload, _ = call(port, "POST", path, body, {**JSON, **AUTH}, timeout=120)
        return got, payload, time.perf_counter() - began

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        time.sleep(0.3)
        began = time.perf_counter()
        with ThreadPoolExecutor(len(hostile)) as pool:
            answers = list(pool.map(attack, hostile))
        took = time.perf_counter() - began
        time.sleep(0.3)
    finally:
        done.set()
        prober.join()
    for (path, _, status), (got, payload, _) in zip(hostile, answers, strict=True):
        assert got == status and is_error(payload), (path, payload)
    assert "4096" in answers[3][1]["error"]["message"]
    assert answers[0][1]["error"]["code"] == "context_length_exceeded"
    assert len(latencies) > 10 and max(latencies) < 0.5, (max(latencies), took)
    statuses = [d.status() for d in cluster.nodes]
    assert [s["epoch"] for s in statuses] == [epoch, epoch]  # no one left, no re-plan
    assert all(len(s["nodes"]) == 2 for s in statuses)
    assert chat(port)[0] == 200


def test_short_keys_and_half_tls_are_refused_at_start(tmp_path: Path, certs):  # noqa: ANN001
    (tmp_path / "short").write_text("hunter2hunter2\n")
    cases = [
        (["--api-key-file", str(tmp_path / "short")], "14-byte key"),
        (["--api-tls-cert", str(certs[0])], "go together"),
        (["--api-tls-cert", str(certs[1]), "--api-tls-key", str(certs[1])], "cannot load"),
        (["--api-tls-cert", str(tmp_path / "none"), "--api-tls-key", str(certs[1])],
         "cannot load"),
    ]  # fmt: skip
    for args, words in cases:
        proc = run_cli("daemon", "--port", str(free_port()), "--no-mdns", "--data-dir",
                       str(tmp_path / "d"), "--api", f"127.0.0.1:{free_port()}", *args,
                       timeout=60)  # fmt: skip
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr


def test_a_ring_client_prompt_too_long_is_refused_by_its_bytes_at_once(cluster):  # noqa: ANN001
    """`generate --node`'s path (the ring's GENERATE): a 4 MiB prompt is refused by its size
    (the frame's header bound, before the context's bytes bound), a 60 KB one after it is
    tokenized off the event loop, and a short one through the same daemon still generates."""
    from node.cluster.client import Client
    from node.engine.sampling import SamplingParams
    from node.errors import RinginferError

    node = cluster.nodes[0]
    sampling = SamplingParams().to_json()
    with Client(node.address) as client:
        began = time.perf_counter()
        with pytest.raises(RinginferError, match="bytes"):
            list(client.generate(30, prompt="x" * (4 << 20), max_tokens=2, sampling=sampling))
        with pytest.raises(RinginferError, match="context holds"):
            list(client.generate(30, prompt="x " * 30_000, max_tokens=2, sampling=sampling))
        assert time.perf_counter() - began < 5
        replies = list(client.generate(60, prompt="Hi", max_tokens=2, sampling=sampling))
    assert replies[-1].kind.name == "DONE"
