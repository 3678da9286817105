"""The scheme protocol: everything about one storage format, in one place.

A scheme knows, for a compressed weight `<m>.weight` of shape (rows, cols):

- its stored tensors (`outputs`: names, dtypes, shapes, roles, in write order) and the staged
  row arrays a chunk fills (`staged_arrays`, `staged_span`);
- how a chunk (a row block) is encoded (`encode_chunk`) and how rows are decoded back
  (`decode_rows`), plus the tiny tensors written from the client (`small_outputs`);
- its `quantization_config` block (`config_block`) and the checks of that block (`config_errors`);
- how to find its modules in a checkpoint (`discover`) and check each one (`verify_module`).

Stages, write, decompress, inspect and verify only dispatch through the registry
(`compressor/schemes/__init__.py`). Schemes are stateless singletons.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch

from compressor.formats import dtypes
from compressor.formats.layout import CodebookArgs, Float4Args, Float8Args, OutputSpec
from compressor.formats.safetensors_io import TensorInfo, read_rows
from compressor.math.gptq import InputHessian
from compressor.math.quant import QuantArgs
from compressor.math.stats import ErrorStats

if TYPE_CHECKING:
    from compressor.formats.checkpoint import Checkpoint

__all__ = [
    "Args",
    "BitmaskArgs",
    "ChunkInput",
    "CompressedModule",
    "RowSink",
    "Scheme",
    "StagedArray",
    "read_part",
]


@dataclass(frozen=True)
class BitmaskArgs:
    """The sparse-bitmask storage of a pruned, unquantized weight (no parameters)."""

    method: str = "bitmask"

    def describe(self) -> str:
        return "sparse bitmask"


Args = QuantArgs | CodebookArgs | Float8Args | Float4Args | BitmaskArgs


class RowSink(Protocol):
    """Where a chunk's output rows go (a staged Zarr array or the shard file, by role)."""

    def put(self, role: str, first_row: int, values: np.ndarray) -> None: ...

    def put_array(self, name: str, values: np.ndarray, dtype: str) -> None:
        """A whole array of its own (e.g. one chunk's kept values, raw bits of safetensors
        dtype `dtype`), staged as `name`."""


@dataclass(frozen=True)
class StagedArray:
    """A row array a scheme's chunks fill in staging: `out/<tensor key>/<role>`."""

    role: str
    shape: tuple[int, ...]
    dtype: str
    chunk_rows: int


@dataclass(frozen=True)
class ChunkInput:
    """One row block to encode: the weights as read (`x`), after pruning (`pruned`), and what
    the earlier stages decided for its tensor."""

    x: torch.Tensor
    pruned: torch.Tensor
    first_row: int
    chunk: int
    removed: int  # weights pruning zeroed in this block
    rounding: str = "rtn"
    scale: torch.Tensor | None = None  # per-tensor parameters (thresholds stage)
    zero: torch.Tensor | None = None
    codebook: tuple[float, ...] | None = None  # k-means: the tensor's stored centroids
    tensor: str = ""  # for messages
    hessian: InputHessian | None = None  # calibration: the weight's input XᵀX


@dataclass(frozen=True)
class CompressedModule:
    """One compressed weight found in a checkpoint: its parts and how to undo it.

    `root` is the part whose position in its shard the dense weight takes on decompression;
    `weight_dtype` is the dense weight's dtype where no stored part carries it (codebooks).
    """

    module: str
    scheme: Scheme
    args: Args
    shape: tuple[int, int]
    parts: dict[str, tuple[str, TensorInfo]]  # suffix → (file, info)
    weight_dtype: str | None = None

    @property
    def root(self) -> str:
        return self.scheme.root_part(self.args)

    @property
    def dtype(self) -> str:
        if self.weight_dtype is not None:
            return self.weight_dtype
        return self.parts[self.scheme.dtype_part][1].dtype

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for _, info in self.parts.values())

    # -- as an input to compress again (`plan.Encoded`) --------------------------------------
    @property
    def consumed(self) -> tuple[str, ...]:
        """Its stored tensors other than the root part (decoding reads them too)."""
        return tuple(f"{self.module}.{s}" for s in self.parts if s != self.root)

    def decode(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of the dense weight, in its dtype (r0 a multiple of 32)."""
        return self.scheme.decode_rows(self, r0, r1, None)


def read_part(module: CompressedModule, suffix: str, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of one stored part, as a torch tensor of its dtype."""
    file, info = module.parts[suffix]
    return dtypes.to_torch(read_rows(file, info, r0, r1), info.dtype)


Where = Callable[[str], str | None]  # tensor name → the file a problem is reported against


class Scheme(ABC):
    """One storage format. Subclasses are registered with `schemes.register`."""

    name: ClassVar[str]  # registry key
    format: ClassVar[str]  # the quantization_config format it writes
    dtype_part: ClassVar[str] = "weight_scale"  # the stored part that carries the weight dtype
    parts: ClassVar[tuple[str, ...]] = ()  # every part suffix it may store, root first
    row_roles: ClassVar[frozenset[str]] = frozenset()  # roles whose rows chunks write
    root_parts: ClassVar[tuple[str, ...]] = ()  # parts that mark a module stored this way
    partial_groups: ClassVar[bool] = False  # a group size need not divide the input dimension
    sized_after_compress: ClassVar[bool] = False  # output sizes known only once values are kept
    exact_zero: ClassVar[bool] = True  # 0.0 decodes to exactly 0.0 (pruning needs it)
    served: ClassVar[bool] = False  # inference servers (vLLM) load it: fused groups apply
    fused_range: ClassVar[bool] = False  # fused-group members share the per-tensor parameters
    ours: ClassVar[bool] = True  # our own layout (its block carries "tool", no quant_method)

    # -- which weights -----------------------------------------------------------------------
    @abstractmethod
    def accepts(self, args: Args) -> bool:
        """Whether this scheme stores weights described by `args`."""

    def root_part(self, args: Args) -> str:
        return self.parts[0]

    def for_width(self, args: Args, cols: int) -> tuple[Args | None, str, str] | None:
        """None when `args` suits a weight of `cols` inputs; else the fallback the plan uses
        (None: the weight stays dense), a short note for the report ("group 128 → 64") and
        why (for `--strict-groups`)."""
        return None

    def row_align(self, args: Args) -> int:
        """Chunks start at multiples of this many rows (32: zero points packed along rows fill
        whole int32 words; a scheme with taller blocks asks for a multiple of 32)."""
        return 32

    # -- layout ------------------------------------------------------------------------------
    @abstractmethod
    def outputs(
        self, tensor_name: str, shape: tuple[int, int], dtype: str, args: Args, kept: int = 0
    ) -> list[OutputSpec]:
        """The output tensors that replace one weight, in the order they are written
        (`kept`: values a bitmask weight keeps)."""

    @abstractmethod
    def staged_arrays(
        self, shape: tuple[int, int], dtype: str, args: Args, chunk_rows: int
    ) -> list[StagedArray]:
        """The staged arrays a tensor's chunks fill (created before compress)."""

    def staged_span(
        self, role: str, r0: int, r1: int, args: Args, rows_out: int
    ) -> tuple[int, int]:
        """The rows of the staged `role` array that weight rows [r0, r1) fill."""
        return r0, r1

    def write_blocks(
        self,
        role: str,
        rows_out: int,
        args: Args,
        chunks: Sequence[tuple[int, int]],
        read: Callable[[str, int, int], np.ndarray],
    ) -> Iterator[np.ndarray]:
        """The bytes of one output tensor from staging, chunk by chunk, in bounded blocks
        (`read(role, first, stop)` reads rows of a staged array; `rows_out`: the output's
        first dimension)."""
        for r0, r1 in chunks:
            yield read(role, *self.staged_span(role, r0, r1, args, rows_out))

    # -- per-tensor parameters (thresholds stage) --------------------------------------------
    def needs_range(self, args: Args) -> bool:
        """Whether a parameter depends on the whole tensor's range (the ingest stage's min and
        max), fixed by `tensor_params` before compress."""
        return False

    def tensor_params(
        self, args: Args, lo: float, hi: float, dtype: str
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The per-tensor (scale, zero) of a weight whose values span [lo, hi] (over its whole
        fused group when `fused_range`), handed to every chunk as `ChunkInput.scale/zero` and
        to `small_outputs`."""
        return None, None

    # -- compress ----------------------------------------------------------------------------
    def fits_codebook(self, args: Args) -> bool:
        """Whether the stats stage fits a per-tensor codebook (k-means) before compress."""
        return False

    def takes_fused_kernels(self, args: Args, dtype: str, rounding: str) -> bool:
        """Whether chunks of a weight of safetensors `dtype` run fused CPU kernels that release
        the GIL (so the embedded cluster can run threads)."""
        return False

    def takes_search_kernels(self, args: Args, dtype: str, rounding: str) -> bool:
        """Whether those chunks also search their scales on fused CPU kernels (a compile of its
        own, the larger one: workers load it only where a tensor of the plan needs it)."""
        return False

    @abstractmethod
    def encode_chunk(self, out: RowSink, args: Args, chunk: ChunkInput) -> ErrorStats:
        """Encode one row block into `out`; return its error against `chunk.x`."""

    def small_outputs(
        self,
        module: str,
        args: Args,
        scale: torch.Tensor | None,
        zero: torch.Tensor | None,
        codebook: Sequence[float] | None,
        input_absmax: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Tiny tensors written from the client (per-tensor scales, codebooks), by name;
        `input_absmax`: the largest input magnitude calibration measured, where it did."""
        return {}

    # -- decompress --------------------------------------------------------------------------
    @abstractmethod
    def decode_rows(
        self, module: CompressedModule, r0: int, r1: int, dtype: torch.dtype | None
    ) -> torch.Tensor:
        """Rows [r0, r1) of the dense weight (`dtype` None: the stored weight dtype)."""

    # -- config.json -------------------------------------------------------------------------
    @abstractmethod
    def config_block(
        self, groups: Mapping[tuple[Args, str], Sequence[str]], dense_linear: Sequence[str]
    ) -> dict[str, Any]:
        """The quantization_config block of every module stored this way: `groups` maps
        (scheme args, weight dtype) to module names; `dense_linear`: linear layers left dense."""

    @abstractmethod
    def config_errors(self, qc: dict[str, Any]) -> list[str]:
        """What is wrong with a quantization_config block of this format (empty: nothing)."""

    def extension_errors(self, qc: dict[str, Any]) -> list[str]:
        """What is wrong with this scheme's extension inside another scheme's block."""
        return []

    def declared(self, qc: dict[str, Any]) -> dict[str, str]:
        """Modules the block's config groups name explicitly (not "Linear" or "re:"
        patterns), with the root part each must have."""
        return {
            target: self.group_root(group)
            for group in (qc.get("config_groups") or {}).values()
            for target in group["targets"]
            if target != "Linear" and not target.startswith("re:")
        }

    def group_root(self, group: dict[str, Any]) -> str:
        """The root part of the modules one config group declares."""
        return self.parts[0]

    # -- reading -----------------------------------------------------------------------------
    @abstractmethod
    def discover(self, checkpoint: Checkpoint, qc: object) -> dict[str, CompressedModule]:
        """Every module of `checkpoint` stored this way, with its scheme args."""

    @abstractmethod
    def verify_module(
        self, tensors: Mapping[str, tuple[str, TensorInfo]], module: CompressedModule, where: Where
    ) -> list[tuple[str | None, str]]:
        """(file, message) for each problem of one module's stored parts."""


def merge_dtypes(groups: Mapping[tuple[Args, str], Sequence[str]]) -> dict[Any, list[str]]:
    """(args, weight dtype) → modules, merged to args → modules, for blocks whose config group
    does not depend on the weight dtype (compressed-tensors': the scale carries it)."""
    merged: dict[Any, list[str]] = {}
    for (args, _), modules in groups.items():
        merged.setdefault(args, []).extend(modules)
    return merged


def expected_problems(
    tensors: Mapping[str, tuple[str, TensorInfo]],
    module: CompressedModule,
    expected: list[OutputSpec],
    described: str,
    where: Where,
) -> list[tuple[str | None, str]]:
    """Each expected part exists with the dtype and shape the scheme implies."""
    problems: list[tuple[str | None, str]] = []
    for spec in expected:
        if spec.name not in tensors:
            problems.append(
                (
                    where(f"{module.module}.{module.root}"),
                    f"module {module.module!r} ({described}) has no {spec.name}",
                )
            )
            continue
        info = tensors[spec.name][1]
        if info.dtype != spec.dtype or info.shape != spec.shape:
            problems.append(
                (
                    where(spec.name),
                    f"tensor {spec.name!r} is {info.dtype} {list(info.shape)}, but a "
                    f"{list(module.shape)} weight stored {described} needs {spec.dtype} "
                    f"{list(spec.shape)}",
                )
            )
    return problems
