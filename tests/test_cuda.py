"""The CUDA path against transformers on the same GPU (skipped where there is no GPU)."""

from __future__ import annotations

import weakref

import pytest
import torch

from node.engine.local import LocalPipeline, generate
from node.engine.sampling import SamplingParams
from node.engine.weights import open_checkpoint
from tests.conftest import FAMILIES, hf_greedy, hf_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
PROMPT = [3, 17, 101, 5, 42, 250, 7, 9, 61, 88, 13, 200]
CUDA = torch.device("cuda")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_logits_and_greedy_match_transformers(tiny_models, family, dtype):  # noqa: ANN001
    path = tiny_models[family]
    theirs = hf_model(path).to(CUDA, dtype)
    ids = torch.tensor([PROMPT], device=CUDA)
    with torch.inference_mode():
        expected = theirs(ids).logits.float()
    expected_tokens = hf_greedy(theirs, PROMPT, 12)
    pipeline = LocalPipeline(open_checkpoint(str(path)), (1, 3), CUDA, dtype)
    with torch.inference_mode():
        got = pipeline.forward(ids, torch.arange(len(PROMPT)), pipeline.new_caches(12))
    assert got.device.type == "cuda" and got.dtype == dtype
    tolerance = 1e-3 if dtype == torch.float32 else 0.03 * expected.abs().max().item()
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=0)
    if dtype == torch.float32:  # half-precision greedy paths may part at near-ties
        greedy = SamplingParams()
        tokens = list(generate(pipeline.session(24, greedy), PROMPT, 12, greedy, frozenset()))
        assert tokens == expected_tokens


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "qwen3_moe"])
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_cuda_quantized_near_transformers_on_the_same_weights(tiny_models, family, fmt):  # noqa: ANN001
    """int4 packs for CUDA's own kernel; int8 is dequantized to bfloat16 there (the CUDA
    int8 kernel is slow). Oracle: transformers on the dequantized weights, bfloat16; the
    router stays in float on both sides (moe.Router), experts are quantized one by one."""
    from node.engine.models.quantized import quantize

    model = hf_model(tiny_models[family])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                continue
            if p.ndim == 3:  # transformers' stacked experts, [expert, out, in]
                p.copy_(torch.stack([quantize(w, fmt).dequantize() for w in p]))
            elif p.ndim == 2 and not name.endswith("wpe.weight"):
                conv1d = family == "gpt2" and "wte" not in name and "lm_head" not in name
                w = p.t() if conv1d else p
                deq = quantize(w, fmt).dequantize()
                p.copy_(deq.t() if conv1d else deq)
    theirs = model.to(CUDA, torch.bfloat16)
    ids = torch.tensor([PROMPT], device=CUDA)
    with torch.inference_mode():
        expected = theirs(ids).logits.float()
    pipeline = LocalPipeline(
        open_checkpoint(str(tiny_models[family])), (2,), CUDA, torch.bfloat16, quantize=fmt
    )
    with torch.inference_mode():
        got = pipeline.forward(ids, torch.arange(len(PROMPT)), pipeline.new_caches(12))
    held = pipeline.quantization
    # int8 on CUDA: linear layers in bfloat16, the token table still int8 (a gather)
    assert (
        held.startswith("int4") if fmt == "int4" else set(held.split("+")) == {"bfloat16", "int8"}
    )
    tolerance = 0.03 * expected.abs().max().item()
    torch.testing.assert_close(got.float(), expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma3"])  # gemma3: its own score scale
def test_a_ragged_decode_pass_on_cuda_equals_each_request_alone(tiny_models, family):  # noqa: ANN001
    """Several requests' decode steps in one pass take one flash-attention call over their
    ragged cache lengths (attention.py's _attend_ragged); each equals its own pass."""
    from node.engine.models.attention import Part

    pipeline = LocalPipeline(open_checkpoint(str(tiny_models[family])), (), CUDA, torch.bfloat16)
    stage = pipeline.stages[0]
    lengths, gen = (3, 11, 20), torch.Generator().manual_seed(3)
    prompts = [torch.randint(300, (n,), generator=gen) for n in lengths]
    alone = [pipeline.new_caches(32)[0] for _ in prompts]
    packed = [pipeline.new_caches(32)[0] for _ in prompts]
    with torch.inference_mode():
        for prompt, a, b in zip(prompts, alone, packed, strict=True):
            for cache in (a, b):
                stage.run(prompt[None].to(CUDA), [Part(cache, 0, len(prompt))])
        for _ in range(4):
            tokens = torch.randint(300, (len(prompts),), generator=gen).to(CUDA)
            got = stage.run(tokens[None], [Part(c, c.length, 1) for c in packed])[0]
            for i, cache in enumerate(alone):
                want = stage.run(tokens[None, i : i + 1], [Part(cache, cache.length, 1)])[0, 0]
                torch.testing.assert_close(got[i].float(), want.float(), atol=0.02, rtol=0.02)


def test_cuda_mxfp4_experts_equal_transformers_on_their_values(tmp_path):  # noqa: ANN001
    """gpt-oss's experts in MXFP4 (as its GGUFs hold them) on CUDA, where no MXFP4 kernel
    exists and they are dequantized by tiles, against transformers running the file's
    exact values (gguf-py's dequantization), float32, across a split."""
    from tests.conftest import make_model
    from tests.test_gguf import dequantized_twin, write_gguf
    from tests.test_moe import PROJECTIONS

    source = make_model("gpt_oss", tmp_path / "hf")
    experts = {f"blk.{i}.ffn_{p}_exps.weight": "MXFP4" for i in range(4) for p in PROJECTIONS}
    path = write_gguf(source, tmp_path / "mxfp4.gguf", "F32", experts)
    theirs = hf_model(dequantized_twin(path, source, tmp_path / "twin")).to(CUDA)
    ids = torch.tensor([PROMPT], device=CUDA)
    with torch.inference_mode():
        expected = theirs(ids).logits.float()
    pipeline = LocalPipeline(open_checkpoint(str(path)), (2,), CUDA, quantize="auto")
    with torch.inference_mode():
        got = pipeline.forward(ids, torch.arange(len(PROMPT)), pipeline.new_caches(12))
    assert "mxfp4" in pipeline.quantization
    torch.testing.assert_close(got.float(), expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_decode_steps_replay_cuda_graphs_equal_to_the_eager_path(tiny_models, family, monkeypatch):  # noqa: ANN001
    """One request's decode steps through three stages: each stage's second step captures a
    graph, later ones replay it (node/engine/models/cuda_graph.py). Their logits are those
    of the eager path within bfloat16's rounding (another attention kernel), and a replay is
    bit for bit the static step run eagerly."""
    from node.engine.models import cuda_graph

    pipeline = LocalPipeline(open_checkpoint(str(tiny_models[family])), (1, 3), CUDA,
                             torch.bfloat16)  # fmt: skip
    follow = [7, 250, 31, 3, 99, 42, 18, 5]

    def logits(graphs: str) -> tuple[torch.Tensor, list]:
        monkeypatch.setenv(cuda_graph.ENV, graphs)
        caches = pipeline.new_caches(32)
        prompt = torch.tensor([PROMPT[:6]], device=CUDA)
        out = [pipeline.forward(prompt, torch.arange(6), caches, True)]
        for i, token in enumerate(follow):
            ids = torch.tensor([[token]], device=CUDA)
            out.append(pipeline.forward(ids, torch.tensor([6 + i]), caches, True))
        return torch.cat(out, dim=1).float(), caches

    with torch.inference_mode():
        graphed, caches = logits("1")
        eager, plain = logits("0")
        assert all(c.graph is not None and c.graph.graph is not None for c in caches)
        assert all(c.graph is None for c in plain)
        torch.testing.assert_close(graphed, eager, atol=0.03 * eager.abs().max().item(), rtol=0)
        last = caches[-1].graph
        last.graph.replay()
        assert torch.equal(last.out, last.run(caches[-1]))
        graphs = [weakref.ref(c.graph) for c in caches]
        del caches, last
        assert all(g() is None for g in graphs)  # freed with their caches, no cycle


def test_a_three_daemon_ring_on_one_gpu_equals_local(tmp_path):  # noqa: ANN001
    """Three daemons on the GPU, layers pinned, their decode steps replaying CUDA graphs:
    each request alone, and two at once (a batched pass beside graphed ones), generates the
    tokens `generate --local --device cuda` does with the same split."""
    import json
    import subprocess
    import sys

    from tokenizers import Tokenizer, models, pre_tokenizers

    from tests.conftest import make_model, run_cli
    from tests.daemons import EXACT_RING, Cluster, Daemon
    from tests.ports import free_port

    model = make_model("llama", tmp_path / "llama", num_hidden_layers=6,
                       max_position_embeddings=128)  # fmt: skip
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(320)}, unk_token="w0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(model / "tokenizer.json"))
    gpu = ["--model", str(model), "--device", "cuda", "--dtype", "bfloat16"]
    ports = [free_port() for _ in range(3)]
    peer = ["--no-mdns", "--peer", f"127.0.0.1:{ports[0]}"]
    pins = ("0:2", "2:4", "4:6")
    nodes = [Daemon(tmp_path, f"n{i}", port, [*gpu, *EXACT_RING, *peer, "--layers", pins[i]])
             for i, port in enumerate(ports)]  # fmt: skip
    cluster = Cluster(tmp_path, 3, [], nodes=nodes)
    try:
        prompts = ["w11 w250 w30 w7 w99", "w5 w6 w7 w8 w9 w10"]
        args = ["--max-tokens", "40", "--json"]
        local = [json.loads(run_cli("generate", p, "--local", *gpu, "--split", "2,4", *args)
                            .stdout)["tokens"] for p in prompts]  # fmt: skip
        for prompt, want in zip(prompts, local, strict=True):
            out = nodes[0].cli("generate", prompt, "--node", nodes[0].address, *args)
            assert out.returncode == 0 and json.loads(out.stdout)["tokens"] == want, out.stderr
        both = [subprocess.Popen([sys.executable, "-m", "node.cli", "generate", p, "--node",
                                  nodes[i].address, *args], stdout=subprocess.PIPE, text=True)
                for i, p in enumerate(prompts)]  # fmt: skip
        assert [json.loads(p.communicate(timeout=120)[0])["tokens"] for p in both] == local
    finally:
        cluster.stop()
