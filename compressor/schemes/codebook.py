"""Our `codebook` layout: non-integer codes decoded through a table (NF4, learned k-means).

NF4 (QLoRA's NormalFloat4 code, `math/codebook.py`), blocks of 64 along each row:

    <m>.weight_nf4         I32   (rows, ceil(cols·4/32))   code indices i in [0, 15], packed as
                                                            `pack_rows` packs (LSB first)
    <m>.weight_absmax      F32   (rows, ceil(cols/64))     absmax of each block of 64 values of
                                                            a row (the last block may be shorter)
    <m>.weight_shape       I64   (2,)

k-means, b bits (2..8), one learned codebook per tensor:

    <m>.weight_indices     I32   (rows, ceil(cols·b/32))   centroid indices in [0, 2^b), packed
    <m>.weight_codebook    F32   (2^b,)                    the centroids (float32)
    <m>.weight_shape       I64   (2,)

The weight's dtype is recorded per config group (`quant_config.codebook_config`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from compressor.errors import InputError
from compressor.formats import dtypes
from compressor.formats.layout import CODEBOOK_FORMAT, CodebookArgs, OutputSpec, module_name
from compressor.formats.quant_config import OUR_TOOL
from compressor.formats.safetensors_io import TensorInfo, read_rows
from compressor.math.codebook import NF4_BLOCK, kmeans_assign, nf4_dequantize, nf4_quantize
from compressor.math.pack import pack_rows, packed_width, unpack_rows
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
from compressor.schemes.discovery import module_parts
from compressor.schemes.int_packed import BLOCK_ROWS, GPU_BLOCK_ROWS, device

if TYPE_CHECKING:
    from compressor.formats.checkpoint import Checkpoint

__all__ = [
    "CodebookScheme",
    "codebook_config",
    "codebook_outputs",
    "nf4_dequantize_rows",
    "nf4_quantize_rows",
]

_PARTS = {  # the root part (what marks a module) → every part of the layout
    "weight_nf4": ("weight_nf4", "weight_absmax", "weight_shape"),
    "weight_indices": ("weight_indices", "weight_codebook", "weight_shape"),
}


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


def codebook_config(groups: Mapping[tuple[CodebookArgs, str], Sequence[str]]) -> dict[str, Any]:
    """Our block for the codebook layouts (NF4, k-means; see layout.py).

    `groups` maps (scheme, the weights' safetensors dtype) to module names: the dtype is what
    decompression restores, since codes, absmax and codebook are stored in float32. As in the
    minmax block, it has no `quant_method` (see `OUR_TOOL`).
    """
    config_groups = {}
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][0].method, kv[0][0].bits, kv[0][1]))
    for k, ((args, dtype), modules) in enumerate(ordered):
        group: dict[str, Any] = {
            "targets": sorted(modules),
            "type": args.method,
            "num_bits": args.bits,
            "dtype": dtype,
        }
        if args.method == "nf4":
            group["block_size"] = args.block_size
        else:
            group["iterations"] = args.iterations
            group["init"] = args.init
        config_groups[f"group_{k}"] = group
    return {
        "tool": OUR_TOOL,
        "format": CODEBOOK_FORMAT,
        "config_groups": config_groups,
        "decompress_with": "compressor decompress SRC DST",
    }


class CodebookScheme(Scheme):
    name = "codebook"
    format = CODEBOOK_FORMAT
    parts = ("weight_nf4", "weight_indices", "weight_absmax", "weight_codebook", "weight_shape")
    root_parts = ("weight_nf4", "weight_indices")
    row_roles = frozenset({"packed", "absmax"})

    def accepts(self, args: Args) -> bool:
        return isinstance(args, CodebookArgs)

    def root_part(self, args: Args) -> str:
        assert isinstance(args, CodebookArgs)
        return "weight_nf4" if args.method == "nf4" else "weight_indices"

    def outputs(
        self, tensor_name: str, shape: tuple[int, int], dtype: str, args: Args, kept: int = 0
    ) -> list[OutputSpec]:
        assert isinstance(args, CodebookArgs)
        return codebook_outputs(tensor_name, shape, args)

    def staged_arrays(
        self, shape: tuple[int, int], dtype: str, args: Args, chunk_rows: int
    ) -> list[StagedArray]:
        assert isinstance(args, CodebookArgs)
        rows, cols = shape
        arrays = [StagedArray("packed", (rows, packed_width(cols, args.bits)), "I32", chunk_rows)]
        if args.method == "nf4":
            arrays.append(StagedArray("absmax", (rows, -(-cols // NF4_BLOCK)), "F32", chunk_rows))
        return arrays

    def fits_codebook(self, args: Args) -> bool:
        return isinstance(args, CodebookArgs) and args.method == "kmeans"

    def encode_chunk(self, out: RowSink, args: Args, chunk: ChunkInput) -> ErrorStats:
        """NF4 or k-means codes of a chunk, in row blocks; stores packed codes (and NF4's
        absmax)."""
        assert isinstance(args, CodebookArgs)
        where = device()
        step = GPU_BLOCK_ROWS if where.type == "cuda" else BLOCK_ROWS
        centroids = None
        if args.method == "kmeans":
            if chunk.codebook is None or len(chunk.codebook) != args.levels:
                raise ValueError(
                    f"{chunk.tensor}: k-means compression needs its {args.levels} centroids"
                )
            centroids = torch.tensor(chunk.codebook, dtype=torch.float64, device=where)
        x = chunk.x
        packed, absmaxes, errors = [], [], []
        for b0 in range(0, x.shape[0], step):
            block = x[b0 : b0 + step].to(where)
            if centroids is None:
                codes, absmax = nf4_quantize_rows(block)
                x_hat = nf4_dequantize_rows(codes, absmax, block.dtype)
                absmaxes.append(absmax.cpu())
            else:
                codes = kmeans_assign(block, centroids)
                x_hat = centroids[codes].to(block.dtype)
            errors.append(error_stats(block, x_hat, count_zeros=False))
            packed.append(pack_rows(codes, args.bits).cpu())
        out.put("packed", chunk.first_row, torch.cat(packed).numpy())
        if absmaxes:
            out.put("absmax", chunk.first_row, torch.cat(absmaxes).numpy())
        return combine_errors(*errors)

    def small_outputs(
        self,
        module: str,
        args: Args,
        scale: torch.Tensor | None,
        zero: torch.Tensor | None,
        codebook: Sequence[float] | None,
        input_absmax: float | None = None,
    ) -> dict[str, np.ndarray]:
        if codebook is None:
            return {}
        return {f"{module}.weight_codebook": np.asarray(codebook, dtype="<f4")}

    def decode_rows(
        self, module: CompressedModule, r0: int, r1: int, dtype: torch.dtype | None
    ) -> torch.Tensor:
        args = module.args
        assert isinstance(args, CodebookArgs)
        dtype = dtype or dtypes.torch_dtype(module.dtype)
        cols = module.shape[1]
        if args.method == "nf4":
            codes = unpack_rows(read_part(module, "weight_nf4", r0, r1), 4, cols).to(torch.uint8)
            return nf4_dequantize_rows(codes, read_part(module, "weight_absmax", r0, r1), dtype)
        indices = unpack_rows(read_part(module, "weight_indices", r0, r1), args.bits, cols)
        codebook = read_part(module, "weight_codebook", 0, args.levels).reshape(-1)
        return codebook[indices.long()].to(dtype)

    def config_block(
        self, groups: Mapping[tuple[Args, str], Sequence[str]], dense_linear: Sequence[str]
    ) -> dict[str, Any]:
        return codebook_config(
            {(a, d): m for (a, d), m in groups.items() if isinstance(a, CodebookArgs)}
        )

    def config_errors(self, qc: dict[str, Any]) -> list[str]:
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            return ["config_groups must be a non-empty object"]
        errors = []
        for key, group in groups.items():
            where = f"config_groups.{key}"
            if not isinstance(group, dict):
                errors.append(f"{where} must be an object")
                continue
            targets = group.get("targets")
            if not (
                isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
            ):
                errors.append(f"{where}.targets must be a non-empty list of module names")
            kind, bits = group.get("type"), group.get("num_bits")
            if kind not in ("nf4", "kmeans"):
                errors.append(f"{where}.type must be nf4 or kmeans, got {kind!r}")
            elif kind == "nf4" and (bits != 4 or group.get("block_size") != 64):
                errors.append(f"{where}: nf4 needs num_bits 4 and block_size 64")
            elif kind == "kmeans" and (type(bits) is not int or not 2 <= bits <= 8):
                errors.append(f"{where}.num_bits must be an integer from 2 to 8, got {bits!r}")
            if group.get("dtype") not in ("BF16", "F16", "F32", "F64"):
                errors.append(
                    f"{where}.dtype must be BF16, F16, F32 or F64, got {group.get('dtype')!r}"
                )
        return errors

    def group_root(self, group: dict[str, Any]) -> str:
        return "weight_nf4" if group.get("type") == "nf4" else "weight_indices"

    def discover(self, checkpoint: Checkpoint, qc: object) -> dict[str, CompressedModule]:
        """NF4 and k-means weights, with their config group's scheme."""
        roots = [
            (name.rsplit(".", 1)[0], name.rsplit(".", 1)[1])
            for name in checkpoint.tensors
            if name.rsplit(".", 1)[-1] in _PARTS
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
            suffixes = _PARTS[root]
            parts, shape = module_parts(checkpoint, module, suffixes, suffixes, root)
            out[module] = CompressedModule(module, self, args, shape, parts, str(group["dtype"]))
        return out

    def verify_module(
        self, tensors: Mapping[str, tuple[str, TensorInfo]], module: CompressedModule, where: Where
    ) -> list[tuple[str | None, str]]:
        args = module.args
        assert isinstance(args, CodebookArgs)
        expected = self.outputs(f"{module.module}.weight", module.shape, module.dtype, args)
        problems = expected_problems(tensors, module, expected, args.describe(), where)
        if problems:
            return problems
        # NaN or inf in the absmax or the codebook would decompress to NaN weights.
        m = module.module
        name = f"{m}.weight_absmax" if args.method == "nf4" else f"{m}.weight_codebook"
        file, info = tensors[name]
        rows = info.shape[0]
        for r0 in range(0, rows, 4096):
            block = read_rows(file, info, r0, min(rows, r0 + 4096))
            if not np.isfinite(block).all():
                return [(where(name), f"tensor {name!r} holds NaN or infinite values")]
        return []
