"""Output tensor layouts: compressed-tensors `pack-quantized`, and our own layouts.

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

checkpoint-compressor `codebook` (non-integer codes; not loadable elsewhere)
  NF4 (QLoRA's NormalFloat4 code, `math/codebook.py`), blocks of 64 along each row:
    <m>.weight_nf4         I32   (rows, ceil(cols·4/32))   code indices i in [0, 15], packed as
                                                            `pack_rows` packs (LSB first)
    <m>.weight_absmax      F32   (rows, ceil(cols/64))     absmax of each block of 64 values of
                                                            a row (the last block of a row may be
                                                            shorter)
    <m>.weight_shape       I64   (2,)
    x̂[r, j] = float32(NF4_CODE[i]) · absmax[r, j // 64], rounded to the weight's dtype. Blocks
    never cross rows, so row-block chunks are independent; when cols % 64 == 0 this is exactly
    bitsandbytes' blocking of the flattened tensor (and its absmax, flattened row-major).
  k-means, b bits (2..8), one learned codebook per tensor:
    <m>.weight_indices     I32   (rows, ceil(cols·b/32))   centroid indices in [0, 2^b), packed
    <m>.weight_codebook    F32   (2^b,)                    the centroids (float64 k-means result
                                                            rounded once to float32)
    <m>.weight_shape       I64   (2,)
    x̂ = codebook[index], rounded to the weight's dtype; each index is the stored (float32)
    centroid nearest to the weight, ties to the lower index.
  The weight's dtype is recorded per config group in `quantization_config` (see
  `quant_config.codebook_config`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from compressor.formats.dtypes import itemsize
from compressor.math.codebook import NF4_BLOCK, nf4_dequantize, nf4_quantize
from compressor.math.pack import packed_width
from compressor.math.quant import QuantArgs

__all__ = [
    "CODEBOOK_FORMAT",
    "CT_FORMAT",
    "MINMAX_FORMAT",
    "SPARSE_BITMASK_FORMAT",
    "CodebookArgs",
    "OutputRole",
    "OutputSpec",
    "bitmask_outputs",
    "codebook_outputs",
    "module_name",
    "nf4_dequantize_rows",
    "nf4_quantize_rows",
    "quantized_outputs",
    "scale_shape",
]

CT_FORMAT = "pack-quantized"
MINMAX_FORMAT = "minmax-float-offset"
SPARSE_BITMASK_FORMAT = "sparse-bitmask"
CODEBOOK_FORMAT = "codebook"

OutputRole = Literal[
    "copy",
    "dense",
    "packed",
    "scale",
    "zero",
    "min",
    "shape",
    "values",
    "bitmask",
    "row_offsets",
    "absmax",
    "codebook",
]


@dataclass(frozen=True)
class CodebookArgs:
    """A codebook scheme: NF4 (fixed code, absmax per block of a row) or a learned k-means
    codebook of 2^bits centroids per tensor; the codebook counterpart of `QuantArgs`.

    `strategy` is the constant tag "codebook", so code asking `args.strategy == "tensor"` (the
    per-tensor integer scale) never mistakes a codebook scheme for one.
    """

    method: Literal["nf4", "kmeans"]
    bits: int = 4
    iterations: int = 0  # k-means: Lloyd iterations (at most; it stops at a fixed point)
    init: Literal["uniform", "histogram"] = "histogram"  # k-means starting centroids
    strategy: Literal["codebook"] = "codebook"

    def __post_init__(self) -> None:
        if self.method == "nf4" and self.bits != 4:
            raise ValueError(f"NF4 codes are 4-bit, got bits={self.bits}")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be in 2..8, got {self.bits}")
        if self.method == "nf4":  # normalised: NF4 has no iterations or initialisation
            object.__setattr__(self, "iterations", 0)
            object.__setattr__(self, "init", "uniform")

    @property
    def block_size(self) -> int:
        """Values per absmax block along a row (NF4); 0 for k-means."""
        return NF4_BLOCK if self.method == "nf4" else 0

    @property
    def levels(self) -> int:
        return 1 << self.bits

    def describe(self) -> str:
        """Short human name: "nf4 b64", "kmeans 4-bit"."""
        if self.method == "nf4":
            return f"nf4 b{self.block_size}"
        return f"kmeans {self.bits}-bit"


def nf4_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 of a (rows, cols) block in the row-blocked layout: codes uint8 (rows, cols) and
    absmax float32 (rows, ceil(cols/64)).

    Each row is zero-padded to a multiple of 64 (zeros change no absmax; their codes are dropped)
    and handed to `nf4_quantize`, whose flattened blocks are then exactly the rows' blocks.
    """
    rows, cols = x.shape
    nblocks = -(-cols // NF4_BLOCK)
    padded = torch.nn.functional.pad(x, (0, nblocks * NF4_BLOCK - cols))
    codes, absmax = nf4_quantize(padded)
    return codes[:, :cols], absmax.view(rows, nblocks)


def nf4_dequantize_rows(
    codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of `nf4_quantize_rows`: x̂ (rows, cols) in `dtype` from codes (rows, cols)."""
    rows, cols = codes.shape
    nblocks = absmax.shape[1]
    padded = torch.full((rows, nblocks * NF4_BLOCK), 7, dtype=torch.uint8, device=codes.device)
    padded[:, :cols] = codes
    x_hat = nf4_dequantize(padded, absmax.reshape(-1), padded.shape, dtype)
    return x_hat[:, :cols]


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
        n = itemsize(self.dtype)
        for d in self.shape:
            n *= d
        return n


def module_name(tensor_name: str) -> str:
    """`model.layers.0.mlp.up_proj.weight` → `model.layers.0.mlp.up_proj`."""
    return tensor_name.removesuffix(".weight")


def codebook_outputs(
    tensor_name: str, shape: tuple[int, int], args: CodebookArgs
) -> list[OutputSpec]:
    """The output tensors of a codebook-quantized weight (see the module docstring)."""
    rows, cols = shape
    m = module_name(tensor_name)
    width = packed_width(cols, args.bits)
    if args.method == "nf4":
        out = [
            OutputSpec(f"{m}.weight_nf4", "I32", (rows, width), "packed", tensor_name),
            OutputSpec(
                f"{m}.weight_absmax", "F32", (rows, -(-cols // NF4_BLOCK)), "absmax", tensor_name
            ),
        ]
    else:
        out = [
            OutputSpec(f"{m}.weight_indices", "I32", (rows, width), "packed", tensor_name),
            OutputSpec(f"{m}.weight_codebook", "F32", (args.levels,), "codebook", tensor_name),
        ]
    out.append(OutputSpec(f"{m}.weight_shape", "I64", (2,), "shape", tensor_name))
    return out


def scale_shape(rows: int, cols: int, args: QuantArgs) -> tuple[int, ...]:
    if args.strategy == "tensor":
        return (1,)
    return (rows, args.groups_per_row(cols))


def quantized_outputs(
    tensor_name: str, shape: tuple[int, int], dtype: str, args: QuantArgs | CodebookArgs
) -> list[OutputSpec]:
    """The output tensors that replace one quantized weight, in the order they are written."""
    if isinstance(args, CodebookArgs):
        return codebook_outputs(tensor_name, shape, args)
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
