"""FP8 block-scaled inputs: checkpoints shipped in FP8, as DeepSeek-V3/R1, Kimi-K2 and
Qwen3-*-FP8 are.

Such a checkpoint's config.json says ``quantization_config: {quant_method: "fp8", fmt: "e4m3",
weight_block_size: [bh, bw], ...}``; each quantized linear stores

    <m>.weight            F8_E4M3  (rows, cols)
    <m>.weight_scale_inv  F32/BF16 (⌈rows/bh⌉, ⌈cols/bw⌉)   the multiplier of each block

and the dense weight is W = float32(weight) · scale_inv (per block), in bfloat16, as DeepSeek's
reference `weight_dequant` computes it. The compress job decodes its own row block only: no
dense copy of the model is ever written or held. The scale tensors are consumed (the output
does not carry them), FP8 weights that no rule quantizes are written dense in bfloat16, and the
output's config.json describes the new scheme only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from compressor.errors import InputError
from compressor.formats import dtypes
from compressor.formats.checkpoint import Checkpoint
from compressor.formats.safetensors_io import TensorInfo, read_rows
from compressor.math import kernels
from compressor.schemes.float8 import expand_blocks

__all__ = [
    "DENSE_DTYPE",
    "SCALE_SUFFIX",
    "BlockScaled",
    "block_scaled_weights",
    "decode_rows",
    "is_fp8_block_config",
]

SCALE_SUFFIX = "_scale_inv"
DENSE_DTYPE = "BF16"  # what the decoded weights are (DeepSeek's reference dequantization)


@dataclass(frozen=True)
class BlockScaled:
    """How one FP8 weight of the input decodes: its scale tensor and the block size. The
    `plan.Encoded` interface: `dtype`, `consumed`, `decode`."""

    scale_name: str
    scale_file: str
    scale: TensorInfo
    block: tuple[int, int]
    weight_file: str
    weight: TensorInfo

    @property
    def dtype(self) -> str:
        return DENSE_DTYPE

    @property
    def consumed(self) -> tuple[str, ...]:
        """Input tensors this weight's decoding reads besides the weight itself."""
        return (self.scale_name,)

    def decode(self, r0: int, r1: int) -> torch.Tensor:
        return decode_rows(self.weight_file, self.weight, self, r0, r1)


def is_fp8_block_config(qc: object) -> bool:
    """Whether a config.json `quantization_config` is the FP8 block-scaled one."""
    return isinstance(qc, Mapping) and qc.get("quant_method") == "fp8"


def _block_size(qc: Mapping[str, Any], config_path: str) -> tuple[int, int]:
    fmt = qc.get("fmt", "e4m3")
    block = qc.get("weight_block_size")
    if (
        fmt != "e4m3"
        or not isinstance(block, list)
        or len(block) != 2
        or not all(type(v) is int and v > 0 for v in block)
        or qc.get("activation_scheme", "dynamic") != "dynamic"
    ):
        raise InputError(
            "has an FP8 quantization_config this tool does not read: it needs fmt e4m3, "
            "dynamic activations and weight_block_size [rows, cols] (DeepSeek-V3's layout), "
            f"got fmt {fmt!r}, weight_block_size {block!r}, activation_scheme "
            f"{qc.get('activation_scheme')!r}",
            path=config_path,
            hint="convert the checkpoint to bfloat16 with the tool that made it, then compress",
        )
    return int(block[0]), int(block[1])


def block_scaled_weights(checkpoint: Checkpoint) -> dict[str, BlockScaled]:
    """Every FP8 weight of a block-scaled FP8 checkpoint with its scale tensor; {} for other
    checkpoints.

    Raises:
        InputError: the config's block size is missing or unusable, or an FP8 weight has no
            scale tensor of the shape its block size implies.
    """
    qc = (checkpoint.config or {}).get("quantization_config")
    if not is_fp8_block_config(qc):
        return {}
    assert isinstance(qc, Mapping)
    block = _block_size(qc, str(checkpoint.root / "config.json"))
    found = {}
    for name, (file, info) in checkpoint.tensors.items():
        if info.dtype != "F8_E4M3":
            continue
        scale_name = name + SCALE_SUFFIX
        rows, cols = (int(v) for v in info.shape) if len(info.shape) == 2 else (0, 0)
        expected = (-(-rows // block[0]), -(-cols // block[1]))
        scale = checkpoint.tensors.get(scale_name)
        if (
            scale is None
            or len(info.shape) != 2
            or tuple(scale[1].shape) != expected
            or scale[1].dtype not in ("F32", "BF16", "F16")
        ):
            got = "none" if scale is None else f"{scale[1].dtype} {list(scale[1].shape)}"
            raise InputError(
                f"is an FP8 weight whose {scale_name.rsplit('.', 1)[1]} should be a float "
                f"{list(expected)} tensor (blocks of {block[0]}×{block[1]}); found {got}",
                path=file,
                tensor=name,
                hint="the checkpoint is incomplete or not in DeepSeek's FP8 layout; restore "
                "its shards and config.json",
            )
        found[name] = BlockScaled(scale_name, scale[0], scale[1], block, file, info)
    return found


def decode_rows(
    file: str, info: TensorInfo, source: BlockScaled, r0: int, r1: int, fused: bool = True
) -> torch.Tensor:
    """Rows [r0, r1) of the dense bfloat16 weight: float32(code) · scale_inv of its block
    (`fused`: through the CPU kernel, else torch)."""
    raw = read_rows(file, info, r0, r1)
    bh = source.block[0]
    first, stop = r0 // bh, -(-r1 // bh)
    scale = dtypes.to_torch(
        read_rows(source.scale_file, source.scale, first, stop), source.scale.dtype
    ).float()
    if fused:  # one pass, no expanded scale tensor (math/kernels.py); the same bits as below
        bits = kernels.fp8_block_decode_bf16(raw.view(np.uint8), scale.numpy(), source.block, r0)
        return torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16)
    codes = dtypes.to_torch(raw, info.dtype)
    full = expand_blocks(scale, source.block, (stop * bh, info.shape[1]))
    return (codes.float() * full[r0 - first * bh : r1 - first * bh]).to(torch.bfloat16)
