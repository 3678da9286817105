"""The fused CPU kernels equal the general torch path they replace.

Reference: `quant.group_ranges` / `qparams_from_range` / `quantize` / `dequantize`, then
`pack.pack_rows` and `stats.error_stats` (itself tested against float64 in test_stats.py): the
packed words and the max error must be identical, the sums of squares equal to float64
rounding (they are summed in another order).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor.math.kernels import (
    BF16,
    F16,
    quantize_pack_16,
    quantize_pack_rtn_16,
)
from compressor.math.pack import pack_rows
from compressor.math.quant import (
    QuantArgs,
    dequantize,
    group_ranges,
    qparams_from_range,
    quantize,
    quantized_range,
)
from compressor.math.stats import error_stats

KINDS = {torch.bfloat16: BF16, torch.float16: F16}


def _bits(x: torch.Tensor) -> np.ndarray:
    return x.contiguous().view(torch.int16).numpy().view(np.uint16)


def _weights(rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Heavy tails and an outlier column, a row of zeros, and values across many binades.
    x = torch.distributions.StudentT(3.0).sample((rows, cols)) * 0.02
    x[:, cols // 3] *= 40
    x[rows // 2] = 0
    x = x * torch.exp2(torch.randint(-6, 3, (rows, 1), generator=g).float())
    return x.to(dtype)


def _reference(x: torch.Tensor, q_in: torch.Tensor, args: QuantArgs, fixed=None):
    """The torch path: what `compress` did before the kernels."""
    if fixed is None:
        lo, hi = group_ranges(q_in.float(), args)
        scale, zero = qparams_from_range(lo, hi, args, x.dtype)
    else:
        scale, zero = fixed
    q = quantize(q_in, scale, zero, args)
    x_hat = dequantize(q, scale, zero, args, x.dtype)
    packed = pack_rows(q - quantized_range(args)[0], args.bits)
    return scale, zero, packed, error_stats(x, x_hat, count_zeros=False)


def _kernel(x: torch.Tensor, q_in: torch.Tensor, args: QuantArgs, scale, zero):
    cols = x.shape[1]
    group = args.group_size if args.strategy == "group" else cols
    s = scale.float().expand(x.shape[0], -(-cols // group)).contiguous().numpy()
    z = None if zero is None else zero.int().expand_as(scale).numpy()
    return quantize_pack_16(
        _bits(q_in), KINDS[x.dtype], group, s, z, quantized_range(args), args.bits, _bits(x)
    )


def _assert_same_rtn(x: torch.Tensor, args: QuantArgs, ref) -> None:
    """The one-pass variant computes the same parameters as `qparams_from_range`, bit for bit."""
    cols = x.shape[1]
    group = args.group_size if args.strategy == "group" else cols
    packed, scale, zero, (sq_error, sq_signal, max_abs), nonfinite = quantize_pack_rtn_16(
        _bits(x), KINDS[x.dtype], group, args.symmetric, quantized_range(args), args.bits
    )
    assert nonfinite == 0
    np.testing.assert_array_equal(scale, _bits(ref[0]))
    if args.symmetric:
        assert zero is None and ref[1] is None
    else:
        np.testing.assert_array_equal(zero, ref[1].numpy())
    _assert_same(ref, (packed, sq_error, sq_signal, max_abs))


def _assert_same(ref, got) -> None:
    _, _, packed, stats = ref
    words, sq_error, sq_signal, max_abs = got
    np.testing.assert_array_equal(words, packed.numpy())
    assert max_abs == stats.max_abs_error
    assert sq_error == pytest.approx(stats.sq_error, rel=1e-12, abs=1e-300)
    assert sq_signal == pytest.approx(stats.sq_signal, rel=1e-12, abs=1e-300)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    "strategy,group,cols", [("group", 128, 512), ("group", 64, 200), ("channel", 0, 96)]
)
def test_quantize_pack_equals_torch_path(dtype, bits, symmetric, strategy, group, cols):
    args = QuantArgs(bits=bits, symmetric=symmetric, strategy=strategy, group_size=group or 128)
    x = _weights(37, cols, dtype, seed=bits)
    ref = _reference(x, x, args)
    _assert_same(ref, _kernel(x, x, args, ref[0], ref[1]))
    _assert_same_rtn(x, args, ref)


def test_pruned_block_measures_against_the_unpruned_weights():
    args = QuantArgs(bits=4, symmetric=False, strategy="group", group_size=128)
    x = _weights(16, 256, torch.bfloat16, seed=3)
    pruned = x.masked_fill(x.abs() < x.abs().median(), 0)
    ref = _reference(x, pruned, args)
    _assert_same(ref, _kernel(x, pruned, args, ref[0], ref[1]))


def test_tensor_strategy_with_fixed_parameters():
    args = QuantArgs(bits=8, symmetric=True, strategy="tensor")
    x = _weights(8, 64, torch.bfloat16, seed=4)
    scale = torch.tensor([[0.0123]], dtype=torch.bfloat16)
    ref = _reference(x, x, args, fixed=(scale, None))
    _assert_same(ref, _kernel(x, x, args, scale, None))


def test_codes_that_would_overflow_are_kept_finite_in_both_paths():
    """A code whose (q − z)·s exceeds the 16-bit maximum moves toward the zero point, in the
    kernel as in `quantize`: same words, finite error figures."""
    args = QuantArgs(bits=4, symmetric=True, strategy="group", group_size=32)
    x = torch.full((1, 32), 65000.0, dtype=torch.float16)
    scale = torch.tensor([[9400.0]], dtype=torch.float16)  # 7 · 9400 > 65504: codes stop at 6
    ref = _reference(x, x, args, fixed=(scale, None))
    got = _kernel(x, x, args, scale, None)
    _assert_same(ref, got)
    assert math.isfinite(got[3]) and math.isfinite(got[1])


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(
    ("dtype", "extreme"),
    [(torch.float16, -65504.0), (torch.float16, 65504.0), (torch.float16, -65280.0),
     (torch.bfloat16, -3.3895313892515355e38), (torch.bfloat16, 3.3895313892515355e38)],
)  # fmt: skip
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_weights_at_the_dtype_limit_reconstruct_finite(dtype, extreme, symmetric, bits):
    """w4a16-asym on one float16 weight of −65504 gave x̂ = −inf; now finite, equal paths."""
    args = QuantArgs(bits=bits, symmetric=symmetric, strategy="group", group_size=64)
    x = _weights(3, 128, dtype, seed=bits)
    x[1, 5] = extreme
    ref = _reference(x, x, args)
    _assert_same_rtn(x, args, ref)
    assert math.isfinite(ref[3].max_abs_error) and math.isfinite(ref[3].sq_error)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 300),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    group=st.sampled_from([16, 32, 128]),
    half=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_random_shapes(rows, cols, bits, symmetric, group, half, seed):
    dtype = torch.float16 if half else torch.bfloat16
    args = QuantArgs(bits=bits, symmetric=symmetric, strategy="group", group_size=group)
    x = _weights(rows, cols, dtype, seed)
    ref = _reference(x, x, args)
    _assert_same(ref, _kernel(x, x, args, ref[0], ref[1]))
    _assert_same_rtn(x, args, ref)


def test_bad_arguments_are_refused():
    raw = np.zeros((2, 8), np.uint16)
    with pytest.raises(ValueError, match="uint16"):
        quantize_pack_rtn_16(raw.astype(np.int32), BF16, 8, True, (-8, 7), 4)
    with pytest.raises(ValueError, match="kind"):
        quantize_pack_rtn_16(raw, 7, 8, True, (-8, 7), 4)
    with pytest.raises(ValueError, match="bits"):
        quantize_pack_rtn_16(raw, BF16, 8, True, (-8, 7), 9)
    with pytest.raises(ValueError, match="reference"):
        quantize_pack_rtn_16(raw, BF16, 8, True, (-8, 7), 4, reference=raw[:1].copy())
    with pytest.raises(ValueError, match="zero"):
        quantize_pack_16(
            raw, BF16, 8, np.ones((2, 1), np.float32), np.zeros((1, 1), np.int32), (-8, 7), 4
        )
    with pytest.raises(ValueError, match="scale"):
        quantize_pack_16(raw, BF16, 8, np.ones((2, 2), np.float32), None, (-8, 7), 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), -float("nan"), float("inf"), -float("inf")])
def test_ranges_reveal_non_finite_weights(dtype, bad):
    """Any NaN or ±inf in a group makes its min or max non-finite: the one-pass kernel counts
    that group (the compress stage then refuses the tensor)."""
    x = _weights(4, 256, dtype, seed=5)
    x[2, 130] = bad
    *_, nonfinite = quantize_pack_rtn_16(_bits(x), KINDS[dtype], 128, False, (-8, 7), 4)
    assert nonfinite == 1


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    half=st.booleans(),
)
def test_random_bit_patterns(seed, bits, symmetric, half):
    """Every finite 16-bit value is fair game: subnormals, ±0, the largest magnitudes, groups
    spanning many binades. Scales, zero points, codes and error figures still match."""
    dtype = torch.float16 if half else torch.bfloat16
    patterns = np.random.default_rng(seed).integers(0, 2**16, size=(6, 96), dtype=np.uint16)
    x = torch.from_numpy(patterns.view(np.int16)).view(dtype).clone()
    x[~torch.isfinite(x)] = 0
    args = QuantArgs(bits=bits, symmetric=symmetric, strategy="group", group_size=32)
    ref = _reference(x, x, args)
    if not np.isfinite(ref[3].sq_error):  # overflowing reconstructions: only codes must match
        words, *_ = _kernel(x, x, args, ref[0], ref[1])
        np.testing.assert_array_equal(words, ref[2].numpy())
        return
    _assert_same(ref, _kernel(x, x, args, ref[0], ref[1]))
    _assert_same_rtn(x, args, ref)


def test_kernels_compile_where_no_cache_can_be_written():
    """Functions numba cannot cache (here: source without a file, as in a read-only install
    with no writable cache directory) are still compiled, not refused at import."""
    from compressor.math.kernels import _jit

    namespace: dict[str, object] = {}
    exec("def double(x):\n    return 2 * x\n", namespace)
    with pytest.raises(RuntimeError, match="cannot cache"):
        import numba

        numba.njit(cache=True)(namespace["double"])
    assert _jit()(namespace["double"])(21) == 42


def _round_to_cases(seed: int) -> np.ndarray:
    """float64 values for the 16-bit roundings: random bit patterns over exponents from far below
    float16's range to beyond bfloat16's, both signs; every bfloat16 tie (the midpoint of two
    neighbours, exact in float64) and its float64 neighbours, at the ends of bfloat16's normal
    range and around a power of two; zeros, infinities and NaN."""
    rng = np.random.default_rng(seed)
    exp = rng.integers(1023 - 160, 1023 + 140, 3000, dtype=np.int64)
    bits = (exp << 52) | rng.integers(0, 1 << 52, 3000, dtype=np.int64)
    bits |= rng.integers(0, 2, 3000, dtype=np.int64) << 63
    tied = []
    for v in (2.0**-126, 2.0**-125, 1.0, 0.75, 3.0e-3, 2.0**127 * 1.5, 2.0**-127):
        lo = torch.tensor(v, dtype=torch.bfloat16)
        for up in (0, 1):  # an even and an odd last bit below the tie
            lo = (lo.view(torch.int16) + up).view(torch.bfloat16)
            hi = (lo.view(torch.int16) + 1).view(torch.bfloat16)
            mid = (lo.double() + hi.double()) / 2
            for m in (
                mid,
                torch.nextafter(mid, torch.tensor(0.0, dtype=torch.float64)),
                torch.nextafter(mid, torch.tensor(math.inf, dtype=torch.float64)),
            ):
                tied += [float(m), -float(m)]
    specials = [0.0, -0.0, math.inf, -math.inf, math.nan, 2.0**128, 2.0**127, 2.0**-149, 1e300]
    return np.concatenate([bits.view(np.float64), np.array(tied + specials)])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_to_scalar_rounds_once_as_quant_round_to(dtype):
    """hqq's fit rounds its scale with `_round_to_scalar` (a shortcut in the float64 bits for
    bfloat16): every value, ties and range ends included, comes out as `quant.round_to`."""
    from compressor.math.kernels import _round_to_scalar
    from compressor.math.quant import round_to

    x = _round_to_cases(0)
    want = round_to(torch.from_numpy(x), dtype).float().numpy()
    got = np.array([_round_to_scalar(float(v), KINDS[dtype]) for v in x], np.float32)
    nan = np.isnan(want)  # NaN stays NaN (its payload is not a scale's concern)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def _split_vs_narrow(scales: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """For each bfloat16 scale (float32), the number of codes whose `_bf16_of_product` bits
    differ from `_narrow(m·s)`'s."""
    import numba

    from compressor.math.kernels import _SPLIT, _bf16_of_product, _f32_as_u32, _narrow

    @numba.njit(fastmath={"reassoc"})  # the kernels' own flags: they must not fold the split
    def count(scales, codes):
        wrong = np.zeros(scales.shape[0], np.int64)
        for i in range(scales.shape[0]):
            s = scales[i]
            split = s * _SPLIT
            for m in codes:
                a = _f32_as_u32(_bf16_of_product(m, s, split))
                b = _f32_as_u32(_narrow(m * s, BF16))
                wrong[i] += a != b
        return wrong

    return count(scales, codes)


def test_split_product_is_bfloat16_narrowing_wherever_it_is_used():
    """The searches' error passes take bfloat16's x̂ = bf16(m·s) from Veltkamp's split
    (`_bf16_of_product`) where `_splits_exactly(s)`: there it is `_narrow`'s nearest-even
    rounding for every bfloat16 scale (subnormals too) and every code |m| ≤ 255; for the
    largest scales it is not (m·s·(2^16 + 1) overflows), which is why the guard is there."""
    from compressor.math.kernels import _splits_exactly

    bits = np.arange(0x0001, 0x7F80, dtype=np.uint32)  # every positive finite bfloat16
    scales = (bits << np.uint32(16)).view(np.float32)
    codes = np.arange(-255, 256, dtype=np.float32)
    used = np.array([_splits_exactly(s) for s in scales])
    assert used.sum() == (0x7F80 - 0x0001) - (127 - 95) * 128  # all but 2^96 and up
    wrong = _split_vs_narrow(scales, codes)
    assert int(wrong[used].sum()) == 0
    assert int(wrong[~used].sum()) > 0
