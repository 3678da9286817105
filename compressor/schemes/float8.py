"""FP8 weights: compressed-tensors `float-quantized` (what vLLM serves on GPUs with FP8 support).

For a weight `<m>.weight` (rows, cols):

    <m>.weight         F8_E4M3  (rows, cols)     codes c = fp8(clamp(x / s, -448, 448)), rounded
                                                 to the nearest E4M3 value (ties to even)
    <m>.weight_scale   dtype    (rows, 1)        s = absmax(row) / 448, in the weight's dtype

and x̂ = float(c) · s, evaluated in the scale's dtype, exactly as compressed-tensors'
`dequantize` does (an E4M3 value converts exactly to bf16/fp16/f32, so the one rounding is the
product's). Quantization divides by the stored (already rounded) scale, in float32, and casts
once to E4M3 (no double rounding through the weight's dtype). A row of zeros gets s = 1.

The config group declares `weights: {num_bits: 8, type: float, strategy: channel|tensor,
symmetric: true, dynamic: false}`; `fp8` (W8A8) adds `input_activations: {num_bits: 8, type:
float, strategy: token, dynamic: true}`, which servers apply at run time (no calibration).
"""

from __future__ import annotations

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
    read_part,
)
from compressor.schemes.discovery import target_matches
from compressor.schemes.int_packed import BLOCK_ROWS, GPU_BLOCK_ROWS, device, structural_errors

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
    ordered = sorted(groups.items(), key=lambda kv: (kv[0].strategy, kv[0].dynamic_activations))
    for k, (args, modules) in enumerate(ordered):
        config_groups[f"group_{k}"] = {
            "targets": sorted(modules),
            "weights": _float_args(args.strategy, dynamic=False),
            "input_activations": _float_args("token", dynamic=True)
            if args.dynamic_activations
            else None,
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


def _float_args(strategy: str, dynamic: bool) -> dict[str, Any]:
    return {
        "num_bits": 8,
        "type": "float",
        "symmetric": True,
        "group_size": None,
        "strategy": strategy,
        "block_structure": None,
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
            OutputSpec(f"{m}.weight_scale", dtype, (rows, 1), "scale", tensor_name),
        ]

    def staged_arrays(
        self, shape: tuple[int, int], dtype: str, args: Args, chunk_rows: int
    ) -> list[StagedArray]:
        assert isinstance(args, Float8Args)
        rows, cols = shape
        return [
            StagedArray("packed", (rows, cols), "F8_E4M3", chunk_rows),
            StagedArray("scale", (rows, 1), dtype, chunk_rows),
        ]

    def encode_chunk(self, out: RowSink, args: Args, chunk: ChunkInput) -> ErrorStats:
        assert isinstance(args, Float8Args)
        where = device()
        step = GPU_BLOCK_ROWS if where.type == "cuda" else BLOCK_ROWS
        x, pruned = chunk.x, chunk.pruned
        codes, scales, errors = [], [], []
        for b0 in range(0, x.shape[0], step):
            block = pruned[b0 : b0 + step].to(where)
            scale = fp8_scale(block)
            c = quantize_fp8(block, scale)
            x_hat = dequantize_fp8(c, scale, block.dtype)
            errors.append(error_stats(x[b0 : b0 + step].to(where), x_hat, count_zeros=False))
            codes.append(c.cpu())
            scales.append(scale.cpu())
        out.put("packed", chunk.first_row, dtypes.to_raw(torch.cat(codes)))
        out.put("scale", chunk.first_row, dtypes.to_raw(torch.cat(scales)))
        return replace(combine_errors(*errors), pruned=chunk.removed)

    def decode_rows(
        self, module: CompressedModule, r0: int, r1: int, dtype: torch.dtype | None
    ) -> torch.Tensor:
        args = module.args
        assert isinstance(args, Float8Args)
        codes = read_part(module, "weight", r0, r1)
        scale = read_part(module, "weight_scale", r0, r1)
        return dequantize_fp8(codes, scale, dtype or scale.dtype)

    def config_block(
        self, groups: Mapping[tuple[Args, str], Sequence[str]], dense_linear: Sequence[str]
    ) -> dict[str, Any]:
        merged: dict[Float8Args, list[str]] = {}
        for (args, _), modules in groups.items():
            assert isinstance(args, Float8Args)
            merged.setdefault(args, []).extend(modules)
        return float_config(merged, dense_linear)

    def config_errors(self, qc: dict[str, Any]) -> list[str]:
        errors = [e for e in structural_errors(qc, minmax=False) if "format" not in e]
        for key, group in (qc.get("config_groups") or {}).items():
            weights = group.get("weights") if isinstance(group, dict) else None
            if isinstance(weights, dict) and (
                weights.get("type") != "float" or weights.get("num_bits") != 8
            ):
                errors.append(f"config_groups.{key}.weights must be type float, num_bits 8")
        try:
            from compressed_tensors.quantization import QuantizationConfig
            from pydantic import ValidationError
        except ImportError:
            return errors
        try:
            QuantizationConfig.model_validate(qc)
        except ValidationError as e:
            for item in e.errors():
                where = ".".join(str(p) for p in item["loc"]) or "(top level)"
                errors.append(f"compressed-tensors rejects {where}: {item['msg']}")
        return errors

    def declared(self, qc: dict[str, Any]) -> dict[str, str]:
        return {
            target: "weight"
            for group in (qc.get("config_groups") or {}).values()
            for target in group["targets"]
            if target != "Linear" and not target.startswith("re:")
        }

    def discover(self, checkpoint: Checkpoint, qc: object) -> dict[str, CompressedModule]:
        if not isinstance(qc, dict) or qc.get("format") != FLOAT_FORMAT:
            return {}
        groups = list((qc.get("config_groups") or {}).values())
        ignore = [p for p in qc.get("ignore") or [] if p != "Linear"]
        out = {}
        for name, (file, info) in checkpoint.tensors.items():
            if not name.endswith(".weight") or info.dtype != "F8_E4M3":
                continue
            module = name.removesuffix(".weight")
            if any(target_matches(p, module) for p in ignore):
                continue
            group = next(
                (g for g in groups if any(target_matches(t, module) for t in g.get("targets", []))),
                None,
            )
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
            if strategy != "channel":
                raise InputError(
                    f"FP8 strategy {strategy!r} is not supported here (channel)",
                    path=file,
                    tensor=name,
                    hint="decompress it with compressed-tensors",
                )
            args = Float8Args(dynamic_activations=group.get("input_activations") is not None)
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
