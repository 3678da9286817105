"""Output tensor layouts: compressed-tensors `pack-quantized`, and our own `minmax` layout.

For a quantized weight `<m>.weight` of shape (rows, cols), b bits, ngroups scale columns:

compressed-tensors `pack-quantized` (int schemes; loads in transformers, vLLM, compressed-tensors)
    <m>.weight_packed      I32   (rows, ceil(cols·b/32))   codes q + 2^(b-1), dense LSB-first
    <m>.weight_scale       dtype (rows, ngroups); (rows, 1) per channel; (1,) per tensor
    <m>.weight_zero_point  I32   (ceil(rows·b/32), ngroups) asymmetric group/channel: the signed
                                 integer zero points z + 2^(b-1), packed along dim 0;
                           I8    (1,) asymmetric per-tensor (compressed-tensors leaves it unpacked)
    <m>.weight_shape       I64   (2,) = [rows, cols]

checkpoint-compressor `sparse-bitmask` (pruned weights that are not quantized)
    <m>.weight_values      dtype (kept,)                    the kept (non-zero) values, row-major
    <m>.weight_bitmask     U8    (rows, ceil(cols/8))       bit j%8 of byte j//8 = column j kept,
                                                            least significant bit first
    <m>.weight_row_offsets I64   (rows + 1,)                values of row r are
                                                            values[offsets[r]:offsets[r+1]]
    <m>.weight_shape       I64   (2,)
    50 % unstructured on bf16 takes 1/2·2 + 1/8 = 1.125 of 2 bytes per weight: 56 %.

checkpoint-compressor `minmax-float-offset` (the seed article's formula; not loadable elsewhere)
    <m>.weight_packed      I32   (rows, ceil(cols·b/32))   unsigned codes q in [0, 2^b-1]
    <m>.weight_scale       dtype (rows, ngroups)           s = (max - min) / (2^b - 1)
    <m>.weight_min         dtype (rows, ngroups)           m = min, the float offset
    <m>.weight_shape       I64   (2,)
    x̂ = m + q·s per group (the last group may be partial). `w4a16-asym` is its loadable cousin:
    the same idea with an integer zero point, which compressed-tensors can express.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from compressor.math.pack import packed_width
from compressor.math.quant import QuantArgs

__all__ = [
    "CT_FORMAT",
    "MINMAX_FORMAT",
    "SPARSE_BITMASK_FORMAT",
    "OutputRole",
    "OutputSpec",
    "bitmask_outputs",
    "module_name",
    "quantized_outputs",
    "scale_shape",
]

CT_FORMAT = "pack-quantized"
MINMAX_FORMAT = "minmax-float-offset"
SPARSE_BITMASK_FORMAT = "sparse-bitmask"

OutputRole = Literal[
    "copy", "dense", "packed", "scale", "zero", "min", "shape", "values", "bitmask", "row_offsets"
]


@dataclass(frozen=True)
class OutputSpec:
    """One tensor of the output checkpoint: its name, dtype, shape and what produces it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    role: OutputRole
    source: str  # the input tensor it comes from

    @property
    def nbytes(self) -> int:
        from compressor.formats.dtypes import itemsize

        n = itemsize(self.dtype)
        for d in self.shape:
            n *= d
        return n


def module_name(tensor_name: str) -> str:
    """`model.layers.0.mlp.up_proj.weight` → `model.layers.0.mlp.up_proj`."""
    return tensor_name.removesuffix(".weight")


def scale_shape(rows: int, cols: int, args: QuantArgs) -> tuple[int, ...]:
    if args.strategy == "tensor":
        return (1,)
    return (rows, args.groups_per_row(cols))


def quantized_outputs(
    tensor_name: str, shape: tuple[int, int], dtype: str, args: QuantArgs
) -> list[OutputSpec]:
    """The output tensors that replace one quantized weight, in the order they are written."""
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
    ]
    if args.method == "minmax":
        out.append(OutputSpec(f"{m}.weight_min", dtype, s_shape, "min", tensor_name))
    elif not args.symmetric:
        if args.strategy == "tensor":
            out.append(OutputSpec(f"{m}.weight_zero_point", "I8", (1,), "zero", tensor_name))
        else:
            zp_shape = (packed_width(rows, args.bits), s_shape[1])
            out.append(OutputSpec(f"{m}.weight_zero_point", "I32", zp_shape, "zero", tensor_name))
    out.append(OutputSpec(f"{m}.weight_shape", "I64", (2,), "shape", tensor_name))
    return out


def bitmask_outputs(
    tensor_name: str, shape: tuple[int, int], dtype: str, kept: int
) -> list[OutputSpec]:
    """The output tensors of a pruned, unquantized weight in the bitmask layout."""
    rows, cols = shape
    m = module_name(tensor_name)
    return [
        OutputSpec(f"{m}.weight_values", dtype, (kept,), "values", tensor_name),
        OutputSpec(f"{m}.weight_bitmask", "U8", (rows, -(-cols // 8)), "bitmask", tensor_name),
        OutputSpec(f"{m}.weight_row_offsets", "I64", (rows + 1,), "row_offsets", tensor_name),
        OutputSpec(f"{m}.weight_shape", "I64", (2,), "shape", tensor_name),
    ]
