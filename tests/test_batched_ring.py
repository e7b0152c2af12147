"""Many requests at once through a 3-node ring whose stages batch them: every request computes
what it computes alone, a cancelled one leaves the others exact, and a long prompt arriving
goes in chunks beside the running streams instead of stopping them.

The oracle is the unbatched engine (`generate --local`'s, itself exact against transformers),
fed each request's tokens: every token the ring chose must be that engine's greedy choice,
or within TOLERANCE of its best logit. Batched passes round differently from one-row ones
(float32 throughout here, weights included, so nothing else does), by ~1e-5 on logits of
magnitude 10-30; a near-tie closer than TOLERANCE may go either way, and the request then
goes on from the ring's token, which the oracle follows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import openai
import pytest
import torch

from node.engine.local import LocalPipeline
from node.engine.weights import open_checkpoint
from tests.conftest import run_cli
from tests.daemons import EXACT_RING, Cluster

TOLERANCE = 1e-3  # logits
CHUNK = 64
# One thread each: three daemons share two cores here, and with two each the stages that
# compute at once (a prompt's chunks in a pipeline) spin on OpenMP barriers while their
# partner thread waits for a core: a 64-position pass took 0.3-0.4 s instead of 0.05.
RING = [*EXACT_RING, "--quantize", "none", "--prefill-chunk", str(CHUNK), "--threads", "1"]
THIRDS = {0: ["--layers", "0:10"], 1: ["--layers", "10:20"], 2: ["--layers", "20:30"]}
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a village at the edge of a great forest, there lived",
    "def fibonacci(n):",
    "List three primary colors and say why painters call them primary.",
    "Water boils at",
    "In 1969 the first humans walked on the Moon. Describe what they brought back and why "
    "scientists still study those samples today.",
    "Hello",
    "The three laws of motion were written by",
]
TOKENS = 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    c = Cluster(tmp_path_factory.mktemp("batched"), 3, RING, THIRDS)
    yield c
    c.stop()


@pytest.fixture(scope="module")
def alone() -> tuple[LocalPipeline, object]:
    """The unbatched engine on the same float32 weights, and the tokenizer."""
    ckpt = open_checkpoint(None)
    return LocalPipeline(ckpt, quantize="none"), ckpt.tokenizer()


def chosen_greedily(pipeline: LocalPipeline, prompt: list[int], tokens: list[int]) -> int:
    """Check each of `tokens` against the unbatched engine fed the tokens before it; the
    number that were its exact argmax."""
    caches = pipeline.new_caches(len(prompt) + len(tokens))
    ids, positions, exact = torch.tensor([prompt]), torch.arange(len(prompt)), 0
    with torch.inference_mode():
        for i, token in enumerate(tokens):
            logits = pipeline.forward(ids, positions, caches, last_only=True)[0, -1]
            best = float(logits.max())
            assert float(logits[token]) >= best - TOLERANCE, (
                f"token {i}: {token} scores {float(logits[token]):.5f}, best "
                f"{int(logits.argmax())} {best:.5f}"
            )
            exact += int(logits.argmax()) == token
            ids, positions = torch.tensor([[token]]), positions[-1:] + 1
    return exact


def start_client(node, prompt: str, *args: str) -> subprocess.Popen:  # noqa: ANN001
    cmd = [sys.executable, "-m", "node.cli", "generate", "--node", node.address, prompt,
           "--json", "--ignore-eos", *args]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def results(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr
        out.append(json.loads(stdout))
    return out


def concurrently(cluster: Cluster, prompts: list[str], *args: str, stagger: float = 0.15
                 ) -> list[dict]:  # fmt: skip
    """The prompts as clients of different requesters, each starting `stagger` s after the
    one before: they join a batch that is already running."""
    procs = []
    for i, prompt in enumerate(prompts):
        procs.append(start_client(cluster.nodes[i % 3], prompt, *args))
        time.sleep(stagger)
    return results(procs)


@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_k_concurrent_greedy_requests_each_compute_what_they_compute_alone(cluster, alone, k):  # noqa: ANN001
    pipeline, tokenizer = alone
    outs = concurrently(cluster, PROMPTS[:k], "--max-tokens", str(TOKENS))
    # read before the local checks: status's batch sizes are of the last few seconds' passes
    batches = [n["batch"] for n in cluster.nodes[0].status()["nodes"]]
    exact = 0
    for prompt, out in zip(PROMPTS[:k], outs, strict=True):
        assert len(out["tokens"]) == TOKENS
        exact += chosen_greedily(pipeline, tokenizer.encode_prompt(prompt, False), out["tokens"])
    print(f"k={k}: {exact}/{k * TOKENS} tokens the unbatched argmax; mean batches {batches}")
    if k >= 5:  # they did run together
        assert max(batches) > 1.5, batches


def test_seeded_sampling_is_reproducible_per_request_in_a_batch(cluster):  # noqa: ANN001
    seeds = [("--temperature", "0.8", "--top-p", "0.9", "--seed", str(s)) for s in (1, 2, 3, 4)]
    procs = []
    for i, sampling in enumerate(seeds):
        procs.append(start_client(cluster.nodes[i % 3], PROMPTS[i], "--max-tokens", "16",
                                  *sampling))  # fmt: skip
        time.sleep(0.1)
    ring = results(procs)
    for i, sampling in enumerate(seeds):
        local = run_cli("generate", "--local", "--quantize", "none", "--threads", "1", "--json",
                        "--ignore-eos", PROMPTS[i], "--max-tokens", "16", *sampling)  # fmt: skip
        assert local.returncode == 0, local.stderr
        assert ring[i]["tokens"] == json.loads(local.stdout)["tokens"], sampling


def test_a_lone_prompt_longer_than_a_chunk_computes_what_local_computes(cluster):  # noqa: ANN001
    """The stages take it in chunks; `generate --local` chunks its prefill the same way, so
    one request alone is bit for bit the same run (greedy tokens equal, not within a
    tolerance)."""
    prompt = " ".join(PROMPTS) * 2  # ~190 tokens: three chunks of 64
    args = ("--json", "--ignore-eos", "--max-tokens", "24", prompt)
    ring = cluster.nodes[1].cli("generate", "--node", cluster.nodes[1].address, *args)
    local = run_cli("generate", "--local", "--quantize", "none", "--threads", "1",
                    "--prefill-chunk", str(CHUNK), *args)  # fmt: skip
    assert ring.returncode == 0 and local.returncode == 0, (ring.stderr, local.stderr)
    ring_out, local_out = json.loads(ring.stdout), json.loads(local.stdout)
    assert ring_out["prompt_tokens"] > 2 * CHUNK
    assert ring_out["tokens"] == local_out["tokens"]


def test_a_request_cancelled_mid_batch_leaves_the_others_exact(cluster, alone):  # noqa: ANN001
    pipeline, tokenizer = alone
    # The one cancelled could not end first: it asks for far more tokens than the others.
    procs = [start_client(cluster.nodes[i % 3], PROMPTS[i], "--max-tokens",
                          "1000" if i == 1 else "60") for i in range(4)]  # fmt: skip
    deadline = time.monotonic() + 60
    while cluster.nodes[1].status()["stats"]["requests_in_flight"] == 0:  # procs[1] runs there
        assert time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(0.5)  # a few tokens in
    procs[1].kill()
    procs[1].wait()
    outs = results([procs[0], procs[2], procs[3]])
    for i, out in zip((0, 2, 3), outs, strict=True):
        chosen_greedily(pipeline, tokenizer.encode_prompt(PROMPTS[i], False), out["tokens"])
    deadline = time.monotonic() + 10
    while any(n["requests"] for n in cluster.nodes[0].status()["nodes"]):
        assert time.monotonic() < deadline, "the cancelled request's caches were not freed"
        time.sleep(0.2)
    assert "client went away" in cluster.nodes[1].text()


def test_a_long_prompt_goes_in_chunks_beside_the_running_streams(cluster):  # noqa: ANN001
    """4 streams decode; a 3000-token prompt arrives. Each stage computes it a chunk per pass
    next to the decodes, so the streams' tokens keep coming: the longest gap between two
    tokens of a stream is a few chunks' time, not the prompt's."""
    arrivals: list[list[float]] = [[] for _ in range(4)]

    def stream(i: int) -> None:
        client = openai.OpenAI(base_url=f"{cluster.nodes[i % 3].api}/v1", api_key="unused",
                               max_retries=0, timeout=300)  # fmt: skip
        chunks = client.completions.create(
            model="SmolLM2-135M-Instruct", prompt=PROMPTS[i], max_tokens=150, temperature=0,
            stream=True, extra_body={"ignore_eos": True},
        )  # fmt: skip
        for _ in chunks:
            arrivals[i].append(time.monotonic())

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    while min(len(a) for a in arrivals) < 10:
        time.sleep(0.05)
    began = time.monotonic()
    long = cluster.nodes[2].cli("generate", "--node", cluster.nodes[2].address, "--json",
                                "word " * 3000, "--max-tokens", "1")  # fmt: skip
    ended = time.monotonic()
    for t in threads:
        t.join(timeout=300)
    assert long.returncode == 0, long.stderr
    prompt_tokens = json.loads(long.stdout)["prompt_tokens"]
    assert prompt_tokens > 2900
    prefill = ended - began
    chunk_s = prefill / (prompt_tokens / CHUNK)  # one chunk through one stage, about
    gaps = [(b, b - a) for s in arrivals for a, b in zip(s, s[1:], strict=False)]
    before = [gap for t, gap in gaps if t < began]
    during = [gap for t, gap in gaps if began < t < ended]
    tpot = sorted(before)[len(before) // 2]
    print(f"prefill {prefill:.2f}s of {prompt_tokens} tokens, ~{chunk_s * 1e3:.0f} ms a chunk; "
          f"streams' TPOT before {tpot * 1e3:.0f} ms, longest gap during "
          f"{max(during) * 1e3:.0f} ms over {len(during)} tokens")  # fmt: skip
    assert len(during) >= 8, "the streams stopped while the prompt was computed"
    # A step crosses three stages; at each it may wait for the pass under way, then go in
    # the next: two passes with a chunk a stage, the late chunks (attending to most of the
    # prompt) up to 1.5x the mean. Unchunked, the prompt would hold each stage for a third
    # of the prefill or more.
    assert max(during) < 9 * chunk_s + 3 * tpot, (max(during), chunk_s, tpot)
    assert max(during) < prefill / 4
