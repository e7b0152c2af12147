"""The sampler against distributions computed independently from the logits."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from node.engine.sampling import SamplingParams, sample
from node.errors import RinginferError

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])
DRAWS = 4000


def draws(params: SamplingParams) -> Counter:
    g = params.generator()
    return Counter(sample(LOGITS, params, g) for _ in range(DRAWS))


def test_greedy_is_argmax():
    assert sample(LOGITS, SamplingParams(), None) == 5


def test_temperature_follows_softmax():
    params = SamplingParams(temperature=0.7, seed=1)
    expected = torch.softmax(LOGITS / 0.7, dim=0)
    counts = draws(params)
    for token, p in enumerate(expected.tolist()):
        assert abs(counts[token] / DRAWS - p) < 0.03, (token, counts[token] / DRAWS, p)


def test_top_k_keeps_only_the_k_best():
    counts = draws(SamplingParams(temperature=1.0, top_k=2, seed=2))
    assert set(counts) == {0, 5}
    p0 = torch.softmax(torch.tensor([2.0, 3.0]), 0)[0].item()
    assert abs(counts[0] / DRAWS - p0) < 0.03


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.softmax(LOGITS, 0)  # sorted: 5 (.57), 0 (.21), 1 (.08), ...
    p = (probs[5] + probs[0]).item() - 1e-3  # needs exactly tokens 5 and 0
    counts = draws(SamplingParams(temperature=1.0, top_p=p, seed=3))
    assert set(counts) == {0, 5}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.01, seed=3))) == {5}


def test_seed_reproduces_and_differs():
    a = draws(SamplingParams(temperature=1.0, seed=7))
    assert a == draws(SamplingParams(temperature=1.0, seed=7))
    g1 = SamplingParams(temperature=1.0, seed=7).generator()
    g2 = SamplingParams(temperature=1.0, seed=8).generator()
    seq1 = [sample(LOGITS, SamplingParams(temperature=1.0), g1) for _ in range(50)]
    seq2 = [sample(LOGITS, SamplingParams(temperature=1.0), g2) for _ in range(50)]
    assert seq1 != seq2


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)]
)
def test_bad_parameters_are_refused(kwargs):  # noqa: ANN001
    with pytest.raises(RinginferError):
        SamplingParams(**kwargs)


def test_json_form_round_trips_and_refuses_malformed():
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, seed=3)
    assert SamplingParams.from_json(params.to_json()) == params
    assert SamplingParams.from_json({}) == SamplingParams()
    for bad in ("greedy", {"temperature": "hot"}, {"top_k": [1]}, {"top_p": 0}):
        with pytest.raises(RinginferError):
            SamplingParams.from_json(bad)
