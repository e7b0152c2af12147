"""The CPU decode path's fused ops against PyTorch's (node/engine/models/decode_ops.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from node.engine.models import cpu_decode, decode_ops
from node.engine.models.attention import Part
from node.engine.models.llama import RMSNorm, rotate
from node.engine.models.quantized import Int4Linear, Int8Linear, quantize
from node.engine.weights import load_stage, open_checkpoint
from tests.conftest import make_model

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def read_the_switch_again():  # noqa: ANN201
    """Tests turn the ops off through the environment, which ops() reads once."""
    decode_ops.ops.cache_clear()
    yield
    decode_ops.ops.cache_clear()


def test_the_ops_build_here():
    """Where they do not build this fails (with the compiler's error), so a CI run cannot
    pass on PyTorch's ops alone."""
    built = decode_ops.native.build("ringinfer_decode", decode_ops.SOURCE, decode_ops.FLAGS)
    assert built is not None
    assert decode_ops.ops() is not None


@pytest.mark.parametrize("shape", [(1, 1, 576), (1, 7, 960), (3, 5, 2880), (2, 33), (4, 0, 64)])
def test_rms_norm_equals_pytorchs(shape):  # noqa: ANN001
    """Rows of any width (not only multiples of the lanes), large and tiny values."""
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen) * torch.logspace(-3, 3, shape[-1])
    w = torch.randn(shape[-1], generator=gen)
    got = decode_ops.ops().rms_norm(x, w, 1e-6)
    torch.testing.assert_close(got, F.rms_norm(x, (shape[-1],), w, 1e-6), rtol=2e-6, atol=0)


def test_the_model_norm_uses_them_and_falls_back_without(monkeypatch):  # noqa: ANN001
    """RMSNorm on float32 CPU rows runs the fused op; with RINGINFER_DECODE_OPS=0 (as where
    it would not build) PyTorch's, to the same values."""
    norm = RMSNorm(576, 1e-5)
    x = torch.randn(1, 3, 576)

    def refused(*args: object, **kwargs: object) -> None:
        raise AssertionError("PyTorch's RMSNorm ran")

    with torch.no_grad(), monkeypatch.context() as m:
        m.setattr(F, "rms_norm", refused)
        ours = norm(x)
    monkeypatch.setenv(decode_ops.KERNEL_ENV, "0")
    decode_ops.ops.cache_clear()
    assert decode_ops.ops() is None
    with torch.no_grad():
        torch.testing.assert_close(norm(x), ours, rtol=2e-6, atol=0)


@pytest.mark.parametrize("shape", [(1, 12, 1, 64), (1, 9, 7, 64), (2, 3, 5, 128)])
def test_rope_equals_pytorchs_four_ops_bit_for_bit(shape):  # noqa: ANN001
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(shape, generator=gen)
    cos, sin = torch.randn(2, shape[2], shape[3], generator=gen)
    want = x * cos + x.roll(shape[3] // 2, -1) * sin
    assert torch.equal(decode_ops.ops().rope(x, cos, sin), want)
    # as Attention rotates: q and k heads of a fused projection, a strided view of one step
    heads = torch.randn(1, 1, 20, 64, generator=gen).transpose(1, 2)[:, :16]
    assert torch.equal(rotate(heads, cos[:1, :64], sin[:1, :64]),
                       heads * cos[:1, :64] + heads.roll(32, -1) * sin[:1, :64])  # fmt: skip


@pytest.mark.parametrize("fmt", ["int4", "int8"])
@pytest.mark.parametrize("out_features", [960, 1000])  # 1000: the int4 kernel's rows padded
def test_quantized_products_equal_the_python_path(monkeypatch, fmt, out_features):  # noqa: ANN001
    """One C++ call for the reshape, casts, kernel and cut: the same numbers, any rows."""
    layer = Int4Linear(576, out_features, False, "cpu") if fmt == "int4" else \
        Int8Linear(576, out_features, False)  # fmt: skip
    gen = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, 576, generator=gen) * 0.02
    layer.load([quantize(weight, fmt)], torch.device("cpu"), torch.float32)
    xs = [torch.randn(1, rows, 576, generator=gen) for rows in (1, 3, 17)]
    with torch.no_grad():
        ours = [layer(x) for x in xs]
        monkeypatch.setenv(decode_ops.KERNEL_ENV, "0")
        decode_ops.ops.cache_clear()
        for x, got in zip(xs, ours, strict=True):
            assert torch.equal(got, layer(x))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "qwen3_padded"])
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_a_layer_in_one_call_equals_the_python_path(tiny_models, tmp_path, monkeypatch,
                                                    family, fmt):  # fmt: skip  # noqa: ANN001
    """Decode steps through cpu_decode's one call a layer give the logits of llama.py's
    modules bit for bit: one request a step and three at different positions at once, on
    both stages of a split. Qwen2 has biases, Qwen3 q and k norms; the padded Qwen3's fused
    projection (4 query heads of 20 and one key head: 120 rows) is padded to 128 rows for
    the int4 kernel, and its grouped query heads are 4 to a key head."""
    path = tiny_models.get(family) or make_model(
        "qwen3", tmp_path / family, head_dim=20, num_key_value_heads=1
    )
    ckpt = open_checkpoint(str(path))
    stages = [load_stage(ckpt, a, b, CPU, torch.float32, None, fmt) for a, b in ((0, 1), (1, 4))]
    calls = []
    fast = cpu_decode.layers
    monkeypatch.setattr(cpu_decode, "layers", lambda *a: calls.append(1) or fast(*a))

    def decode() -> list[torch.Tensor]:
        caches = [[s.new_cache(1, 32, torch.float32, CPU) for s in stages] for _ in range(3)]
        prompts = [torch.arange(3, 3 + n)[None] for n in (5, 2, 9)]
        logits = []
        with torch.inference_mode():
            for prompt, cache in zip(prompts, caches, strict=True):
                x = prompt
                for stage, c in zip(stages, cache, strict=True):
                    x = stage.run(x, [Part(c, 0, prompt.shape[1])], slice(-1, None))
            for step in range(4):  # alone, then the three together
                group = [0] if step % 2 == 0 else [0, 1, 2]
                x = torch.tensor([[7 + step + i for i in group]])
                for j, stage in enumerate(stages):
                    parts = [Part(caches[i][j], caches[i][j].length, 1) for i in group]
                    x = stage.run(x, parts)
                logits.append(x)
        return logits

    ours = decode()
    assert len(calls) == 8  # every decode pass of both stages took the one-call path
    monkeypatch.setattr(cpu_decode, "usable", lambda *a: False)
    for got, want in zip(ours, decode(), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["mistral", "qwen3_moe", "gemma3", "gpt_oss"])
def test_windows_experts_and_other_layers_keep_the_python_path(tiny_models, family):  # noqa: ANN001
    """Sliding windows (Mistral, Gemma 3, gpt-oss), experts and sinks are not what
    decode_layer computes: their decode steps stay on the modules."""
    ckpt = open_checkpoint(str(tiny_models[family]))
    stage = load_stage(ckpt, 0, ckpt.n_layers, CPU, torch.float32, None, "int4")
    cache = stage.new_cache(1, 32, torch.float32, CPU)
    with torch.inference_mode():
        stage.run(torch.arange(3, 8)[None], [Part(cache, 0, 5)], slice(-1, None))
        h = stage.embed_tokens(torch.tensor([[9]]))
        assert not cpu_decode.usable(stage, h, [Part(cache, 5, 1)])


def test_the_default_model_decodes_as_pytorchs_ops_do(monkeypatch):  # noqa: ANN001
    """The default model (int4 layers, int8 table) through cpu_decode's one call a layer and
    the fused norms and RoPE, against PyTorch's own ops (RINGINFER_DECODE_OPS=0)
    on the same 48 tokens (PyTorch's greedy choices, fed to both): the logits of every step
    agree to 3% of their largest, and so do the choices wherever the best logit leads the
    next by more than that. (Not every choice: int4 products take bfloat16 activations, so
    any change of rounding order moves logits by up to ~2%, and near-ties fall either way.)"""
    from node.engine.local import LocalPipeline, generate
    from node.engine.sampling import SamplingParams

    ckpt = open_checkpoint(None)
    pipeline = LocalPipeline(ckpt, (), quantize="auto")
    prompt = ckpt.tokenizer().encode_prompt("Name three rivers of Europe.", True)

    def logits(tokens: list[int]) -> torch.Tensor:
        caches = pipeline.new_caches(len(prompt) + len(tokens))
        with torch.inference_mode():
            rows = [pipeline.forward(torch.tensor([prompt]), torch.arange(len(prompt)), caches)]
            for i, token in enumerate(tokens[:-1], len(prompt)):
                rows.append(pipeline.forward(torch.tensor([[token]]), torch.tensor([i]), caches))
        return torch.stack([r[0, -1] for r in rows])

    monkeypatch.setenv(decode_ops.KERNEL_ENV, "0")
    decode_ops.ops.cache_clear()
    greedy = SamplingParams()
    session = pipeline.session(len(prompt) + 48, greedy)
    tokens = list(generate(session, prompt, 48, greedy, frozenset()))
    theirs = logits(tokens)
    monkeypatch.delenv(decode_ops.KERNEL_ENV)
    decode_ops.ops.cache_clear()
    ours = logits(tokens)
    bound = 0.03 * theirs.abs().amax(-1)
    assert ((ours - theirs).abs().amax(-1) <= bound).all()
    best = theirs.topk(2, -1).values
    clear = best[:, 0] - best[:, 1] > bound
    assert clear.sum() >= 24 and torch.equal(ours.argmax(-1)[clear], theirs.argmax(-1)[clear])
