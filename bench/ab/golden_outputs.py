"""Byte-identity check for refactors: every scheme family, compressed, decompressed, inspected.

    cd /tmp && PYTHONPATH=<tree> python /path/to/bench/ab/golden_outputs.py DIR > hashes.json

Compresses one generated checkpoint with 17 configurations (every preset, tensor strategy sym and
asym, a mixed recipe, k-means 3-bit, minmax 3-bit g32, hqq and mse rounding, the automatic
budget, bitmask, 2:4 and global pruning), decompresses and inspects each output, and prints the
sha256 of every file (not our run-specific compression.json/manifest.json). Run it with two
trees and diff the JSON: the scheme registry was checked this way (docs/design.md).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import yaml

from compressor.config import build_config
from compressor.formats.compressed import decompress_checkpoint, inspect_checkpoint
from compressor.pipeline import compress_checkpoint
from compressor.testing.generate import LlamaShape, generate_llama_checkpoint

SHAPE = LlamaShape(hidden_size=192, intermediate_size=448, num_hidden_layers=2, vocab_size=256)
RECIPES: dict[str, dict[str, Any]] = {
    "tensor": {"quantization": [{"targets": ["Linear"], "bits": 8, "strategy": "tensor"}]},
    "tensor-asym": {
        "quantization": [
            {"targets": ["Linear"], "bits": 4, "strategy": "tensor", "symmetric": False}
        ]
    },
    "mixed": {
        "quantization": [
            {"targets": ["re:.*mlp.*"], "bits": 4, "group_size": 64},
            {"targets": ["Linear"], "bits": 8, "strategy": "channel"},
        ]
    },
    "kmeans3": {"quantization": [{"targets": ["Linear"], "method": "kmeans", "bits": 3}]},
    "minmax3-g32": {
        "quantization": [
            {
                "targets": ["Linear"],
                "method": "minmax",
                "bits": 3,
                "group_size": 32,
                "symmetric": False,
            }
        ]
    },
}
CASES: dict[str, dict[str, Any]] = {
    "w8a16": {"preset": "w8a16"},
    "w4a16": {"preset": "w4a16"},
    "w4a16-asym": {"preset": "w4a16-asym"},
    "minmax": {"preset": "minmax"},
    "nf4": {"preset": "nf4"},
    "kmeans4": {"preset": "kmeans4"},
    "hqq": {"preset": "w4a16", "rounding": "hqq"},
    "mse-asym": {"preset": "w4a16-asym", "rounding": "mse"},
    "budget": {"preset": "w4a16", "budget": {"target_bits": 4.5}},
    "bitmask": {"preset": "dense", "pruning": {"sparsity": 0.5, "sparse_format": "bitmask"}},
    "prune-asym": {"preset": "w4a16-asym", "pruning": {"sparsity": 0.3, "structure": "2:4"}},
    "dense-prune": {"preset": "dense", "pruning": {"sparsity": 0.4, "scope": "global"}},
}


def _digests(directory: Path, keep: Any) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16]
        for p in sorted(directory.iterdir())
        if keep(p)
    }


def main(root: Path) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    src = root / "src"
    if not src.exists():
        generate_llama_checkpoint(src, SHAPE, shard_mb=0.5, seed=7)
    cases = dict(CASES)
    for name, body in RECIPES.items():
        recipe = root / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump({"version": 1, **body}))
        cases[name] = {"recipe_path": str(recipe)}
    out: dict[str, Any] = {}
    for name, options in cases.items():
        dst, dense = root / f"out-{name}", root / f"dense-{name}"
        shutil.rmtree(dst, ignore_errors=True)
        shutil.rmtree(dense, ignore_errors=True)
        compress_checkpoint(build_config(str(src), str(dst), workers=0, max_shard_mb=1, **options))
        out[name] = _digests(dst, lambda p: p.name not in ("compression.json", "manifest.json"))
        decompress_checkpoint(dst, dense)
        out[name]["decompressed"] = _digests(dense, lambda p: p.suffix == ".safetensors")
        table = json.dumps(inspect_checkpoint(dst), sort_keys=True, default=str)
        out[name]["inspect"] = hashlib.sha256(table.replace(str(dst), "X").encode()).hexdigest()[
            :16
        ]
    return out


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=1, sort_keys=True))
