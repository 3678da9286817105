"""FP4 weights: compressed-tensors' microscale formats `nvfp4-pack-quantized` and
`mxfp4-pack-quantized` (what vLLM serves on Blackwell GPUs, and through Marlin on older ones).

Both store FP4 E2M1 codes, two per byte, and a scale per small group of inputs. For a weight
`<m>.weight` (rows, cols):

    <m>.weight_packed        U8       (rows, cols/2)   byte j of a row holds the codes of
                                                       columns 2j (low nibble) and 2j+1 (high);
                                                       a code is sign·8 + i, value ±E2M1[i],
                                                       E2M1 = 0, .5, 1, 1.5, 2, 3, 4, 6
    NVFP4 (groups of 16):
    <m>.weight_scale         F8_E4M3  (rows, cols/16)  s = fp8(G · absmax(group) / 6)
    <m>.weight_global_scale  F32      (1,)             G = 448 · 6 / absmax(tensor), the absmax
                                                       taken over the whole fused group (q/k/v,
                                                       gate/up) since servers keep one G for a
                                                       fused module
    <m>.input_global_scale   F32      (1,)             W4A4 only: 448 · 6 / max |x| of the
                                                       module's input over the calibration
                                                       tokens (q/k/v, gate/up share an input,
                                                       hence the value); the server computes
                                                       the per-16 input scales at run time
        x̂ = dtype(float32(code) · (float32(s) / G))
    MXFP4 (groups of 32):
    <m>.weight_scale         U8       (rows, cols/32)  E8M0 exponent e: the group's absmax
                                                       rounded to a power of two 2^k (up when
                                                       its mantissa is ≥ 1.75), e = 127 + k − 2
        x̂ = dtype(code · 2^(e − 127))

The arithmetic of x̂ is compressed-tensors' own decompression, step for step (it converts the
scale to bfloat16 first, exactly, and gives bfloat16 weights, which is what `decompress` gives
by default here too: these layouts do not record the original dtype). Codes are the nearest E2M1
value of x / scale after clamping to ±6, ties to the even code. A group of zeros gets codes 0
(and, for NVFP4, the scale 0.125 compressed-tensors also uses), so pruned zeros stay exact.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal, cast

import numpy as np
import torch

from compressor.errors import InputError
from compressor.formats import dtypes
from compressor.formats.layout import Float4Args, OutputSpec, module_name
from compressor.formats.safetensors_io import TensorInfo
from compressor.math import kernels
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
from compressor.schemes.int_packed import BLOCK_ROWS, GPU_BLOCK_ROWS, NonFiniteWeights, device

if TYPE_CHECKING:
    from compressor.formats.checkpoint import Checkpoint

__all__ = [
    "E2M1",
    "MXFP4_FORMAT",
    "NVFP4_FORMAT",
    "Mxfp4Scheme",
    "Nvfp4Scheme",
    "decode_fp4",
    "encode_fp4",
    "mx_exponents",
    "nvfp4_global_scale",
    "nvfp4_scales",
    "pack_fp4",
    "unpack_fp4",
]

NVFP4_FORMAT = "nvfp4-pack-quantized"
MXFP4_FORMAT = "mxfp4-pack-quantized"
FP4_MAX = 6.0
FP8_MAX = 448.0
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_KINDS = {torch.bfloat16: kernels.BF16, torch.float16: kernels.F16}  # fused-kernel inputs
NVFP4_ZERO_SCALE = 0.125  # the scale of an all-zero group (compressed-tensors' choice too)
# Round to nearest, ties to the even code: |v| crosses into code i+1 past each midpoint,
# strictly (">") where the lower code is even, inclusively (">=") where it is odd.
_STRICT = torch.tensor([0.25, 1.25, 2.5, 5.0])  # midpoints above codes 0, 2, 4, 6
_INCLUSIVE = torch.tensor([0.75, 1.75, 3.5])  # midpoints above codes 1, 3, 5


def encode_fp4(v: torch.Tensor) -> torch.Tensor:
    """E2M1 codes (uint8, sign·8 + index) of float32 values already divided by their scale:
    clamped to ±6, rounded to the nearest value, ties to the even code; zero is code 0."""
    a = v.abs().clamp(max=FP4_MAX)
    strict, inclusive = _STRICT.to(v.device), _INCLUSIVE.to(v.device)
    index = (a.unsqueeze(-1) > strict).sum(-1) + (a.unsqueeze(-1) >= inclusive).sum(-1)
    sign = ((v < 0) & (index > 0)).to(torch.uint8) << 3
    return index.to(torch.uint8) | sign


def decode_fp4(codes: torch.Tensor) -> torch.Tensor:
    """float32 values of E2M1 codes."""
    values = E2M1.to(codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) != 0, -values, values)


def pack_fp4(codes: torch.Tensor) -> torch.Tensor:
    """(rows, cols) codes → (rows, cols/2) bytes, column 2j in the low nibble."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_fp4(packed: torch.Tensor) -> torch.Tensor:
    """(rows, cols/2) bytes → (rows, cols) codes."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def _group_absmax(x: torch.Tensor, group: int) -> torch.Tensor:
    rows, cols = x.shape
    return x.float().abs().reshape(rows, cols // group, group).amax(dim=-1)


def nvfp4_global_scale(absmax: float) -> torch.Tensor:
    """(1,) float32 G = 448·6 / absmax (1 for an all-zero tensor)."""
    g = torch.tensor([FP8_MAX * FP4_MAX], dtype=torch.float32) / torch.tensor(
        [absmax], dtype=torch.float32
    )
    return torch.where(torch.isfinite(g) & (g > 0), g, torch.ones_like(g))


def nvfp4_scales(x: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """(rows, cols/16) FP8 E4M3 local scales fp8(G · absmax / 6); 0.125 where that is 0."""
    return _nvfp4_scales_of(_group_absmax(x, 16), global_scale)


def _nvfp4_scales_of(absmax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    local = absmax / FP4_MAX * global_scale.to(absmax.device)
    fp8 = local.clamp(max=FP8_MAX).to(torch.float8_e4m3fn)
    zero = fp8.float() == 0
    return torch.where(zero, torch.full_like(local, NVFP4_ZERO_SCALE), fp8.float()).to(
        torch.float8_e4m3fn
    )


def mx_exponents(x: torch.Tensor) -> torch.Tensor:
    """(rows, cols/32) uint8 E8M0 exponents: absmax rounded to 2^k (up from mantissa 1.75),
    e = 127 + k − 2, within [0, 254]; 0 for an all-zero group."""
    return _mx_exponents_of(_group_absmax(x, 32))


def _mx_exponents_of(absmax: torch.Tensor) -> torch.Tensor:
    mantissa, exponent = torch.frexp(absmax)  # absmax = mantissa · 2^exponent, mantissa ∈ [.5, 1)
    k = exponent - 1 + (mantissa >= 0.875).to(exponent.dtype)  # 1.75·2^(e-1) = .875·2^e
    e = (k + 127 - 2).clamp(0, 254)
    return torch.where(absmax > 0, e, torch.zeros_like(e)).to(torch.uint8)


def _mx_scale(exponents: torch.Tensor) -> torch.Tensor:
    """float32 2^(e − 127) (exact: every such power is a float32 value)."""
    return torch.ldexp(torch.ones_like(exponents, dtype=torch.float32), exponents.int() - 127)


def _nvfp4_effective(scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """float32(s) / G: the multiplier compressed-tensors applies to a code."""
    return scale.float() / global_scale.float().to(scale.device)


def _config_inputs(args: Float4Args) -> dict[str, Any] | None:
    """W4A4: NVFP4 activations as compressed-tensors' NVFP4 scheme writes them (scales per 16
    computed at run time, "local"; a static global scale per module)."""
    if not args.activations:
        return None
    return {
        **_config_weights(args),
        "dynamic": "local",
        "observer": "static_minmax",
    }


def _config_weights(args: Float4Args) -> dict[str, Any]:
    nvfp4 = args.method == "nvfp4"
    return {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "group_size": args.group_size,
        "strategy": "tensor_group" if nvfp4 else "group",
        "block_structure": None,
        "dynamic": False,
        "actorder": None,
        "scale_dtype": "torch.float8_e4m3fn" if nvfp4 else "torch.uint8",
        "zp_dtype": None,
        "observer": "static_minmax" if nvfp4 else "minmax",
        "observer_kwargs": {},
    }


class _Fp4Scheme(Scheme):
    """What NVFP4 and MXFP4 share: packed E2M1 codes and a scale per group of inputs."""

    method: ClassVar[str]
    group: ClassVar[int]
    scale_dtype: ClassVar[str]
    dtype_part = "weight_packed"  # unused: the weight dtype is not stored (weight_dtype)
    root_parts = ("weight_packed",)  # as the integer scheme's: the config's format tells them apart
    row_roles = frozenset({"packed", "scale"})
    served = True
    ours = False
    exact_zero = True

    def accepts(self, args: Args) -> bool:
        return isinstance(args, Float4Args) and args.method == self.method

    def for_width(self, args: Args, cols: int) -> tuple[Args | None, str, str] | None:
        """The format has no partial groups and no coarser fallback: such a weight stays dense
        (and is listed in the config's `ignore`, as llm-compressor users do by hand)."""
        if cols % self.group == 0:
            return None
        why = f"{self.method} groups of {self.group} do not divide the input dimension {cols}"
        return None, f"{self.method} → left dense", why

    def outputs(
        self, tensor_name: str, shape: tuple[int, int], dtype: str, args: Args, kept: int = 0
    ) -> list[OutputSpec]:
        rows, cols = shape
        m = module_name(tensor_name)
        return [
            OutputSpec(f"{m}.weight_packed", "U8", (rows, cols // 2), "packed", tensor_name),
            OutputSpec(
                f"{m}.weight_scale",
                self.scale_dtype,
                (rows, cols // self.group),
                "scale",
                tensor_name,
            ),
            *self._global_outputs(m, tensor_name, cast(Float4Args, args)),
        ]

    def _global_outputs(self, m: str, tensor_name: str, args: Float4Args) -> list[OutputSpec]:
        return []

    def staged_arrays(
        self, shape: tuple[int, int], dtype: str, args: Args, chunk_rows: int
    ) -> list[StagedArray]:
        rows, cols = shape
        return [
            StagedArray("packed", (rows, cols // 2), "U8", chunk_rows),
            StagedArray("scale", (rows, cols // self.group), self.scale_dtype, chunk_rows),
        ]

    def takes_fused_kernels(self, args: Args, dtype: str, rounding: str) -> bool:
        return dtype in ("BF16", "F16")

    def encode_chunk(self, out: RowSink, args: Args, chunk: ChunkInput) -> ErrorStats:
        x = chunk.x
        where = device()
        if where.type == "cpu" and x.dtype in _KINDS:
            packed, scale, error = self._encode_fused(chunk)
        else:
            packed, scale, error = self._encode_torch(chunk, where)
        out.put("packed", chunk.first_row, packed)
        out.put("scale", chunk.first_row, dtypes.to_raw(scale))
        return replace(error, pruned=chunk.removed)

    def _encode_torch(
        self, chunk: ChunkInput, where: torch.device
    ) -> tuple[np.ndarray, torch.Tensor, ErrorStats]:
        """Row blocks through torch (GPU workers, 32-bit weights)."""
        step = GPU_BLOCK_ROWS if where.type == "cuda" else BLOCK_ROWS
        x, pruned = chunk.x, chunk.pruned
        packed, scales, errors = [], [], []
        for b0 in range(0, x.shape[0], step):
            block = pruned[b0 : b0 + step].to(where)
            scale, multiplier = self._scales(_group_absmax(block, self.group), chunk.scale)
            per_value = multiplier.repeat_interleave(self.group, dim=1)
            codes = encode_fp4(block.float() / per_value)
            # bfloat16: what the checkpoint decodes to (compressed-tensors' decompression too)
            x_hat = (decode_fp4(codes) * per_value).to(torch.bfloat16)
            errors.append(error_stats(x[b0 : b0 + step].to(where), x_hat, count_zeros=False))
            packed.append(pack_fp4(codes).cpu())
            scales.append(scale.cpu())
        return torch.cat(packed).numpy(), torch.cat(scales), combine_errors(*errors)

    def _encode_fused(self, chunk: ChunkInput) -> tuple[np.ndarray, torch.Tensor, ErrorStats]:
        """Scales in torch (one reduction per group), codes, packing and error figures in one
        fused kernel pass (`kernels.fp4_pack_16`): the same float32 steps as `_encode_torch`."""
        x, pruned = chunk.x, chunk.pruned
        kind = _KINDS[x.dtype]
        raw = dtypes.to_raw(pruned.contiguous()).view(np.uint16)
        absmax = torch.from_numpy(kernels.group_absmax_16(raw, kind, self.group))
        if not bool(torch.isfinite(absmax).all()):
            raise NonFiniteWeights(int((~torch.isfinite(pruned)).sum()))
        scale, multiplier = self._scales(absmax, chunk.scale)
        reference = None if pruned is x else dtypes.to_raw(x.contiguous()).view(np.uint16)
        packed, sq_error, sq_signal, max_abs = kernels.fp4_pack_16(
            raw, kind, self.group, multiplier.contiguous().numpy(), reference
        )
        return packed, scale, ErrorStats(x.numel(), sq_error, sq_signal, max_abs)

    @abstractmethod
    def _scales(
        self, absmax: torch.Tensor, fixed: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored scales of groups with these float32 maxima, and the float32 multiplier
        of each group's codes."""

    def decode_rows(
        self, module: CompressedModule, r0: int, r1: int, dtype: torch.dtype | None
    ) -> torch.Tensor:
        codes = unpack_fp4(read_part(module, "weight_packed", r0, r1))
        multiplier = self._multiplier(module, read_part(module, "weight_scale", r0, r1))
        values = decode_fp4(codes) * multiplier.repeat_interleave(self.group, dim=1)
        dense = values.to(torch.bfloat16)  # the stored weight, as compressed-tensors decodes it
        return dense if dtype is None else dense.to(dtype)

    @abstractmethod
    def _multiplier(self, module: CompressedModule, scale: torch.Tensor) -> torch.Tensor:
        """What each group's codes are multiplied by on decoding, from its stored scales."""

    def config_block(
        self, groups: Mapping[tuple[Args, str], Sequence[str]], dense_linear: Sequence[str]
    ) -> dict[str, Any]:
        by_args = merge_dtypes(groups)  # W4A16 and W4A4 modules: a config group each
        ordered = sorted(by_args, key=lambda a: cast(Float4Args, a).activations)
        config_groups = {}
        for k, args in enumerate(ordered):
            assert isinstance(args, Float4Args)
            config_groups[f"group_{k}"] = {
                "targets": sorted(by_args[args]),
                "weights": _config_weights(args),
                "input_activations": _config_inputs(args),
                "output_activations": None,
                "format": self.format,
            }
        return {
            "quant_method": "compressed-tensors",
            "format": self.format,
            "quantization_status": "compressed",
            "config_groups": config_groups,
            "kv_cache_scheme": None,
            "global_compression_ratio": None,
            "ignore": sorted(dense_linear),
        }

    def config_errors(self, qc: dict[str, Any]) -> list[str]:
        errors = []
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            return ["config_groups must be a non-empty object"]
        for key, group in groups.items():
            weights = group.get("weights") if isinstance(group, dict) else None
            if not isinstance(weights, dict):
                errors.append(f"config_groups.{key}.weights must be an object")
                continue
            if (weights.get("type"), weights.get("num_bits"), weights.get("group_size")) != (
                "float",
                4,
                self.group,
            ):
                errors.append(
                    f"config_groups.{key}.weights must be type float, num_bits 4, group_size "
                    f"{self.group} for {self.format}"
                )
            inputs = group.get("input_activations")
            if inputs is not None and not self._reads_inputs(inputs):
                errors.append(
                    f"config_groups.{key}.input_activations must be null"
                    + (
                        " or NVFP4 (type float, num_bits 4, group_size 16, strategy "
                        'tensor_group, dynamic "local")'
                        if self.method == "nvfp4"
                        else f" for {self.format} (weight-only here)"
                    )
                )
        return errors + compressed_tensors_errors(qc)

    def _reads_inputs(self, inputs: object) -> bool:
        """Whether this scheme stores the input quantization a config group declares."""
        return False

    def group_root(self, group: dict[str, Any]) -> str:
        return "weight_packed"

    def root_part(self, args: Args) -> str:
        return "weight_packed"

    def discover(self, checkpoint: Checkpoint, qc: object) -> dict[str, CompressedModule]:
        if not isinstance(qc, dict) or qc.get("format") != self.format:
            return {}
        out = {}
        for name, (file, info) in checkpoint.tensors.items():
            if not name.endswith(".weight_packed"):
                continue
            module = name.removesuffix(".weight_packed")
            group = config_group(qc, module)
            if group is IGNORED:
                continue
            in_group = group is not None
            args = Float4Args(
                cast(Literal["nvfp4", "mxfp4"], self.method),
                activations=isinstance(group, dict)
                and self._reads_inputs(group.get("input_activations")),
            )
            needed = [p for p in self.parts if p != "input_global_scale" or args.activations]
            parts = {
                suffix: checkpoint.tensors[f"{module}.{suffix}"]
                for suffix in needed
                if f"{module}.{suffix}" in checkpoint.tensors
            }
            missing = [p for p in needed if p not in parts]
            if not in_group or missing or len(info.shape) != 2:
                raise InputError(
                    f"is an {self.method} weight without "
                    + (f"its {', '.join(missing)}" if missing else "its config group"),
                    path=file,
                    tensor=name,
                    hint="restore the config.json and shards written with the checkpoint",
                )
            rows, half = (int(v) for v in info.shape)
            out[module] = CompressedModule(
                module,
                self,
                args,
                (rows, 2 * half),
                parts,
                "BF16",
            )
        return out

    def verify_module(
        self, tensors: Mapping[str, tuple[str, TensorInfo]], module: CompressedModule, where: Where
    ) -> list[tuple[str | None, str]]:
        expected = self.outputs(f"{module.module}.weight", module.shape, "BF16", module.args)
        return expected_problems(tensors, module, expected, module.args.describe(), where)


class Nvfp4Scheme(_Fp4Scheme):
    name = "nvfp4"
    format = NVFP4_FORMAT
    method = "nvfp4"
    group = 16
    scale_dtype = "F8_E4M3"
    parts = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")

    def needs_range(self, args: Args) -> bool:
        return True

    def _reads_inputs(self, inputs: object) -> bool:
        if not isinstance(inputs, dict):
            return False
        kind = (inputs.get("type"), inputs.get("num_bits"), inputs.get("group_size"))
        return kind == ("float", 4, 16) and (inputs.get("strategy"), inputs.get("dynamic")) == (
            "tensor_group",
            "local",
        )

    fused_range = True  # servers keep one global scale for a fused module

    def tensor_params(
        self, args: Args, lo: float, hi: float, dtype: str
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return nvfp4_global_scale(max(abs(lo), abs(hi))), None

    def _global_outputs(self, m: str, tensor_name: str, args: Float4Args) -> list[OutputSpec]:
        weights = OutputSpec(f"{m}.weight_global_scale", "F32", (1,), "global_scale", tensor_name)
        if not args.activations:
            return [weights]
        inputs = OutputSpec(f"{m}.input_global_scale", "F32", (1,), "global_scale", tensor_name)
        return [weights, inputs]

    def _scales(
        self, absmax: torch.Tensor, fixed: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert fixed is not None, "the thresholds stage gives every NVFP4 tensor its global scale"
        scale = _nvfp4_scales_of(absmax, fixed)
        return scale, _nvfp4_effective(scale, fixed)

    def small_outputs(
        self,
        module: str,
        args: Args,
        scale: torch.Tensor | None,
        zero: torch.Tensor | None,
        codebook: Sequence[float] | None,
        input_absmax: float | None = None,
    ) -> dict[str, np.ndarray]:
        assert scale is not None
        small = {f"{module}.weight_global_scale": scale.reshape(1).float().numpy()}
        if cast(Float4Args, args).activations:
            assert input_absmax is not None, "W4A4 runs are calibrated (config validation)"
            small[f"{module}.input_global_scale"] = nvfp4_global_scale(input_absmax).numpy()
        return small

    def _multiplier(self, module: CompressedModule, scale: torch.Tensor) -> torch.Tensor:
        return _nvfp4_effective(scale, read_part(module, "weight_global_scale", 0, 1))


class Mxfp4Scheme(_Fp4Scheme):
    name = "mxfp4"
    format = MXFP4_FORMAT
    method = "mxfp4"
    group = 32
    scale_dtype = "U8"
    parts = ("weight_packed", "weight_scale")

    def _scales(
        self, absmax: torch.Tensor, fixed: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = _mx_exponents_of(absmax)
        return exponents, _mx_scale(exponents)

    def _multiplier(self, module: CompressedModule, scale: torch.Tensor) -> torch.Tensor:
        return _mx_scale(scale)
