"""The safetensors dtypes this tool understands, and how each maps onto numpy and torch.

A tensor read from a safetensors file is held as a numpy array of its *storage* dtype: a numpy
dtype of the same item size that holds the raw little-endian bits unchanged. numpy has no
bfloat16 or float8, so BF16 is held as uint16 and every F8_* as uint8; all other dtypes are held
as their natural numpy dtype. `to_torch` reinterprets those bits as the logical torch dtype
without copying, and `to_raw` goes back.

Supported: F64 F32 F16 BF16 F8_E4M3 F8_E5M2 F8_E8M0 I64 I32 I16 I8 U64 U32 U16 U8 BOOL
(F8_E8M0 only where the installed torch has `float8_e8m0fnu`). Refused: F4 and F6_* (several
elements per byte, so "item size in bytes" does not exist and row reads would need bit slicing),
C64 and the *FNUZ float8 variants (no LLM checkpoint we target uses them).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from compressor.errors import InputError

__all__ = [
    "SUPPORTED_DTYPES",
    "is_float",
    "is_supported",
    "itemsize",
    "safetensors_dtype_of",
    "safetensors_dtype_of_numpy",
    "serialization_rank",
    "storage_numpy_dtype",
    "to_raw",
    "to_torch",
    "torch_dtype",
]


@dataclass(frozen=True)
class _Spec:
    name: str
    itemsize: int
    storage: np.dtype  # little-endian numpy dtype holding the raw bits
    logical: torch.dtype  # the dtype the bits mean
    torch_storage: torch.dtype  # torch dtype with `storage` as its numpy counterpart
    is_float: bool
    # Position in the Rust crate's `Dtype` enum, which is declared in increasing alignment
    # order. `safetensors.serialize` lays tensors out by descending rank, then by name.
    rank: int


def _spec(
    name: str,
    storage: str,
    logical: torch.dtype,
    rank: int,
    torch_storage: torch.dtype | None = None,
) -> _Spec:
    np_dtype = np.dtype(storage)
    return _Spec(
        name=name,
        itemsize=np_dtype.itemsize,
        storage=np_dtype,
        logical=logical,
        torch_storage=logical if torch_storage is None else torch_storage,
        is_float=name.startswith(("F", "BF")),
        rank=rank,
    )


# Ranks copy the order of `safetensors::Dtype` (BOOL < F4 < F6_E2M3 < F6_E3M2 < U8 < I8 <
# F8_E5M2 < F8_E4M3 < F8_E8M0 < I16 < U16 < F16 < BF16 < I32 < U32 < F32 < C64 < F64 < I64 <
# U64); the gaps belong to the dtypes refused above.
_SPECS: dict[str, _Spec] = {
    s.name: s
    for s in (
        _spec("BOOL", "|b1", torch.bool, 0),
        _spec("U8", "|u1", torch.uint8, 4),
        _spec("I8", "|i1", torch.int8, 5),
        _spec("F8_E5M2", "|u1", torch.float8_e5m2, 6, torch.uint8),
        _spec("F8_E4M3", "|u1", torch.float8_e4m3fn, 7, torch.uint8),
        _spec("I16", "<i2", torch.int16, 9),
        _spec("U16", "<u2", torch.uint16, 10),
        _spec("F16", "<f2", torch.float16, 11),
        _spec("BF16", "<u2", torch.bfloat16, 12, torch.uint16),
        _spec("I32", "<i4", torch.int32, 13),
        _spec("U32", "<u4", torch.uint32, 14),
        _spec("F32", "<f4", torch.float32, 15),
        _spec("F64", "<f8", torch.float64, 17),
        _spec("I64", "<i8", torch.int64, 18),
        _spec("U64", "<u8", torch.uint64, 19),
    )
}
_float8_e8m0 = getattr(torch, "float8_e8m0fnu", None)  # torch >= 2.7
if _float8_e8m0 is not None:
    _SPECS["F8_E8M0"] = _spec("F8_E8M0", "|u1", _float8_e8m0, 8, torch.uint8)

SUPPORTED_DTYPES: tuple[str, ...] = tuple(_SPECS)
"""Every safetensors dtype string accepted, in increasing alignment order."""

_BY_TORCH: dict[torch.dtype, str] = {s.logical: s.name for s in _SPECS.values()}

# Natural numpy dtype -> safetensors dtype; BF16 and F8_* have no numpy dtype, so they are
# absent (a uint16 array means U16, never BF16).
_BY_NUMPY: dict[np.dtype, str] = {
    s.storage.newbyteorder("="): s.name for s in _SPECS.values() if s.torch_storage == s.logical
}


def _get(dtype: str) -> _Spec:
    try:
        return _SPECS[dtype]
    except (KeyError, TypeError):  # TypeError: an unhashable value from a malformed header
        raise InputError(
            f"unsupported safetensors dtype {dtype!r}",
            hint=f"supported dtypes are {', '.join(SUPPORTED_DTYPES)}; convert the tensor to one of them",
        ) from None


def is_supported(dtype: object) -> bool:
    """Whether `dtype` is a safetensors dtype string this module accepts."""
    return isinstance(dtype, str) and dtype in _SPECS


def itemsize(dtype: str) -> int:
    """Bytes per element of safetensors dtype `dtype` (e.g. 2 for "BF16")."""
    return _get(dtype).itemsize


def storage_numpy_dtype(dtype: str) -> np.dtype:
    """The little-endian numpy dtype that holds the raw bits of `dtype` (BF16 → uint16,
    F8_* → uint8, BOOL → bool, others their natural numpy dtype)."""
    return _get(dtype).storage


def torch_dtype(dtype: str) -> torch.dtype:
    """The logical torch dtype of safetensors dtype `dtype` (e.g. "F8_E4M3" →
    torch.float8_e4m3fn)."""
    return _get(dtype).logical


def safetensors_dtype_of(dtype: torch.dtype) -> str:
    """The safetensors dtype string of torch dtype `dtype` (inverse of `torch_dtype`)."""
    try:
        return _BY_TORCH[dtype]
    except (KeyError, TypeError):
        raise InputError(
            f"torch dtype {dtype} has no supported safetensors dtype",
            hint=f"convert the tensor to one of {', '.join(str(d) for d in _BY_TORCH)}",
        ) from None


def safetensors_dtype_of_numpy(dtype: np.dtype) -> str:
    """The safetensors dtype string of a numpy array dtype, either byte order.

    numpy has no bfloat16/float8, so this never returns BF16 or F8_*: pass torch tensors (or
    declare the dtype explicitly to the writer) for those.
    """
    try:
        return _BY_NUMPY[np.dtype(dtype).newbyteorder("=")]
    except (KeyError, TypeError):
        raise InputError(
            f"numpy dtype {dtype} has no supported safetensors dtype",
            hint="convert the array to a bool, integer or float16/32/64 dtype",
        ) from None


def is_float(dtype: str) -> bool:
    """Whether `dtype` is a floating-point dtype (F64, F32, F16, BF16, F8_*)."""
    return _get(dtype).is_float


def serialization_rank(dtype: str) -> int:
    """Sort key of `dtype` in the reference serializer: higher rank = wider alignment = laid out
    first. Only the relative order is meaningful."""
    return _get(dtype).rank


def to_torch(raw: np.ndarray, dtype: str) -> torch.Tensor:
    """View raw bits `raw` (an array of `storage_numpy_dtype(dtype)`, any shape) as a torch
    tensor of the logical dtype, same shape.

    Zero-copy whenever torch can alias the array: the tensor then shares memory with `raw`. A
    copy is made only when it cannot: see the comment in the body.
    """
    spec = _get(dtype)
    if raw.dtype.newbyteorder("<") != spec.storage:
        raise ValueError(
            f"to_torch: array of dtype {raw.dtype} does not hold raw {dtype} bits "
            f"(expected {spec.storage})"
        )
    needs_copy = (
        # torch has no read-only tensors: from_numpy on a read-only array (an mmap, a buffer
        # from the reader) only warns, and a later in-place op would write into memory we
        # promised not to touch (or segfault on a read-only mapping). Copy to make it safe.
        not raw.flags.writeable
        # torch tensors are always native-endian: a big-endian array must be byteswapped.
        or not raw.dtype.isnative
        # torch strides are in elements and non-negative: reversed or unaligned views
        # cannot be expressed, so they are materialised.
        or not raw.flags.aligned
        or any(s < 0 or s % raw.itemsize for s in raw.strides)
    )
    if needs_copy:
        raw = np.array(raw, dtype=raw.dtype.newbyteorder("="), order="C", copy=True)
    tensor = torch.from_numpy(raw)
    if tensor.dtype != spec.logical:
        # Same item size on both sides (e.g. uint16 → bfloat16), so this is a pure
        # reinterpretation of the bits and keeps shape and strides.
        tensor = tensor.view(spec.logical)
    return tensor


def to_raw(t: torch.Tensor) -> np.ndarray:
    """The raw little-endian bits of `t` as a C-contiguous numpy array of the storage dtype,
    same shape (the inverse of `to_torch`).

    Shares memory with `t` when `t` is already a contiguous CPU tensor on a little-endian
    machine; otherwise it is a copy. Gradients are detached.
    """
    spec = _get(safetensors_dtype_of(t.dtype))
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    # Lazy conjugate/negative views are flags on the tensor, not bits in memory: resolve them
    # so the bytes we hand out are the values the tensor shows.
    t = t.resolve_conj().resolve_neg().contiguous()
    if spec.torch_storage != spec.logical:
        t = t.view(spec.torch_storage)
    raw = t.numpy()
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CI
        # safetensors data is little-endian regardless of the host.
        raw = raw.astype(raw.dtype.newbyteorder("<"))
    return raw
