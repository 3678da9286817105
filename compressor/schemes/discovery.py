"""Helpers the schemes share to find their modules in a checkpoint."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from compressor.errors import InputError
from compressor.formats.safetensors_io import read_tensor

if TYPE_CHECKING:
    from compressor.formats.checkpoint import Checkpoint

__all__ = ["IGNORED", "compressed_tensors_errors", "config_group", "module_parts", "target_matches"]


IGNORED: dict[str, Any] = {"ignored": True}  # `config_group`'s answer for an ignored module


def config_group(qc: dict[str, Any], module: str) -> dict[str, Any] | None:
    """The config group of a quantization_config block that targets `module` (the first, as
    compressed-tensors takes it), `IGNORED` when its `ignore` list names the module, None when
    no group targets it."""
    if any(target_matches(p, module) for p in qc.get("ignore") or [] if p != "Linear"):
        return IGNORED
    return next(
        (
            g
            for g in (qc.get("config_groups") or {}).values()
            if any(target_matches(t, module) for t in g.get("targets", []))
        ),
        None,
    )


def target_matches(target: str, module: str) -> bool:
    """A quantization_config target (exact name, "re:" pattern or "Linear") names `module`."""
    if target == "Linear":
        return True
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module


def module_parts(
    checkpoint: Checkpoint,
    module: str,
    suffixes: tuple[str, ...],
    required: tuple[str, ...],
    main: str,
) -> tuple[dict[str, Any], tuple[int, int]]:
    """A compressed module's stored tensors (those of `suffixes` present) and its dense shape;
    a missing `required` one is an error naming `<module>.<main>`."""
    parts = {
        suffix: checkpoint.tensors[f"{module}.{suffix}"]
        for suffix in suffixes
        if f"{module}.{suffix}" in checkpoint.tensors
    }
    for suffix in required:
        if suffix not in parts:
            raise InputError(
                f"has no {suffix}", path=str(checkpoint.root), tensor=f"{module}.{main}"
            )
    file, info = parts["weight_shape"]
    values = read_tensor(file, info).reshape(-1) if info.dtype[0] in "IU" else None
    if values is None or values.size != 2 or not all(0 < int(v) < 2**40 for v in values):
        raise InputError(
            "is not a valid [rows, cols] pair of positive integers "
            f"({info.dtype} {list(info.shape)}: {values.tolist() if values is not None else '?'})",
            path=file,
            tensor=f"{module}.weight_shape",
            hint="the checkpoint is corrupt or was edited; run `compressor verify` and recompress",
        )
    rows, cols = (int(v) for v in values)
    return parts, (rows, cols)


def compressed_tensors_errors(qc: dict[str, Any]) -> list[str]:
    """What compressed-tensors' own pydantic model (`QuantizationConfig`) rejects in a
    quantization_config block; nothing when the package is not installed (it is optional: each
    scheme's structural checks stand alone)."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
        from pydantic import ValidationError
    except ImportError:
        return []
    try:
        QuantizationConfig.model_validate(qc)
    except ValidationError as e:
        return [
            f"compressed-tensors rejects {'.'.join(str(p) for p in item['loc']) or '(top level)'}: "
            f"{item['msg']}"
            for item in e.errors()
        ]
    return []
