"""Integer schemes with packed codes: compressed-tensors `pack-quantized`, and our minmax layout.

compressed-tensors `pack-quantized` (loads in transformers, vLLM, compressed-tensors), for a
weight `<m>.weight` (rows, cols), b bits, ngroups scale columns:

    <m>.weight_packed      I32   (rows, ceil(cols·b/32))   codes q + 2^(b-1), dense LSB-first
    <m>.weight_scale       dtype (rows, ngroups); (rows, 1) per channel; (1,) per tensor
    <m>.weight_zero_point  I32   (ceil(rows·b/32), ngroups) asymmetric group/channel: the signed
                                 integer zero points z + 2^(b-1), packed along dim 0;
                           I8    (1,) asymmetric per-tensor (compressed-tensors leaves it unpacked)
    <m>.weight_shape       I64   (2,) = [rows, cols]

checkpoint-compressor `minmax-float-offset` (the seed article's formula; not loadable elsewhere):
the same packed codes (unsigned, q in [0, 2^b-1]), `weight_scale` s = (max - min)/(2^b - 1) and
`weight_min` m (both in the weight dtype, one per group; the last group may be partial), and
x̂ = m + q·s. `w4a16-asym` is its loadable cousin: an integer zero point instead of m.

Encoding runs the fused numba kernels on the CPU for 16-bit weights (`math.kernels`: one pass,
the same bits as the torch path) and the torch path in row blocks elsewhere (GPU workers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, cast

import numpy as np
import torch

from compressor.errors import InputError
from compressor.formats import dtypes
from compressor.formats.layout import CT_FORMAT, MINMAX_FORMAT, OutputSpec, module_name
from compressor.formats.quant_config import OUR_TOOL
from compressor.formats.safetensors_io import TensorInfo
from compressor.math import kernels, search_kernels
from compressor.math.gptq import InputHessian, gptq_rows
from compressor.math.pack import pack_rows, packed_width, unpack_rows
from compressor.math.quant import (
    QuantArgs,
    Strategy,
    dequantize,
    qparams_from_range,
    quantized_range,
)
from compressor.math.rounding import RoundingMode, fused_search, quantize_rows
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
from compressor.schemes.discovery import (
    IGNORED,
    compressed_tensors_errors,
    config_group,
    module_parts,
)

if TYPE_CHECKING:
    from compressor.formats.checkpoint import Checkpoint

__all__ = [
    "BLOCK_ROWS",
    "GPU_BLOCK_ROWS",
    "IntScheme",
    "MinmaxScheme",
    "NonFiniteWeights",
    "PackedRows",
    "compressed_tensors_config",
    "device",
    "fused_kind",
    "minmax_config",
    "quantize_block",
    "quantize_rows_packed",
    "warm_up",
]

# Rows per block of the quantize math: small blocks keep temporaries in cache on the CPU
# (measured 205 → 153 ms per chunk at 64 rows); a GPU wants large ones.
BLOCK_ROWS = 64
GPU_BLOCK_ROWS = 2048


class _Fixed(Protocol):
    """Per-tensor parameters from the thresholds stage (None: each group chooses its own)."""

    @property
    def scale(self) -> torch.Tensor | None: ...

    @property
    def zero(self) -> torch.Tensor | None: ...


@dataclass(frozen=True)
class _Params:
    scale: torch.Tensor | None = None
    zero: torch.Tensor | None = None


class NonFiniteWeights(ValueError):
    """The block holds NaN or infinite weights (found by the fused kernels' range pass)."""

    def __init__(self, count: int) -> None:
        super().__init__(f"{count} NaN or infinite weight(s)")
        self.count = count


@dataclass(frozen=True)
class PackedRows:
    """A quantized row block as stored: packed codes, scales, zero points, and its error."""

    packed: torch.Tensor  # int32 (rows, ceil(cols·bits/32)), codes q − qmin
    scale: torch.Tensor  # (rows, ngroups) in the weight dtype, or (1, 1) for the tensor strategy
    zero: torch.Tensor | None  # int8 zero points / float offsets (minmax), None when symmetric
    error: ErrorStats


def device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def quantize_block(
    x: torch.Tensor,
    args: QuantArgs,
    fixed: _Fixed,
    rounding: str = "rtn",
    hessian: InputHessian | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Quantize a (rows, cols) block: unsigned codes, scale, zero/offset, and x̂ (x's dtype).

    Per-tensor parameters (`fixed`) apply as they are; otherwise `rounding` chooses each
    group's (`math.rounding.quantize_rows`), weighting each input by its second moment when the
    input's `hessian` is known; gptq runs `math.gptq` with it. Codes are offset to unsigned,
    as stored.
    """
    scale = fixed.scale.to(x.device) if fixed.scale is not None else None
    zero = fixed.zero.to(x.device) if fixed.zero is not None else None
    if rounding == "gptq":
        if hessian is None:
            raise ValueError("rounding gptq needs the input's Hessian (calibration)")
        u, dead = hessian.factor()
        q, scale, zero, x_hat = gptq_rows(
            x.cpu(), u, dead, args, importance=hessian.diagonal(), order=hessian.order()
        )
        q, scale, x_hat = q.to(x.device), scale.to(x.device), x_hat.to(x.device)
        zero = None if zero is None else zero.to(x.device)
    else:
        importance = hessian.diagonal().to(x.device) if hessian is not None else None
        mode = cast(RoundingMode, rounding)
        q, scale, zero, x_hat = quantize_rows(x, args, mode, scale, zero, importance)
    qmin, _ = quantized_range(args)
    codes = q - qmin  # compressed-tensors stores q + 2^(b-1); minmax codes are already ≥ 0
    return codes, scale, zero, x_hat


def fused_kind(x: torch.Tensor, args: QuantArgs, fixed: _Fixed) -> int | None:
    """The kernels' `kind` when the fused CPU path computes exactly what the torch path does,
    and the work stays on the CPU (a GPU worker moves its blocks to the device instead)."""
    kind = {torch.bfloat16: kernels.BF16, torch.float16: kernels.F16}.get(x.dtype)
    if kind is None or x.device.type != "cpu" or device().type != "cpu" or args.method != "int":
        return None
    if fixed.scale is not None and fixed.scale.dtype != x.dtype:
        return None
    return kind


def warm_up(*, searches: bool) -> None:
    """Load (or compile, the first time on a machine) the fused kernels in this process, so the
    cost shows as start-up, not inside the first chunks of the stage; the mse/hqq searches
    (the larger compile, ~3 min and 1.3 GB on one core: docs/operations.md) only with
    `searches`."""
    if device().type == "cpu":
        kernels.warm_up()
        if searches:
            search_kernels.warm_up()


def quantize_rows_packed(
    x: torch.Tensor,
    pruned: torch.Tensor,
    args: QuantArgs,
    fixed: _Fixed,
    rounding: str = "rtn",
    hessian: InputHessian | None = None,
) -> PackedRows:
    """Quantize `pruned` (= `x` when nothing was pruned), pack it, and measure it against `x`.

    On the CPU, integer schemes on 16-bit weights take the fused kernels (`math.kernels`: one
    pass, same bits as the torch path; the mse and hqq searches `math.search_kernels`: the same
    candidates); everything else runs the torch path in blocks of
    `BLOCK_ROWS` (GPU: `GPU_BLOCK_ROWS`) rows so temporaries stay cache-sized.
    """
    kind = fused_kind(x, args, fixed)
    if kind is not None and rounding != "gptq":
        return _fused_rows(x, pruned, args, fixed, rounding, kind, hessian)
    where = device()
    step = GPU_BLOCK_ROWS if where.type == "cuda" else BLOCK_ROWS
    if rounding == "gptq":  # one pass over the columns for the whole chunk
        step = max(1, x.shape[0])
    packed, scales, zeros, errors = [], [], [], []
    for b0 in range(0, x.shape[0], step):
        block = pruned[b0 : b0 + step].to(where)
        codes, scale, zero, x_hat = quantize_block(block, args, fixed, rounding, hessian)
        errors.append(error_stats(x[b0 : b0 + step].to(where), x_hat, count_zeros=False))
        packed.append(pack_rows(codes, args.bits).cpu())
        scales.append(scale.cpu())
        if zero is not None:
            zeros.append(zero.cpu())
    if args.strategy == "tensor":  # one (1, 1) parameter set for every block
        return PackedRows(
            torch.cat(packed), scales[0], zeros[0] if zeros else None, combine_errors(*errors)
        )
    return PackedRows(
        torch.cat(packed),
        torch.cat(scales),
        torch.cat(zeros) if zeros else None,
        combine_errors(*errors),
    )


def _fused_rows(
    x: torch.Tensor,
    pruned: torch.Tensor,
    args: QuantArgs,
    fixed: _Fixed,
    rounding: str,
    kind: int,
    hessian: InputHessian | None = None,
) -> PackedRows:
    rows, cols = x.shape
    raw = dtypes.to_raw(pruned.contiguous()).view(np.uint16)
    reference = None if pruned is x else dtypes.to_raw(x.contiguous()).view(np.uint16)
    group = args.group_size if args.strategy == "group" else cols
    qrange = quantized_range(args)
    if fixed.scale is None and rounding == "rtn":  # parameters from each group's range, same pass
        packed, bits16, zeros, (sq_error, sq_signal, max_abs), bad = kernels.quantize_pack_rtn_16(
            raw, kind, group, args.symmetric, qrange, args.bits, reference
        )
        if bad:
            raise NonFiniteWeights(int((~torch.isfinite(pruned)).sum()))
        scale = torch.from_numpy(bits16.view(np.int16)).view(x.dtype)
        zero = None if zeros is None else torch.from_numpy(zeros)
    else:
        if fixed.scale is not None:
            scale, zero = fixed.scale, fixed.zero
        else:  # the search's own kernels choose the parameters; the kernel below applies them
            importance = hessian.diagonal() if hessian is not None else None
            bits16, zeros, bad = fused_search(
                raw, kind, args, cast(RoundingMode, rounding), importance
            )
            if bad:
                raise NonFiniteWeights(int((~torch.isfinite(pruned)).sum()))
            scale = torch.from_numpy(bits16.view(np.int16)).view(x.dtype)
            zero = None if zeros is None else torch.from_numpy(zeros)
        ngroups = -(-cols // group)
        packed, sq_error, sq_signal, max_abs = kernels.quantize_pack_16(
            raw,
            kind,
            group,
            scale.float().expand(rows, ngroups).contiguous().numpy(),
            None if zero is None else zero.int().expand(rows, ngroups).numpy(),
            qrange,
            args.bits,
            reference,
        )
    error = ErrorStats(x.numel(), sq_error, sq_signal, max_abs)
    return PackedRows(torch.from_numpy(packed), scale, zero, error)


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


def _order(args: QuantArgs) -> tuple:
    return (-args.bits, args.method, not args.symmetric, args.strategy, -args.group_size)


def scale_shape(rows: int, cols: int, args: QuantArgs) -> tuple[int, ...]:
    if args.strategy == "tensor":
        return (1,)
    return (rows, args.groups_per_row(cols))


class IntScheme(Scheme):
    """compressed-tensors `pack-quantized`: symmetric or with an integer zero point."""

    name = "int"
    format = CT_FORMAT
    parts = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
    offset_part = "weight_zero_point"  # where the offset lives (minmax: weight_min)
    served = True
    ours = False
    root_parts = ("weight_packed",)
    row_roles = frozenset({"packed", "scale", "zero"})

    def accepts(self, args: Args) -> bool:
        return isinstance(args, QuantArgs) and args.method == "int"

    def for_width(self, args: Args, cols: int) -> tuple[Args | None, str, str] | None:
        """compressed-tensors (and so transformers and vLLM) refuses a group size that does not
        divide the input dimension: halve it down to 32 while it does not, else per channel.
        Our minmax layout allows a partial last group."""
        assert isinstance(args, QuantArgs)
        if args.strategy != "group" or self.partial_groups or cols % args.group_size == 0:
            return None
        why = f"group size {args.group_size} does not divide the input dimension {cols}"
        g = args.group_size // 2
        while g >= 32:
            if cols % g == 0:
                return replace(args, group_size=g), f"group {args.group_size} → {g}", why
            g //= 2
        return replace(args, strategy="channel"), f"group {args.group_size} → per-channel", why

    # -- layout ------------------------------------------------------------------------------
    def outputs(
        self, tensor_name: str, shape: tuple[int, int], dtype: str, args: Args, kept: int = 0
    ) -> list[OutputSpec]:
        assert isinstance(args, QuantArgs)
        rows, cols = shape
        m = module_name(tensor_name)
        s_shape = scale_shape(rows, cols, args)
        out = [
            OutputSpec(
                f"{m}.weight_packed",
                "I32",
                (rows, packed_width(cols, args.bits)),
                "packed",
                tensor_name,
            ),
            OutputSpec(f"{m}.weight_scale", dtype, s_shape, "scale", tensor_name),
            *self._offset_outputs(m, tensor_name, rows, s_shape, dtype, args),
            OutputSpec(f"{m}.weight_shape", "I64", (2,), "shape", tensor_name),
        ]
        return out

    def _offset_outputs(
        self,
        m: str,
        tensor_name: str,
        rows: int,
        s_shape: tuple[int, ...],
        dtype: str,
        args: QuantArgs,
    ) -> list[OutputSpec]:
        if args.symmetric:
            return []
        if args.strategy == "tensor":
            return [OutputSpec(f"{m}.weight_zero_point", "I8", (1,), "zero", tensor_name)]
        zp_shape = (packed_width(rows, args.bits), s_shape[1])
        return [OutputSpec(f"{m}.weight_zero_point", "I32", zp_shape, "zero", tensor_name)]

    def staged_arrays(
        self, shape: tuple[int, int], dtype: str, args: Args, chunk_rows: int
    ) -> list[StagedArray]:
        assert isinstance(args, QuantArgs)
        rows, cols = shape
        arrays = [StagedArray("packed", (rows, packed_width(cols, args.bits)), "I32", chunk_rows)]
        if args.strategy == "tensor":
            return arrays
        ngroups = args.groups_per_row(cols)
        arrays.append(StagedArray("scale", (rows, ngroups), dtype, chunk_rows))
        arrays += self._staged_offset(rows, ngroups, dtype, args, chunk_rows)
        return arrays

    def _staged_offset(
        self, rows: int, ngroups: int, dtype: str, args: QuantArgs, chunk_rows: int
    ) -> list[StagedArray]:
        if args.symmetric:
            return []
        return [
            StagedArray(
                "zero",
                (packed_width(rows, args.bits), ngroups),
                "I32",
                chunk_rows * args.bits // 32,
            )
        ]

    def staged_span(
        self, role: str, r0: int, r1: int, args: Args, rows_out: int
    ) -> tuple[int, int]:
        if role != "zero":
            return r0, r1
        assert isinstance(args, QuantArgs)  # packed along rows: chunk rows → words
        return r0 * args.bits // 32, min(rows_out, -(-r1 * args.bits // 32))

    # -- per-tensor parameters ----------------------------------------------------------------
    def needs_range(self, args: Args) -> bool:
        return isinstance(args, QuantArgs) and args.strategy == "tensor"

    def tensor_params(
        self, args: Args, lo: float, hi: float, dtype: str
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The tensor strategy's one scale and zero point (offset, minmax), from the range of
        the whole tensor, which no single chunk sees."""
        assert isinstance(args, QuantArgs)
        scale, zero = qparams_from_range(
            torch.tensor([[lo]], dtype=torch.float64),
            torch.tensor([[hi]], dtype=torch.float64),
            args,
            dtypes.torch_dtype(dtype),
        )
        return scale, zero

    # -- compress ----------------------------------------------------------------------------
    def takes_fused_kernels(self, args: Args, dtype: str, rounding: str) -> bool:
        return (
            isinstance(args, QuantArgs)
            and args.method == "int"
            and args.strategy != "tensor"
            and dtype in ("BF16", "F16")
            and rounding in ("rtn", "mse", "hqq")
        )

    def takes_search_kernels(self, args: Args, dtype: str, rounding: str) -> bool:
        return rounding in ("mse", "hqq") and self.takes_fused_kernels(args, dtype, rounding)

    def encode_chunk(self, out: RowSink, args: Args, chunk: ChunkInput) -> ErrorStats:
        assert isinstance(args, QuantArgs)
        fixed = _Params(chunk.scale, chunk.zero)
        rows = quantize_rows_packed(
            chunk.x, chunk.pruned, args, fixed, chunk.rounding, chunk.hessian
        )
        r0 = chunk.first_row
        out.put("packed", r0, rows.packed.numpy())
        if args.strategy != "tensor":
            out.put("scale", r0, dtypes.to_raw(rows.scale))
            if not args.symmetric:
                assert rows.zero is not None
                self._put_offset(out, r0, rows.zero, args)
        return replace(rows.error, pruned=chunk.removed)

    def _put_offset(self, out: RowSink, r0: int, zero: torch.Tensor, args: QuantArgs) -> None:
        # Zero points are packed along rows; chunks start at multiples of 32 rows, so this
        # chunk's words start at word r0·b/32 exactly.
        z = zero.to(torch.int16) - quantized_range(args)[0]
        words = pack_rows(z.T.contiguous(), args.bits).T.contiguous()
        out.put("zero", r0 * args.bits // 32, words.numpy())

    def small_outputs(
        self,
        module: str,
        args: Args,
        scale: torch.Tensor | None,
        zero: torch.Tensor | None,
        codebook: Sequence[float] | None,
        input_absmax: float | None = None,
    ) -> dict[str, np.ndarray]:
        small: dict[str, np.ndarray] = {}
        if scale is not None:  # the per-tensor strategy: one scale (and offset) for all rows
            small[f"{module}.weight_scale"] = dtypes.to_raw(scale.reshape(1))
            if zero is not None:
                small[f"{module}.{self.offset_part}"] = dtypes.to_raw(zero.reshape(1))
        return small

    # -- decompress --------------------------------------------------------------------------
    def decode_rows(
        self, module: CompressedModule, r0: int, r1: int, dtype: torch.dtype | None
    ) -> torch.Tensor:
        args = module.args
        assert isinstance(args, QuantArgs)
        cols = module.shape[1]
        codes = unpack_rows(read_part(module, "weight_packed", r0, r1), args.bits, cols)
        q = codes + quantized_range(args)[0]
        if args.strategy == "tensor":
            scale = read_part(module, "weight_scale", 0, 1).reshape(1, 1)
        else:
            scale = read_part(module, "weight_scale", r0, r1)
        zero = self._read_offset(module, args, r0, r1)
        return dequantize(q, scale, zero, args, dtype or dtypes.torch_dtype(module.dtype))

    def _read_offset(
        self, module: CompressedModule, args: QuantArgs, r0: int, r1: int
    ) -> torch.Tensor | None:
        if "weight_zero_point" not in module.parts:
            return None
        if args.strategy == "tensor":
            return read_part(module, "weight_zero_point", 0, 1).reshape(1, 1).to(torch.int16)
        rows = module.shape[0]
        w0, w1 = (
            r0 * args.bits // 32,
            min(packed_width(rows, args.bits), math.ceil(r1 * args.bits / 32)),
        )
        words = read_part(module, "weight_zero_point", w0, w1)
        z = unpack_rows(words.T.contiguous(), args.bits, r1 - r0).T
        return z + quantized_range(args)[0]

    # -- config.json -------------------------------------------------------------------------
    def config_block(
        self, groups: Mapping[tuple[Args, str], Sequence[str]], dense_linear: Sequence[str]
    ) -> dict[str, Any]:
        return self._block(merge_dtypes(groups), dense_linear)

    def _block(
        self, groups: Mapping[QuantArgs, Sequence[str]], dense_linear: Sequence[str]
    ) -> dict[str, Any]:
        return compressed_tensors_config(groups, dense_linear)

    def config_errors(self, qc: dict[str, Any]) -> list[str]:
        return structural_errors(qc, minmax=False) + compressed_tensors_errors(qc)

    # -- reading -----------------------------------------------------------------------------
    def _reads(self, qc: object) -> bool:
        """Whether packed modules under this block are ours to read (not when another scheme
        owns its format: minmax, FP4)."""
        from compressor import schemes  # the registry imports this module

        if not isinstance(qc, dict):
            return True
        owner = schemes.by_format(qc.get("format"))
        return owner is None or owner is self

    def discover(self, checkpoint: Checkpoint, qc: object) -> dict[str, CompressedModule]:
        packed = [
            n.removesuffix(".weight_packed")
            for n in checkpoint.tensors
            if n.endswith(".weight_packed")
        ]
        if not packed or not self._reads(qc):
            return {}
        if not isinstance(qc, dict):
            raise InputError(
                "is a packed weight but config.json has no quantization_config to decode it",
                path=str(checkpoint.root),
                tensor=f"{packed[0]}.weight_packed",
                hint="restore the config.json written with the checkpoint, or start from the "
                "original (unquantized) checkpoint",
            )
        fmt = qc.get("format")
        if qc.get("quant_method") == "compressed-tensors" and fmt not in (
            CT_FORMAT,
            "mixed-precision",
        ):
            raise InputError(
                f"compressed-tensors format {fmt!r} is not supported here (only {CT_FORMAT})",
                path=str(checkpoint.root),
            )
        out = {}
        for module in packed:
            group = config_group(qc, module)
            if group is IGNORED:
                continue
            if group is None:
                raise InputError(
                    "is packed but no quantization config group targets it",
                    path=str(checkpoint.root),
                    tensor=f"{module}.weight_packed",
                )
            parts, shape = module_parts(
                checkpoint, module, self.parts, ("weight_scale", "weight_shape"), "weight_packed"
            )
            out[module] = CompressedModule(module, self, self._args_from_group(group), shape, parts)
        return out

    def _args_from_group(self, group: dict) -> QuantArgs:
        return _args_from_weights(group.get("weights") or {}, "int")

    def verify_module(
        self, tensors: Mapping[str, tuple[str, TensorInfo]], module: CompressedModule, where: Where
    ) -> list[tuple[str | None, str]]:
        scale_dtype = tensors[f"{module.module}.weight_scale"][1].dtype
        expected = self.outputs(f"{module.module}.weight", module.shape, scale_dtype, module.args)
        return expected_problems(tensors, module, expected, module.args.describe(), where)


class MinmaxScheme(IntScheme):
    """Our `minmax-float-offset` layout: a float offset (the minimum) instead of a zero point."""

    name = "minmax"
    format = MINMAX_FORMAT
    parts = ("weight_packed", "weight_scale", "weight_min", "weight_shape")
    offset_part = "weight_min"
    partial_groups = True  # ours: the last group of a row may be shorter
    served = False
    ours = True
    exact_zero = False  # its float offset cannot represent 0 exactly
    row_roles = frozenset({"packed", "scale", "min"})

    def accepts(self, args: Args) -> bool:
        return isinstance(args, QuantArgs) and args.method == "minmax"

    def _offset_outputs(
        self,
        m: str,
        tensor_name: str,
        rows: int,
        s_shape: tuple[int, ...],
        dtype: str,
        args: QuantArgs,
    ) -> list[OutputSpec]:
        return [OutputSpec(f"{m}.weight_min", dtype, s_shape, "min", tensor_name)]

    def _staged_offset(
        self, rows: int, ngroups: int, dtype: str, args: QuantArgs, chunk_rows: int
    ) -> list[StagedArray]:
        return [StagedArray("min", (rows, ngroups), dtype, chunk_rows)]

    def staged_span(
        self, role: str, r0: int, r1: int, args: Args, rows_out: int
    ) -> tuple[int, int]:
        return r0, r1

    def _put_offset(self, out: RowSink, r0: int, zero: torch.Tensor, args: QuantArgs) -> None:
        out.put("min", r0, dtypes.to_raw(zero))

    def _read_offset(
        self, module: CompressedModule, args: QuantArgs, r0: int, r1: int
    ) -> torch.Tensor | None:
        if args.strategy == "tensor":
            return read_part(module, "weight_min", 0, 1).reshape(1, 1)
        return read_part(module, "weight_min", r0, r1)

    def _block(
        self, groups: Mapping[QuantArgs, Sequence[str]], dense_linear: Sequence[str]
    ) -> dict[str, Any]:
        return minmax_config(groups)

    def config_errors(self, qc: dict[str, Any]) -> list[str]:
        return structural_errors(qc, minmax=True)

    def _reads(self, qc: object) -> bool:
        return isinstance(qc, dict) and qc.get("format") == MINMAX_FORMAT

    def _args_from_group(self, group: dict) -> QuantArgs:
        return _args_from_weights(group, "minmax")


def _args_from_weights(weights: dict, method: str) -> QuantArgs:
    strategy: Strategy = weights.get("strategy") or (
        "group" if weights.get("group_size") else "channel"
    )
    if strategy not in ("tensor", "channel", "group"):
        raise InputError(
            f"quantization strategy {strategy!r} is not supported (tensor, channel, group)",
            hint="decompress it with the tool that wrote it",
        )
    minmax = method == "minmax"
    return QuantArgs(
        bits=int(weights.get("num_bits", 8)),
        method="minmax" if minmax else "int",
        symmetric=False if minmax else bool(weights.get("symmetric", True)),
        strategy=strategy,
        group_size=int(weights.get("group_size") or 128),
    )


def _names(value: object) -> list[str] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def structural_errors(qc: dict[str, Any], minmax: bool) -> list[str]:
    """Checks of an integer block that need no compressed-tensors (also our minmax block)."""
    errors = []
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        return ["config_groups must be a non-empty object"]
    if _names(qc.get("ignore", [])) is None:
        errors.append("ignore must be a list of module names")
    if not minmax and qc.get("format") not in (CT_FORMAT, "mixed-precision"):
        errors.append(f"format {qc.get('format')!r} is not {CT_FORMAT} or mixed-precision")
    for key, group in groups.items():
        if not isinstance(group, dict):
            errors.append(f"config_groups.{key} must be an object")
            continue
        if not _names(group.get("targets")):
            errors.append(f"config_groups.{key}.targets must be a non-empty list of names")
        args = group if minmax else group.get("weights")
        where = f"config_groups.{key}" + ("" if minmax else ".weights")
        if not isinstance(args, dict):
            errors.append(f"{where} must be an object")
            continue
        bits = args.get("num_bits")
        if type(bits) is not int or not 1 <= bits <= 8:
            errors.append(f"{where}.num_bits must be an integer from 1 to 8, got {bits!r}")
        strategy = args.get("strategy")
        if strategy not in ("tensor", "channel", "group"):
            errors.append(f"{where}.strategy must be tensor, channel or group, got {strategy!r}")
        group_size = args.get("group_size")
        if strategy == "group" and (type(group_size) is not int or group_size < 1):
            errors.append(f"{where}.group_size must be a positive integer, got {group_size!r}")
        if not minmax and not isinstance(args.get("symmetric"), bool):
            errors.append(f"{where}.symmetric must be true or false")
    return errors
