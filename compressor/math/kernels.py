"""Fused CPU kernels for the compress hot path: one pass per chunk instead of ~15 torch passes.

The torch path (`quant.quantize` → `dequantize` → `stats.error_stats` → `pack.pack_rows`) runs
every step as its own pass over a float32 copy of the block, and on a CPU that costs ~10 ns per
weight. These numba kernels do the same IEEE operations per weight in one loop that LLVM
vectorises, and never materialise x̂ or the integer codes:

    quantize_pack_rtn_16  round-to-nearest scales and zero points from each group's range (the
                      float64 steps of `quant.qparams_from_range`), then as quantize_pack_16
    quantize_pack_16  codes q = clamp(rint(x / s) + z, lo, hi), packed LSB-first into int32
                      words (compressed-tensors' layout, as `pack.pack_rows`), and the error
                      figures of x̂ = to16((q − z)·s) against the reference weights; [lo, hi]
                      is [qmin, qmax] narrowed, per group, to the codes whose x̂ is finite
                      (`quant.finite_code_bounds`)
    fp4_pack_16       FP4 E2M1 codes of x / m for given per-group float32 multipliers m
                      (NVFP4, MXFP4: `schemes/float4.py` computes the scales), two per byte,
                      and the error figures of x̂ = bf16(E2M1[code] · m)

Contract (pinned by tests/math/test_kernels.py against the torch path, bit for bit on the packed
words and the max error; sums of squares to float64 rounding):
- weights are the raw bits of bfloat16 or float16 (`uint16` arrays, (rows, cols), C order);
  scales are the stored 16-bit scales widened to float32 (exact), zero points integers;
- x / s is one float32 division rounded to nearest even, `rint` rounds half to even, the
  product (q − z)·s is one float32 multiplication, narrowed once (round to nearest even) to the
  16-bit dtype: exactly what `quantize` / `dequantize` compute in their float32 work dtype;
- the squared error and signal accumulate in float64 (differences of two 16-bit values are exact
  in float64, their squares too), in a different order than torch's, so they agree to ~1e-15
  relative; the max |x − x̂| is exact.

Fast-math is limited to `reassoc`: reductions may be reordered, which is what lets LLVM
vectorise them. Division, rounding and the 16-bit narrowing stay exact IEEE operations (no
`arcp`, no `contract`), and inf/NaN keep their meaning (a product above the 16-bit maximum
narrows to inf, as in torch). Float min/max reductions do not vectorise even so, so ranges and
the max error reduce over integer keys that order as the values do.

Compiled on first use and cached on disk (numba's `cache=True`), so a worker pays the compile
(~1-3 s) once per machine, then ~0.1 s to load. Everything here is CPU-only: CUDA blocks take
the torch path, which is already one fused kernel launch per op there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba.core import types
from numba.extending import intrinsic

__all__ = [
    "BF16",
    "F16",
    "fp4_pack_16",
    "fp8_block_decode_bf16",
    "group_absmax_16",
    "quantize_pack_16",
    "quantize_pack_rtn_16",
    "warm_up",
]

BF16 = 0  # `kind` of the 16-bit weights: bfloat16 bits
F16 = 1  # IEEE half bits

_FASTMATH = {"reassoc"}


def _jit(**options: Any) -> Callable[[Callable[..., Any]], Any]:
    """`numba.njit(nogil=True)` with the on-disk cache where there is a writable place for it
    (beside this file, NUMBA_CACHE_DIR or the user's cache directory). numba refuses to define
    a cached function when there is none (read-only install, no home); then every process
    compiles the kernels itself (~3 s) instead of failing to import.

    numba keys a cached function on its own source file's stamp only, not on the helpers it
    inlines from other modules: after editing a helper here that `search_kernels` inlines
    (`_narrow`, `_round_to_scalar`, `_rtn_params`, …), touch search_kernels.py or delete its
    `__pycache__/*.nbi` files, or its cached kernels keep the old helper."""

    def decorate(fn: Callable[..., Any]) -> Any:
        try:
            return numba.njit(cache=True, nogil=True, **options)(fn)
        except RuntimeError:
            return numba.njit(cache=False, nogil=True, **options)(fn)

    return decorate


# --------------------------------------------------------------------------------------------
# Bit casts and 16-bit conversions (LLVM instructions; numba has no float16/bfloat16 type)
# --------------------------------------------------------------------------------------------


def _bitcast(source: types.Type, target: types.Type, llvm_target: ir.Type) -> object:
    """An intrinsic reinterpreting a value's bits as another type of the same width."""

    @intrinsic
    def cast(typingctx, x):
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], llvm_target)

        return target(source), codegen

    return cast


_u32_as_f32 = _bitcast(types.uint32, types.float32, ir.FloatType())
_f32_as_u32 = _bitcast(types.float32, types.uint32, ir.IntType(32))
_f64_as_i64 = _bitcast(types.float64, types.int64, ir.IntType(64))
_i64_as_f64 = _bitcast(types.int64, types.float64, ir.DoubleType())


@intrinsic
def _f16_to_f32(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _fmuladd(typingctx, a, b, c):
    """float32 a·b + c, one fused multiply-add where the CPU has one (LLVM's `fmuladd`). numba
    inlines helpers into the kernel and compiles them with the kernel's flags, so an `fma`
    can't be asked for per helper; this call carries its own (`reassoc` keeps a loop summing
    it a vectorisable reduction) and leaves every other product of the kernel rounded alone."""

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic(
            "llvm.fmuladd", [f32], ir.FunctionType(f32, [f32] * 3)
        )
        return builder.call(fn, args, fastmath=("reassoc", "contract"))

    return types.float32(types.float32, types.float32, types.float32), codegen


@intrinsic
def _bf16_of_product(typingctx, m, s, split):
    """The bfloat16 nearest (ties to even) m·s, as float32, for an integer code m and a bfloat16
    scale s, given split = s·(2^16 + 1): Veltkamp's splitting, t = m·split, h = t − (t − m·s),
    a multiply, a multiply-add and a subtract where `_narrow(m * s, BF16)` takes a multiply and
    five integer steps (the searches' error passes are bound by their operations per weight).
    m·s and s·(2^16 + 1) are exact in float32 (8 + 8 and 8 + 17 significant bits), so t is the
    nearest float32 to m·s·(2^16 + 1), and h is then `_narrow`'s bits wherever
    `_splits_exactly(s)` and |m| ≤ 255: checked on every such pair (tests/math/test_kernels.py;
    above, t overflows). Emitted without fast-math flags, so no `reassoc` of the kernel around
    it can fold t − (t − v) to v."""

    def codegen(context, builder, signature, args):
        code, scale, splitter = args
        f32 = ir.FloatType()
        fmuladd = builder.module.declare_intrinsic(
            "llvm.fmuladd", [f32], ir.FunctionType(f32, [f32] * 3)
        )
        t = builder.fmul(code, splitter)
        low = builder.call(fmuladd, [builder.fneg(code), scale, t])  # t − m·s, m·s exact
        return builder.fsub(t, low)

    return types.float32(types.float32, types.float32, types.float32), codegen


_SPLIT = np.float32(2.0**16 + 1.0)  # Veltkamp's constant for float32's 24 bits → bfloat16's 8


@_jit(inline="always")
def _splits_exactly(s):
    """Whether `_bf16_of_product` is exact for the bfloat16 scale s (> 0) and every code
    |m| ≤ 255: s below 2^96 (from 2^104 up, m·s·(2^16 + 1) can overflow)."""
    return s < np.float32(2.0**96)


@intrinsic
def _f32_to_f16(typingctx, x):
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@_jit(inline="always")
def _widen(u, kind):
    """16-bit weight bits → float32 (exact)."""
    if kind == BF16:
        return _u32_as_f32(np.uint32(u) << np.uint32(16))
    return _f16_to_f32(u)


@_jit(inline="always")
def _narrow(v, kind):
    """float32 → the nearest 16-bit value (ties to even), returned widened to float32.

    bfloat16 is float32's top half: add half an ulp of the result (plus the tie-breaking bit) and
    truncate, as torch's own conversion does; overflow carries into the exponent and gives inf.
    """
    if kind == BF16:
        u = _f32_as_u32(v)
        u = (u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)
        return _u32_as_f32(u)
    return _f16_to_f32(_f32_to_f16(v))


@_jit(inline="always")
def _order_key(v):
    """16-bit float bits (as int16) → an int16 that orders as the values do (−0 just below +0).

    Flipping the magnitude bits of negative values makes two's-complement order match float
    order; the map is its own inverse. Integer min/max reductions vectorise (32 lanes), float
    ones do not (LLVM keeps their NaN semantics). NaNs order beyond ±inf, so a group holding one
    has a NaN minimum or maximum.
    """
    return np.int16(v ^ ((v >> np.int16(15)) & np.int16(0x7FFF)))


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@_jit(inline="always", fastmath=_FASTMATH)
def _range_of(keys, kind):
    """(min, max) of a group of 16-bit float bits (int16), widened to float32."""
    lo = np.int16(0x7FFF)
    hi = np.int16(-0x8000)
    for k in range(keys.shape[0]):
        key = _order_key(keys[k])
        lo = key if key < lo else lo
        hi = key if key > hi else hi
    return (
        _widen(np.uint16(_order_key(lo) & 0xFFFF), kind),
        _widen(np.uint16(_order_key(hi) & 0xFFFF), kind),
    )


@_jit(inline="always")
def _bits16(v, kind):
    """The 16-bit pattern of a float32 that holds a 16-bit value exactly."""
    if kind == BF16:
        return np.uint16(_f32_as_u32(v) >> np.uint32(16))
    return _f32_to_f16(v)


@_jit(inline="always")
def _round_to(x, kind):
    """float64 → the nearest 16-bit value, rounded once (as `quant.round_to`): to float32 by
    rounding to odd, which keeps what the second rounding to nearest even needs. Selects, not
    branches, so a loop over candidates vectorises (`search_kernels._candidates_at_once`)."""
    y = np.float32(x)
    back = np.float64(y)
    bits = np.int32(_f32_as_u32(y))
    bits = bits - np.int32(1) if abs(back) > abs(x) else bits
    odd = _u32_as_f32(np.uint32(bits | np.int32(1)))
    return _narrow(odd if back != x else y, kind)


# The smallest float64 exponent (biased) of bfloat16's normal range, 2^-126: from there up
# (to the infinities), rounding the float64 bits to bfloat16's 8 significant bits is one correct
# rounding, and float32 holds the result exactly (or overflows to ∞, as bfloat16 does).
_BF16_EXP_LO = 1023 - 126


@_jit(inline="always")
def _round_to_scalar(x, kind):
    """`_round_to` for one value on a dependency chain (hqq's fit, once per iteration): a bfloat16
    in its normal range is rounded in the float64 bits, half an ulp of the result plus the tie
    bit added and the 45 lower bits cut, as `_narrow` does in float32; one conversion where
    `_round_to` takes four steps through float32. A branch, not a select (the other case, float16,
    a subnormal, ±∞ or NaN, is rare and predicted): it would not vectorise."""
    if kind == BF16:
        b = _f64_as_i64(x)
        e = (b >> np.int64(52)) & np.int64(0x7FF)
        if e >= _BF16_EXP_LO and e < 0x7FF:
            half = np.int64((1 << 44) - 1) + ((b >> np.int64(45)) & np.int64(1))
            return np.float32(_i64_as_f64((b + half) & np.int64(-(1 << 45))))
    return _round_to(x, kind)


@_jit(inline="always")
def _rtn_params(lo, hi, kind, symmetric, qmin, qmax):
    """Scale (a 16-bit value, as float32) and zero point of a group with range [lo, hi]:
    `quant.qparams_from_range` for int schemes, in the same float64 steps. Selects where the
    value decides (a loop over candidates vectorises); `symmetric` is the caller's constant."""
    lo = min(lo, 0.0)
    hi = max(hi, 0.0)
    levels = np.float64(qmax - qmin)
    if symmetric:
        s = _round_to(max(abs(lo), hi) / (levels / 2.0), kind)
    else:
        s = _round_to((hi - lo) / levels, kind)
    s = np.float32(1.0) if s == 0 else s
    if symmetric:
        return s, 0
    zf = np.rint(qmin - lo / np.float64(s))
    zf = min(max(zf, np.float64(qmin)), np.float64(qmax))
    return s, int(zf if zf == zf else 0.0)  # NaN (a non-finite group) is reported, not used


# `quant.finite_limit`: the smallest magnitude that narrows to ±inf (max + half an ulp).
_LIMIT_F16 = 65520.0
_LIMIT_BF16 = 2.0**127 * (2.0 - 2.0**-8)


@_jit(inline="always")
def _finite_codes(s, z, kind, fmin, fmax):
    """The group's code range whose x̂ = to16((q − z)·s) is finite: `quant.finite_code_bounds`
    for int schemes (|q − z|·s below the 16-bit limit; exact in float64), as float32."""
    limit = _LIMIT_F16 if kind == F16 else _LIMIT_BF16
    sd = np.float64(s)
    levels = np.float64(fmax) - np.float64(fmin)
    if sd * (levels + 1.0) < limit:  # every code is finite (exact: a 16-bit value × a small int)
        return fmin, fmax
    k = np.floor(limit / sd)
    if not k < levels:  # also a NaN scale (a non-finite group, refused by the caller)
        k = levels
    if k * sd >= limit:
        k -= 1.0
    lo = max(np.float64(fmin), np.float64(z) - k)
    hi = min(np.float64(fmax), np.float64(z) + k)
    return np.float32(lo), np.float32(hi)


@_jit(fastmath=_FASTMATH)
def _quantize_pack(raw, keys, ref, kind, g, rtn, symmetric, scale, zero, qmin, qmax, bits, out):
    """With `rtn`, each group's scale and zero are computed from its range and stored into
    `scale` (16-bit patterns, uint16) and `zero` (int8); otherwise they are read (float32,
    int32). Returns (sq_error, sq_signal, max |x − x̂|, groups whose range is not finite)."""
    rows, cols = raw.shape
    ngroups = scale.shape[1]
    sq_error = 0.0
    sq_signal = 0.0
    max_key = np.int64(0)  # bits of the largest |x − x̂| (non-negative doubles order as ints)
    nonfinite = 0
    codes = np.empty(cols, np.uint8)
    out_bytes = out.view(np.uint8)
    fmin = np.float32(qmin)
    fmax = np.float32(qmax)
    offset = np.float32(-qmin)  # stored codes are unsigned: q − qmin
    for r in range(rows):
        xr = raw[r]
        kr = keys[r]
        rr = ref[r]
        for gi in range(ngroups):
            c0 = gi * g
            n = min(g, cols - c0)
            xg = xr[c0 : c0 + n]
            if rtn:
                lo, hi = _range_of(kr[c0 : c0 + n], kind)
                if not (np.isfinite(lo) and np.isfinite(hi)):
                    nonfinite += 1
                s, zi = _rtn_params(np.float64(lo), np.float64(hi), kind, symmetric, qmin, qmax)
                scale[r, gi] = _bits16(s, kind)
                zero[r, gi] = zi
                z = np.float32(zi)
            else:
                s = np.float32(scale[r, gi])
                z = np.float32(zero[r, gi])
            glo, ghi = _finite_codes(s, z, kind, fmin, fmax)
            rg = rr[c0 : c0 + n]
            cg = codes[c0 : c0 + n]
            e_acc = 0.0
            s_acc = 0.0
            m = np.int64(0)
            for k in range(n):
                y = np.rint(_widen(xg[k], kind) / s) + z
                y = glo if y < glo else y
                y = ghi if y > ghi else y
                x_ref = np.float64(_widen(rg[k], kind))
                d = np.float64(_narrow((y - z) * s, kind)) - x_ref
                e_acc += d * d
                s_acc += x_ref * x_ref
                key = _f64_as_i64(abs(d))
                m = key if key > m else m
                cg[k] = np.uint8(np.int32(y + offset))
            sq_error += e_acc
            sq_signal += s_acc
            max_key = m if m > max_key else max_key
        _pack_row(codes, bits, out[r], out_bytes[r])
    return sq_error, sq_signal, _i64_as_f64(max_key), nonfinite


@_jit(inline="always")
def _pack_row(codes, bits, words, word_bytes):
    """LSB-first bit stream of `bits`-bit codes into int32 words (tail bits stay 0)."""
    n = codes.shape[0]
    if bits == 8:
        word_bytes[:n] = codes
    elif bits == 4:
        for j in range(n // 2):
            word_bytes[j] = codes[2 * j] | (codes[2 * j + 1] << np.uint8(4))
        if n % 2:
            word_bytes[n // 2] = codes[n - 1]
    else:
        acc = np.uint64(0)
        filled = 0
        w = 0
        for c in range(n):
            acc |= np.uint64(codes[c]) << np.uint64(filled)
            filled += bits
            if filled >= 32:
                words[w] = np.int32(np.uint32(acc & np.uint64(0xFFFFFFFF)))
                w += 1
                acc >>= np.uint64(32)
                filled -= 32
        if filled > 0:
            words[w] = np.int32(np.uint32(acc & np.uint64(0xFFFFFFFF)))


@_jit(fastmath=_FASTMATH)
def _group_absmax(keys, kind, g, out):
    rows, cols = keys.shape
    for r in range(rows):
        for gi in range(cols // g):
            lo, hi = _range_of(keys[r, gi * g : gi * g + g], kind)
            if lo != lo or hi != hi:
                out[r, gi] = np.float32(np.nan)
            else:
                out[r, gi] = hi if hi > -lo else -lo


@_jit(fastmath=_FASTMATH)
def _fp4_pack(raw, ref, kind, g, mult, out):
    """Codes of x / m per group (m = mult[r, group]), packed two per byte (even column in the
    low nibble); returns (sq_error, sq_signal, max |x − x̂|) with x̂ = bf16(E2M1[code]·m)."""
    rows, cols = raw.shape
    ngroups = mult.shape[1]
    sq_error = 0.0
    sq_signal = 0.0
    max_key = np.int64(0)
    codes = np.empty(cols, np.uint8)
    for r in range(rows):
        xr = raw[r]
        rr = ref[r]
        for gi in range(ngroups):
            m = mult[r, gi]
            e_acc = 0.0
            s_acc = 0.0
            mk = np.int64(0)
            for c in range(gi * g, gi * g + g):
                v = _widen(xr[c], kind) / m
                a = min(abs(v), np.float32(6.0))
                # nearest E2M1 value, ties to the even code (see schemes/float4.encode_fp4)
                index = (
                    np.int32(a > 0.25)
                    + np.int32(a >= 0.75)
                    + np.int32(a > 1.25)
                    + np.int32(a >= 1.75)
                    + np.int32(a > 2.5)
                    + np.int32(a >= 3.5)
                    + np.int32(a > 5.0)
                )
                # its value, branch-free: the steps between E2M1 values are .5 ×4, 1, 1, 2
                value = np.float32(
                    0.5 * (np.int32(a > 0.25) + np.int32(a >= 0.75) + np.int32(a > 1.25))
                    + 0.5 * np.int32(a >= 1.75)
                    + np.int32(a > 2.5)
                    + np.int32(a >= 3.5)
                    + 2.0 * np.int32(a > 5.0)
                )
                negative = v < 0 and index > 0
                codes[c] = np.uint8(index + (8 if negative else 0))
                x_hat = _narrow((-value if negative else value) * m, BF16)
                x_ref = np.float64(_widen(rr[c], kind))
                d = np.float64(x_hat) - x_ref
                e_acc += d * d
                s_acc += x_ref * x_ref
                key = _f64_as_i64(abs(d))
                mk = key if key > mk else mk
            sq_error += e_acc
            sq_signal += s_acc
            max_key = mk if mk > max_key else max_key
        o = out[r]
        for j in range(cols // 2):
            o[j] = codes[2 * j] | (codes[2 * j + 1] << np.uint8(4))
    return sq_error, sq_signal, _i64_as_f64(max_key)


@_jit(fastmath=_FASTMATH)
def _fp8_block_decode(codes, lut, scale, bh, bw, first_row, out):
    """out[r, c] = bf16(lut[codes[r, c]] · scale[(first_row + r) // bh - first_row // bh,
    c // bw]): one float32 product, rounded once to bfloat16 (bits)."""
    rows, cols = codes.shape
    base = first_row // bh
    for r in range(rows):
        srow = scale[(first_row + r) // bh - base]
        cr = codes[r]
        o = out[r]
        for c in range(cols):
            v = _narrow(lut[cr[c]] * srow[c // bw], BF16)
            o[c] = np.uint16(_f32_as_u32(v) >> np.uint32(16))


# --------------------------------------------------------------------------------------------
# Public wrappers: shapes and dtypes checked here, once per chunk, not per weight
# --------------------------------------------------------------------------------------------


def _check_raw(raw: np.ndarray, kind: int) -> None:
    if raw.dtype != np.uint16 or raw.ndim != 2 or not raw.flags.c_contiguous:
        raise ValueError(
            f"expected C-ordered (rows, cols) uint16 bits, got {raw.dtype} {raw.shape}"
        )
    if kind not in (BF16, F16):
        raise ValueError(f"kind must be BF16 ({BF16}) or F16 ({F16}), got {kind}")


def quantize_pack_16(
    raw: np.ndarray,
    kind: int,
    group: int,
    scale: np.ndarray,
    zero: np.ndarray | None,
    qrange: tuple[int, int],
    bits: int,
    reference: np.ndarray | None = None,
) -> tuple[np.ndarray, float, float, float]:
    """Quantize, pack and measure a block in one pass, with given parameters.

    `raw` (rows, cols) uint16 holds the weights to quantize; `reference` (same shape, default
    `raw`) the weights the error is measured against (the unpruned ones when pruning zeroed some).
    `scale` (rows, ngroups) float32, `zero` (rows, ngroups) integer zero points or None
    (symmetric), `qrange` = (qmin, qmax). Returns `(packed, sq_error, sq_signal, max_abs_error)`
    with `packed` int32 (rows, ceil(cols·bits/32)) holding the codes q − qmin.
    """
    rows, cols = _check_block(raw, kind, bits, reference)
    ngroups = -(-cols // group)
    if scale.shape != (rows, ngroups) or scale.dtype != np.float32:
        raise ValueError(f"scale must be float32 of shape {(rows, ngroups)}, got {scale.shape}")
    z = np.zeros((rows, ngroups), np.int32) if zero is None else zero.astype(np.int32)
    if z.shape != (rows, ngroups):
        raise ValueError(f"zero must have shape {(rows, ngroups)}, got {z.shape}")
    packed = np.zeros((rows, -(-cols * bits // 32)), np.int32)
    qmin, qmax = qrange
    ref = raw if reference is None else reference
    sq_error, sq_signal, max_abs, _ = _quantize_pack(
        raw, raw.view(np.int16), ref, kind, group, False, False,
        np.ascontiguousarray(scale), z, qmin, qmax, bits, packed,
    )  # fmt: skip
    return packed, float(sq_error), float(sq_signal), float(max_abs)


def quantize_pack_rtn_16(
    raw: np.ndarray,
    kind: int,
    group: int,
    symmetric: bool,
    qrange: tuple[int, int],
    bits: int,
    reference: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, tuple[float, float, float], int]:
    """`quantize_pack_16` with round-to-nearest parameters computed in the same pass, from each
    group's range, exactly as `quant.group_ranges` + `quant.qparams_from_range` (int schemes).

    Returns `(packed, scale, zero, (sq_error, sq_signal, max_abs_error), nonfinite)`: `scale`
    the 16-bit patterns of the scales (uint16, (rows, ngroups)), `zero` int8 zero points (None
    when symmetric), `nonfinite` the number of groups holding NaN or ±inf (whose figures are
    meaningless: the caller refuses the block).
    """
    rows, cols = _check_block(raw, kind, bits, reference)
    ngroups = -(-cols // group)
    scale = np.empty((rows, ngroups), np.uint16)
    zero = np.zeros((rows, ngroups), np.int8)
    packed = np.zeros((rows, -(-cols * bits // 32)), np.int32)
    qmin, qmax = qrange
    ref = raw if reference is None else reference
    sq_error, sq_signal, max_abs, nonfinite = _quantize_pack(
        raw, raw.view(np.int16), ref, kind, group, True, symmetric,
        scale, zero, qmin, qmax, bits, packed,
    )  # fmt: skip
    stats = (float(sq_error), float(sq_signal), float(max_abs))
    return packed, scale, None if symmetric else zero, stats, int(nonfinite)


def fp4_pack_16(
    raw: np.ndarray,
    kind: int,
    group: int,
    multiplier: np.ndarray,
    reference: np.ndarray | None = None,
) -> tuple[np.ndarray, float, float, float]:
    """FP4 E2M1 codes of a block for given per-group multipliers, packed, and their error.

    `raw` (rows, cols) uint16 16-bit weights to quantize, `reference` the weights the error is
    measured against (default `raw`), `multiplier` (rows, cols/group) float32: what a code is
    multiplied by on decoding. Returns `(packed, sq_error, sq_signal, max_abs_error)`, `packed`
    uint8 (rows, cols/2). Finite weights only: the caller checks the group maxima first.
    """
    rows, cols = _check_block(raw, kind, 4, reference)
    if cols % group or cols % 2:
        raise ValueError(f"{cols} columns are not a multiple of the group {group}")
    if multiplier.shape != (rows, cols // group) or multiplier.dtype != np.float32:
        raise ValueError(f"multiplier must be float32 {(rows, cols // group)}")
    packed = np.empty((rows, cols // 2), np.uint8)
    ref = raw if reference is None else reference
    sq_error, sq_signal, max_abs = _fp4_pack(
        raw, ref, kind, group, np.ascontiguousarray(multiplier), packed
    )
    return packed, float(sq_error), float(sq_signal), float(max_abs)


def group_absmax_16(raw: np.ndarray, kind: int, group: int) -> np.ndarray:
    """(rows, cols/group) float32 max |x| of each group of a 16-bit block (NaN where a group
    holds a NaN, inf where it holds ±inf)."""
    _check_raw(raw, kind)
    rows, cols = raw.shape
    if cols % group:
        raise ValueError(f"{cols} columns are not a multiple of the group {group}")
    out = np.empty((rows, cols // group), np.float32)
    _group_absmax(raw.view(np.int16), kind, group, out)
    return out


_E4M3_VALUES: np.ndarray | None = None


def fp8_block_decode_bf16(
    codes: np.ndarray, scale: np.ndarray, block: tuple[int, int], first_row: int
) -> np.ndarray:
    """bfloat16 bits (uint16, codes' shape) of float32(E4M3 code) · its block's float32 scale,
    for rows `first_row`… of a block-scaled FP8 weight; `scale` holds the block rows those rows
    touch. The same float32 product and one rounding as torch's
    `(codes.float() * scale).to(torch.bfloat16)`, without the expanded scale tensor."""
    global _E4M3_VALUES
    if _E4M3_VALUES is None:  # every E4M3 value, exactly, by code (via torch's conversion)
        import torch

        every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
        _E4M3_VALUES = every.float().numpy()
    if codes.dtype != np.uint8 or codes.ndim != 2 or scale.dtype != np.float32:
        raise ValueError("expected (rows, cols) uint8 codes and float32 block scales")
    out = np.empty(codes.shape, np.uint16)
    _fp8_block_decode(
        np.ascontiguousarray(codes), _E4M3_VALUES, np.ascontiguousarray(scale),
        block[0], block[1], first_row, out,
    )  # fmt: skip
    return out


def _check_block(
    raw: np.ndarray, kind: int, bits: int, reference: np.ndarray | None
) -> tuple[int, int]:
    _check_raw(raw, kind)
    if reference is not None and (
        reference.shape != raw.shape
        or reference.dtype != raw.dtype
        or not reference.flags.c_contiguous
    ):
        raise ValueError("the reference must be C-ordered uint16 bits of the block's shape")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    return raw.shape[0], raw.shape[1]


def warm_up() -> None:
    """Compile or load every kernel now (each has one signature), on a tiny block."""
    raw = np.zeros((1, 32), np.uint16)
    quantize_pack_16(raw, BF16, 32, np.ones((1, 1), np.float32), None, (-8, 7), 4)
    quantize_pack_rtn_16(raw, BF16, 32, True, (-8, 7), 4)
    fp4_pack_16(raw, BF16, 16, np.ones((1, 2), np.float32))
    group_absmax_16(raw, BF16, 16)
    fp8_block_decode_bf16(np.zeros((1, 32), np.uint8), np.ones((1, 1), np.float32), (128, 128), 0)
