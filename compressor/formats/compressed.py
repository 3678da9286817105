"""Reading compressed checkpoints back: scheme discovery, streaming decompression, inspection.

Understands compressed-tensors `pack-quantized` checkpoints (ours and other tools', with exact,
"re:" or "Linear" targets) and our `minmax-float-offset`, `sparse-bitmask` and `codebook` (NF4,
k-means) layouts (see `layout.py`).
Decompression streams row blocks, so memory stays bounded whatever the tensor size.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from compressor.errors import InputError, OutputError
from compressor.formats import dtypes
from compressor.formats.checkpoint import INDEX_NAME, Checkpoint, open_checkpoint
from compressor.formats.layout import (
    CODEBOOK_FORMAT,
    CT_FORMAT,
    MINMAX_FORMAT,
    CodebookArgs,
    nf4_dequantize_rows,
)
from compressor.formats.paths import check_disjoint, check_parent_writable
from compressor.formats.safetensors_io import (
    SafetensorsWriter,
    TensorInfo,
    iter_byte_blocks,
    read_rows,
    read_tensor,
)
from compressor.math.pack import packed_width, unpack_rows
from compressor.math.quant import QuantArgs, Strategy, dequantize, quantized_range

__all__ = [
    "CompressedModule",
    "decompress_checkpoint",
    "dequantize_module_rows",
    "inspect_checkpoint",
    "quantized_modules",
]

_ROW_BLOCK = 1024  # multiple of 32: zero-point words never straddle two blocks
_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_min", "weight_shape")
_BITMASK_SUFFIXES = ("weight_bitmask", "weight_values", "weight_row_offsets", "weight_shape")
_CODEBOOK_SUFFIXES = {  # the root part (what marks a module) → every part of the layout
    "weight_nf4": ("weight_nf4", "weight_absmax", "weight_shape"),
    "weight_indices": ("weight_indices", "weight_codebook", "weight_shape"),
}


@dataclass(frozen=True)
class CompressedModule:
    """One compressed weight: its parts in the checkpoint and how to undo it.

    `args` is the quantization scheme, or None for a pruned weight in the bitmask layout.
    `root` is the part whose position in its shard the dense weight takes on decompression.
    `weight_dtype` is the dense weight's dtype where no stored part carries it (codebooks).
    """

    module: str
    args: QuantArgs | CodebookArgs | None
    shape: tuple[int, int]
    parts: dict[str, tuple[str, TensorInfo]]  # suffix → (file, info)
    weight_dtype: str | None = None

    @property
    def root(self) -> str:
        if isinstance(self.args, CodebookArgs):
            return "weight_nf4" if self.args.method == "nf4" else "weight_indices"
        return "weight_packed" if self.args is not None else "weight_bitmask"

    @property
    def dtype(self) -> str:
        if self.weight_dtype is not None:
            return self.weight_dtype
        key = "weight_scale" if self.args is not None else "weight_values"
        return self.parts[key][1].dtype

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for _, info in self.parts.values())


def _target_matches(target: str, module: str) -> bool:
    if target == "Linear":
        return True
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module


def _args_from_group(group: dict, minmax: bool) -> QuantArgs:
    weights = group if minmax else group.get("weights") or {}
    strategy: Strategy = weights.get("strategy") or (
        "group" if weights.get("group_size") else "channel"
    )
    if strategy not in ("tensor", "channel", "group"):
        raise InputError(
            f"quantization strategy {strategy!r} is not supported (tensor, channel, group)",
            hint="decompress it with the tool that wrote it",
        )
    return QuantArgs(
        bits=int(weights.get("num_bits", 8)),
        method="minmax" if minmax else "int",
        symmetric=False if minmax else bool(weights.get("symmetric", True)),
        strategy=strategy,
        group_size=int(weights.get("group_size") or 128),
    )


def quantized_modules(checkpoint: Checkpoint) -> dict[str, CompressedModule]:
    """Every packed weight of a checkpoint with the scheme its config group gives it."""
    qc = (checkpoint.config or {}).get("quantization_config")
    out = _bitmask_modules(checkpoint)
    out.update(_codebook_modules(checkpoint, qc))
    packed = [
        n.removesuffix(".weight_packed") for n in checkpoint.tensors if n.endswith(".weight_packed")
    ]
    if not packed:
        return out
    if not isinstance(qc, dict):
        raise InputError(
            "holds packed weights but config.json has no quantization_config",
            path=str(checkpoint.root),
            hint="restore the config.json written with the checkpoint",
        )
    fmt = qc.get("format")
    minmax = fmt == MINMAX_FORMAT
    if qc.get("quant_method") == "compressed-tensors" and fmt not in (CT_FORMAT, "mixed-precision"):
        raise InputError(
            f"compressed-tensors format {fmt!r} is not supported here (only {CT_FORMAT})",
            path=str(checkpoint.root),
        )
    groups = list((qc.get("config_groups") or {}).values())
    ignore = qc.get("ignore") or []
    for module in packed:
        if any(_target_matches(p, module) for p in ignore if p != "Linear"):
            continue
        group = next(
            (g for g in groups if any(_target_matches(t, module) for t in g.get("targets", []))),
            None,
        )
        if group is None:
            raise InputError(
                "is packed but no quantization config group targets it",
                path=str(checkpoint.root),
                tensor=f"{module}.weight_packed",
            )
        parts, shape = _module_parts(
            checkpoint, module, _SUFFIXES, ("weight_scale", "weight_shape"), "weight_packed"
        )
        out[module] = CompressedModule(module, _args_from_group(group, minmax), shape, parts)
    return out


def _codebook_modules(checkpoint: Checkpoint, qc: object) -> dict[str, CompressedModule]:
    """NF4 and k-means weights (our `codebook` layout), with their config group's scheme."""
    roots = [
        (name.rsplit(".", 1)[0], name.rsplit(".", 1)[1])
        for name in checkpoint.tensors
        if name.rsplit(".", 1)[-1] in _CODEBOOK_SUFFIXES
    ]
    if not roots:
        return {}
    if not isinstance(qc, dict) or qc.get("format") != CODEBOOK_FORMAT:
        raise InputError(
            f"holds codebook weights ({roots[0][0]}.{roots[0][1]}) but config.json's "
            f"quantization_config is not the checkpoint-compressor {CODEBOOK_FORMAT} block",
            path=str(checkpoint.root),
            hint="restore the config.json written with the checkpoint",
        )
    groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, dict)]
    out = {}
    for module, root in roots:
        where = f"{module}.{root}"
        group = next((g for g in groups if module in (g.get("targets") or [])), None)
        if group is None:
            raise InputError(
                "is codebook-quantized but no quantization config group targets it",
                path=str(checkpoint.root),
                tensor=where,
            )
        method: Literal["nf4", "kmeans"] = "nf4" if root == "weight_nf4" else "kmeans"
        try:
            if group.get("type") != method:
                raise ValueError(f"its config group says type {group.get('type')!r}")
            args = CodebookArgs(
                method=method,
                bits=int(group.get("num_bits", 4)),
                iterations=int(group.get("iterations", 0)),
                init=group.get("init", "uniform"),
            )
            dtypes.torch_dtype(str(group.get("dtype")))
        except (ValueError, TypeError, KeyError) as e:
            raise InputError(
                f"has an unusable codebook config group: {e}",
                path=str(checkpoint.root),
                tensor=where,
                hint="restore the config.json written with the checkpoint",
            ) from e
        suffixes = _CODEBOOK_SUFFIXES[root]
        parts, shape = _module_parts(checkpoint, module, suffixes, suffixes, root)
        out[module] = CompressedModule(module, args, shape, parts, str(group["dtype"]))
    return out


def _bitmask_modules(checkpoint: Checkpoint) -> dict[str, CompressedModule]:
    """Pruned weights stored as values + bitmask (our `sparse-bitmask` layout)."""
    out = {}
    for name in checkpoint.tensors:
        if not name.endswith(".weight_bitmask"):
            continue
        module = name.removesuffix(".weight_bitmask")
        parts, shape = _module_parts(
            checkpoint, module, _BITMASK_SUFFIXES, _BITMASK_SUFFIXES, "weight_bitmask"
        )
        out[module] = CompressedModule(module, None, shape, parts)
    return out


def _module_parts(
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


def _check_part_shapes(module: CompressedModule) -> None:
    """Every stored part has the shape its layout gives the module's `weight_shape` (a tampered
    or mismatched shape is refused here, before any output is written, naming both)."""
    rows, cols = module.shape
    args = module.args
    expected: dict[str, tuple[int, ...]] = {}
    if args is None:
        expected = {"weight_bitmask": (rows, -(-cols // 8)), "weight_row_offsets": (rows + 1,)}
    elif isinstance(args, CodebookArgs):
        if args.method == "nf4":
            expected = {
                "weight_nf4": (rows, packed_width(cols, 4)),
                "weight_absmax": (rows, -(-cols // 64)),
            }
        else:
            expected = {
                "weight_indices": (rows, packed_width(cols, args.bits)),
                "weight_codebook": (args.levels,),
            }
    else:
        expected["weight_packed"] = (rows, packed_width(cols, args.bits))
        if args.strategy != "tensor":
            expected["weight_scale"] = (rows, args.groups_per_row(cols))
            if args.method == "minmax":
                expected["weight_min"] = expected["weight_scale"]
            elif "weight_zero_point" in module.parts:
                expected["weight_zero_point"] = (
                    packed_width(rows, args.bits),
                    args.groups_per_row(cols),
                )
    for suffix, shape in expected.items():
        if suffix not in module.parts:
            continue
        file, info = module.parts[suffix]
        if tuple(info.shape) != shape:
            raise InputError(
                f"has shape {list(info.shape)} but the module's weight_shape {[rows, cols]} "
                f"needs {list(shape)} for {module.args.describe() if module.args else 'bitmask'}",
                path=file,
                tensor=f"{module.module}.{suffix}",
                hint="the checkpoint is corrupt or was edited; run `compressor verify` and "
                "recompress",
            )


def _read(module: CompressedModule, suffix: str, r0: int, r1: int) -> torch.Tensor:
    file, info = module.parts[suffix]
    return dtypes.to_torch(read_rows(file, info, r0, r1), info.dtype)


def dequantize_module_rows(
    module: CompressedModule, r0: int, r1: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Rows [r0, r1) of the dense weight (r0 a multiple of 32 when zero points are packed)."""
    args = module.args
    rows, cols = module.shape
    if args is None:
        return _unmask_rows(module, r0, r1, dtype)
    if isinstance(args, CodebookArgs):
        return _codebook_rows(module, args, r0, r1, dtype or dtypes.torch_dtype(module.dtype))
    scale_dtype = dtypes.torch_dtype(module.dtype)
    codes = unpack_rows(_read(module, "weight_packed", r0, r1), args.bits, cols)
    q = codes + quantized_range(args)[0]
    if args.strategy == "tensor":
        scale = _read(module, "weight_scale", 0, 1).reshape(1, 1)
    else:
        scale = _read(module, "weight_scale", r0, r1)
    zero = None
    if args.method == "minmax":
        zero = (
            _read(module, "weight_min", 0, 1).reshape(1, 1)
            if args.strategy == "tensor"
            else _read(module, "weight_min", r0, r1)
        )
    elif "weight_zero_point" in module.parts:
        if args.strategy == "tensor":
            zero = _read(module, "weight_zero_point", 0, 1).reshape(1, 1).to(torch.int16)
        else:
            w0, w1 = (
                r0 * args.bits // 32,
                min(packed_width(rows, args.bits), math.ceil(r1 * args.bits / 32)),
            )
            words = _read(module, "weight_zero_point", w0, w1)
            z = unpack_rows(words.T.contiguous(), args.bits, r1 - r0).T
            zero = z + quantized_range(args)[0]
    return dequantize(q, scale, zero, args, dtype or scale_dtype)


def _codebook_rows(
    module: CompressedModule, args: CodebookArgs, r0: int, r1: int, dtype: torch.dtype
) -> torch.Tensor:
    """Rows [r0, r1) of an NF4 or k-means weight (see layout.py)."""
    cols = module.shape[1]
    if args.method == "nf4":
        codes = unpack_rows(_read(module, "weight_nf4", r0, r1), 4, cols).to(torch.uint8)
        return nf4_dequantize_rows(codes, _read(module, "weight_absmax", r0, r1), dtype)
    indices = unpack_rows(_read(module, "weight_indices", r0, r1), args.bits, cols)
    codebook = _read(module, "weight_codebook", 0, args.levels).reshape(-1)
    return codebook[indices.long()].to(dtype)


def _unmask_rows(
    module: CompressedModule, r0: int, r1: int, dtype: torch.dtype | None
) -> torch.Tensor:
    """Rows [r0, r1) of a bitmask-stored weight: zeros, with the kept values scattered back."""
    cols = module.shape[1]
    bits = read_rows(*module.parts["weight_bitmask"], r0, r1)
    kept = torch.from_numpy(np.unpackbits(bits, axis=1, count=cols, bitorder="little").astype(bool))
    offsets = read_rows(*module.parts["weight_row_offsets"], r0, r1 + 1)
    values = _read(module, "weight_values", int(offsets[0]), int(offsets[-1]))
    if values.numel() != int(kept.sum()):
        file, _ = module.parts["weight_bitmask"]
        raise InputError(
            "the bitmask and the row offsets disagree on how many values are kept",
            path=file,
            tensor=f"{module.module}.weight_bitmask",
            hint="the checkpoint is corrupt; run `compressor verify` and recompress",
        )
    dense = torch.zeros((r1 - r0, cols), dtype=values.dtype)
    dense[kept] = values
    return dense if dtype is None else dense.to(dtype)


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
                    "scheme": module.args.describe() if module.args else "sparse bitmask",
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
