"""What mse's asymmetric walk costs and saves, in time and in error, with the kernel as it is.

    python -m bench.mse_walks [--processes 4] [--rounds 9] [--walks before every5 compress]

Weighted asymmetric int4 g128 on `search_speed`'s block (importance rand⁴, seed 5). The walks
(`WALKS`, all with steps 2 and 1 after their coarse stage): `before`, the walk compress used
until 2026-12-06 (every 4th factor at the three shifts: 15 coarse candidates); `every5`, every
5th at the three shifts (12); `compress`, `rounding.mse_path`'s walk today (every 5th, the last
factor centred only: 10). `search_mse_16` runs each path: the same compiled kernel, so no
code-layout effect. Each of `--processes` fresh processes times every walk, RTN's kernel and the
apply (`quantize_pack_16`) over `--rounds` alternating rounds and reports medians, so each
walk's row ratio (search + apply over RTN) comes from one process. Then, once, each walk's
Σ w·(x − x̂)² (float64, `reconstruction_error`) against RTN's and the whole grid's. Writes
bench/results/mse-walks.json and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bench.search_speed import child_json, student_t_block, timed
from compressor.math import kernels, search_kernels
from compressor.math.quant import QuantArgs, quantized_range
from compressor.math.rounding import (
    MSE_GRID,
    _shrink_factors,
    mse_path,
    reconstruction_error,
    search_qparams,
)

RESULTS = Path(__file__).parent / "results" / "mse-walks.json"
ARGS = QuantArgs(bits=4, symmetric=False, strategy="group", group_size=128)
Walk = tuple[list[tuple[int, int]], tuple[int, ...]]


WALKS: dict[str, Walk] = {
    "before": mse_path(MSE_GRID, 3, every=4, last_at_every_shift=True),
    "every5": mse_path(MSE_GRID, 3, every=5, last_at_every_shift=True),
    "compress": mse_path(MSE_GRID, 3),
}


def block() -> tuple[torch.Tensor, np.ndarray, torch.Tensor]:
    x, raw = student_t_block()
    torch.manual_seed(5)
    return x, raw, torch.rand(1024, dtype=torch.float64) ** 4


def search(raw: np.ndarray, imp: torch.Tensor, path: Walk) -> tuple[np.ndarray, np.ndarray]:
    factors = np.array(_shrink_factors(MSE_GRID))
    scale, zero, _ = search_kernels.search_mse_16(
        raw,
        kernels.BF16,
        ARGS.group_size,
        False,
        quantized_range(ARGS),
        factors,
        path,
        imp.numpy(),
    )
    assert zero is not None
    return scale, zero


def child(rounds: int, walks: list[str]) -> dict[str, float]:
    """One process: ms per million weights of RTN, the apply and each walk (medians)."""
    _, raw, imp = block()
    g, bits, qrange = ARGS.group_size, ARGS.bits, quantized_range(ARGS)
    scale, zero = search(raw, imp, WALKS[walks[0]])
    scale32 = (scale.astype(np.uint32) << 16).view(np.float32)  # bfloat16 bits → float32
    cases = {
        "rtn": lambda: kernels.quantize_pack_rtn_16(raw, kernels.BF16, g, False, qrange, bits),
        "apply": lambda: kernels.quantize_pack_16(
            raw, kernels.BF16, g, scale32, zero.astype(np.int32), qrange, bits
        ),
    }
    for name in walks:
        cases[name] = lambda p=WALKS[name]: search(raw, imp, p)
    for fn in cases.values():
        fn()  # compile or load
    return timed(cases, rounds, raw.size)


def errors(walks: list[str]) -> dict[str, float]:
    """Σ w·(x − x̂)² of RTN, each walk and the whole grid, on the same block."""
    x, raw, imp = block()
    rs, rz = search_qparams(x, ARGS, torch.bfloat16, "rtn")
    out = {"rtn": float(reconstruction_error(x, rs, rz, ARGS, imp).sum())}
    grid = mse_path(MSE_GRID, 3, exhaustive=True)
    for name, path in [(w, WALKS[w]) for w in walks] + [("grid", grid)]:
        scale, zero = search(raw, imp, path)
        s = torch.from_numpy(scale.view(np.int16)).view(torch.bfloat16)
        z = torch.from_numpy(zero)
        out[name] = float(reconstruction_error(x, s, z, ARGS, imp).sum())
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--processes", type=int, default=4)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--walks", nargs="+", choices=list(WALKS), default=list(WALKS))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.processes < 1:
        p.error("--processes takes 1 or more")
    if a.child:
        print(json.dumps(child(a.rounds, a.walks)))
        return
    args = ["--child", "--rounds", str(a.rounds), "--walks", *a.walks]
    per_process = [child_json("bench.mse_walks", *args) for _ in range(a.processes)]
    walks = a.walks
    print("| process | rtn ms/M | apply | " + " | ".join(walks) + " | " + " | ".join(f"{w} + apply × rtn" for w in walks) + " |")  # fmt: skip
    print("| --- " * (3 + 2 * len(walks)) + "|")
    for i, t in enumerate(per_process, 1):
        ratios = [(t[w] + t["apply"]) / t["rtn"] for w in walks]
        cells = [f"{t['rtn']:.3f}", f"{t['apply']:.3f}", *(f"{t[w]:.3f}" for w in walks)]
        print(f"| {i} | " + " | ".join(cells + [f"{r:.2f}" for r in ratios]) + " |")
    err = errors(a.walks)
    gain = err["rtn"] - err["grid"]
    print("\n| search | Σ w·(x − x̂)² | share of the grid's gain over RTN |\n| --- | ---: | ---: |")
    for name, e in err.items():
        print(f"| {name} | {e:.4f} | {(err['rtn'] - e) / gain:.4f} |")
    RESULTS.write_text(
        json.dumps({"ms_per_million": per_process, "weighted_error": err}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
