"""Our `sparse-bitmask` layout: pruned weights that are not quantized, stored without zeros.

    <m>.weight_values      dtype (kept,)                    the kept (non-zero) values, row-major
    <m>.weight_bitmask     U8    (rows, ceil(cols/8))       bit j%8 of byte j//8 = column j kept,
                                                            least significant bit first
    <m>.weight_row_offsets I64   (rows + 1,)                values of row r are
                                                            values[offsets[r]:offsets[r+1]]
    <m>.weight_shape       I64   (2,)

50 % unstructured on bf16 takes 1/2·2 + 1/8 = 1.125 of 2 bytes per weight: 56 %. Standalone it
is our own `quantization_config` block; beside integer schemes it is an extension key of the
compressed-tensors block (`checkpoint_compressor_sparse_bitmask`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from compressor.errors import InputError
from compressor.formats import dtypes
from compressor.formats.layout import SPARSE_BITMASK_FORMAT, OutputSpec, module_name
from compressor.formats.quant_config import OUR_TOOL
from compressor.formats.safetensors_io import TensorInfo, read_rows, read_tensor
from compressor.math.stats import ErrorStats, error_stats
from compressor.schemes.base import (
    Args,
    BitmaskArgs,
    ChunkInput,
    CompressedModule,
    RowSink,
    Scheme,
    StagedArray,
    Where,
    expected_problems,
    read_part,
)
from compressor.schemes.discovery import module_parts

if TYPE_CHECKING:
    from compressor.formats.checkpoint import Checkpoint

__all__ = ["EXTENSION_KEY", "BitmaskScheme", "bitmask_outputs", "sparse_bitmask_config"]

EXTENSION_KEY = "checkpoint_compressor_sparse_bitmask"
_PARTS = ("weight_bitmask", "weight_values", "weight_row_offsets", "weight_shape")


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


def sparse_bitmask_config(modules: Sequence[str]) -> dict[str, Any]:
    """Our block for pruned, unquantized weights stored as values + bitmask (see layout.py)."""
    return {
        "tool": OUR_TOOL,
        "format": SPARSE_BITMASK_FORMAT,
        "targets": sorted(modules),
        "decompress_with": "compressor decompress SRC DST",
    }


class BitmaskScheme(Scheme):
    name = "bitmask"
    format = SPARSE_BITMASK_FORMAT
    parts = _PARTS
    dtype_part = "weight_values"
    root_parts = ("weight_bitmask",)
    row_roles = frozenset()  # never assembled in place: sizes are known only after compress
    sized_after_compress = True

    def accepts(self, args: Args) -> bool:
        return isinstance(args, BitmaskArgs)

    def outputs(
        self, tensor_name: str, shape: tuple[int, int], dtype: str, args: Args, kept: int = 0
    ) -> list[OutputSpec]:
        return bitmask_outputs(tensor_name, shape, dtype, kept)

    def staged_arrays(
        self, shape: tuple[int, int], dtype: str, args: Args, chunk_rows: int
    ) -> list[StagedArray]:
        rows, cols = shape
        return [
            StagedArray("bitmask", (rows, -(-cols // 8)), "U8", chunk_rows),
            StagedArray("row_counts", (rows,), "I64", chunk_rows),
        ]

    def encode_chunk(self, out: RowSink, args: Args, chunk: ChunkInput) -> ErrorStats:
        x = chunk.pruned
        kept = x != 0
        out.put("bitmask", chunk.first_row, np.packbits(kept.numpy(), axis=1, bitorder="little"))
        out.put("row_counts", chunk.first_row, kept.sum(dim=1).numpy().astype("<i8"))
        # row-major order: row by row, ascending column; one array per chunk
        out.put_array(
            f"values/c{chunk.chunk:05d}",
            dtypes.to_raw(x[kept]),
            dtypes.safetensors_dtype_of(x.dtype),
        )
        return error_stats(chunk.x, chunk.pruned, chunk.removed)

    def write_blocks(
        self,
        role: str,
        rows_out: int,
        args: Args,
        chunks: Sequence[tuple[int, int]],
        read: Callable[[str, int, int], np.ndarray],
    ) -> Iterator[np.ndarray]:
        if role == "values":  # one array per chunk, concatenated in chunk order
            for k in range(len(chunks)):
                yield read(f"values/c{k:05d}", 0, 2**62)
            return
        if role == "row_offsets":  # a running sum of the per-row kept counts
            offset = 0
            yield np.zeros(1, dtype="<i8")
            for r0, r1 in chunks:
                offsets = np.cumsum(read("row_counts", r0, r1), dtype="<i8") + offset
                offset = int(offsets[-1])
                yield offsets
            return
        yield from super().write_blocks(role, rows_out, args, chunks, read)

    def decode_rows(
        self, module: CompressedModule, r0: int, r1: int, dtype: torch.dtype | None
    ) -> torch.Tensor:
        """Zeros, with the kept values scattered back."""
        cols = module.shape[1]
        bits = read_rows(*module.parts["weight_bitmask"], r0, r1)
        kept = torch.from_numpy(
            np.unpackbits(bits, axis=1, count=cols, bitorder="little").astype(bool)
        )
        offsets = read_rows(*module.parts["weight_row_offsets"], r0, r1 + 1)
        values = read_part(module, "weight_values", int(offsets[0]), int(offsets[-1]))
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

    def config_block(
        self, groups: Mapping[tuple[Args, str], Sequence[str]], dense_linear: Sequence[str]
    ) -> dict[str, Any]:
        return sparse_bitmask_config([m for modules in groups.values() for m in modules])

    def attach(self, block: dict[str, Any], modules: Sequence[str]) -> dict[str, Any]:
        """Another scheme's block with these modules declared as our extension."""
        return {**block, EXTENSION_KEY: sorted(modules)}

    def config_errors(self, qc: dict[str, Any]) -> list[str]:
        targets = qc.get("targets")
        if isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets):
            return []
        return ["targets must be a list of module names"]

    def extension_errors(self, qc: dict[str, Any]) -> list[str]:
        value = qc.get(EXTENSION_KEY, [])
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return []
        return [f"{EXTENSION_KEY} must be a list of module names"]

    def declared(self, qc: dict[str, Any]) -> dict[str, str]:
        names = qc["targets"] if qc.get("format") == self.format else qc.get(EXTENSION_KEY, [])
        return dict.fromkeys(names, "weight_bitmask")

    def discover(self, checkpoint: Checkpoint, qc: object) -> dict[str, CompressedModule]:
        out = {}
        for name in checkpoint.tensors:
            if not name.endswith(".weight_bitmask"):
                continue
            module = name.removesuffix(".weight_bitmask")
            parts, shape = module_parts(checkpoint, module, _PARTS, _PARTS, "weight_bitmask")
            out[module] = CompressedModule(module, self, BitmaskArgs(), shape, parts)
        return out

    def verify_module(
        self, tensors: Mapping[str, tuple[str, TensorInfo]], module: CompressedModule, where: Where
    ) -> list[tuple[str | None, str]]:
        m = module.module
        values = tensors[f"{m}.weight_values"][1]
        if len(values.shape) != 1:
            return [(where(f"{m}.weight_values"), f"tensor '{m}.weight_values' is not 1-D")]
        expected = self.outputs(
            f"{m}.weight", module.shape, values.dtype, module.args, values.shape[0]
        )
        problems = expected_problems(tensors, module, expected, "as a sparse bitmask", where)
        if problems:
            return problems
        # The bits, the row offsets and the number of values must agree (row block by row block).
        rows, cols = module.shape
        file, info = tensors[f"{m}.weight_row_offsets"]
        offsets = read_tensor(file, info).astype(np.int64)
        if offsets[0] != 0 or (np.diff(offsets) < 0).any() or offsets[-1] != values.shape[0]:
            return [
                (
                    where(f"{m}.weight_row_offsets"),
                    f"tensor '{m}.weight_row_offsets' does not run from 0 up to the "
                    f"{values.shape[0]} stored values",
                )
            ]
        file, info = tensors[f"{m}.weight_bitmask"]
        for r0 in range(0, rows, 4096):
            r1 = min(rows, r0 + 4096)
            bits = np.unpackbits(
                read_rows(file, info, r0, r1), axis=1, count=cols, bitorder="little"
            )
            if not np.array_equal(bits.sum(axis=1), np.diff(offsets[r0 : r1 + 1])):
                return [
                    (
                        where(f"{m}.weight_bitmask"),
                        f"tensor '{m}.weight_bitmask' and '{m}.weight_row_offsets' disagree on "
                        f"how many values rows {r0}..{r1 - 1} keep",
                    )
                ]
        return []
