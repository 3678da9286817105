"""Profile each stage of one run in this process (`--workers 0`, the serial executor), so every
call, zarr's I/O thread included, is attributed to its stage.

    MALLOC_TRIM_THRESHOLD_=65536 python -m bench.profile_serial [SRC] [--top 25]

(set MALLOC_TRIM_THRESHOLD_=65536 to reproduce what a Dask worker process runs under.)
Prints, per stage, its wall time and the functions with the most cumulative time (cProfile;
zarr's async writes run on its own loop thread while the caller waits in `sync`, so they show
as time under `zarr ... sync`).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import sys
import time

import torch

torch.set_num_threads(1)  # as in a Dask worker (OMP_NUM_THREADS=1)

from compressor.config import build_config  # noqa: E402
from compressor.pipeline import Pipeline  # noqa: E402
from compressor.stages.executor import SerialExecutor  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("src", nargs="?", default="/work/bench-data/llama-1.8g")
    p.add_argument("--dst", default="/work/bench-data/out/serial")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--chunk-mb", type=int)
    a = p.parse_args()
    shutil.rmtree(a.dst, ignore_errors=True)
    extra = {"chunk_mb": a.chunk_mb} if a.chunk_mb else {}
    config = build_config(a.src, a.dst, preset="w4a16", workers=0, **extra)
    pipe = Pipeline(config)
    ex = SerialExecutor()
    stages = [
        ("plan", pipe.make_plan),
        ("ingest", lambda: pipe.ingest(ex)),
        ("thresholds", pipe.thresholds),
        ("compress", lambda: pipe.compress(ex)),
        ("write", lambda: pipe.write(ex)),
        ("publish", pipe.publish),
    ]
    for name, fn in stages:
        if name == "thresholds" and hasattr(pipe, "stats"):
            pipe.stats(ex)  # a newer pipeline has a separate stats stage
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        prof.enable()
        fn()
        prof.disable()
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        print(f"\n===== {name}: wall {wall:.2f} s, cpu {cpu:.2f} s", flush=True)
        if wall > 0.5:
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(a.top)
            lines = out.getvalue().splitlines()
            start = next(i for i, line in enumerate(lines) if "ncalls" in line)
            print("\n".join(lines[start:]))
    shutil.rmtree(a.dst, ignore_errors=True)
    print(pipe.timings, file=sys.stderr)


if __name__ == "__main__":
    main()
