"""Dense bit packing of small unsigned integers into int32 words (compressed-tensors' layout).

Element i of a row occupies bits [i·b, (i+1)·b) of the row's bit stream, least significant
bit first; word w holds stream bits [32w, 32w+32). Values of width 3, 5, 6, 7 straddle word
boundaries. A row of n values takes ceil(n·b / 32) words; unused high bits of the last word are
zero. Packing along dim 0 (zero points) is packing the transpose.

Every `pack_*` has its `unpack_*`, and `unpack(pack(u)) == u` for all widths and lengths.
"""

from __future__ import annotations

import math

import torch

__all__ = ["pack_rows", "packed_width", "unpack_rows"]


def packed_width(n: int, bits: int) -> int:
    """Words needed for a row of `n` values of `bits` bits."""
    return math.ceil(n * bits / 32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (rows, n) unsigned values in [0, 2^bits) into int32 (rows, ceil(n·bits/32)).

    Works 32 values at a time: 32 values of b bits fill exactly b words, so each block of 32
    columns maps to b output words with a fixed pattern of shifts (computed once per width).
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if bits in (1, 2, 4, 8):
        return _pack_byte_aligned(values, bits)
    rows, n = values.shape
    blocks = math.ceil(n / 32)
    v = torch.zeros((rows, blocks * 32), dtype=torch.int64, device=values.device)
    v[:, :n] = values
    v = v.view(rows, blocks, 32)
    out = torch.zeros((rows, blocks, bits), dtype=torch.int64, device=values.device)
    for j in range(32):
        start = j * bits
        word, offset = divmod(start, 32)
        out[:, :, word] |= v[:, :, j] << offset
        if offset + bits > 32:  # the value's high bits continue in the next word
            out[:, :, word + 1] |= v[:, :, j] >> (32 - offset)
    out &= 0xFFFFFFFF
    words = out.view(rows, blocks * bits)[:, : packed_width(n, bits)]
    # Reinterpret the low 32 bits as signed int32 (two's complement), as the format stores them.
    return (words - ((words >> 31) << 32)).to(torch.int32)


def _pack_byte_aligned(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Fast path for widths that divide 8: compose bytes, then view them as little-endian words.

    Equal to the general path (tested); it touches uint8 instead of int64 temporaries, which is
    what makes 4-bit packing cheap. Assumes a little-endian host (x86, ARM), as torch does.
    """
    rows, n = values.shape
    per_byte = 8 // bits
    nbytes = packed_width(n, bits) * 4
    v = torch.zeros((rows, nbytes * per_byte), dtype=torch.uint8, device=values.device)
    v[:, :n] = values
    out = v[:, 0::per_byte].clone()
    for k in range(1, per_byte):
        out |= v[:, k::per_byte] << (k * bits)
    return out.view(torch.int32)


def unpack_rows(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_rows`: int32 (rows, words) → int16 (rows, n) values in [0, 2^bits)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    rows, words = packed.shape
    if words != packed_width(n, bits):
        raise ValueError(f"{words} words cannot hold exactly {n} values of {bits} bits")
    if bits in (1, 2, 4, 8):
        per_byte = 8 // bits
        b = packed.contiguous().view(torch.uint8)
        parts = [(b >> (k * bits)) & ((1 << bits) - 1) for k in range(per_byte)]
        return torch.stack(parts, dim=2).view(rows, -1)[:, :n].to(torch.int16)
    blocks = math.ceil(n / 32)
    w = torch.zeros((rows, blocks * bits + 1), dtype=torch.int64, device=packed.device)
    w[:, :words] = packed.to(torch.int64) & 0xFFFFFFFF
    out = torch.empty((rows, blocks, 32), dtype=torch.int64, device=packed.device)
    mask = (1 << bits) - 1
    for j in range(32):
        start = j * bits
        word, offset = divmod(start, 32)
        idx = torch.arange(blocks, device=packed.device) * bits + word
        lo = w[:, idx] >> offset
        if offset + bits > 32:
            lo |= w[:, idx + 1] << (32 - offset)
        out[:, :, j] = lo & mask
    return out.view(rows, blocks * 32)[:, :n].to(torch.int16)
