"""The compress math on CUDA gives the CPU's bits (runs where a GPU is present; skipped here)."""

from __future__ import annotations

import pytest
import torch

from compressor.math.pack import pack_rows
from compressor.math.quant import QuantArgs
from compressor.stages.compress import quantize_block
from compressor.stages.thresholds import TensorThresholds

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize(
    "args",
    [
        QuantArgs(bits=4, symmetric=True, strategy="group", group_size=128),
        QuantArgs(bits=4, symmetric=False, strategy="group", group_size=128),
        QuantArgs(bits=8, symmetric=True, strategy="channel"),
        QuantArgs(bits=3, method="minmax", symmetric=False, strategy="group", group_size=64),
    ],
)
def test_cuda_matches_cpu_bit_for_bit(args: QuantArgs) -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(512, 1024, generator=g) * torch.rand(1, 1024, generator=g) * 4).to(
        torch.bfloat16
    )
    cpu = quantize_block(x, args, TensorThresholds())
    gpu = quantize_block(x.cuda(), args, TensorThresholds())
    for a, b in zip(cpu, gpu, strict=True):
        if a is None:
            assert b is None
            continue
        assert torch.equal(a, b.cpu())
    assert torch.equal(pack_rows(cpu[0], args.bits), pack_rows(gpu[0], args.bits).cpu())
