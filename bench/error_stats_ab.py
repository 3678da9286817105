"""error_stats as it is (float64 temporaries) vs a float32 variant, on 256-row bf16 blocks of a
real weight (what compress_chunk calls it on). Best-of-N ms per block, one torch thread.

    python -m bench.error_stats_ab          # also run under MALLOC_TRIM_THRESHOLD_=65536
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

torch.set_num_threads(1)

from bench.profile_stages import ARGS, find_tensor  # noqa: E402
from compressor.formats import dtypes  # noqa: E402
from compressor.formats.safetensors_io import read_rows  # noqa: E402
from compressor.math import quant  # noqa: E402
from compressor.math.stats import error_stats  # noqa: E402


def error_stats_f32(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[float, float, float, int]:
    """Proposed: float32 difference (exact enough: both are bf16 values), float32 dot products
    (torch accumulates them blockwise; ~1e-7 relative), no bool or abs temporaries."""
    ref = x.float().view(-1)
    diff = x_hat.float().view(-1)
    diff.sub_(ref)
    lo, hi = torch.aminmax(diff)
    return (
        float(torch.dot(diff, diff)),
        float(torch.dot(ref, ref)),
        max(-float(lo), float(hi)),
        int(x_hat.numel() - torch.count_nonzero(x_hat)),
    )


def main() -> None:
    path, info = find_tensor(
        Path("/work/bench-data/llama-1.8g"), "model.layers.0.mlp.gate_proj.weight"
    )
    x = dtypes.to_torch(read_rows(path, info, 0, 256), "BF16")
    work = x.float()
    lo, hi = quant.group_ranges(work, ARGS)
    s, z = quant.qparams_from_range(lo, hi, ARGS, x.dtype)
    x_hat = quant.dequantize(quant.quantize(work, s, z, ARGS), s, z, ARGS, x.dtype)

    def best(fn, n=30):
        ts = []
        for _ in range(n):
            c0 = time.thread_time()
            fn()
            ts.append(time.thread_time() - c0)
        return round(min(ts) * 1e3, 3)

    a, b = error_stats(x, x_hat), error_stats_f32(x, x_hat)
    out = {
        "env_MALLOC_TRIM_THRESHOLD_": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
        "current_cpu_ms": best(lambda: error_stats(x, x_hat)),
        "float32_cpu_ms": best(lambda: error_stats_f32(x, x_hat)),
        "quantize+dequantize_cpu_ms": best(
            lambda: quant.dequantize(quant.quantize(work, s, z, ARGS), s, z, ARGS, x.dtype)
        ),
        "rel_diff_sq_error": abs(a.sq_error - b[0]) / a.sq_error,
        "rel_diff_sq_signal": abs(a.sq_signal - b[1]) / a.sq_signal,
        "same_max_abs": a.max_abs_error == b[2],
        "same_zeros": a.zeros == b[3],
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
