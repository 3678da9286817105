"""`compressor.math.pack`: round trips, widths, a bit-by-bit reference, compressed-tensors' packer,
and hand-computed golden words."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor.math.pack import pack_rows, packed_width, unpack_rows

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def unsigned_rows(draw, bits=st.integers(1, 8), max_n: int = 300, max_rows: int = 9):
    """(bits, values): values an int16 (rows, n) tensor in [0, 2^bits)."""
    b = draw(bits)
    rows = draw(st.integers(1, max_rows))
    n = draw(st.integers(1, max_n))
    top = (1 << b) - 1
    fill = draw(st.sampled_from(["random", "zeros", "ones", "max", "alternating"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if fill == "random":
        a = rng.integers(0, top + 1, (rows, n))
    elif fill == "zeros":
        a = np.zeros((rows, n), dtype=np.int64)
    elif fill == "ones":
        a = np.ones((rows, n), dtype=np.int64)
    elif fill == "max":  # every bit set: exercises the sign bit of every word
        a = np.full((rows, n), top)
    else:
        a = np.where(np.arange(n) % 2 == 0, top, 0) * np.ones((rows, 1), dtype=np.int64)
    for _ in range(draw(st.integers(0, 4))):  # shrinkable single elements
        a[draw(st.integers(0, rows - 1)), draw(st.integers(0, n - 1))] = draw(st.integers(0, top))
    return b, torch.from_numpy(a.astype(np.int16))


def slow_pack(values: list[list[int]], bits: int) -> list[list[int]]:
    """Bit by bit, straight from the module docstring: element i's bit k is stream bit i·b + k,
    stream bit j is bit j % 32 of word j // 32; words are read back as signed int32."""
    out = []
    for row in values:
        words = [0] * math.ceil(len(row) * bits / 32)
        for i, v in enumerate(row):
            for k in range(bits):
                if (v >> k) & 1:
                    pos = i * bits + k
                    words[pos // 32] |= 1 << (pos % 32)
        out.append([w - (1 << 32) if w >= 1 << 31 else w for w in words])
    return out


@SETTINGS
@given(unsigned_rows())
def test_unpack_inverts_pack(case):
    bits, u = case
    packed = pack_rows(u, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (u.shape[0], packed_width(u.shape[1], bits))
    back = unpack_rows(packed, bits, u.shape[1])
    assert back.dtype == torch.int16
    assert torch.equal(back, u)


@given(st.integers(0, 5000), st.integers(1, 8))
def test_packed_width_is_ceil_of_bits_over_32(n, bits):
    assert packed_width(n, bits) == -(-(n * bits) // 32)
    assert packed_width(n, bits) * 32 >= n * bits > (packed_width(n, bits) - 1) * 32 or n == 0


@settings(max_examples=100, deadline=None)
@given(unsigned_rows(max_n=70, max_rows=3))
def test_pack_equals_bit_by_bit_reference(case):
    """All widths: 1, 2, 4, 8 take the byte-aligned fast path, 3, 5, 6, 7 the general one."""
    bits, u = case
    assert pack_rows(u, bits).tolist() == slow_pack(u.tolist(), bits)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 31, 32, 33, 63, 64, 65])
def test_byte_aligned_fast_path_small_lengths(bits, n):
    rng = np.random.default_rng(bits * 100 + n)
    u = torch.from_numpy(rng.integers(0, 1 << bits, (3, n)).astype(np.int16))
    assert pack_rows(u, bits).tolist() == slow_pack(u.tolist(), bits)
    assert torch.equal(unpack_rows(pack_rows(u, bits), bits, n), u)


@pytest.mark.parametrize("bits", range(1, 9))
def test_unused_high_bits_of_last_word_are_zero(bits):
    n = 33
    u = torch.full((2, n), (1 << bits) - 1, dtype=torch.int16)
    last = pack_rows(u, bits)[:, -1].to(torch.int64) & 0xFFFFFFFF
    used = n * bits - 32 * (packed_width(n, bits) - 1)
    assert torch.all(last == (1 << used) - 1)


@SETTINGS
@given(unsigned_rows(bits=st.integers(2, 8)))
def test_pack_rows_equals_compressed_tensors_along_dim1(case):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    bits, u = case
    q = (u - (1 << (bits - 1))).to(torch.int8)  # the signed codes compressed-tensors packs
    assert torch.equal(pack_rows(u, bits), pack_to_int32(q, bits, packed_dim=1))


@SETTINGS
@given(unsigned_rows(bits=st.integers(2, 8)))
def test_pack_rows_equals_compressed_tensors_along_dim0(case):
    """Zero points (out_features, groups) are packed along dim 0: that is packing the transpose."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    bits, u = case
    z = u.T.contiguous()  # (out_features ≤ 300, groups ≤ 9)
    q = (z - (1 << (bits - 1))).to(torch.int8)
    ours = pack_rows(z.T.contiguous(), bits).T
    theirs = pack_to_int32(q, bits, packed_dim=0)
    assert ours.shape == theirs.shape == (packed_width(z.shape[0], bits), z.shape[1])
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_rows(ours.T.contiguous(), bits, z.shape[0]).T, z)


@SETTINGS
@given(unsigned_rows(bits=st.integers(2, 8)))
def test_unpack_equals_compressed_tensors_unpack(case):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    bits, u = case
    packed = pack_rows(u, bits)
    theirs = unpack_from_int32(packed, bits, u.shape, packed_dim=1)
    assert torch.equal(theirs.to(torch.int16) + (1 << (bits - 1)), u)


def test_golden_4bit():
    # nibble i at bits 4i: 1..8 → 0x87654321 (signed: 0x87654321 − 2^32), 9 → word 1 = 0x9
    u = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9], [15, 15, 15, 15, 15, 15, 15, 15, 0]])
    assert pack_rows(u.to(torch.int16), 4).tolist() == [[-2023406815, 9], [-1, 0]]
    assert 0x87654321 - 2**32 == -2023406815


def test_golden_3bit():
    # v = 1 2 3 4 5 6 7 0 1 2 7 (n = 11, 33 bits → 2 words). Elements 0..9 fill bits 0..29 and
    # read as octal digits 0o2107654321 = 287267025; element 10 (0b111) puts its low two bits
    # at 30, 31 (+ 0xC0000000) and its high bit at bit 0 of word 1.
    # word 0 = 287267025 + 3221225472 = 3508492497 → signed 3508492497 − 2^32 = −786474799
    u = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 7]], dtype=torch.int16)
    assert pack_rows(u, 3).tolist() == [[-786474799, 1]]
    assert 0o2107654321 == 287267025
    # 32 values of 3 bits fill exactly 3 words; value 4 (0b100) at index 10 is bit 32: word 1
    v = torch.zeros((1, 32), dtype=torch.int16)
    v[0, 10] = 4
    assert pack_rows(v, 3).tolist() == [[0, 1, 0]]


@pytest.mark.parametrize("bits", [0, 9])
def test_bad_widths_are_rejected(bits):
    with pytest.raises(ValueError):
        pack_rows(torch.zeros((1, 4), dtype=torch.int16), bits)
    with pytest.raises(ValueError):
        unpack_rows(torch.zeros((1, 1), dtype=torch.int32), bits, 4)


def test_unpack_rejects_wrong_word_count():
    with pytest.raises(ValueError):
        unpack_rows(torch.zeros((1, 2), dtype=torch.int32), 4, 8)
