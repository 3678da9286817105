"""How much of hqq's gain over RTN each iteration brings, and what stopping early would give up.

    python -m bench.hqq_iterations

hqq (`rounding._hqq`, torch) runs its `HQQ_ITERATIONS` iterations (15 when the committed JSON was
made, 5 since 2026-12-05) on the weights of `bench.search_quality`
(Student-t and three SmolLM2 weights; int4 sym g128, int4 asym g64, int3 asym g64; unweighted and
weighted by a rand⁴ importance) while every iterate's per-group error is recorded. Reported, as
a share of the full run's gain (Σ over groups of RTN's error − the best iterate's):
`K<k>` keeping only the first k iterations; `P<p>` stopping each group once p iterations in a
row did not improve it, with the mean number of iterations that rule runs. hqq's cost is one
pass per iteration, so this is the trade between its speed and its error. Writes
bench/results/hqq-iterations.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from bench.search_quality import SCHEMES, weights
from compressor.math.quant import group_ranges, qparams_from_range
from compressor.math.rounding import HQQ_ITERATIONS, _Best, _Blocks, _hqq

RESULTS = Path(__file__).parent / "results" / "hqq-iterations.json"


def _trajectory(x: torch.Tensor, args: Any, imp: torch.Tensor | None) -> torch.Tensor:
    """(iterations + 1, rows, groups) errors: RTN's, then each iterate's."""
    blocks = _Blocks.build(x, args, torch.bfloat16, imp)
    rtn = qparams_from_range(*group_ranges(x, args), args, torch.bfloat16)
    best = _Best(blocks, rtn)
    errors = [best.err.double().clone()]
    offer = best.offer

    def recording(cand: Any) -> torch.Tensor:
        errors.append(blocks.error(cand).double())
        return offer(cand)

    best.offer = recording  # type: ignore[method-assign]
    _hqq(blocks, rtn, best, HQQ_ITERATIONS)
    return torch.stack(errors)


def _patience(errors: torch.Tensor, p: int) -> tuple[torch.Tensor, float]:
    """Best error per group when each stops after p iterations in a row without improving it,
    and the mean number of iterations run."""
    best = errors[0].clone()
    stale = torch.zeros_like(best)
    alive = torch.ones_like(best, dtype=torch.bool)
    runs = torch.zeros_like(best)
    for e in errors[1:]:
        runs += alive.double()
        better = alive & (e < best)
        best = torch.where(better, e, best)
        stale = torch.where(better, 0, stale + alive.double())
        alive &= stale < p
    return best, float(runs.mean())


def main() -> None:
    rows = []
    for label, x in weights():
        x = x.to(torch.bfloat16)
        for args in SCHEMES:
            for weighted in (False, True):
                g = torch.Generator().manual_seed(1)
                imp = torch.rand(x.shape[1], generator=g, dtype=torch.float64) ** 4
                errors = _trajectory(x, args, imp if weighted else None)
                rtn = errors[0]
                gain = float((rtn - errors.min(0).values).sum())
                row: dict[str, Any] = {
                    "weights": label,
                    "scheme": args.describe(),
                    "weighted": weighted,
                    "gain_vs_rtn": round(gain / float(rtn.sum()), 3),
                }
                for k in (4, 6, 8, 10):
                    kept = errors[: k + 1].min(0).values
                    row[f"K{k}"] = round(float((rtn - kept).sum()) / gain, 3)
                for p in (1, 2, 3):
                    best, runs = _patience(errors, p)
                    row[f"P{p}"] = round(float((rtn - best).sum()) / gain, 3)
                    row[f"P{p}_iterations"] = round(runs, 1)
                rows.append(row)
                print(json.dumps(row), flush=True)
    RESULTS.write_text(json.dumps({"iterations": HQQ_ITERATIONS, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
