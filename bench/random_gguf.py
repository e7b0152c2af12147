"""A Llama GGUF file of random float16 weights, with the default model's tokenizer and
metadata (gguf-py writes it): a model of a chosen size that no machine here has.

    .venv/bin/python bench/random_gguf.py /tmp/random-1b.gguf       # 16 layers, d=2048: 1.1B
    .venv/bin/python bench/random_gguf.py /tmp/8b-4.gguf --layers 4 --dim 4096 --ffn 14336 \
        --type q4_0     # Llama-3.1-8B-shaped layers in Q4_0, the token table in Q8_0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from node.engine.weights import default_model_path  # noqa: E402

FILE_TYPES = {"f16": 1, "q4_0": 2, "q8_0": 7}  # llama.cpp's general.file_type


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--type", choices=("f16", "q4_0", "q8_0"), default="f16",
                        help="the weight matrices' type (a Q4_0 file's token table: Q8_0)")
    parser.add_argument("--source", type=Path, help="the GGUF whose metadata and tokenizer it "
                        "copies (default: the default model's)")  # fmt: skip
    args = parser.parse_args()
    source = GGUFReader(args.source or default_model_path())
    dims = {
        "llama.block_count": args.layers, "llama.embedding_length": args.dim,
        "llama.feed_forward_length": args.ffn, "llama.attention.head_count": args.heads,
        "llama.attention.head_count_kv": args.kv_heads,
        "llama.rope.dimension_count": args.dim // args.heads,
        "general.name": f"random {args.layers}x{args.dim}",
        "general.file_type": FILE_TYPES[args.type],
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

    matrices = GGMLQuantizationType[args.type.upper()]

    def add(name: str, shape: tuple[int, ...]) -> None:
        scale = 1.0 if len(shape) == 1 else 0.02
        data = rng.standard_normal(shape, np.float32) * scale
        if len(shape) == 1:  # norms: float32, as llama.cpp's converters write them
            writer.add_tensor(name, data)
            return
        kind = matrices
        if kind == GGMLQuantizationType.F16:
            data = data.astype(np.float16)
        else:
            kind = GGMLQuantizationType.Q8_0 if name == "token_embd.weight" else matrices
            data = quants.quantize(data, kind)
        writer.add_tensor(name, data, raw_dtype=kind)

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
