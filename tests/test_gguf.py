"""GGUF loading: a random Llama written with gguf.GGUFWriter as llama.cpp's converter does,
read by us and by transformers; and the GGUF tokenizer against transformers' converter."""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from gguf import GGUF_MAGIC

from node.engine.local import LocalPipeline
from node.engine.weights import open_checkpoint
from tests.conftest import hf_model, run_cli

PROMPT = [3, 17, 101, 5, 42, 250, 7, 9, 61, 88, 13, 200]
# llama.cpp stacks a layer's experts into one [experts, rows, columns] tensor per projection.
EXPERT_TO_GGUF = {
    "gate_proj": "ffn_gate_exps", "up_proj": "ffn_up_exps", "down_proj": "ffn_down_exps",
    "w1": "ffn_gate_exps", "w3": "ffn_up_exps", "w2": "ffn_down_exps",
}  # fmt: skip
# GGUF architectures whose name differs from the Hugging Face model_type (Mixtral is
# written as llama).
GGUF_ARCH = {"gemma3_text": "gemma3", "mixtral": "llama", "qwen2_moe": "qwen2moe",
             "qwen3_moe": "qwen3moe", "gpt_oss": "gpt-oss"}  # fmt: skip
STACKED = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)(_bias)?")
EXPERT = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.(\w+)")


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's Q/K row order for llama.cpp's RoPE kernel."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf.py's `rope_freqs` for llama3 scaling (divisors of each frequency)."""
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    low = rope["original_max_position_embeddings"] / rope["low_freq_factor"]
    high = rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    factors = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < high:
            factors.append(1.0)
        elif wavelen > low:
            factors.append(rope["factor"])
        else:
            smooth = (
                rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]
            ) / (rope["high_freq_factor"] - rope["low_freq_factor"])
            factors.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(factors, dtype=np.float32)


# gguf-py has no quantizer for these: their fixtures are random valid blocks (small scales).
K_TYPES = ("Q4_K", "Q5_K", "Q6_K")


def random_blocks(shape: tuple[int, ...], quant: str, seed: int) -> np.ndarray:
    """Random bytes in `quant`'s block layout, with its f16 super-block scales kept small."""
    import gguf

    qtype = gguf.GGMLQuantizationType[quant]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    small = lambda: rng.uniform(1e-4, 4e-4, raw.shape[:2]).astype(np.float16)  # noqa: E731
    if quant == "Q6_K":  # ql, qh, int8 scales, then d (IQ types: d first)
        raw[..., -2:] = small()[..., None].view(np.uint8)
        # Sub-block scales of one sign and size, as a quantizer's are on real weights
        # (uniform random ones span 100x within a row, which no per-row int8 can keep).
        raw[..., 192:208] = rng.integers(64, 128, raw[..., 192:208].shape, dtype=np.uint8)
    else:  # d, dmin, then scales and codes
        raw[..., 0:2] = small()[..., None].view(np.uint8)
        raw[..., 2:4] = small()[..., None].view(np.uint8)
    return raw.reshape(shape[0], -1)


def write_gguf(
    hf_dir: Path, out: Path, quant: str, types: dict[str, str] | None = None,
    per_expert: bool = False,
) -> Path:  # fmt: skip
    """`hf_dir`'s model as llama.cpp's converter writes it, matrices in `quant` (or as
    `types` names them by GGUF tensor name). Tensor names come from gguf-py's own map for
    the architecture, as the converter's do; `per_expert`: experts one tensor each, as
    before llama.cpp stacked them (`blk.N.ffn_gate.E.weight`)."""
    import gguf

    model = hf_model(hf_dir)
    cfg = model.config
    arch = GGUF_ARCH.get(cfg.model_type, cfg.model_type)  # llama.cpp permutes Q/K for llama only
    names = tensor_names(arch, cfg.num_hidden_layers)
    w = start_gguf(out, arch, cfg)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)  # Gemma: global layers
    w.add_rope_freq_base(rope["rope_theta"])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if arch == "gemma3":
        gemma3_metadata(w, cfg)
    else:
        w.add_rope_dimension_count(head_dim)
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", 0)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        width = getattr(cfg, "moe_intermediate_size", None)
        if width or cfg.model_type == "gpt_oss":
            w.add_expert_feed_forward_length(width or cfg.intermediate_size)
        if getattr(cfg, "shared_expert_intermediate_size", 0):
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
        w.add_expert_weights_norm(cfg.model_type == "mixtral" or getattr(cfg, "norm_topk_prob", 0))
    if cfg.model_type == "gpt_oss":
        w.add_sliding_window(cfg.sliding_window)
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    if rope.get("rope_type") == "llama3":  # llama.cpp stores llama3 scaling as a tensor
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, head_dim))

    def tensors() -> Iterator[tuple[str, int | None, np.ndarray]]:
        for name, arr in checkpoint_state(hf_dir).items():
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # llama.cpp writes no output.weight for tied embeddings
            heads = permuted_heads(name, arch, cfg)
            arr = llama_cpp_permute(arr, heads) if heads else arr
            if name.endswith("shared_expert_gate.weight"):
                arr = arr.reshape(-1)  # llama.cpp: a vector
            if arch == "gemma3" and name.endswith("norm.weight"):
                arr = arr + 1  # the converter's norm_shift: Gemma scales by (1 + w)
            yield *gguf_place(name, names), arr

    finish_gguf(w, tensors(), lambda gname, arr: (types or {}).get(gname, quant), per_expert)
    return out


def start_gguf(out: Path, arch: str, cfg: Any, kv_heads: int | None = None) -> Any:
    """A writer holding what every llama.cpp converter writes: sizes, heads (`kv_heads`:
    other than the config's), the norms' epsilon, a vocabulary of one character a token
    ("hi" is two tokens)."""
    import gguf

    w = gguf.GGUFWriter(out, arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads if kv_heads is None else kv_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(33 + i) for i in range(cfg.vocab_size)])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_merges([])
    return w


def finish_gguf(
    w: Any, tensors: Iterable[tuple[str, int | None, np.ndarray]],
    kind: Callable[[str, np.ndarray], str], per_expert: bool = False,
) -> None:  # fmt: skip
    """The tensors (llama.cpp's name, the expert's index or None, the array) added in the
    format `kind` gives each, a layer's experts stacked as llama.cpp stacks them
    (`per_expert`: one tensor each, as before it did), and the file written."""
    stacked: dict[str, dict[int, np.ndarray]] = {}
    for gname, expert, arr in tensors:
        if expert is None:
            add_tensor(w, gname, arr, kind(gname, arr))
        else:
            stacked.setdefault(gname, {})[expert] = arr
    for gname, by_expert in stacked.items():
        if per_expert:
            for e in sorted(by_expert):
                add_tensor(w, gname.replace("_exps.", f".{e}."), by_expert[e],
                           kind(gname, by_expert[e]))  # fmt: skip
            continue
        arr = np.stack([by_expert[e] for e in sorted(by_expert)])
        add_tensor(w, gname, arr, kind(gname, arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def in_whole_blocks(quant: str) -> Callable[[str, np.ndarray], str]:
    """`quant` for matrices whose rows are whole 32-value blocks, F32 for the others (as
    llama.cpp's converter falls back)."""
    return lambda gname, arr: quant if arr.shape[-1] % 32 == 0 else "F32"


def add_tensor(w: object, gname: str, arr: np.ndarray, kind: str) -> None:
    """One tensor, matrices (and stacks of them) in `kind`; routers stay float32 as
    llama.cpp's converter keeps them."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    float_kept = "ffn_gate_inp" in gname or gname.endswith(".bias")
    if arr.ndim < 2 or qtype == gguf.GGMLQuantizationType.F32 or float_kept:
        w.add_tensor(gname, arr)
    elif kind in K_TYPES or kind.startswith("IQ"):
        seed = zlib.crc32(gname.encode())
        rows = random_blocks((int(np.prod(arr.shape[:-1])), arr.shape[-1]), kind, seed)
        w.add_tensor(gname, rows.reshape(*arr.shape[:-1], -1), raw_dtype=qtype)
    else:
        w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)


def checkpoint_state(hf_dir: Path) -> dict[str, np.ndarray]:
    """The checkpoint file's tensors as the converter reads them, in float32 (a tied head
    named too: it is the token table)."""
    from safetensors.numpy import load_file

    state = {k: v.astype(np.float32) for k, v in load_file(hf_dir / "model.safetensors").items()}
    state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    return split_experts(state)


def split_experts(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """gpt-oss's stacked experts ([experts, in, 2*out], gate and up interleaved column by
    column) as one [out, in] matrix and one vector per expert and projection."""
    out = {}
    for name, arr in state.items():
        m = STACKED.fullmatch(name)
        if not m:
            out[name] = arr
            continue
        kind = "bias" if m[3] else "weight"
        for e, x in enumerate(arr):
            parts = {"gate": x[..., 0::2], "up": x[..., 1::2]} if m[2] == "gate_up_proj" else {
                "down": x}  # fmt: skip
            for proj, v in parts.items():
                out[f"{m[1]}.{e}.{proj}_proj.{kind}"] = v if m[3] else np.ascontiguousarray(v.T)
    return out


def stack_experts(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`split_experts` undone: gpt-oss's checkpoint layout."""
    out, groups = {}, {}
    for name, arr in state.items():
        m = EXPERT.fullmatch(name)
        if m:
            groups.setdefault((m[1], m[4]), {}).setdefault(int(m[2]), {})[m[3]] = arr
        else:
            out[name] = arr
    for (prefix, kind), experts in groups.items():
        bias = kind == "bias"
        gate_up, down = [], []
        for e in sorted(experts):
            p = {k: v if bias else v.T for k, v in experts[e].items()}
            pair = np.empty((*p["gate"].shape[:-1], 2 * p["gate"].shape[-1]), np.float32)
            pair[..., 0::2], pair[..., 1::2] = p["gate"], p["up"]
            gate_up.append(pair)
            down.append(p["down"])
        suffix = "_bias" if bias else ""
        # Contiguous: np.stack keeps the transposes' layout, which save_file writes as is.
        out[f"{prefix}.gate_up_proj{suffix}"] = np.ascontiguousarray(np.stack(gate_up))
        out[f"{prefix}.down_proj{suffix}"] = np.ascontiguousarray(np.stack(down))
    return out


def tensor_names(arch: str, n_layers: int) -> list[Any]:
    """gguf-py's own maps from Hugging Face names to llama.cpp's: the architecture's, then
    Llama's (the MoE architectures list no dense MLP, which our tiny models' mlp_only_layers
    have)."""
    import gguf

    which = [next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == name)
             for name in dict.fromkeys((arch, "llama"))]  # fmt: skip
    return [gguf.get_tensor_name_map(a, n_layers) for a in which]


def gguf_place(name: str, names: Any) -> tuple[str, int | None]:
    """llama.cpp's tensor for a checkpoint tensor, and the expert's index where it stacks a
    layer's experts into one tensor."""
    m = re.fullmatch(r"model\.layers\.(\d+)\.\w+\.experts\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m:
        return f"blk.{m[1]}.{EXPERT_TO_GGUF[m[3]]}.{m[4]}", int(m[2])
    gname = next(filter(None, (n.get_name(name, try_suffixes=(".weight", ".bias")) for n in names)),
                 None)  # fmt: skip
    if gname is None:
        raise KeyError(f"gguf-py names no tensor for {name}")
    return (f"{gname}.weight" if name.endswith(".sinks") else gname), None  # as the converter


def permuted_heads(name: str, arch: str, cfg: object) -> int | None:
    """The heads whose rows llama.cpp's converter permutes in this tensor (llama only)."""
    if arch != "llama":
        return None
    if ".q_proj." in name:
        return cfg.num_attention_heads
    return cfg.num_key_value_heads if ".k_proj." in name else None


def dequantized_twin(gguf_path: Path, hf_dir: Path, out: Path) -> Path:
    """A Hugging Face directory of `hf_dir`'s model holding the weights `gguf_path` holds,
    as gguf-py reads and dequantizes them: transformers runs it as the reference of a
    quantized file (its own GGUF loader does not read tiny mixture-of-experts shapes)."""
    import shutil

    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(hf_dir)
    arch = GGUF_ARCH.get(cfg.model_type, cfg.model_type)
    names = tensor_names(arch, cfg.num_hidden_layers)
    held = {t.name: t for t in GGUFReader(gguf_path).tensors}
    state = {}
    for name, original in checkpoint_state(hf_dir).items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        gname, expert = gguf_place(name, names)
        t = held[gname]
        arr = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        arr = arr[expert] if expert is not None else arr
        heads = permuted_heads(name, arch, cfg)
        if heads:  # llama_cpp_permute undone
            arr = arr.reshape(heads, -1, 2, *arr.shape[1:]).swapaxes(1, 2)
        if arch == "gemma3" and name.endswith("norm.weight"):
            arr = arr - 1  # the converter's norm_shift undone
        state[name] = np.ascontiguousarray(arr, dtype=np.float32).reshape(original.shape)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(hf_dir / "config.json", out / "config.json")
    save_file(stack_experts(state) if cfg.model_type == "gpt_oss" else state,
              out / "model.safetensors")  # fmt: skip
    return out


def gemma3_metadata(w: Any, cfg: Any) -> None:
    """What convert_hf_to_gguf.py's Gemma3Model writes beyond the common keys: the head
    size, the window, the global layers' RoPE scaling, the logit cap. Not the layer kinds,
    the local RoPE base or the score scale: llama.cpp assumes those."""
    import gguf

    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_sliding_window(cfg.sliding_window)
    rope = cfg.rope_parameters["full_attention"]
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if cfg.final_logit_softcapping:
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)


@pytest.mark.parametrize(
    "family,quant",
    [("llama", "F32"), ("llama", "F16"), ("qwen2", "BF16"), ("llama", "Q8_0"), ("qwen2", "Q8_0")],
)
def test_gguf_load_equals_transformers_load(tiny_models, tmp_path, family, quant):  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    path = write_gguf(tiny_models[family], tmp_path / f"{family}-{quant}.gguf", quant)
    theirs = AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    ).eval()
    with torch.inference_mode():
        expected = theirs(torch.tensor([PROMPT])).logits
    for splits in [(), (1,), (2,), (3,)]:
        pipeline = LocalPipeline(open_checkpoint(str(path)), splits)
        with torch.inference_mode():
            got = pipeline.forward(
                torch.tensor([PROMPT]), torch.arange(len(PROMPT)), pipeline.new_caches(12)
            )
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    if quant == "F32":  # unquantized, it is also the original HF model
        with torch.inference_mode():
            original = hf_model(tiny_models[family])(torch.tensor([PROMPT])).logits
        torch.testing.assert_close(got, original, atol=1e-4, rtol=0)


def test_gguf_llama3_rope_and_tied_head_equal_the_hf_model(tiny_models, tmp_path):  # noqa: ANN001
    path = write_gguf(tiny_models["llama3"], tmp_path / "llama3.gguf", "F32")
    ckpt = open_checkpoint(str(path))
    assert ckpt.config.rope_type == "freq_factors" and ckpt.config.tie_embeddings
    with torch.inference_mode():
        expected = hf_model(tiny_models["llama3"])(torch.tensor([PROMPT])).logits
        pipeline = LocalPipeline(ckpt, (2,))
        got = pipeline.forward(torch.tensor([PROMPT]), torch.arange(12), pipeline.new_caches(12))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


TEXTS = [
    "The capital of France is",
    "Numbers 12345 and 3.14159!\n\n  indented\ttab",
    "héllo wörld 日本語 🤖 don't WE'RE",
    "<|im_start|>user\nHi<|im_end|>\n",
]


def test_gguf_tokenizer_equals_transformers_conversion():
    from transformers import AutoTokenizer

    ckpt = open_checkpoint(None)
    ours = ckpt.tokenizer()
    theirs = AutoTokenizer.from_pretrained(ckpt.path.parent, gguf_file=ckpt.path.name)
    for text in TEXTS:
        ids = ours.encode(text, add_special=False)
        assert ids == theirs(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids) == text


@pytest.mark.parametrize("quant", ["default", "Q4_K"])
def test_lazy_reader_equals_gguf_reader(tiny_models, tmp_path, quant):  # noqa: ANN001
    """Our header parser against gguf-py's own reader: every metadata value, every tensor's
    type, shape, offset and bytes."""
    from gguf import GGUFReader

    from node.engine.gguf_file import GGUFFile
    from node.engine.weights import default_model_path

    if quant == "default":
        path = default_model_path()
    else:
        types = {"blk.0.ffn_up.weight": "Q5_1", "blk.1.attn_q.weight": "Q8_0"}
        path = write_gguf(tiny_models["llama"], tmp_path / "mixed.gguf", "Q4_0", types)
    ours, theirs = GGUFFile(path), GGUFReader(path)
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == expected
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert (info.type, info.offset, info.n_bytes) == (t.tensor_type, t.data_offset, t.n_bytes)
        assert info.shape == tuple(reversed(t.shape.tolist()))
        assert np.array_equal(ours.read(t.name), t.data.reshape(-1).view(np.uint8))


def test_truncated_gguf_is_one_line(tmp_path):  # noqa: ANN001
    from node.engine.weights import default_model_path

    data = default_model_path().read_bytes()
    for cut in (100, 2_000_000, len(data) - 1000):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        proc = run_cli("generate", "--local", "--model", str(bad), "hi")
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert "not a readable GGUF file" in proc.stderr, proc.stderr


def _s(text: bytes, claimed: int | None = None) -> bytes:
    return struct.pack("<Q", len(text) if claimed is None else claimed) + text


def _kv(key: bytes, kind: int, value: bytes) -> bytes:
    return _s(key) + struct.pack("<I", kind) + value


def _tensor(name: bytes, dims: list[int], n_dims: int | None = None, kind: int = 0) -> bytes:
    n = len(dims) if n_dims is None else n_dims
    return _s(name) + struct.pack(f"<I{len(dims)}QIQ", n, *dims, kind, 0)


def _gguf(n_tensors: int, n_kv: int, *parts: bytes) -> bytes:
    return struct.pack("<IIQQ", GGUF_MAGIC, 3, n_tensors, n_kv) + b"".join(parts) + bytes(64)


STRING, ARRAY, UINT8 = 8, 9, 0
HOSTILE = {
    "2**40-byte key": _gguf(0, 1, _s(b"k", 1 << 40)),
    "2**40-byte string": _gguf(0, 1, _kv(b"k", STRING, _s(b"v", 1 << 40))),
    "2**40 bytes in an array": _gguf(0, 1, _kv(b"k", ARRAY, struct.pack("<IQ", UINT8, 1 << 40))),
    "2**40 strings in an array": _gguf(0, 1, _kv(b"k", ARRAY, struct.pack("<IQ", STRING, 1 << 40))),
    "arrays nested 10000 deep": _gguf(0, 1, _kv(b"k", ARRAY, struct.pack("<IQ", ARRAY, 1) * 10000)),
    "2**62 metadata entries": _gguf(0, 1 << 62),
    "2**62 tensors": _gguf(1 << 62, 0),
    "2**31 dims": _gguf(1, 0, _s(b"t") + struct.pack("<I", 1 << 31)),
    "dims whose product overflows int64": _gguf(1, 0, _tensor(b"t", [1 << 32, 1 << 32, 1 << 32])),
    "a zero dim": _gguf(1, 0, _tensor(b"t", [32, 0])),
}


@pytest.mark.parametrize("what", list(HOSTILE))
def test_hostile_gguf_header_is_refused_before_any_allocation(tmp_path, what):  # noqa: ANN001
    """Every size a header claims is checked against the bytes left in the file first."""
    import tracemalloc

    from node.engine.gguf_file import GGUFFile

    path = tmp_path / "hostile.gguf"
    path.write_bytes(HOSTILE[what])
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as e:
            GGUFFile(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak
    assert "\n" not in str(e.value) and len(str(e.value)) < 200, e.value


def test_hostile_gguf_is_one_line_and_exit_2(tmp_path):  # noqa: ANN001
    path = tmp_path / "hostile.gguf"
    path.write_bytes(HOSTILE["2**40-byte string"])
    proc = run_cli("generate", "--local", "--model", str(path), "hi")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "not a readable GGUF file" in proc.stderr and "MemoryError" not in proc.stderr
