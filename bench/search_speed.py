"""CPU time per weight of the data-free searches against round to nearest, as compress runs them.

    python -m bench.search_speed [--rounds 5] [--layout minmax]
    python -m bench.search_speed --processes 15 [--rounds 7] [--against FILE]

One thread; bfloat16 1024 × 1024 Student-t (4 d.o.f.) weights, int4 g128, symmetric and
asymmetric, unweighted and weighted by a per-column importance. Each row times what the compress
stage does for a block on the CPU: `rtn` the fused quantize-and-pack kernel with its own
parameters (`kernels.quantize_pack_rtn_16`); `mse` / `hqq` the fused search
(`rounding.fused_search`) plus the same kernel applying its parameters; "torch" rows the torch
search (`rounding.search_qparams`, what ran before the fused searches, and what GPU workers run)
plus that kernel. Rounds alternate the cases; the median per case is reported, with its ratio to
rtn's in the same run. Also counts the passes per group the fused hqq runs: codes passes (of
1 + `HQQ_ITERATIONS`: it leaves out those that would repeat the last one exactly) and targets
passes (of `HQQ_ITERATIONS`: none where β shrinks no residual). Writes bench/results/search-speed.json.

`--processes N`: the int cases without their torch rows, timed in N fresh processes one after
another (`--rounds` each); reports, per case, the median over the processes of each one's ratio
to its own rtn, and the smallest and largest. On the Zen 4 host one process's figures stay
within ±1 % from round to round, yet they move by up to ±8 % from one process to the next
(bimodal: the same kernels, loaded elsewhere), so one process's ratio can sit on either side
of a target. Writes bench/results/search-speed-processes.json.

`--processes N --against FILE`: an A/B of the search kernels. FILE is another copy of
compressor/math/search_kernels.py (say `git show REV:compressor/math/search_kernels.py >
/tmp/before.py`), kept outside the tree; N processes with this tree's kernels and N with FILE's
run alternately, and each case's median CPU time over each side's processes is reported with
the ratio of the two (this tree's / FILE's; RTN, unchanged, shows the noise). numba caches
FILE's kernels beside it, so its first process compiles them (minutes). Writes nothing.

`--layout minmax`: our float-offset layout instead, int4 g64, which compress runs in torch
(`rounding.quantize_rows`: parameters, codes and x̂) for rtn, mse and hqq (the hqq library's
offset fit), hqq also weighted; ratios to that layout's own rtn. Writes
bench/results/search-speed-minmax.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from compressor.math import kernels, search_kernels
from compressor.math.quant import QuantArgs, quantized_range
from compressor.math.rounding import (
    _HQQ_BETA,
    _HQQ_KAPPA,
    HQQ_ITERATIONS,
    fused_search,
    quantize_rows,
    search_qparams,
)

RESULTS = Path(__file__).parent / "results"


def student_t_block() -> tuple[torch.Tensor, np.ndarray]:
    """The benchmark's weights, torch set to one thread: bfloat16 1024 × 1024 Student-t (4 d.o.f.)
    × 0.02, seed 0, and the same as 16-bit patterns (uint16) for the fused kernels."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = (torch.distributions.StudentT(4.0).sample((1024, 1024)) * 0.02).to(torch.bfloat16)
    return x, x.view(torch.int16).numpy().view(np.uint16)


def int_cases(
    x: torch.Tensor, raw: np.ndarray, importance: torch.Tensor, with_torch: bool = True
) -> dict[str, Callable[[], object]]:
    """The int schemes as compress runs them on the CPU: rtn, the fused mse/hqq searches and
    (`with_torch`) the torch ones, each followed by the quantize-and-pack kernel."""
    kernels.warm_up()
    cases: dict[str, Callable[[], object]] = {}
    for sym in (True, False):
        args = QuantArgs(bits=4, symmetric=sym, strategy="group", group_size=128)
        qrange = quantized_range(args)
        label = "sym" if sym else "asym"

        def apply(scale: np.ndarray, zero: np.ndarray | None, args: QuantArgs = args) -> None:
            kernels.quantize_pack_16(raw, kernels.BF16, 128, scale, zero, quantized_range(args), 4)

        cases[f"rtn {label}"] = lambda sym=sym, qrange=qrange: kernels.quantize_pack_rtn_16(
            raw, kernels.BF16, 128, sym, qrange, 4
        )
        for mode in ("mse", "hqq"):
            for weighted in (False, True):
                imp = importance if weighted else None
                name = f"{mode}{' weighted' if weighted else ''} {label}"

                def fused(mode=mode, imp=imp, args=args, apply=apply) -> None:
                    bits16, zero, _ = fused_search(raw, kernels.BF16, args, mode, imp)
                    scale = torch.from_numpy(bits16.view(np.int16)).view(torch.bfloat16)
                    apply(scale.float().numpy(), None if zero is None else zero.astype(np.int32))

                def in_torch(mode=mode, imp=imp, args=args, apply=apply) -> None:
                    s, z = search_qparams(x, args, torch.bfloat16, mode, imp)
                    apply(s.float().numpy(), None if z is None else z.int().numpy())

                fused()  # compile or load before timing
                cases[name] = fused
                if with_torch:
                    cases[f"{name}, torch"] = in_torch
    return cases


def minmax_cases(x: torch.Tensor, importance: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The minmax layout's roundings as compress runs them (torch, `quantize_rows`)."""
    args = QuantArgs(bits=4, method="minmax", symmetric=False, strategy="group", group_size=64)
    cases: dict[str, Callable[[], object]] = {}
    for mode, imp in (("rtn", None), ("mse", None), ("hqq", None), ("hqq", importance)):
        name = f"{mode}{'' if imp is None else ' weighted'} minmax"
        cases[name] = lambda mode=mode, imp=imp: quantize_rows(x, args, mode, importance=imp)
    return cases


def hqq_passes(raw: np.ndarray, importance: torch.Tensor) -> dict[str, dict[str, float]]:
    """Mean passes per group the fused hqq runs on the block, int4 g128 as timed: codes passes
    (of 1 + `HQQ_ITERATIONS`: RTN's and the iterations'; those left out would repeat the last one
    exactly) and targets passes (of `HQQ_ITERATIONS`; left out where β shrinks no residual: the
    targets are the weights)."""
    out = {}
    for sym in (True, False):
        args = QuantArgs(bits=4, symmetric=sym, strategy="group", group_size=128)
        for imp in (None, importance.numpy()):
            passes = np.zeros(2, np.int64)
            scale, _, _ = search_kernels.search_hqq_16(
                raw, kernels.BF16, 128, sym, quantized_range(args), HQQ_ITERATIONS, _HQQ_BETA,
                _HQQ_KAPPA, imp, passes=passes,
            )  # fmt: skip
            name = f"hqq{'' if imp is None else ' weighted'} {'sym' if sym else 'asym'}"
            out[name] = {
                "codes": round(float(passes[0]) / scale.size, 2),
                "targets": round(float(passes[1]) / scale.size, 2),
            }
    return out


def timed(cases: dict[str, Callable[[], object]], rounds: int, weights: int) -> dict[str, float]:
    """Median CPU ms per million weights of each case, the rounds alternating the cases."""
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    return {k: statistics.median(v) / weights * 1e9 for k, v in times.items()}


def use_kernels(path: Path) -> None:
    """Make `rounding.fused_search` run the search kernels of the copy at `path` (`--against`):
    loaded from its own file, so numba caches them beside it, apart from this tree's."""
    import compressor.math

    spec = importlib.util.spec_from_file_location("compressor.math.search_kernels", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--kernels {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    compressor.math.search_kernels = module  # type: ignore[attr-defined]


def child_json(module: str, *args: str) -> dict[str, float]:
    """Run `python -m module args` as a fresh timing process; the JSON object it prints."""
    done = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"a timing process failed (exit {done.returncode}):\n{done.stderr}")
    times: dict[str, float] = json.loads(done.stdout)
    return times


def child_times(rounds: int, kernels_file: Path | None) -> dict[str, float]:
    """One timing process of `--processes`: its CPU ms per million weights per case."""
    more = [] if kernels_file is None else ["--kernels", str(kernels_file)]
    return child_json("bench.search_speed", "--rounds", str(rounds), "--child", *more)


def against(processes: int, rounds: int, other: Path) -> None:
    """`--against`: this tree's kernels and `other`'s, in alternating processes."""
    ours: dict[str, list[float]] = {}
    theirs: dict[str, list[float]] = {}
    for _ in range(processes):
        for side, path in ((ours, None), (theirs, other)):
            for name, ms in child_times(rounds, path).items():
                side.setdefault(name, []).append(ms)
    print(
        f"CPU ms per million weights, medians over {processes} processes each\n"
        f"| case | this tree | {other.name} | ratio |\n| --- | ---: | ---: | ---: |"
    )
    for name in ours:
        a, b = statistics.median(ours[name]), statistics.median(theirs[name])
        print(f"| {name} | {a:.3f} | {b:.3f} | {a / b:.3f} |")


def across_processes(processes: int, rounds: int) -> None:
    """`--processes`: each process's ratios to its own rtn, then per case their median, smallest
    and largest."""
    ratios: dict[str, list[float]] = {}
    for _ in range(processes):
        per_m = child_times(rounds, None)
        for name, ms in per_m.items():
            ratios.setdefault(name, []).append(ms / per_m[f"rtn {name.split()[-1]}"])
    rows = [
        {
            "case": name,
            "x_rtn_median": round(statistics.median(r), 2),
            "x_rtn_min": round(min(r), 2),
            "x_rtn_max": round(max(r), 2),
            "x_rtn_per_process": [round(v, 2) for v in r],
        }
        for name, r in ratios.items()
    ]
    report = {"processes": processes, "rounds": rounds, "rows": rows}
    (RESULTS / "search-speed-processes.json").write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"× rtn over {processes} processes\n| case | median | min | max |\n| --- | ---: | ---: | ---: |"
    )
    for row in rows:
        print(
            f"| {row['case']} | {row['x_rtn_median']} | {row['x_rtn_min']} | {row['x_rtn_max']} |"
        )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--layout", choices=["int", "minmax"], default="int")
    p.add_argument("--processes", type=int, default=0)
    p.add_argument("--against", type=Path, help="another copy of search_kernels.py to A/B")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kernels", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.against is not None and not a.processes:
        p.error("--against times fresh processes: give --processes N too")
    if a.kernels is not None and not a.child:
        p.error("--kernels is --against's, for its timing processes")
    if a.against is not None and not a.against.is_file():
        p.error(f"--against {a.against}: no such file")
    if a.processes:
        if a.layout != "int":
            p.error("--processes times the int layout's fused searches; leave out --layout")
        if a.against is not None:
            against(a.processes, a.rounds, a.against.resolve())
        else:
            across_processes(a.processes, a.rounds)
        return
    if a.kernels is not None:
        use_kernels(a.kernels)
    x, raw = student_t_block()
    importance = torch.rand(1024, dtype=torch.float64) ** 4
    if a.child:  # one process of `--processes`: its medians as JSON on stdout
        print(
            json.dumps(timed(int_cases(x, raw, importance, with_torch=False), a.rounds, x.numel()))
        )
        return
    cases = minmax_cases(x, importance) if a.layout == "minmax" else int_cases(x, raw, importance)
    per_m = timed(cases, a.rounds, x.numel())  # ms per M
    rows = []
    for name, ms in per_m.items():
        scheme = name.split(",")[0].split()[-1]  # sym | asym | minmax
        rtn = per_m[f"rtn {scheme}"]
        rows.append({"case": name, "ms_per_million": round(ms, 2), "x_rtn": round(ms / rtn, 1)})
    out = RESULTS / ("search-speed.json" if a.layout == "int" else "search-speed-minmax.json")
    report: dict[str, object] = {"rounds": a.rounds, "rows": rows}
    if a.layout == "int":
        report["hqq_passes_per_group"] = hqq_passes(raw, importance)
        print(
            f"hqq passes per group (codes of {1 + HQQ_ITERATIONS}, targets of {HQQ_ITERATIONS}):",
            report["hqq_passes_per_group"],
        )
    out.write_text(json.dumps(report, indent=1) + "\n")
    print("| case | CPU ms per million weights | × rtn |\n| --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['case']} | {r['ms_per_million']} | {r['x_rtn']} |")


if __name__ == "__main__":
    main()
