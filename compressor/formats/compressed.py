"""Reading compressed checkpoints back: scheme discovery, streaming decompression, inspection.

Understands every layout a registered scheme reads (`compressor/schemes/`): compressed-tensors
`pack-quantized` checkpoints (ours and other tools', with exact, "re:" or "Linear" targets) and
our `minmax-float-offset`, `sparse-bitmask` and `codebook` (NF4, k-means) layouts.
Decompression streams row blocks, so memory stays bounded whatever the tensor size.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from compressor import schemes
from compressor.errors import InputError, OutputError
from compressor.formats import dtypes
from compressor.formats.checkpoint import INDEX_NAME, Checkpoint, open_checkpoint
from compressor.formats.paths import check_disjoint, check_parent_writable
from compressor.formats.safetensors_io import (
    SafetensorsWriter,
    TensorInfo,
    iter_byte_blocks,
    read_rows,
)
from compressor.schemes import CompressedModule

__all__ = [
    "CompressedModule",
    "decompress_checkpoint",
    "dequantize_module_rows",
    "inspect_checkpoint",
    "quantized_modules",
]

_ROW_BLOCK = 1024  # multiple of 32: zero-point words never straddle two blocks


def quantized_modules(checkpoint: Checkpoint) -> dict[str, CompressedModule]:
    """Every compressed weight of a checkpoint, found by each registered scheme, with the
    scheme args its quantization_config gives it."""
    qc = (checkpoint.config or {}).get("quantization_config")
    out: dict[str, CompressedModule] = {}
    for scheme in schemes.all_schemes():
        out.update(scheme.discover(checkpoint, qc))
    return out


def _check_part_shapes(module: CompressedModule) -> None:
    """Every stored part has the shape its scheme gives the module's `weight_shape` (a tampered
    or mismatched shape is refused here, before any output is written, naming both)."""
    rows, cols = module.shape
    kept = module.parts["weight_values"][1].shape[0] if "weight_values" in module.parts else 0
    specs = module.scheme.outputs(
        f"{module.module}.weight", module.shape, module.dtype, module.args, kept
    )
    for spec in specs:
        suffix = spec.name.rsplit(".", 1)[1]
        if suffix not in module.parts or suffix == "weight_shape":
            continue
        file, info = module.parts[suffix]
        if tuple(info.shape) != spec.shape:
            raise InputError(
                f"has shape {list(info.shape)} but the module's weight_shape {[rows, cols]} "
                f"needs {list(spec.shape)} for {module.args.describe()}",
                path=file,
                tensor=f"{module.module}.{suffix}",
                hint="the checkpoint is corrupt or was edited; run `compressor verify` and "
                "recompress",
            )


def dequantize_module_rows(
    module: CompressedModule, r0: int, r1: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Rows [r0, r1) of the dense weight (r0 a multiple of 32 when zero points are packed)."""
    return module.scheme.decode_rows(module, r0, r1, dtype)


def _dense_blocks(module: CompressedModule, dtype: torch.dtype | None) -> Iterator[torch.Tensor]:
    rows = module.shape[0]
    for r0 in range(0, rows, _ROW_BLOCK):
        yield dequantize_module_rows(module, r0, min(rows, r0 + _ROW_BLOCK), dtype)


def decompress_checkpoint(
    source: str | Path, destination: str | Path, dtype: str | None = None, overwrite: bool = False
) -> Path:
    """Write a dense copy of a compressed checkpoint (same shard split, no quantization_config).

    `dtype` ("bfloat16", "float16", "float32") casts every float tensor; by default dequantized
    weights take their scale's dtype and other tensors stay as they are.
    """
    dest = Path(destination)
    partial = dest.parent / f".{dest.name}.partial"
    check_disjoint(
        {"the compressed checkpoint": source},
        {"the destination": dest, "the temporary directory": partial},
    )
    check_parent_writable(dest)
    checkpoint = open_checkpoint(source)
    modules = quantized_modules(checkpoint)
    for found in modules.values():
        _check_part_shapes(found)
    if dest.exists() and not overwrite:
        raise OutputError(
            "the destination already exists",
            path=str(dest),
            hint="pass --overwrite or choose another destination",
        )
    target_dtype = _parse_dtype(dtype) if dtype else None
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    part_of = {f"{m.module}.{s}": m for m in modules.values() for s in m.parts}
    weight_map = {}
    total = 0
    for shard in checkpoint.shards:
        entries: list[tuple[str, str, tuple[int, ...]]] = []
        plan: list[tuple[str, CompressedModule | TensorInfo]] = []
        for name, info in shard.tensors.items():
            module = part_of.get(name)
            if module is not None:
                if name == f"{module.module}.{module.root}":
                    out_dtype = (
                        dtypes.safetensors_dtype_of(target_dtype) if target_dtype else module.dtype
                    )
                    entries.append((f"{module.module}.weight", out_dtype, module.shape))
                    plan.append((f"{module.module}.weight", module))
                continue
            out_dtype = (
                dtypes.safetensors_dtype_of(target_dtype)
                if target_dtype and dtypes.is_float(info.dtype)
                else info.dtype
            )
            entries.append((name, out_dtype, info.shape))
            plan.append((name, info))
        file_name = Path(shard.path).name
        with SafetensorsWriter(partial / file_name, entries, metadata={"format": "pt"}) as writer:
            for (name, out_dtype, _), (_, what) in zip(entries, plan, strict=True):
                if isinstance(what, CompressedModule):
                    for block in _dense_blocks(what, dtypes.torch_dtype(out_dtype)):
                        writer.write(name, dtypes.to_raw(block))
                elif out_dtype == what.dtype:
                    for raw in iter_byte_blocks(shard.path, what):
                        writer.write(name, raw)
                else:
                    rows = what.shape[0] if what.shape else 1
                    step = max(1, (16 << 20) // max(1, what.nbytes // max(rows, 1)))
                    for r0 in range(0, rows, step):
                        t = dtypes.to_torch(
                            read_rows(shard.path, what, r0, min(rows, r0 + step)), what.dtype
                        )
                        writer.write(name, dtypes.to_raw(t.to(dtypes.torch_dtype(out_dtype))))
                weight_map[name] = file_name
        total += sum(i.nbytes for i in writer.tensors.values())
    if len(checkpoint.shards) > 1:
        (partial / INDEX_NAME).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    for rel in checkpoint.extra_files:
        if rel in ("compression.json", "manifest.json"):
            continue
        (partial / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(checkpoint.root / rel, partial / rel)
    config = dict(checkpoint.config or {})
    config.pop("quantization_config", None)
    if target_dtype is not None and "torch_dtype" in config:
        config["torch_dtype"] = str(target_dtype).removeprefix("torch.")
    if checkpoint.config is not None:
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if dest.is_dir() and not dest.is_symlink():
        shutil.rmtree(dest)
    elif dest.exists() or dest.is_symlink():  # --overwrite of a file or a link: replace it
        dest.unlink()
    partial.rename(dest)
    return dest


def _parse_dtype(name: str) -> torch.dtype:
    table = {
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "float32": torch.float32,
        "fp32": torch.float32,
        "float64": torch.float64,
    }
    if name.lower() not in table:
        raise InputError(f"unknown dtype {name!r}", hint=f"use one of {', '.join(sorted(table))}")
    return table[name.lower()]


def inspect_checkpoint(path: str | Path) -> dict:
    """Rows (name, dtype, shape, scheme, bytes, dense bytes) and totals, dense or compressed."""
    checkpoint = open_checkpoint(path)
    modules = quantized_modules(checkpoint)
    part_of = {f"{m.module}.{s}": m for m in modules.values() for s in m.parts}
    rows: list[dict[str, Any]] = []
    for name, (_, info) in checkpoint.tensors.items():
        module = part_of.get(name)
        if module is None:
            rows.append(
                {
                    "name": name,
                    "dtype": info.dtype,
                    "shape": list(info.shape),
                    "scheme": "dense",
                    "bytes": info.nbytes,
                    "dense_bytes": info.nbytes,
                }
            )
        elif name == f"{module.module}.{module.root}":
            dense = math.prod(module.shape) * dtypes.itemsize(module.dtype)
            rows.append(
                {
                    "name": f"{module.module}.weight",
                    "dtype": module.dtype,
                    "shape": list(module.shape),
                    "scheme": module.args.describe(),
                    "bytes": module.nbytes,
                    "dense_bytes": dense,
                }
            )
    total = sum(r["bytes"] for r in rows)
    dense = sum(r["dense_bytes"] for r in rows)
    return {
        "path": str(path),
        "tensors": rows,
        "total_bytes": total,
        "dense_bytes": dense,
        "ratio": dense / total if total else 0.0,
        "quantized": len(modules),
    }
