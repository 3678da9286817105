"""The `quantization_config` block written into the output's config.json.

compressed-tensors validates this block with pydantic models that reject unknown keys, so we
write exactly its known fields. Every config group lists its modules by exact name: with
fallback group sizes and mixed bit widths a broad target such as "Linear" would be ambiguous.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from compressor.formats.layout import (
    CODEBOOK_FORMAT,
    CT_FORMAT,
    MINMAX_FORMAT,
    SPARSE_BITMASK_FORMAT,
    CodebookArgs,
)
from compressor.math.quant import QuantArgs

OUR_TOOL = "checkpoint-compressor"
"""Marks our own layouts' blocks (`"tool": OUR_TOOL`). They carry no `quant_method` on purpose:
transformers then refuses to load the checkpoint (ValueError) — with an unknown `quant_method`
it would only warn and load randomly initialised weights."""


def is_ours(quantization_config: object) -> bool:
    """Whether a config.json `quantization_config` block is one of our own layouts."""
    return isinstance(quantization_config, dict) and quantization_config.get("tool") == OUR_TOOL


__all__ = [
    "OUR_TOOL",
    "codebook_config",
    "compressed_tensors_config",
    "is_ours",
    "minmax_config",
    "sparse_bitmask_config",
]


def _weights_args(args: QuantArgs) -> dict[str, Any]:
    return {
        "num_bits": args.bits,
        "type": "int",
        "symmetric": args.symmetric,
        "group_size": args.group_size if args.strategy == "group" else None,
        "strategy": args.strategy,
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
        "observer_kwargs": {},
    }


def compressed_tensors_config(
    groups: Mapping[QuantArgs, Sequence[str]], ignore: Sequence[str]
) -> dict[str, Any]:
    """Build the block for int schemes: one config group per distinct `QuantArgs`.

    `groups` maps each scheme to the module names quantized with it; `ignore` lists linear
    modules left dense (lm_head, ignored layers), so loaders don't expect packed weights there.
    """
    config_groups = {}
    for k, (args, modules) in enumerate(sorted(groups.items(), key=lambda kv: _order(kv[0]))):
        config_groups[f"group_{k}"] = {
            "targets": sorted(modules),
            "weights": _weights_args(args),
            "input_activations": None,
            "output_activations": None,
            "format": CT_FORMAT,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": CT_FORMAT if len(config_groups) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "ignore": sorted(ignore),
    }


def minmax_config(groups: Mapping[QuantArgs, Sequence[str]]) -> dict[str, Any]:
    """Our own block for the float-offset layout, marked `"tool": OUR_TOOL` and without a
    `quant_method`, so transformers refuses the checkpoint instead of misreading it (decompress
    first)."""
    return {
        "tool": OUR_TOOL,
        "format": MINMAX_FORMAT,
        "config_groups": {
            f"group_{k}": {
                "targets": sorted(modules),
                "num_bits": args.bits,
                "strategy": args.strategy,
                "group_size": args.group_size if args.strategy == "group" else None,
            }
            for k, (args, modules) in enumerate(
                sorted(groups.items(), key=lambda kv: _order(kv[0]))
            )
        },
        "decompress_with": "compressor decompress SRC DST",
    }


def sparse_bitmask_config(modules: Sequence[str]) -> dict[str, Any]:
    """Our block for pruned, unquantized weights stored as values + bitmask (see layout.py)."""
    return {
        "tool": OUR_TOOL,
        "format": SPARSE_BITMASK_FORMAT,
        "targets": sorted(modules),
        "decompress_with": "compressor decompress SRC DST",
    }


def codebook_config(groups: Mapping[tuple[CodebookArgs, str], Sequence[str]]) -> dict[str, Any]:
    """Our block for the codebook layouts (NF4, k-means; see layout.py).

    `groups` maps (scheme, the weights' safetensors dtype) to module names: the dtype is what
    decompression restores, since codes, absmax and codebook are stored in float32. As in the
    minmax block, it has no `quant_method` (see `OUR_TOOL`).
    """
    config_groups = {}
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][0].method, kv[0][0].bits, kv[0][1]))
    for k, ((args, dtype), modules) in enumerate(ordered):
        group: dict[str, Any] = {
            "targets": sorted(modules),
            "type": args.method,
            "num_bits": args.bits,
            "dtype": dtype,
        }
        if args.method == "nf4":
            group["block_size"] = args.block_size
        else:
            group["iterations"] = args.iterations
            group["init"] = args.init
        config_groups[f"group_{k}"] = group
    return {
        "tool": OUR_TOOL,
        "format": CODEBOOK_FORMAT,
        "config_groups": config_groups,
        "decompress_with": "compressor decompress SRC DST",
    }


def _order(args: QuantArgs) -> tuple:
    return (-args.bits, args.method, not args.symmetric, args.strategy, -args.group_size)
