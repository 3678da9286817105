"""FP8 weights: compressed-tensors `float-quantized` (what vLLM serves on GPUs with FP8 support).

For a weight `<m>.weight` (rows, cols):

    <m>.weight         F8_E4M3  (rows, cols)     codes c = fp8(clamp(x / s, -448, 448)), rounded
                                                 to the nearest E4M3 value (ties to even)
    <m>.weight_scale   dtype    (rows, 1)        per channel: s = absmax(row) / 448, in the
                                                 weight's dtype
                                (⌈rows/128⌉,     per 128×128 block ("FP8_BLOCK", DeepSeek-V3's
                                 ⌈cols/128⌉)     layout): s = absmax(block) / 448; the last
                                                 blocks of a row or column may be partial

and x̂ = float(c) · s, evaluated in the scale's dtype, exactly as compressed-tensors'
`dequantize` does (an E4M3 value converts exactly to bf16/fp16/f32, so the one rounding is the
product's). Quantization divides by the stored (already rounded) scale, in float32, and casts
once to E4M3 (no double rounding through the weight's dtype). A row of zeros gets s = 1.

The config group declares `weights: {num_bits: 8, type: float, strategy: channel|tensor,
symmetric: true, dynamic: false}`; `fp8` (W8A8) adds `input_activations: {num_bits: 8, type:
float, strategy: token, dynamic: true}`, which servers apply at run time (no calibration).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from compressor.errors import InputError
from compressor.formats import dtypes
from compressor.formats.layout import Float8Args, OutputSpec, module_name
from compressor.formats.safetensors_io import TensorInfo
from compressor.math.stats import ErrorStats, combine_errors, error_stats
from compressor.schemes.base import (
    Args,
    ChunkInput,
    CompressedModule,
    RowSink,
    Scheme,
    StagedArray,
    Where,
    expected_problems,
    merge_dtypes,
    read_part,
)
from compressor.schemes.discovery import IGNORED, compressed_tensors_errors, config_group
from compressor.schemes.int_packed import BLOCK_ROWS, GPU_BLOCK_ROWS, device

if TYPE_CHECKING:
    from compressor.formats.checkpoint import Checkpoint

__all__ = ["FLOAT_FORMAT", "FP8_MAX", "Float8Scheme", "dequantize_fp8", "quantize_fp8"]

FLOAT_FORMAT = "float-quantized"
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_FP8 = torch.float8_e4m3fn


def fp8_scale(block: torch.Tensor) -> torch.Tensor:
    """(rows, 1) scales absmax/448 in the block's dtype (float32 math, one rounding); 1 where a
    row is all zeros."""
    absmax = block.abs().amax(dim=1, keepdim=True).float()
    scale = (absmax / FP8_MAX).to(block.dtype)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def fp8_block_scale(block: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(⌈rows/bh⌉, ⌈cols/bw⌉) scales absmax/448 of each block (zero padding: partial blocks
    take the absmax of what they hold), in the block's dtype; 1 for an all-zero block."""
    bh, bw = size
    rows, cols = block.shape
    nr, nc = -(-rows // bh), -(-cols // bw)
    padded = torch.nn.functional.pad(block.abs().float(), (0, nc * bw - cols, 0, nr * bh - rows))
    absmax = padded.reshape(nr, bh, nc, bw).amax(dim=(1, 3))
    scale = (absmax / FP8_MAX).to(block.dtype)
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def expand_blocks(
    scale: torch.Tensor, size: tuple[int, int], shape: tuple[int, int]
) -> torch.Tensor:
    """Block scales repeated over their rows and columns, cut to `shape`."""
    bh, bw = size
    full = scale.repeat_interleave(bh, dim=0).repeat_interleave(bw, dim=1)
    return full[: shape[0], : shape[1]]


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """E4M3 codes of `x` with the stored `scale` (broadcast over columns)."""
    return torch.clamp(x.float() / scale.float(), -FP8_MAX, FP8_MAX).to(_FP8)


def dequantize_fp8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x̂ = float(c)·s in the scale's dtype (compressed-tensors' order), then `dtype`."""
    return (codes.to(scale.dtype) * scale).to(dtype)


def float_config(
    groups: Mapping[Float8Args, Sequence[str]], ignore: Sequence[str]
) -> dict[str, Any]:
    """The compressed-tensors block: one config group per distinct `Float8Args`."""
    config_groups = {}
    ordered = sorted(
        groups.items(), key=lambda kv: (kv[0].strategy, kv[0].dynamic_activations, kv[0].block)
    )
    for k, (args, modules) in enumerate(ordered):
        config_groups[f"group_{k}"] = {
            "targets": sorted(modules),
            "weights": _float_args(
                args.strategy, False, args.block if args.strategy == "block" else None
            ),
            "input_activations": _activations(args) if args.dynamic_activations else None,
            "output_activations": None,
            "format": FLOAT_FORMAT,
        }
    return {
        "quant_method": "compressed-tensors",
        "format": FLOAT_FORMAT,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "ignore": sorted(ignore),
    }


def _activations(args: Float8Args) -> dict[str, Any]:
    """Dynamic FP8 activations: per token; with block weights per group of 128 inputs, as
    compressed-tensors' FP8_BLOCK preset and DeepSeek-V3 do."""
    if args.strategy == "block":
        return _float_args("group", True, group_size=args.block[1])
    return _float_args("token", True)


def _float_args(
    strategy: str,
    dynamic: bool,
    block: tuple[int, int] | None = None,
    group_size: int | None = None,
) -> dict[str, Any]:
    return {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "group_size": group_size,
        "strategy": strategy,
        "block_structure": list(block) if block is not None else None,
        "dynamic": dynamic,
        "actorder": None,
        "observer": None if dynamic else "minmax",
        "observer_kwargs": {},
    }


class Float8Scheme(Scheme):
    name = "float8"
    format = FLOAT_FORMAT
    parts = ("weight", "weight_scale")
    root_parts = ()  # its root is the module's own `weight`: no name marks it, its dtype does
    row_roles = frozenset({"packed", "scale"})
    served = True
    ours = False

    def accepts(self, args: Args) -> bool:
        return isinstance(args, Float8Args)

    def root_part(self, args: Args) -> str:
        return "weight"

    def outputs(
        self, tensor_name: str, shape: tuple[int, int], dtype: str, args: Args, kept: int = 0
    ) -> list[OutputSpec]:
        assert isinstance(args, Float8Args)
        rows, cols = shape
        m = module_name(tensor_name)
        return [
            OutputSpec(f"{m}.weight", "F8_E4M3", (rows, cols), "packed", tensor_name),
            OutputSpec(f"{m}.weight_scale", dtype, _scale_shape(shape, args), "scale", tensor_name),
        ]

    def for_width(self, args: Args, cols: int) -> tuple[Args | None, str, str] | None:
        """Block scales need whole blocks along the input dimension: compressed-tensors' own
        decompressor fails on a partial column block, and servers split inputs by block. Rows
        may end in a partial block (DeepSeek-V3's kv_a_proj_with_mqa has 576)."""
        assert isinstance(args, Float8Args)
        if args.strategy != "block" or cols % args.block[1] == 0:
            return None
        why = f"fp8 block width {args.block[1]} does not divide the input dimension {cols}"
        return replace(args, strategy="channel"), f"fp8 block {args.block[1]} → per-channel", why

    def row_align(self, args: Args) -> int:
        assert isinstance(args, Float8Args)
        if args.strategy != "block":
            return 32
        return math.lcm(32, args.block[0])

    def staged_arrays(
        self, shape: tuple[int, int], dtype: str, args: Args, chunk_rows: int
    ) -> list[StagedArray]:
        assert isinstance(args, Float8Args)
        rows, cols = shape
        scale_rows = chunk_rows // args.block[0] if args.strategy == "block" else chunk_rows
        return [
            StagedArray("packed", (rows, cols), "F8_E4M3", chunk_rows),
            StagedArray("scale", _scale_shape(shape, args), dtype, max(1, scale_rows)),
        ]

    def staged_span(
        self, role: str, r0: int, r1: int, args: Args, rows_out: int
    ) -> tuple[int, int]:
        assert isinstance(args, Float8Args)
        if role != "scale" or args.strategy != "block":
            return r0, r1
        bh = args.block[0]  # chunks start at multiples of bh (row_align)
        return r0 // bh, min(rows_out, -(-r1 // bh))

    def encode_chunk(self, out: RowSink, args: Args, chunk: ChunkInput) -> ErrorStats:
        assert isinstance(args, Float8Args)
        where = device()
        step = GPU_BLOCK_ROWS if where.type == "cuda" else BLOCK_ROWS
        if args.strategy == "block":  # whole blocks of rows per step
            step = max(step // args.block[0], 1) * args.block[0]
        x, pruned = chunk.x, chunk.pruned
        codes, scales, errors = [], [], []
        for b0 in range(0, x.shape[0], step):
            block = pruned[b0 : b0 + step].to(where)
            if args.strategy == "block":
                scale = fp8_block_scale(block, args.block)
                full = expand_blocks(scale, args.block, (block.shape[0], block.shape[1]))
            else:
                scale = full = fp8_scale(block)
            c = quantize_fp8(block, full)
            x_hat = dequantize_fp8(c, full, block.dtype)
            errors.append(error_stats(x[b0 : b0 + step].to(where), x_hat, count_zeros=False))
            codes.append(c.cpu())
            scales.append(scale.cpu())
        out.put("packed", chunk.first_row, dtypes.to_raw(torch.cat(codes)))
        first_scale_row = (
            chunk.first_row // args.block[0] if args.strategy == "block" else chunk.first_row
        )
        out.put("scale", first_scale_row, dtypes.to_raw(torch.cat(scales)))
        return replace(combine_errors(*errors), pruned=chunk.removed)

    def decode_rows(
        self, module: CompressedModule, r0: int, r1: int, dtype: torch.dtype | None
    ) -> torch.Tensor:
        args = module.args
        assert isinstance(args, Float8Args)
        codes = read_part(module, "weight", r0, r1)
        if args.strategy == "block":
            bh = args.block[0]
            first, stop = r0 // bh, -(-r1 // bh)
            blocks = read_part(module, "weight_scale", first, stop)
            full = expand_blocks(blocks, args.block, (stop * bh, module.shape[1]))
            scale = full[r0 - first * bh : r1 - first * bh]
            return dequantize_fp8(codes, scale, dtype or scale.dtype)
        scale = read_part(module, "weight_scale", r0, r1)
        return dequantize_fp8(codes, scale, dtype or scale.dtype)

    def config_block(
        self, groups: Mapping[tuple[Args, str], Sequence[str]], dense_linear: Sequence[str]
    ) -> dict[str, Any]:
        return float_config(merge_dtypes(groups), dense_linear)

    def config_errors(self, qc: dict[str, Any]) -> list[str]:
        return _structural_errors(qc) + compressed_tensors_errors(qc)

    def discover(self, checkpoint: Checkpoint, qc: object) -> dict[str, CompressedModule]:
        if not isinstance(qc, dict) or qc.get("format") != FLOAT_FORMAT:
            return {}
        out = {}
        for name, (file, info) in checkpoint.tensors.items():
            if not name.endswith(".weight") or info.dtype != "F8_E4M3":
                continue
            module = name.removesuffix(".weight")
            group = config_group(qc, module)
            if group is IGNORED:
                continue
            scale = checkpoint.tensors.get(f"{module}.weight_scale")
            if group is None or scale is None or len(info.shape) != 2:
                raise InputError(
                    "is an FP8 weight without its config group or weight_scale",
                    path=file,
                    tensor=name,
                    hint="restore the config.json and shards written with the checkpoint",
                )
            weights = group.get("weights") or {}
            strategy = weights.get("strategy")
            block = tuple(weights.get("block_structure") or (128, 128))
            if strategy not in ("channel", "block") or len(block) != 2:
                raise InputError(
                    f"FP8 strategy {strategy!r} is not supported here (channel, block)",
                    path=file,
                    tensor=name,
                    hint="decompress it with compressed-tensors",
                )
            args = Float8Args(
                strategy=strategy,
                dynamic_activations=group.get("input_activations") is not None,
                block=(int(block[0]), int(block[1])),
            )
            rows, cols = (int(v) for v in info.shape)
            parts = {"weight": (file, info), "weight_scale": scale}
            out[module] = CompressedModule(module, self, args, (rows, cols), parts)
        return out

    def verify_module(
        self, tensors: Mapping[str, tuple[str, TensorInfo]], module: CompressedModule, where: Where
    ) -> list[tuple[str | None, str]]:
        scale_dtype = tensors[f"{module.module}.weight_scale"][1].dtype
        expected = self.outputs(f"{module.module}.weight", module.shape, scale_dtype, module.args)
        return expected_problems(tensors, module, expected, module.args.describe(), where)


def _structural_errors(qc: dict[str, Any]) -> list[str]:
    """Checks of a float-quantized block that need no compressed-tensors."""
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        return ["config_groups must be a non-empty object"]
    errors = []
    ignore = qc.get("ignore", [])
    if not isinstance(ignore, list) or not all(isinstance(v, str) for v in ignore):
        errors.append("ignore must be a list of module names")
    for key, group in groups.items():
        where = f"config_groups.{key}"
        weights = group.get("weights") if isinstance(group, dict) else None
        targets = group.get("targets") if isinstance(group, dict) else None
        if not isinstance(targets, list) or not targets:
            errors.append(f"{where}.targets must be a non-empty list of names")
        if not isinstance(weights, dict):
            errors.append(f"{where}.weights must be an object")
            continue
        if weights.get("type") != "float" or weights.get("num_bits") != 8:
            errors.append(f"{where}.weights must be type float, num_bits 8")
        strategy = weights.get("strategy")
        if strategy not in ("channel", "block"):
            errors.append(f"{where}.weights.strategy must be channel or block, got {strategy!r}")
        block = weights.get("block_structure")
        if strategy == "block" and not (
            isinstance(block, list)
            and len(block) == 2
            and all(type(v) is int and v > 0 for v in block)
        ):
            errors.append(f"{where}.weights.block_structure must be [rows, cols], got {block!r}")
    return errors


def _scale_shape(shape: tuple[int, int], args: Args) -> tuple[int, int]:
    assert isinstance(args, Float8Args)
    rows, cols = shape
    if args.strategy == "block":
        return (-(-rows // args.block[0]), -(-cols // args.block[1]))
    return (rows, 1)
