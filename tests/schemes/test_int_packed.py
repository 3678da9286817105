"""`quantize_rows_packed`: the fused CPU kernels and the torch path (what GPU workers run)
store the same packed codes, scales and zero points, and report the same error."""

from __future__ import annotations

import pytest
import torch

import compressor.schemes.int_packed as int_packed
from compressor.math.quant import QuantArgs
from compressor.schemes.int_packed import quantize_rows_packed
from compressor.stages.thresholds import TensorThresholds

CASES = [
    (QuantArgs(bits=4, symmetric=True, strategy="group", group_size=128), "rtn", None),
    (QuantArgs(bits=4, symmetric=False, strategy="group", group_size=128), "rtn", None),
    (QuantArgs(bits=8, symmetric=True, strategy="channel"), "rtn", None),
    (QuantArgs(bits=3, symmetric=False, strategy="group", group_size=64), "mse", None),
    (QuantArgs(bits=8, symmetric=True, strategy="tensor"), "rtn", 0.0123),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("args,rounding,tensor_scale", CASES)
@pytest.mark.parametrize("pruned", [False, True])
def test_fused_path_equals_torch_path(monkeypatch, dtype, args, rounding, tensor_scale, pruned):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(200, 512, generator=g) * torch.rand(1, 512, generator=g)).to(dtype)
    q_in = x.masked_fill(x.abs() < 0.1, 0) if pruned else x
    fixed = TensorThresholds()
    if tensor_scale is not None:
        fixed = TensorThresholds(scale=torch.tensor([[tensor_scale]], dtype=dtype))
    # The fused path is CPU work: pin the device, so a GPU machine does not take the torch
    # path twice and compare it with itself.
    monkeypatch.setattr(int_packed, "device", lambda: torch.device("cpu"))
    assert int_packed.fused_kind(x, args, fixed) is not None
    fused = quantize_rows_packed(x, q_in, args, fixed, rounding)
    monkeypatch.setattr(int_packed, "fused_kind", lambda *a: None)
    torch_path = quantize_rows_packed(x, q_in, args, fixed, rounding)
    assert torch.equal(fused.packed, torch_path.packed)
    assert torch.equal(fused.scale, torch_path.scale)
    if args.symmetric:
        assert fused.zero is None and torch_path.zero is None
    else:
        assert torch.equal(fused.zero, torch_path.zero)
    assert fused.error.max_abs_error == torch_path.error.max_abs_error
    assert fused.error.sq_error == pytest.approx(torch_path.error.sq_error, rel=1e-12)
    assert fused.error.sq_signal == pytest.approx(torch_path.error.sq_signal, rel=1e-12)
    assert fused.error.count == torch_path.error.count == x.numel()
