"""Continuous batching in one stage: what runs together (a pure decision), and that a packed
pass over several requests, prompts in chunks, computes what each request computes alone."""

from __future__ import annotations

import pytest
import torch

from node.engine.batching import Work, next_batch
from node.engine.local import LocalPipeline
from node.engine.perplexity import score
from node.engine.sampling import Candidates, SamplingParams
from node.engine.shard import Shard
from node.engine.weights import open_checkpoint
from protocol.wire import Piece

# Float32, packed against alone: the matmuls see other rows and other chunk sizes, so sums
# round in other orders. Observed differences stay below 1e-5; logits of these models are
# of order 1-10.
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def work(req: str, start: int, count: int, step: int = 1, end: int | None = None) -> Work:
    body = {"requester": "n", "capacity": 64, "sampling": {}} if start == 0 else {"requester": "n"}
    end = start + count if end is None else end
    return Work(Piece(req, step, start, count, end, body), torch.zeros(count), 1)


def test_every_decode_runs_and_prompts_fill_the_chunk_in_arrival_order():
    waiting = [work("a", 0, 100), work("b", 7, 1), work("c", 0, 300), work("d", 9, 1),
               work("e", 0, 5)]  # fmt: skip
    batch, rest = next_batch(waiting, 256)
    assert [(w.req, w.piece.start, w.count) for w in batch] == [
        ("a", 0, 100),
        ("b", 7, 1),
        ("c", 0, 156),
        ("d", 9, 1),
    ]
    assert [(w.req, w.piece.start, w.count) for w in rest] == [("c", 156, 144), ("e", 0, 5)]
    first, tail = batch[2], rest[0]
    assert not first.piece.final and tail.piece.final and tail.piece.end == 300
    assert "capacity" in first.piece.body and tail.piece.body == {"requester": "n"}
    assert torch.equal(torch.cat([first.x, tail.x]), waiting[2].x)


def test_a_request_runs_once_a_pass_and_its_later_chunk_waits():
    waiting = [work("a", 0, 8, step=0, end=16), work("a", 8, 8, step=0, end=16), work("b", 3, 1)]
    batch, rest = next_batch(waiting, 100)
    assert [(w.req, w.piece.start) for w in batch] == [("a", 0), ("b", 3)]
    assert [(w.req, w.piece.start) for w in rest] == [("a", 8)]
    batch, rest = next_batch([work("a", 0, 50), work("b", 0, 9), work("c", 4, 1)], 50)
    assert [w.req for w in batch] == ["a", "c"] and [w.req for w in rest] == ["b"]


@pytest.mark.parametrize(
    "family",
    ["llama", "mistral", "gpt2", "qwen3_moe", "qwen2_moe", "gpt_oss", "deepseek_v3", "qwen3_next",
     "qwen3_5_moe"],
)
def test_a_packed_pass_computes_what_each_request_computes_alone(tiny_models, family):  # noqa: ANN001
    """Four requests of different lengths on one whole-model shard, scheduled by next_batch
    with chunks of 8 (mistral's sliding window is 6): prompts in chunks next to decodes,
    requests joining while others decode. Each request's logits at every step equal its
    own unbatched run's, fed the same tokens."""
    ckpt = open_checkpoint(str(tiny_models[family]))
    vocab = ckpt.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(vocab, (n,), generator=gen) for n in (3, 20, 11, 1)]
    joins = [0, 0, 2, 5]  # the pass at which each request arrives
    steps = 6  # decode steps each
    shard = Shard(ckpt, 0, ckpt.n_layers, torch.device("cpu"), torch.float32)
    full = SamplingParams(temperature=1.0)  # candidates are then the whole logits row
    tokens: dict[str, list[int]] = {}
    got: dict[str, list[torch.Tensor]] = {}
    waiting: list[Work] = []
    for turn in range(40):
        for i, prompt in enumerate(prompts):
            if joins[i] == turn:
                req = f"r{i}"
                shard.open(req, 64, "n", full, 1)
                piece = Piece(req, 0, 0, len(prompt), len(prompt), {"requester": "n"})
                waiting.append(shard.accept(piece, prompt, 1))
                tokens[req], got[req] = [], []
        if not waiting:
            continue
        batch, waiting = next_batch(waiting, 8)
        for w, answer in zip(batch, shard.run(batch), strict=True):
            if answer is None:
                continue
            assert isinstance(answer, Candidates)
            got[w.req].append(answer.logits)
            if len(got[w.req]) <= steps:
                token = int(answer.logits.argmax())
                position = w.piece.end
                tokens[w.req].append(token)
                piece = Piece(w.req, w.piece.step + 1, position, 1, position + 1, w.piece.body)
                waiting.append(shard.accept(piece, torch.tensor([token]), 1))
    assert all(len(g) == steps + 1 for g in got.values()), {r: len(g) for r, g in got.items()}

    alone = LocalPipeline(ckpt)
    for i, prompt in enumerate(prompts):
        req = f"r{i}"
        caches = alone.new_caches(64)
        ids = prompt[None]
        positions = torch.arange(len(prompt))
        for step in range(steps + 1):
            want = alone.forward(ids, positions, caches, last_only=True)[0, -1]
            torch.testing.assert_close(got[req][step], want, **TOLERANCE)
            if step < steps:
                ids = torch.tensor([[tokens[req][step]]])
                positions = positions[-1:] + 1


def test_a_window_scored_in_chunks_equals_scored_whole(tiny_models):  # noqa: ANN001
    ckpt = open_checkpoint(str(tiny_models["llama"]))
    ids = torch.randint(ckpt.config.vocab_size, (30,), generator=torch.Generator().manual_seed(2))
    targets = ids[15:].tolist()
    shard = Shard(ckpt, 0, ckpt.n_layers, torch.device("cpu"), torch.float32)
    shard.open("w", 30, "n", SamplingParams(), 1, targets)
    waiting = [shard.accept(Piece("w", 0, 0, 30, 30, {"requester": "n"}), ids, 1)]
    answers = []
    while waiting:
        batch, waiting = next_batch(waiting, 7)
        answers += shard.run(batch)
    assert answers[:-1] == [None] * 4
    caches = LocalPipeline(ckpt).new_caches(30)
    logits = LocalPipeline(ckpt).forward(ids[None], torch.arange(30), caches)[0]
    torch.testing.assert_close(answers[-1].logprobs, score(logits, targets), **TOLERANCE)
