"""Generate Llama-shaped bf16 benchmark checkpoints of a target size (0.5 to 8 GB).

    python -m bench.generate --size-gb 1.8 --shards 2 /work/bench-data/llama-1.8g

The shape is Llama-like (hidden 2048, intermediate 5632, 16 heads / 4 KV heads, vocab 32000,
untied lm_head); the number of layers is chosen so the checkpoint lands near the target size.
Weights come from `compressor.testing.generate` (Student-t tails, loud outlier input channels,
deterministic per (seed, tensor index)), written tensor by tensor so memory stays at one tensor.

A directory that already holds a checkpoint generated with the same shape, dtype, shard size and
seed (recorded in `bench-generate.json`) is reused as is; anything else there is an error.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

from compressor.testing.generate import LlamaShape, generate_llama_checkpoint, llama_tensor_shapes

STAMP = "bench-generate.json"
ITEMSIZE = 2  # bf16

# The reference shape (TinyLlama-1.1B's widths): 2048 hidden, 5632 intermediate, GQA 16/4 heads.
BASE = {
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "max_position_embeddings": 2048,
}


def checkpoint_bytes(shape: LlamaShape) -> int:
    return sum(math.prod(d) for _, d in llama_tensor_shapes(shape)) * ITEMSIZE


def shape_for_size(size_gb: float, **overrides: int) -> LlamaShape:
    """The Llama shape (BASE widths) whose bf16 size is closest to `size_gb` (10^9 bytes)."""
    widths = {**BASE, **overrides}
    fixed = checkpoint_bytes(LlamaShape(**widths, num_hidden_layers=0))
    per_layer = checkpoint_bytes(LlamaShape(**widths, num_hidden_layers=1)) - fixed
    layers = max(1, round((size_gb * 1e9 - fixed) / per_layer))
    return LlamaShape(**widths, num_hidden_layers=layers)


def shard_mb_for(shape: LlamaShape, shards: int) -> float:
    """A shard size (MiB) that cuts the checkpoint into `shards` nearly equal shards."""
    total = checkpoint_bytes(shape)
    # The biggest tensor (embed / lm_head) must fit; 1% slack so tensor boundaries don't spill
    # a third shard when asking for two.
    return math.ceil(total / shards / 2**20 * 1.01)


def generate(
    path: Path, shape: LlamaShape, *, shard_mb: float, seed: int = 0, dtype: str = "BF16"
) -> dict:
    """Generate (or reuse) the checkpoint at `path`; return its description."""
    desc = {"shape": asdict(shape), "dtype": dtype, "shard_mb": shard_mb, "seed": seed}
    stamp = path / STAMP
    if stamp.exists():
        recorded = json.loads(stamp.read_text())
        if {k: recorded.get(k) for k in desc} == desc:
            return recorded
        raise SystemExit(f"{path} holds a different generated checkpoint; remove it first")
    if path.exists():
        raise SystemExit(f"{path} exists and is not a generated benchmark checkpoint")
    start = time.perf_counter()
    generate_llama_checkpoint(path, shape, dtype=dtype, shard_mb=shard_mb, seed=seed)
    files = sorted(path.glob("*.safetensors"))
    desc.update(
        {
            "bytes": sum(f.stat().st_size for f in files),
            "shards": [[f.name, f.stat().st_size] for f in files],
            "generate_s": round(time.perf_counter() - start, 1),
        }
    )
    stamp.write_text(json.dumps(desc, indent=2) + "\n")
    return desc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("path", type=Path)
    p.add_argument("--size-gb", type=float, default=1.8, help="target size, 10^9 bytes")
    p.add_argument("--layers", type=int, help="exact layer count (overrides --size-gb)")
    p.add_argument("--shards", type=int, default=2, help="number of ~equal shards")
    p.add_argument("--shard-mb", type=float, help="shard size in MiB (overrides --shards)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if not 0.1 <= a.size_gb <= 16:
        p.error("--size-gb must be within 0.1..16")
    shape = (
        LlamaShape(**BASE, num_hidden_layers=a.layers) if a.layers else shape_for_size(a.size_gb)
    )
    shard_mb = a.shard_mb or shard_mb_for(shape, a.shards)
    desc = generate(a.path, shape, shard_mb=shard_mb, seed=a.seed)
    json.dump(desc, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
