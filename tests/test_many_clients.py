"""64 clients at once against a ring whose stages each fit 8 requests' caches: every request
is accounted for (completed, exact, or refused `busy` when the queues are full), none hangs,
and the daemons' memory stays bounded by what they offered."""

from __future__ import annotations

import functools
import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

from node.cluster.planner import HEADROOM, ModelShape, StageSpec, stage_bytes
from node.engine.shapes import shape_of
from node.engine.weights import layer_format, open_checkpoint
from tests.conftest import run_cli
from tests.daemons import EXACT_RING, Cluster

MODEL = "SmolLM2-135M-Instruct"
CLIENTS = 64
FITS = 8  # requests whose caches each stage has room for
CAPACITY = 512  # KV positions each request holds on every stage
QUEUE = 12  # --max-queue of each requester
STAGES = [(0, 10), (10, 20), (20, 30)]
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):",
           "The three primary colors are"]  # fmt: skip


@functools.cache
def default_shape() -> ModelShape:
    """The default model's shape as a daemon on this CPU holds it."""
    ckpt = open_checkpoint(None)
    fmt = layer_format(ckpt, "auto", torch.device("cpu"))
    return shape_of(ckpt.family, ckpt.config, torch.float32, torch.float32, fmt)


def memory_for(start: int, end: int) -> tuple[int, int]:
    """(--max-memory that fits FITS and a half requests beside the stage's weights, the
    bytes one request's caches take there), by the sizes the daemon itself uses."""
    shape = default_shape()
    need = shape.kv_bytes * (end - start) * CAPACITY
    weights = stage_bytes(StageSpec("", start, end), shape)
    return int((weights + (FITS + 0.5) * need) / HEADROOM), need


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    per_node = {}
    for i, (start, end) in enumerate(STAGES):
        memory, _ = memory_for(start, end)
        per_node[i] = ["--layers", f"{start}:{end}", "--max-memory", str(memory)]
    c = Cluster(tmp_path_factory.mktemp("many"), 3, [*EXACT_RING, "--max-queue", str(QUEUE)],
                per_node)  # fmt: skip
    yield c
    c.stop()


@pytest.fixture(scope="module")
def expected() -> dict[str, tuple[str, str, int]]:
    """Per prompt: (the stop string, the text before it, max_tokens for CAPACITY positions),
    from --local's greedy text; the stop string ends each request early."""
    out = {}
    for prompt in PROMPTS:
        proc = run_cli("generate", "--local", "--json", prompt, "--max-tokens", "24")
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        text, at = result["text"], 24
        while text.index(text[at:at + 3]) != at:
            at += 1
        out[prompt] = (text[at:at + 3], text[:at], CAPACITY + 1 - result["prompt_tokens"])
    return out


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def test_64_clients_are_all_completed_exactly_or_refused_busy(cluster, expected):  # noqa: ANN001
    pids = [d.proc.pid for d in cluster.nodes]
    before = [rss(p) for p in pids]
    peak = list(before)
    most_cached, most_queued = [0, 0, 0], [0, 0, 0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for i, (p, d) in enumerate(zip(pids, cluster.nodes, strict=True)):
                peak[i] = max(peak[i], rss(p))
                with urllib.request.urlopen(f"{d.api}/v1/status", timeout=30) as r:
                    stats = json.load(r)["stats"]
                most_cached[i] = max(most_cached[i], stats["cached_requests"])
                most_queued[i] = max(most_queued[i], stats["queued"])
            time.sleep(0.05)

    def one(i: int) -> tuple[str, str]:
        prompt = PROMPTS[i % len(PROMPTS)]
        stop, _, max_tokens = expected[prompt]
        c = openai.OpenAI(base_url=f"{cluster.nodes[i % 3].api}/v1", api_key="unused",
                          max_retries=0, timeout=300)  # fmt: skip
        kw = dict(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stop=[stop])
        try:
            if i % 2:
                return prompt, c.completions.create(**kw).choices[0].text
            chunks = c.completions.create(**kw, stream=True)
            return prompt, "".join(ch.choices[0].text for ch in chunks)
        except openai.APIStatusError as e:
            assert e.status_code == 503, e
            assert e.body["code"] == "busy", e.body
            return prompt, "busy"

    watcher = threading.Thread(target=watch)
    watcher.start()
    began = time.monotonic()
    try:
        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(one, i) for i in range(CLIENTS)]
            answers = [f.result(timeout=max(1, 600 - (time.monotonic() - began)))
                       for f in futures]  # fmt: skip
    finally:
        done.set()
        watcher.join()

    completed = [(p, text) for p, text in answers if text != "busy"]
    for prompt, text in completed:
        assert text == expected[prompt][1], prompt
    busy = CLIENTS - len(completed)
    grown = [(peak[i] - before[i]) >> 20 for i in range(3)]
    print(f"{len(completed)} completed, {busy} busy in {time.monotonic() - began:.0f}s; most "
          f"cached {most_cached}, most queued {most_queued}, RSS grew {grown} MiB")  # fmt: skip
    assert len(completed) >= FITS + QUEUE, f"{len(completed)} completed, {busy} busy"
    assert 0 < max(most_cached) <= FITS, f"most requests cached at once: {most_cached}"
    assert max(most_queued) > 0, "no request ever waited in a queue"
    for i, (start, end) in enumerate(STAGES):
        _, need = memory_for(start, end)
        grew = peak[i] - before[i]
        assert grew < FITS * need + (96 << 20), f"node{i + 1} grew {grew >> 20} MiB"
    for d in cluster.nodes:
        assert d.proc.poll() is None
        status = d.status()
        assert status["stats"]["cached_requests"] == 0 and not status["stats"]["queued"]
