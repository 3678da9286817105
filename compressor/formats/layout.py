"""Output tensor records and the layout pieces the schemes share.

Each storage format's full description (its tensors, dtypes, shapes and how they decode) lives in
its scheme module under `compressor/schemes/`: `int_packed.py` (compressed-tensors
`pack-quantized`, and our `minmax-float-offset`), `codebook.py` (NF4, k-means), `bitmask.py`
(`sparse-bitmask`). This module holds what they share: `OutputSpec`, the format names, the
codebook scheme's arguments and its row-blocked NF4 helpers, and the pure layout functions of the
codebook and bitmask tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from compressor.formats.dtypes import itemsize
from compressor.math.codebook import NF4_BLOCK

__all__ = [
    "CODEBOOK_FORMAT",
    "CT_FORMAT",
    "MINMAX_FORMAT",
    "SPARSE_BITMASK_FORMAT",
    "CodebookArgs",
    "Float4Args",
    "Float8Args",
    "OutputRole",
    "OutputSpec",
    "module_name",
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
    "global_scale",
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


@dataclass(frozen=True)
class Float8Args:
    """FP8 (E4M3) weights: compressed-tensors `float-quantized`, the layout vLLM serves on
    GPUs with FP8 support. One scale per output channel, or per 128×128 block (DeepSeek-V3's
    layout, "FP8_BLOCK"); with
    `dynamic_activations` the config also asks the server to quantize activations to FP8 per
    token at run time (W8A8-FP8)."""

    strategy: Literal["channel", "block"] = "channel"
    dynamic_activations: bool = False
    block: tuple[int, int] = (128, 128)  # strategy block: rows × cols of one scale
    bits: int = 8
    method: Literal["fp8"] = "fp8"
    symmetric: bool = True

    def describe(self) -> str:
        where = f"block {self.block[0]}x{self.block[1]}" if self.strategy == "block" else "channel"
        return f"fp8 e4m3 {where}" + (" w8a8" if self.dynamic_activations else "")


@dataclass(frozen=True)
class Float4Args:
    """FP4 (E2M1) weights in compressed-tensors' microscale layouts:

    - ``nvfp4``: an FP8 E4M3 scale per 16 inputs and one FP32 global scale per tensor (shared by
      the members of a fused group, as servers need), `nvfp4-pack-quantized`; with
      `activations`, W4A4: the server also quantizes each linear's input to NVFP4 at run time,
      its scales per 16 computed then ("dynamic local") under a static FP32 global scale per
      module, `input_global_scale`, which calibration measures;
    - ``mxfp4``: a power-of-two (E8M0) scale per 32 inputs, `mxfp4-pack-quantized`.
    """

    method: Literal["nvfp4", "mxfp4"] = "nvfp4"
    bits: int = 4
    symmetric: bool = True
    strategy: Literal["group"] = "group"  # never "tensor": no per-tensor integer scale
    activations: bool = False  # nvfp4 only: W4A4

    @property
    def group_size(self) -> int:
        return 16 if self.method == "nvfp4" else 32

    def describe(self) -> str:
        return f"{self.method} g{self.group_size}" + (" w4a4" if self.activations else "")


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
