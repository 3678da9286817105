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


@pytest.mark.parametrize("symmetric", [True, False])
def test_cuda_stage_matches_the_cpu_kernels(symmetric: bool) -> None:
    """A GPU worker's compress path (torch on CUDA) writes what a CPU worker's fused kernels do."""
    import numpy as np

    from compressor.math import kernels
    from compressor.math.quant import quantized_range
    from compressor.stages.compress import quantize_rows_packed

    args = QuantArgs(bits=4, symmetric=symmetric, strategy="group", group_size=128)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(300, 1024, generator=g) * 0.02).to(torch.bfloat16)
    on_gpu = quantize_rows_packed(x, x, args, TensorThresholds())  # CUDA: the torch path
    raw = x.view(torch.int16).numpy().view(np.uint16)
    packed, scale, zero, (sq_error, _, max_abs), _ = kernels.quantize_pack_rtn_16(
        raw, kernels.BF16, 128, symmetric, quantized_range(args), 4
    )
    np.testing.assert_array_equal(on_gpu.packed.numpy(), packed)
    np.testing.assert_array_equal(on_gpu.scale.view(torch.int16).numpy().view(np.uint16), scale)
    if not symmetric:
        np.testing.assert_array_equal(on_gpu.zero.numpy(), zero)
    assert on_gpu.error.max_abs_error == max_abs
    assert on_gpu.error.sq_error == pytest.approx(sq_error, rel=1e-12)
