"""Qwen3-Next (node/engine/models/qwen3_next.py) against transformers: a prompt of several
delta-rule chunks, the same prompt in pieces (recurrent states carried between passes),
what a request's caches hold, and a state that cannot be rewritten. test_models.py runs
conftest's tiny model at every split point and greedy; test_batching.py packed with
others; test_ring.py through three daemons."""

from __future__ import annotations

import pytest
import torch

from node.engine.local import LocalPipeline
from node.engine.models.qwen3_next import CHUNK
from node.engine.weights import open_checkpoint
from node.errors import RinginferError
from tests.conftest import hf_model

LONG = [(7 * i + 3) % 320 for i in range(2 * CHUNK + 22)]  # two whole chunks and a part


def test_a_prompt_of_several_chunks_equals_transformers_whole_and_in_pieces(tiny_models):  # noqa: ANN001
    path = tiny_models["qwen3_next"]
    with torch.inference_mode():
        expected = hf_model(path)(torch.tensor([LONG])).logits
        for splits in [(), (1,), (2, 3)]:
            pipeline = LocalPipeline(open_checkpoint(str(path)), splits)
            whole = pipeline.forward(torch.tensor([LONG]), torch.arange(len(LONG)),
                                     pipeline.new_caches(len(LONG)))  # fmt: skip
            torch.testing.assert_close(whole, expected, atol=1e-4, rtol=0)
            caches, pieces, at = pipeline.new_caches(len(LONG)), [], 0
            for size in (50, 1, 77, len(LONG) - 128):  # across chunk boundaries, one alone
                ids = torch.tensor([LONG[at : at + size]])
                pieces.append(pipeline.forward(ids, torch.arange(at, at + size), caches))
                at += size
            torch.testing.assert_close(torch.cat(pieces, dim=1), expected, atol=1e-4, rtol=0)


def test_a_request_holds_keys_for_attention_layers_and_fixed_states_for_deltanet(tiny_models):  # noqa: ANN001
    """Two attention layers hold keys and values for every position; the two DeltaNet layers
    a convolution window and a state whose size does not depend on the context."""
    pipeline = LocalPipeline(open_checkpoint(str(tiny_models["qwen3_next"])))
    for capacity in (64, 32768):
        cache = pipeline.new_caches(capacity)[0]
        keys = 2 * 2 * 2 * 32 * 4 * capacity  # layers, k and v, kv heads, head dim, bytes
        states = 2 * (80 * 3 + 4 * 8 * 12) * 4  # layers, (conv dim x 3 + heads x 8 x 12), bytes
        assert cache.nbytes == keys + states
    assert pipeline.stages[0].cache_positions(32768) == 2 * 32768


def test_a_recurrent_state_is_not_rewound(tiny_models):  # noqa: ANN001
    """A pass over positions the state has already taken in is refused, not folded in twice."""
    pipeline = LocalPipeline(open_checkpoint(str(tiny_models["qwen3_next"])))
    caches = pipeline.new_caches(16)
    with torch.inference_mode():
        pipeline.forward(torch.tensor([[5, 6, 7]]), torch.arange(3), caches)
        with pytest.raises(RinginferError, match="rewrites a recurrent state"):
            pipeline.forward(torch.tensor([[7]]), torch.tensor([2]), caches)


def test_a_killed_middle_stage_is_replayed_around_exactly(tmp_path):  # noqa: ANN001
    """Three daemons, the middle stage SIGKILLed after ~50 tokens: the requester replays its
    history into the plan of the two left, whose DeltaNet states are rebuilt from it, and
    the tokens are those of an uninterrupted run."""
    from tests.conftest import with_tokenizer
    from tests.daemons import EXACT_RING, Cluster
    from tests.test_replay import kill_at_token_50, local

    model = str(with_tokenizer("qwen3_next", tmp_path / "qwen3_next"))
    cluster = Cluster(tmp_path, 3, ["--model", model, *EXACT_RING])
    try:
        want = local("--model", model)
        nodes = cluster.nodes[0].status()["nodes"]
        stages = sorted((n["layers"][0], n["name"]) for n in nodes)
        by_name = {d.name: d for d in cluster.nodes}
        first, middle, _ = (by_name[name] for _, name in stages)
        result = kill_at_token_50(first, middle)
        assert result["tokens"] == want
        assert len(result["replays"]) == 1 and middle.name in result["replays"][0]["why"]
    finally:
        cluster.stop()


def test_a_hub_qwen3_5_moe_checkpoint_equals_transformers(tmp_path):  # noqa: ANN001
    """Qwen3.5-MoE as the Hub holds it: a vision-language model's checkpoint (the text model
    under model.language_model, multimodal RoPE in its config), experts stacked in
    gate_up_proj [experts, 2 x width, dim] and down_proj. Its text logits at every split."""
    import transformers
    from safetensors.torch import load_file, save_file

    from tests.conftest import FAMILIES

    text = dict(FAMILIES["qwen3_5_moe"][1], rope_parameters={
        "rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25,
        "mrope_section": [2, 1, 1], "mrope_interleaved": True})  # fmt: skip
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                  out_hidden_size=64, patch_size=4, num_position_embeddings=16)  # fmt: skip
    config = transformers.Qwen3_5MoeConfig(text_config=text, vision_config=vision)
    torch.manual_seed(0)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(tmp_path)
    state, stacks = load_file(tmp_path / "model.safetensors"), {}
    for name in [n for n in state if ".mlp.experts." in n]:
        layer, rest = name.split(".mlp.experts.")
        expert, proj = rest.split(".", 1)
        stacks.setdefault(layer, {}).setdefault(proj, {})[int(expert)] = state.pop(name)
    for layer, p in stacks.items():
        n = len(p["gate_proj.weight"])
        gate_up = [torch.cat([p["gate_proj.weight"][e], p["up_proj.weight"][e]]) for e in range(n)]
        state[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(gate_up)
        state[f"{layer}.mlp.experts.down_proj"] = torch.stack(
            [p["down_proj.weight"][e] for e in range(n)])  # fmt: skip
    assert any(k.startswith("model.language_model.layers.") for k in state)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with torch.inference_mode():
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
        expected = theirs.eval()(torch.tensor([LONG[:12]])).logits
        for splits in [(), (1,), (2, 3)]:
            pipeline = LocalPipeline(open_checkpoint(str(tmp_path)), splits)
            got = pipeline.forward(torch.tensor([LONG[:12]]), torch.arange(12),
                                   pipeline.new_caches(12))  # fmt: skip
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
