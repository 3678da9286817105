"""What the `quantization_config` blocks of config.json share.

Each scheme builds its own block (`compressor/schemes/`; `schemes.quantization_config` combines
them). compressed-tensors validates its block with pydantic models that reject unknown keys, so
the integer scheme writes exactly its known fields; every config group lists its modules by exact
name (with fallback group sizes and mixed bit widths a broad target such as "Linear" would be
ambiguous). Our own layouts carry the marker below instead of a `quant_method`.
"""

from __future__ import annotations

OUR_TOOL = "checkpoint-compressor"
"""Marks our own layouts' blocks (`"tool": OUR_TOOL`). They carry no `quant_method` on purpose:
transformers then refuses to load the checkpoint (ValueError) — with an unknown `quant_method`
it would only warn and load randomly initialised weights."""


def is_ours(quantization_config: object) -> bool:
    """Whether a config.json `quantization_config` block is one of our own layouts."""
    return isinstance(quantization_config, dict) and quantization_config.get("tool") == OUR_TOOL


__all__ = [
    "OUR_TOOL",
    "is_ours",
]
