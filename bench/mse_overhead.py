"""Where the fused mse search's time goes: the group's own work against its candidates.

    python -m bench.mse_overhead [--rounds 7]

One thread; the weights of `bench.search_speed` (bfloat16 1024 × 1024 Student-t, int4 g128),
unweighted. Times `search_kernels.search_mse_16` alone (no quantize-and-pack) with the walk
compress uses (`rounding.mse_path`) and with an empty one: the empty walk still loads each
group, makes RTN's parameters, sums RTN's error and makes the final choice, so the difference
divided by the most candidates the walk can try (`candidates_at_most`; some are cut by the
clipping bound or equal the best) is a lower bound of what one candidate costs. One error pass
alone (`_error32` over 128 weights) is 0.36 ns per weight (docs/benchmarks.md). CPU time per
weight, minimum over alternating rounds.

`groups` (symmetric): the empty walk and RTN's quantize-and-pack kernel at group sizes 32 to
1024, each fitted as t = per_weight + per_group / g (least squares over the sizes): what a
group costs before any candidate, against what RTN's whole kernel spends per group. Writes
bench/results/mse-overhead.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from bench.search_speed import student_t_block
from compressor.math import kernels, search_kernels
from compressor.math.quant import QuantArgs, quantized_range
from compressor.math.rounding import MSE_GRID, _shrink_factors, mse_path

RESULTS = Path(__file__).parent / "results" / "mse-overhead.json"


GROUP_SIZES = (32, 64, 128, 256, 512, 1024)


def fixed_costs(raw: np.ndarray, factors: np.ndarray, rounds: int) -> dict[str, object]:
    """ns per weight of the empty walk and of RTN's kernel at each group size (symmetric int4),
    and each fitted as per_weight + per_group / g."""
    qrange = quantized_range(QuantArgs(bits=4, symmetric=True, strategy="group", group_size=32))
    cases = {
        "empty walk": lambda g: search_kernels.search_mse_16(
            raw, kernels.BF16, g, True, qrange, factors, ([], ())
        ),
        "rtn kernel": lambda g: kernels.quantize_pack_rtn_16(raw, kernels.BF16, g, True, qrange, 4),
    }
    best = {(name, g): float("inf") for name in cases for g in GROUP_SIZES}
    for _ in range(rounds):
        for name, run in cases.items():
            for g in GROUP_SIZES:
                start = time.process_time()
                run(g)
                best[name, g] = min(best[name, g], time.process_time() - start)
    out: dict[str, object] = {}
    for name in cases:
        ns = np.array([best[name, g] / raw.size * 1e9 for g in GROUP_SIZES])
        design = np.stack([np.ones(len(GROUP_SIZES)), 1.0 / np.array(GROUP_SIZES)], axis=1)
        (per_weight, per_group), *_ = np.linalg.lstsq(design, ns, rcond=None)
        out[name] = {
            "ns_per_weight": {
                str(g): round(float(t), 2) for g, t in zip(GROUP_SIZES, ns, strict=True)
            },
            "fit_per_weight_ns": round(float(per_weight), 2),
            "fit_per_group_ns": round(float(per_group), 1),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()
    _, raw = student_t_block()
    factors = np.array(_shrink_factors(MSE_GRID), np.float64)
    search_kernels.warm_up()
    rows = []
    for sym in (True, False):
        args = QuantArgs(bits=4, symmetric=sym, strategy="group", group_size=128)
        qrange = quantized_range(args)
        walks = {"walk": mse_path(MSE_GRID, 1 if sym else 3), "empty": ([], ())}
        best = {name: float("inf") for name in walks}
        for _ in range(a.rounds):
            for name, walk in walks.items():
                start = time.process_time()
                search_kernels.search_mse_16(raw, kernels.BF16, 128, sym, qrange, factors, walk)
                best[name] = min(best[name], time.process_time() - start)
        coarse, steps = walks["walk"]
        row = {
            "case": "sym" if sym else "asym",
            "walk_ns_per_weight": round(best["walk"] / raw.size * 1e9, 2),
            "empty_ns_per_weight": round(best["empty"] / raw.size * 1e9, 2),
            "candidates_at_most": len(coarse) + 2 * len(steps),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    groups = fixed_costs(raw, factors, a.rounds)
    print(json.dumps(groups), flush=True)
    RESULTS.write_text(json.dumps({"rounds": a.rounds, "rows": rows, "groups": groups}, indent=1))


if __name__ == "__main__":
    main()
