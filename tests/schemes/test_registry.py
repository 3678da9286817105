"""The scheme registry: one module per storage format, found by its arguments or its format.

Every scheme's encode and decode agree on every layout it declares (the staged arrays a chunk
fills are exactly the row roles of its outputs, with the same shapes), no format is registered
twice, and no scheme knowledge leaks out of `compressor/schemes/` (`method ==` branches).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import compressor
from compressor import schemes
from compressor.formats.layout import (
    CODEBOOK_FORMAT,
    CT_FORMAT,
    CodebookArgs,
    Float4Args,
    Float8Args,
)
from compressor.math.quant import QuantArgs
from compressor.schemes import BitmaskArgs, Scheme

ARGS = [
    QuantArgs(bits=4, strategy="group", group_size=64),
    QuantArgs(bits=4, symmetric=False, strategy="group", group_size=64),
    QuantArgs(bits=8, strategy="channel"),
    QuantArgs(bits=3, symmetric=False, strategy="tensor"),
    QuantArgs(bits=4, method="minmax", symmetric=False, strategy="group", group_size=64),
    CodebookArgs(method="nf4"),
    CodebookArgs(method="kmeans", bits=3),
    Float8Args(),
    Float8Args(dynamic_activations=True),
    Float4Args(method="nvfp4"),
    Float4Args(method="mxfp4"),
    BitmaskArgs(),
]


def test_every_args_has_exactly_one_scheme_and_formats_map_back() -> None:
    for args in ARGS:
        owners = [s.name for s in schemes.all_schemes() if s.accepts(args)]
        assert len(owners) == 1, (args, owners)
        scheme = schemes.for_args(args)
        assert schemes.by_format(scheme.format) is scheme
    assert schemes.by_format("mixed-precision") is schemes.by_format(CT_FORMAT)
    assert schemes.by_format(CODEBOOK_FORMAT) is schemes.by_name("codebook")
    assert schemes.by_format("float-quantized") is schemes.by_name("float8")
    assert schemes.by_format("nvfp4-pack-quantized") is schemes.by_name("nvfp4")
    assert schemes.by_format("mxfp4-pack-quantized") is schemes.by_name("mxfp4")
    assert schemes.by_format("marlin-24") is None


def test_a_duplicate_name_or_format_is_refused() -> None:
    class Again(type(schemes.by_name("int"))):  # type: ignore[misc]
        pass

    with pytest.raises(ValueError, match="registered twice"):
        schemes.register(Again)

    class OtherName(type(schemes.by_name("int"))):  # type: ignore[misc]
        name = "int-again"

    with pytest.raises(ValueError, match="already has a scheme"):
        schemes.register(OtherName)


@pytest.mark.parametrize("args", ARGS, ids=lambda a: a.describe())
def test_staged_arrays_match_the_row_roles_of_the_outputs(args) -> None:
    scheme: Scheme = schemes.for_args(args)
    rows, cols, chunk_rows = 96, 320, 32
    outputs = scheme.outputs("m.weight", (rows, cols), "BF16", args, kept=1000)
    staged = {a.role: a for a in scheme.staged_arrays((rows, cols), "BF16", args, chunk_rows)}
    scale, zero = (
        scheme.tensor_params(args, -1.0, 1.0, "BF16") if scheme.needs_range(args) else (None, None)
    )
    small = scheme.small_outputs(
        "m", args, scale, zero, [0.0] * 8 if scheme.fits_codebook(args) else None
    )
    for spec in outputs:
        if spec.name in small:  # written whole from the client
            assert small[spec.name].size * small[spec.name].itemsize == spec.nbytes, spec
        elif spec.role in scheme.row_roles:  # written row block by row block: same array
            assert spec.role in staged, spec
            assert staged[spec.role].shape == spec.shape
            assert staged[spec.role].dtype == spec.dtype
    assert {s.name.rsplit(".", 1)[1] for s in outputs} <= set(scheme.parts)
    assert scheme.root_part(args) in {s.name.rsplit(".", 1)[1] for s in outputs}


def test_no_scheme_branches_outside_the_scheme_modules() -> None:
    """Stages, pipeline, formats and the CLI dispatch through the registry; only the math
    (pure functions of a scheme's arguments) and the scheme modules look at `method`."""
    root = Path(compressor.__file__).parent
    branch = re.compile(r'\.method\s*(==|!=|in\b)|\bmethod\s*==\s*"(int|minmax|nf4|kmeans)"')
    allowed = {"schemes", "math"}
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] in allowed or rel.as_posix() in ("config.py", "formats/layout.py"):
            continue  # config validates recipes; layout holds CodebookArgs itself
        for k, line in enumerate(path.read_text().splitlines(), 1):
            if branch.search(line):
                found.append(f"{rel}:{k}: {line.strip()}")
    assert not found, "\n".join(found)
