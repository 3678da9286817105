"""Compress-stage math on a GPU worker (CUDA when available, else the CPU), against the device's
own copy bandwidth, in one short call.

    python -m bench.gpu                 # on a one-worker Dask LocalCluster (resources GPU=1)
    python -m bench.gpu --in-process    # same measurement in this process
    python -m bench.gpu --mb 512 --block-rows 256,4096,0

What one call measures (input bytes per second, bf16 weights of shape (rows, 4096), W4A16:
int4 symmetric, group 128 — the math of `compress_chunk`, without the Zarr staging I/O):

    copy          `dst.copy_(src)` on the device (the ceiling: read + write each byte once)
    math          ranges → scales → quantize → dequantize → error stats → pack, data resident on
                  the device, for each BLOCK_ROWS setting (0 = the whole chunk at once)
    math+h2d+d2h  the same with the input coming from host memory block by block and the outputs
                  going back (the torch path: `.to(device)` per block, `.cpu()`)
    stage         `compress.quantize_rows_packed` on the host chunk, what compress_chunk runs:
                  the fused numba kernels on a CPU, the torch path in GPU_BLOCK_ROWS blocks on CUDA

On a CPU-only machine it runs the same code on the CPU (one torch thread, as a Dask worker has)
with a smaller default size, so it always runs; the JSON says which device it measured.
"""

# The timed closures are called inside the loop iteration that defines them.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


CPU_TIMES: list[float] = []  # thread CPU time of the best repeat of the last _best call


def _best(fn, device, repeats: int) -> float:
    """Best wall time of `repeats` calls; the matching thread CPU time goes to CPU_TIMES (on a
    shared CPU the wall time includes waiting for a core, the CPU time does not)."""
    fn()  # warm-up (kernels, allocator)
    _sync(device)
    times = []
    for _ in range(repeats):
        c0 = time.thread_time()
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0, time.thread_time() - c0))
    wall, cpu = min(times)
    CPU_TIMES[:] = [cpu]
    return wall


def measure(
    mb: int | None = None, block_rows: tuple[int, ...] = (256, 4096, 0), repeats: int = 3
) -> dict[str, Any]:
    import torch

    from compressor.math.pack import pack_rows
    from compressor.math.quant import (
        QuantArgs,
        dequantize,
        group_ranges,
        qparams_from_range,
        quantize,
        quantized_range,
    )
    from compressor.math.stats import error_stats
    from compressor.stages.compress import quantize_rows_packed, warm_up
    from compressor.stages.thresholds import TensorThresholds

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
    mb = mb or (512 if cuda else 32)
    cols = 4096
    rows = max(256, mb * 2**20 // (cols * 2) // 256 * 256)
    nbytes = rows * cols * 2
    args = QuantArgs(bits=4, symmetric=True, strategy="group", group_size=128)
    qmin, _ = quantized_range(args)

    g = torch.Generator(device="cpu").manual_seed(0)
    host = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
    host[:, ::97] *= 8  # a few loud input channels
    if cuda:
        host = host.pin_memory()
    x = host.to(device)
    dst = torch.empty_like(x)

    def block_math(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        work = b.to(torch.float32)
        lo, hi = group_ranges(work, args)
        scale, zero = qparams_from_range(lo, hi, args, b.dtype)
        q = quantize(work, scale, zero, args)
        x_hat = dequantize(q, scale, zero, args, b.dtype)
        error_stats(b, x_hat)  # float() of the sums syncs, as in the real stage
        return pack_rows(q - qmin, args.bits), scale

    def math_resident(br: int) -> None:
        step = br or rows
        for r in range(0, rows, step):
            block_math(x[r : r + step])

    def math_roundtrip(br: int) -> None:
        step = br or rows
        for r in range(0, rows, step):
            packed, scale = block_math(host[r : r + step].to(device, non_blocking=False))
            packed.cpu()
            scale.cpu()

    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0)
        if cuda
        else f"cpu ({torch.get_num_threads()} thread)",
        "torch": torch.__version__,
        "shape": [rows, cols],
        "input_mib": round(nbytes / 2**20, 1),
        "repeats": repeats,
    }
    t = _best(lambda: dst.copy_(x), device, repeats)
    result["copy_GBps"] = round(nbytes / t / 1e9, 2)
    if not cuda:
        result["copy_GB_per_cpu_s"] = round(nbytes / CPU_TIMES[0] / 1e9, 2)
    if cuda:
        t = _best(lambda: x.to("cpu"), device, repeats)
        result["d2h_pinned_source_GBps"] = round(nbytes / t / 1e9, 2)
        t = _best(lambda: host.to(device), device, repeats)
        result["h2d_pinned_GBps"] = round(nbytes / t / 1e9, 2)
    rows_out = {}
    for br in block_rows:
        key = str(br) if br else "chunk"
        entry = {
            "math_GBps": round(nbytes / _best(lambda: math_resident(br), device, repeats) / 1e9, 3)
        }
        entry["math+h2d+d2h_GBps"] = round(
            nbytes / _best(lambda: math_roundtrip(br), device, repeats) / 1e9, 3
        )
        entry["math_vs_copy"] = round(entry["math_GBps"] / result["copy_GBps"], 4)
        if not cuda:  # contention-free figure: input bytes per second of CPU time
            entry["math+h2d+d2h_GB_per_cpu_s"] = round(nbytes / CPU_TIMES[0] / 1e9, 3)
        rows_out[key] = entry
    result["by_block_rows"] = rows_out
    warm_up(searches=False)  # the stage below rounds to nearest
    t = _best(lambda: quantize_rows_packed(host, host, args, TensorThresholds()), device, repeats)
    result["stage_GBps"] = round(nbytes / t / 1e9, 3)
    result["stage_vs_copy"] = round(result["stage_GBps"] / result["copy_GBps"], 4)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mb", type=int, help="input MiB (default 512 on CUDA, 32 on CPU)")
    p.add_argument("--block-rows", default="256,4096,0", help="comma list; 0 = whole chunk")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--in-process", action="store_true", help="no Dask worker")
    a = p.parse_args()
    blocks = tuple(int(b) for b in a.block_rows.split(","))
    t0 = time.perf_counter()
    if a.in_process:
        res = measure(a.mb, blocks, a.repeats)
        res["where"] = "in-process"
    else:
        import torch
        from distributed import Client, LocalCluster

        gpu = torch.cuda.is_available()
        with (
            LocalCluster(
                n_workers=1,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                resources={"GPU": 1} if gpu else None,
            ) as cluster,
            Client(cluster) as client,
        ):
            fut = client.submit(
                measure, a.mb, blocks, a.repeats, resources={"GPU": 1} if gpu else None, pure=False
            )
            res = fut.result()
            res["where"] = "dask worker" + (" (resources GPU=1)" if gpu else "")
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    res["nproc"] = os.cpu_count()
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
