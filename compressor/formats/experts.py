"""Fused 3-D MoE expert tensors, seen as the per-expert 2-D weights servers load.

transformers v5 keeps an MoE block's experts as two 3-D tensors,

    <block>.experts.gate_up_proj   (E, 2·I, H)   expert j's gate_proj rows, then its up_proj rows
    <block>.experts.down_proj      (E, H, I)

and some checkpoints are stored that way. vLLM's compressed-tensors MoE loaders and
transformers' own checkpoint conversion read per-expert 2-D weights,
`<block>.experts.<j>.{gate,up,down}_proj.weight`. In row-major safetensors every one of those
matrices is a contiguous byte range of the 3-D tensor, so the plan simply sees each as a tensor
of its own (a `TensorInfo` view: same file, its own offsets and 2-D shape): it is chunked,
quantized per expert and written under its per-expert name, and nothing is ever copied whole.

gpt-oss stores its experts input-major with gate and up interleaved column by column
(`gate_up_proj` (E, H, 2·I), biases beside them): those are not views of row blocks, and are
left as they are (the coverage check names them when a recipe expected them quantized).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace

from compressor.formats import dtypes
from compressor.formats.safetensors_io import TensorInfo

__all__ = ["FUSED_EXPERTS", "split_fused_experts"]

FUSED_EXPERTS = re.compile(r"^(?P<block>.*\.experts)\.(?P<kind>gate_up_proj|down_proj)$")
_INPUT_MAJOR = ("gpt_oss",)  # model types whose 3-D experts are (E, in, out): not views


def _model_type(config: Mapping[str, object] | None) -> object:
    config = config or {}
    text = config.get("text_config")
    if isinstance(text, Mapping) and "model_type" in text:
        return text.get("model_type")
    return config.get("model_type")


def split_fused_experts(
    name: str, info: TensorInfo, config: Mapping[str, object] | None
) -> list[tuple[str, TensorInfo]] | None:
    """The per-expert 2-D views of a fused 3-D expert tensor, in storage order, or None when
    `name` is not one (or is stored input-major)."""
    m = FUSED_EXPERTS.match(name)
    if m is None or len(info.shape) != 3 or _model_type(config) in _INPUT_MAJOR:
        return None
    experts, rows, cols = (int(v) for v in info.shape)
    if experts == 0 or rows == 0 or cols == 0 or (m["kind"] == "gate_up_proj" and rows % 2):
        return None
    size = dtypes.itemsize(info.dtype)
    views = []
    for j in range(experts):
        base = info.start + j * rows * cols * size
        prefix = f"{m['block']}.{j}"
        if m["kind"] == "down_proj":
            parts = [("down_proj", 0, rows)]
        else:
            half = rows // 2
            parts = [("gate_proj", 0, half), ("up_proj", half, rows)]
        for leaf, r0, r1 in parts:
            start = base + r0 * cols * size
            views.append(
                (
                    f"{prefix}.{leaf}.weight",
                    replace(
                        info,
                        name=f"{prefix}.{leaf}.weight",
                        shape=(r1 - r0, cols),
                        start=start,
                        end=start + (r1 - r0) * cols * size,
                    ),
                )
            )
    return views
