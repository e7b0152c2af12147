"""A Llama GGUF file of random float16 weights, with the default model's tokenizer and
metadata (gguf-py writes it): a model of a chosen size that no machine here has.

    .venv/bin/python bench/random_gguf.py /tmp/random-1b.gguf       # 16 layers, d=2048: 1.1B
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from node.engine.weights import default_model_path  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--source", type=Path, help="the GGUF whose metadata and tokenizer it "
                        "copies (default: the default model's)")  # fmt: skip
    args = parser.parse_args()
    source = GGUFReader(args.source or default_model_path())
    dims = {
        "llama.block_count": args.layers, "llama.embedding_length": args.dim,
        "llama.feed_forward_length": args.ffn, "llama.attention.head_count": args.heads,
        "llama.attention.head_count_kv": args.kv_heads,
        "llama.rope.dimension_count": args.dim // args.heads,
        "general.name": f"random {args.layers}x{args.dim}", "general.file_type": 1,
    }  # fmt: skip
    writer = GGUFWriter(args.out, "llama")
    for name, field in source.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kind = field.types[0]
        value = dims.get(name, field.contents())
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        if name in dims and kind != GGUFValueType.STRING:
            kind = GGUFValueType.UINT32
        writer.add_key_value(name, value, kind, sub_type=sub)
    rng = np.random.default_rng(0)
    vocab, d, kv = 49152, args.dim, args.dim // args.heads * args.kv_heads

    def add(name: str, shape: tuple[int, ...]) -> None:
        scale = 1.0 if len(shape) == 1 else 0.02
        data = (rng.standard_normal(shape, np.float32) * scale).astype(np.float16)
        writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType.F16)

    add("token_embd.weight", (vocab, d))
    for i in range(args.layers):
        for part, shape in (("attn_norm", (d,)), ("attn_q", (d, d)), ("attn_k", (kv, d)),
                            ("attn_v", (kv, d)), ("attn_output", (d, d)), ("ffn_norm", (d,)),
                            ("ffn_gate", (args.ffn, d)), ("ffn_up", (args.ffn, d)),
                            ("ffn_down", (d, args.ffn))):  # fmt: skip
            add(f"blk.{i}.{part}.weight", shape)
    add("output_norm.weight", (d,))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=True)
    writer.close()
    print(f"wrote {args.out} ({args.out.stat().st_size / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
