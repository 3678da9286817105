"""How much the `minmax` layout's `hqq` (the hqq library's offset fit, `rounding._offset_fit`)
moves with the float details of the same fit: per-group stop, the variants differing only in
what is rounded when.

    python -m bench.offset_fit                        # SmolLM2, every row
    python -m bench.offset_fit --model gemma3-270m --only product,library-notation

Every row fits each group of 64 (4 bits) by the same rule: the scale is the full range's, the
offset starts on the grid through 0, moves by the group's mean error, and the group stops
after its first pass whose mean |error| did not fall. The stored scale and offset are bf16 and
the codes are recomputed from them, as `--preset minmax` stores them:

    product           `search_qparams(..., "hqq")` on the minmax layout: the fit uses the stored
                      (bf16) scale and carries the offset unrounded (float32, the search's
                      work dtype for 16-bit weights), rounded once at the end
    library-notation  the library's notation (inverse scale a = 15/(max − min), float zero z,
                      codes round(x·a + z)), float32, unrounded scale during the fit
    float32 / float64 offset notation, the unrounded scale during the fit
    offset-each-pass  as `product`, with the offset rounded to bf16 after every pass
    xhat-bf16         as float64, with x̂ rounded to bf16 before the error is taken
    all-rounded       stored scale, offset and x̂ all rounded at every pass

Each row is scored like `bench.hqq_replica` (ΔPPL on *Persuasion* and *Pride and Prejudice*,
2048 tokens each, windows of 512; weight rel. error). Writes bench/results/offset-fit-MODEL.json.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from bench.hqq_gap import _ppl, _weights, rewritten
from bench.hqq_replica import GROUP, LEVELS, _weight_stats, arguments, report
from compressor.math.quant import QuantArgs, dequantize, quantize
from compressor.math.rounding import OFFSET_FIT_ITERATIONS, search_qparams

WORK = Path("/work/bench-data/offset-fit")
MINMAX = QuantArgs(bits=4, method="minmax", symmetric=False, strategy="group", group_size=GROUP)
BF16 = torch.bfloat16


def _product(w: torch.Tensor) -> torch.Tensor:
    x = w.reshape(w.shape[0], -1)
    s, m = search_qparams(x, MINMAX, x.dtype, "hqq")
    return dequantize(quantize(x, s, m, MINMAX), s, m, MINMAX, x.dtype)


def _snap(t: torch.Tensor, on: bool) -> torch.Tensor:
    return t.to(BF16).to(t.dtype) if on else t


def _stored(x: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x̂ with s and m stored in bf16 and the codes recomputed from them."""
    sb, mb = s.to(BF16).double(), m.to(BF16).double()
    return mb + torch.round((x.double() - mb) / sb).clamp(0, LEVELS) * sb


def _per_group(
    w: torch.Tensor,
    dtype: torch.dtype = torch.float64,
    scale: bool = False,
    offset: bool = False,
    xhat: bool = False,
) -> torch.Tensor:
    """The fit in offset notation; `scale`/`offset`/`xhat`: round that to bf16 at every pass."""
    x = w.to(dtype).reshape(-1, GROUP)
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    s = _snap(torch.where(hi > lo, (hi - lo) / LEVELS, torch.ones_like(lo)), scale)
    m = _snap(torch.round(lo / s) * s, offset)
    best = torch.full_like(m, torch.inf)
    live = torch.ones_like(m, dtype=torch.bool)
    for _ in range(OFFSET_FIT_ITERATIONS):
        d = x - _snap(m + torch.round((x - m) / s).clamp(0, LEVELS) * s, xhat)
        err = d.abs().mean(1, keepdim=True)
        m = torch.where(live, _snap(m + d.mean(1, keepdim=True), offset), m)
        live &= err < best
        best = torch.minimum(best, err)
    return _stored(x, s, m)


def _library_notation(w: torch.Tensor) -> torch.Tensor:
    x = w.float().reshape(-1, GROUP)
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    a = torch.where(hi > lo, LEVELS / (hi - lo), torch.ones_like(lo))
    z = torch.round(-lo * a)
    best = torch.full_like(z, torch.inf)
    live = torch.ones_like(z, dtype=torch.bool)
    for _ in range(OFFSET_FIT_ITERATIONS):
        q = torch.round(x * a + z).clamp(0, LEVELS)
        err = (x - (q - z) / a).abs().mean(1, keepdim=True)
        z = torch.where(live, (q - x * a).mean(1, keepdim=True), z)
        live &= err < best
        best = torch.minimum(best, err)
    s = (1.0 / a).to(BF16).float()
    return _stored(x, s, -z * s)


ROWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "product": _product,
    "library-notation": _library_notation,
    "float32": lambda w: _per_group(w, torch.float32),
    "float64": _per_group,
    "offset-each-pass": lambda w: _per_group(w, scale=True, offset=True),
    "xhat-bf16": lambda w: _per_group(w, xhat=True),
    "all-rounded": lambda w: _per_group(w, scale=True, offset=True, xhat=True),
}


def main() -> None:
    model, src, keys = arguments("offset_fit", ROWS)
    original = _weights(src)
    rows: list[dict[str, object]] = []
    try:
        for key in keys:
            shutil.rmtree(WORK, ignore_errors=True)
            path = rewritten(src, WORK, lambda _, w, fit=ROWS[key]: fit(w))
            row = {
                "variant": key,
                **_weight_stats(path, original),
                "delta_ppl_pct": _ppl(path, src),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    report("offset-fit", model, rows, ["rel_error"])


if __name__ == "__main__":
    main()
