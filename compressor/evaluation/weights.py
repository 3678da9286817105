"""Per-tensor weight error between a reference and an approximate set of dense weights.

For each tensor ``W`` (reference) and ``Ŵ`` (approximation, e.g. the dequantized weights of a
compressed checkpoint) this reports

* the relative Frobenius error ``‖W − Ŵ‖ / ‖W‖``, and
* the signal-to-quantization-noise ratio ``SQNR = 10·log10(‖W‖² / ‖W − Ŵ‖²)`` in dB, which is
  ``inf`` when ``Ŵ == W`` exactly (for 4-bit round-to-nearest expect roughly 15–25 dB, for 8-bit
  roughly 40 dB or more).

Everything is computed in float64, tensor by tensor and in chunks of each tensor, so memory stays
bounded by one tensor of each side in its stored dtype plus a few float64 chunks. Either side may be
an in-memory mapping of name to tensor (a model's ``state_dict()``) or a checkpoint directory of
``*.safetensors`` files, read one tensor at a time with ``safetensors.safe_open``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from compressor.errors import InputError

__all__ = [
    "SafetensorsCheckpoint",
    "TensorError",
    "WeightComparison",
    "compare_weights",
    "tensor_error",
]

_CHUNK_ELEMENTS = 1 << 22  # float64 chunk: 32 MiB per side


def _rel_error(ref_sq: float, err_sq: float) -> float:
    if err_sq == 0.0:
        return 0.0
    if ref_sq == 0.0:
        return math.inf
    return math.sqrt(err_sq / ref_sq)


def _sqnr_db(ref_sq: float, err_sq: float) -> float:
    if err_sq == 0.0:
        return math.inf
    if ref_sq == 0.0:
        return -math.inf
    return 10.0 * math.log10(ref_sq / err_sq)


def _json_float(value: float) -> float | None:
    """JSON has no infinities: ``inf`` SQNR (exact) becomes ``None``."""
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class TensorError:
    """Error figures of one tensor. ``ref_sq = ‖W‖²``, ``err_sq = ‖W − Ŵ‖²`` (float64)."""

    name: str
    shape: tuple[int, ...]
    ref_sq: float
    err_sq: float
    max_abs_error: float

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def exact(self) -> bool:
        return self.err_sq == 0.0

    @property
    def rel_error(self) -> float:
        """Relative Frobenius error ``‖W − Ŵ‖ / ‖W‖`` (0 when exact)."""
        return _rel_error(self.ref_sq, self.err_sq)

    @property
    def sqnr_db(self) -> float:
        """``10·log10(‖W‖² / ‖W − Ŵ‖²)``; ``inf`` when exact."""
        return _sqnr_db(self.ref_sq, self.err_sq)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe: ``sqnr_db`` is ``None`` when the tensor is reproduced exactly."""
        return {
            "name": self.name,
            "shape": list(self.shape),
            "rel_error": _json_float(self.rel_error),
            "sqnr_db": _json_float(self.sqnr_db),
            "max_abs_error": self.max_abs_error,
            "exact": self.exact,
        }


@dataclass(frozen=True)
class WeightComparison:
    """Errors of the tensors present on both sides, in the reference's order."""

    tensors: tuple[TensorError, ...]
    only_in_reference: tuple[str, ...] = field(default=())
    only_in_approx: tuple[str, ...] = field(default=())

    @property
    def total_rel_error(self) -> float:
        """``‖W − Ŵ‖ / ‖W‖`` over all compared tensors taken as one vector."""
        return _rel_error(sum(t.ref_sq for t in self.tensors), sum(t.err_sq for t in self.tensors))

    @property
    def total_sqnr_db(self) -> float:
        return _sqnr_db(sum(t.ref_sq for t in self.tensors), sum(t.err_sq for t in self.tensors))

    @property
    def worst(self) -> TensorError | None:
        """The tensor with the lowest SQNR, ``None`` if every tensor is exact."""
        inexact = [t for t in self.tensors if not t.exact]
        return min(inexact, key=lambda t: t.sqnr_db) if inexact else None

    def to_dict(self) -> dict[str, Any]:
        worst = self.worst
        return {
            "total_rel_error": _json_float(self.total_rel_error),
            "total_sqnr_db": _json_float(self.total_sqnr_db),
            "tensors_compared": len(self.tensors),
            "tensors_exact": sum(t.exact for t in self.tensors),
            "worst_tensor": worst.name if worst is not None else None,
            "only_in_reference": list(self.only_in_reference),
            "only_in_approx": list(self.only_in_approx),
            "tensors": [t.to_dict() for t in self.tensors],
        }


def tensor_error(name: str, reference: torch.Tensor, approx: torch.Tensor) -> TensorError:
    """Error figures of ``approx`` against ``reference`` (same shape), computed in float64."""
    if tuple(reference.shape) != tuple(approx.shape):
        raise InputError(
            f"shape {tuple(approx.shape)} of the approximation differs from the reference's "
            f"{tuple(reference.shape)}",
            tensor=name,
        )
    ref = reference.detach().reshape(-1)
    app = approx.detach().reshape(-1).to(ref.device)
    ref_sq = torch.zeros((), dtype=torch.float64, device=ref.device)
    err_sq = torch.zeros((), dtype=torch.float64, device=ref.device)
    max_abs = torch.zeros((), dtype=torch.float64, device=ref.device)
    for i in range(0, ref.numel(), _CHUNK_ELEMENTS):
        r = ref[i : i + _CHUNK_ELEMENTS].to(torch.float64)
        d = app[i : i + _CHUNK_ELEMENTS].to(torch.float64, copy=True)  # never alias the input
        d.sub_(r)
        ref_sq += torch.dot(r, r)  # BLAS: one pass, about twice as fast as square().sum()
        err_sq += torch.dot(d, d)
        max_abs = torch.maximum(max_abs, torch.linalg.vector_norm(d, math.inf))
    values = torch.stack([ref_sq, err_sq, max_abs]).cpu().tolist()
    if not all(math.isfinite(v) for v in values):
        raise InputError("non-finite values (NaN/inf) in the weights", tensor=name)
    return TensorError(
        name=name,
        shape=tuple(int(s) for s in reference.shape),
        ref_sq=values[0],
        err_sq=values[1],
        max_abs_error=values[2],
    )


class SafetensorsCheckpoint(Mapping[str, torch.Tensor]):
    """A read-only mapping over the tensors of a directory of ``*.safetensors`` files.

    Nothing is loaded up front: ``ckpt[name]`` reads that one tensor with ``safe_open``.
    """

    def __init__(self, checkpoint_dir: Path | str) -> None:
        self.path = Path(checkpoint_dir)
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise InputError(
                "no *.safetensors files in the checkpoint directory", path=str(self.path)
            )
        self._where: dict[str, Path] = {}
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    if key in self._where:
                        raise InputError(
                            f"tensor is stored twice, in {self._where[key].name} and {file.name}",
                            path=str(self.path),
                            tensor=key,
                        )
                    self._where[key] = file

    def __getitem__(self, name: str) -> torch.Tensor:
        file = self._where[name]
        with safe_open(str(file), framework="pt") as f:
            return f.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _as_mapping(source: Mapping[str, torch.Tensor] | Path | str) -> Mapping[str, torch.Tensor]:
    if isinstance(source, (str, Path)):
        return SafetensorsCheckpoint(source)
    return source


def compare_weights(
    reference: Mapping[str, torch.Tensor] | Path | str,
    approx: Mapping[str, torch.Tensor] | Path | str,
) -> WeightComparison:
    """Per-tensor errors of ``approx`` against ``reference`` for every name on both sides.

    Each side is a mapping of name to tensor (e.g. ``model.state_dict()``) or a checkpoint
    directory. Only floating-point tensors are compared; names found on one side only are listed
    in the result (e.g. a tied ``lm_head.weight`` a model's state dict has and its checkpoint
    does not).
    """
    ref = _as_mapping(reference)
    app = _as_mapping(approx)
    errors: list[TensorError] = []
    for name in ref:
        if name not in app:
            continue
        r = ref[name]
        if not r.is_floating_point():
            continue
        errors.append(tensor_error(name, r, app[name]))
        del r
    return WeightComparison(
        tensors=tuple(errors),
        only_in_reference=tuple(n for n in ref if n not in app),
        only_in_approx=tuple(n for n in app if n not in ref),
    )
