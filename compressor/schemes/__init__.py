"""The scheme registry: every storage format is one module behind one protocol (`base.Scheme`).

Stages, write, decompress, inspect and verify look schemes up here and dispatch; no scheme
branches live outside the scheme modules. A new format is one new module that subclasses
`Scheme` and registers itself, plus its tests.

    >>> from compressor.math.quant import QuantArgs
    >>> for_args(QuantArgs(bits=4, strategy="group", group_size=128)).name
    'int'
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from compressor.schemes.base import (
    Args,
    BitmaskArgs,
    ChunkInput,
    CompressedModule,
    RowSink,
    Scheme,
    StagedArray,
)

__all__ = [
    "Args",
    "BitmaskArgs",
    "ChunkInput",
    "CompressedModule",
    "RowSink",
    "Scheme",
    "StagedArray",
    "all_schemes",
    "by_format",
    "by_name",
    "for_args",
    "quantization_config",
    "register",
]

_REGISTRY: dict[str, Scheme] = {}


def register(cls: type[Scheme]) -> type[Scheme]:
    """Class decorator: add one instance of `cls` under `cls.name` (duplicates are refused)."""
    if cls.name in _REGISTRY:
        raise ValueError(f"scheme {cls.name!r} is registered twice")
    if any(s.format == cls.format for s in _REGISTRY.values()):
        raise ValueError(f"format {cls.format!r} already has a scheme")
    _REGISTRY[cls.name] = cls()
    return cls


def all_schemes() -> tuple[Scheme, ...]:
    return tuple(_REGISTRY.values())


def by_name(name: str) -> Scheme:
    return _REGISTRY[name]


def by_format(fmt: object) -> Scheme | None:
    """The scheme whose quantization_config format is `fmt` (compressed-tensors'
    "mixed-precision" is the integer scheme's), or None."""
    if fmt == "mixed-precision":
        fmt = _REGISTRY["int"].format
    return next((s for s in _REGISTRY.values() if s.format == fmt), None)


def for_args(args: Args) -> Scheme:
    """The scheme that stores weights described by `args`."""
    for scheme in _REGISTRY.values():
        if scheme.accepts(args):
            return scheme
    raise ValueError(f"no scheme stores {args!r}")


def quantization_config(
    modules: Iterable[tuple[Args, str, str]], dense_linear: Sequence[str]
) -> dict[str, Any] | None:
    """The config.json block for compressed modules given as (args, weight dtype, module name),
    None when there are none. At most one quantizing scheme per output (recipes refuse mixing
    codebook, minmax and integer rules); sparse-bitmask modules beside it are declared as its
    extension, alone they get their own block."""
    by_scheme: dict[str, dict[tuple[Args, str], list[str]]] = {}
    for args, dtype, module in modules:
        by_scheme.setdefault(for_args(args).name, {}).setdefault((args, dtype), []).append(module)
    bitmask = by_scheme.pop("bitmask", None)
    if len(by_scheme) > 1:
        raise ValueError(f"one output cannot hold the schemes {sorted(by_scheme)}")
    if not by_scheme:
        return _REGISTRY["bitmask"].config_block(bitmask, ()) if bitmask else None
    ((name, groups),) = by_scheme.items()
    block = _REGISTRY[name].config_block(groups, dense_linear)
    if bitmask:
        return _attach(block, [m for ms in bitmask.values() for m in ms])
    return block


def _attach(block: dict[str, Any], modules: Sequence[str]) -> dict[str, Any]:
    from compressor.schemes.bitmask import BitmaskScheme

    scheme = _REGISTRY["bitmask"]
    assert isinstance(scheme, BitmaskScheme)
    return scheme.attach(block, modules)


def _register_builtin() -> None:
    from compressor.schemes.bitmask import BitmaskScheme
    from compressor.schemes.codebook import CodebookScheme
    from compressor.schemes.float4 import Mxfp4Scheme, Nvfp4Scheme
    from compressor.schemes.float8 import Float8Scheme
    from compressor.schemes.int_packed import IntScheme, MinmaxScheme

    builtin = (IntScheme, MinmaxScheme, CodebookScheme, BitmaskScheme, Float8Scheme)
    for cls in (*builtin, Nvfp4Scheme, Mxfp4Scheme):
        register(cls)


_register_builtin()
