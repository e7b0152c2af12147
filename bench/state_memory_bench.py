"""Per-request cache memory of a hybrid model against the same model with full attention in
every layer (issue 25): the caches a whole-model stage allocates for one request of N
positions (meta tensors: sizes only), bfloat16.

    .venv/bin/python bench/state_memory_bench.py --out bench/results/state_memory.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.engine.models import family_for_hf  # noqa: E402
from node.engine.shapes import built_in  # noqa: E402


def cache_bytes(name: str, positions: int, all_attention: bool = False) -> int:
    full, fields = built_in(name)
    family = family_for_hf(fields)
    config = family.config_cls.from_hf(fields)
    if all_attention:  # every layer a gated attention layer
        config = dataclasses.replace(config, linear=(False,) * config.n_layers)
    config = dataclasses.replace(config, n_experts=0, dense_layers=())  # MLPs: not cached
    with torch.device("meta"):
        stage = family.stage_cls(config, 0, config.n_layers, "cpu")
        cache = stage.new_cache(1, positions, torch.bfloat16, torch.device("meta"))
    return cache.nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen3-Next-80B-A3B-Instruct")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    for positions in (4096, 32768, 262144):
        hybrid = cache_bytes(args.model, positions)
        full = cache_bytes(args.model, positions, all_attention=True)
        rows.append({"positions": positions, "hybrid_mib": hybrid / 2**20,
                     "all_attention_mib": full / 2**20, "fraction": hybrid / full})  # fmt: skip
        print(rows[-1])
    out = {"benchmark": "per-request cache memory, hybrid vs all-attention", "model": args.model,
           "dtype": "bfloat16 (DeltaNet states float32)", "rows": rows}  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
