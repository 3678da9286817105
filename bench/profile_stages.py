"""Per-component timings of each stage's chunk work, in one process, one torch thread
(as in a Dask worker: the nanny sets OMP_NUM_THREADS=1).

    python -m bench.profile_stages [--src CKPT] [--tensor NAME] [--repeats 3]

Uses a real tensor of the benchmark checkpoint (default: layer 0's mlp.gate_proj, 5632×2048
bf16, 22 MiB: one 32 MB chunk) and times, per chunk:

    ingest    safetensors read_rows · zarr write_rows · range_stats · mark_done
    compress  zarr read_rows · to_torch · quantize_block (split: float cast, group ranges,
              qparams, quantize, dequantize, error stats) · pack_rows · zarr writes
    write     zarr read of packed/scale · SafetensorsWriter (write + fsync) · sha256 re-read

and the zarr write/read cost per chunk size (8..128 MB), plus alternatives the code could use
(BLOCK_ROWS, a cheaper error statistic, raw file writes instead of zarr). Prints a JSON
document; best-of-N wall times in milliseconds.
"""

# The timed closures are called inside the loop iteration that defines them.
# ruff: noqa: B023

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

torch.set_num_threads(1)

from compressor.formats import dtypes  # noqa: E402
from compressor.formats.checkpoint import open_checkpoint  # noqa: E402
from compressor.formats.safetensors_io import SafetensorsWriter, read_rows  # noqa: E402
from compressor.formats.staging import Staging  # noqa: E402
from compressor.math import quant  # noqa: E402
from compressor.math.pack import pack_rows  # noqa: E402
from compressor.math.quant import QuantArgs  # noqa: E402
from compressor.math.stats import error_stats, range_stats  # noqa: E402
from compressor.schemes import int_packed  # noqa: E402
from compressor.stages import compress as compress_stage  # noqa: E402
from compressor.stages.thresholds import TensorThresholds  # noqa: E402

ARGS = QuantArgs(bits=4, symmetric=True, strategy="group", group_size=128)


def best(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return round(min(times) * 1e3, 2)


def find_tensor(src: Path, name: str):
    ck = open_checkpoint(str(src))
    if name not in ck.tensors:
        raise SystemExit(f"{name} not in {src}")
    return ck.tensors[name]


def quantize_parts(x: torch.Tensor, repeats: int, block_rows: int) -> dict[str, float]:
    """quantize_block's steps, each timed over the whole chunk in blocks of `block_rows`."""
    fixed = TensorThresholds()
    blocks = [x[i : i + block_rows] for i in range(0, x.shape[0], block_rows)]
    work = [b.to(torch.float32) for b in blocks]
    rng = [quant.group_ranges(w, ARGS) for w in work]
    qp = [quant.qparams_from_range(lo, hi, ARGS, x.dtype) for lo, hi in rng]
    q = [quant.quantize(w, s, z, ARGS) for w, (s, z) in zip(work, qp, strict=True)]
    deq = [quant.dequantize(qq, s, z, ARGS, x.dtype) for qq, (s, z) in zip(q, qp, strict=True)]
    codes = [qq + 8 for qq in q]
    out = {
        "cast_to_f32": best(lambda: [b.to(torch.float32) for b in blocks], repeats),
        "group_ranges": best(lambda: [quant.group_ranges(w, ARGS) for w in work], repeats),
        "qparams": best(
            lambda: [quant.qparams_from_range(lo, hi, ARGS, x.dtype) for lo, hi in rng], repeats
        ),
        "quantize": best(
            lambda: [quant.quantize(w, s, z, ARGS) for w, (s, z) in zip(work, qp, strict=True)],
            repeats,
        ),
        "dequantize": best(
            lambda: [
                quant.dequantize(qq, s, z, ARGS, x.dtype) for qq, (s, z) in zip(q, qp, strict=True)
            ],
            repeats,
        ),
        "error_stats": best(
            lambda: [error_stats(b, d) for b, d in zip(blocks, deq, strict=True)], repeats
        ),
        "codes_minus_qmin": best(lambda: [qq + 8 for qq in q], repeats),
        "pack_rows": best(lambda: [pack_rows(c, 4) for c in codes], repeats),
        "quantize_block_total": best(
            lambda: [compress_stage.quantize_block(b, ARGS, fixed) for b in blocks], repeats
        ),
    }
    return out


def error_stats_f32(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[float, float, float, int]:
    """A cheaper error statistic (what error_stats could do): float32 diff, float64 sums."""
    ref = x.to(torch.float32)
    diff = x_hat.to(torch.float32) - ref
    return (
        float(torch.sum(diff * diff, dtype=torch.float64)),
        float(torch.sum(ref * ref, dtype=torch.float64)),
        float(diff.abs().max()),
        int((x_hat == 0).sum()),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--src", type=Path, default=Path("/work/bench-data/llama-1.8g"))
    p.add_argument("--tensor", default="model.layers.0.mlp.gate_proj.weight")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tmp", type=Path, default=Path("/work/bench-data/profile-tmp"))
    a = p.parse_args()
    r = a.repeats
    path, info = find_tensor(a.src, a.tensor)
    rows, cols = info.shape
    mb = info.nbytes / 2**20
    shutil.rmtree(a.tmp, ignore_errors=True)
    a.tmp.mkdir(parents=True)
    st = Staging(a.tmp / "staging")
    report: dict[str, Any] = {
        "tensor": a.tensor,
        "shape": [rows, cols],
        "chunk_mib": round(mb, 1),
        "torch_threads": torch.get_num_threads(),
    }

    # -- ingest ---------------------------------------------------------------------------------
    raw = read_rows(path, info, 0, rows)
    st.create("in/t", (rows, cols), "BF16", rows)
    x = dtypes.to_torch(raw, "BF16")
    report["ingest_ms"] = {
        "safetensors_read_rows": best(lambda: read_rows(path, info, 0, rows), r),
        "zarr_write_rows": best(lambda: st.write_rows("in/t", 0, raw), r),
        "range_stats": best(lambda: range_stats(x), r),
        "mark_done": best(lambda: st.mark_done("ingest", "t", 0, {"a": 1}), r),
    }

    # -- compress -------------------------------------------------------------------------------
    packed_cols = cols * 4 // 32
    st.create("out/t/packed", (rows, packed_cols), "I32", rows)
    st.create("out/t/scale", (rows, cols // 128), "BF16", rows)
    codes, scale, _, _ = compress_stage.quantize_block(x, ARGS, TensorThresholds())
    packed = pack_rows(codes, 4).numpy()
    scale_raw = dtypes.to_raw(scale)
    blocks = {}
    for br in (64, 256, 1024, rows):
        int_packed.BLOCK_ROWS = br

        def chunk() -> None:
            xx = x
            out = []
            for b0 in range(0, rows, br):
                c, _s, _z, _e = compress_stage.quantize_block(
                    xx[b0 : b0 + br], ARGS, TensorThresholds()
                )
                out.append(pack_rows(c, 4))
            torch.cat(out)

        blocks[str(br)] = best(chunk, r)
    int_packed.BLOCK_ROWS = 256
    report["compress_ms"] = {
        "zarr_read_rows": best(lambda: st.read_rows("in/t", 0, rows), r),
        "to_torch": best(lambda: dtypes.to_torch(st.read_rows("in/t", 0, rows), "BF16"), r),
        "math_per_block_rows_256": quantize_parts(x, r, 256),
        "quantize_block+pack by BLOCK_ROWS": blocks,
        "zarr_write_packed": best(lambda: st.write_rows("out/t/packed", 0, packed), r),
        "zarr_write_scale": best(lambda: st.write_rows("out/t/scale", 0, scale_raw), r),
        "error_stats_float64 (current)": best(
            lambda: error_stats(x, quant.dequantize(codes - 8, scale, None, ARGS, x.dtype)), r
        ),
        "error_stats_float32 (alternative)": best(
            lambda: error_stats_f32(x, quant.dequantize(codes - 8, scale, None, ARGS, x.dtype)), r
        ),
    }
    # The whole job as the worker runs it (resume marker removed before each try).
    from compressor.stages.compress import CompressJob, compress_chunk
    from compressor.stages.plan import TensorPlan

    tp = TensorPlan(0, a.tensor, str(path), info, ARGS, ((0, rows),))
    st2 = Staging(a.tmp / "staging2")
    st2.create(f"in/{tp.key}", (rows, cols), "BF16", rows)
    st2.write_rows(f"in/{tp.key}", 0, raw)
    st2.create(f"out/{tp.key}/packed", (rows, packed_cols), "I32", rows)
    st2.create(f"out/{tp.key}/scale", (rows, cols // 128), "BF16", rows)

    def job() -> None:
        shutil.rmtree(st2.root / "done", ignore_errors=True)
        compress_chunk(CompressJob(st2, tp, 0, TensorThresholds()))

    report["compress_ms"]["compress_chunk_total"] = best(job, r)

    # -- write ----------------------------------------------------------------------------------
    out = a.tmp / "shard.safetensors"
    entries = [("p", "I32", (rows, packed_cols)), ("s", "BF16", (rows, cols // 128))]

    def write_file(fsync: bool = True) -> None:
        with SafetensorsWriter(out, entries, {"format": "pt"}) as w:
            w.write("p", st.read_rows("out/t/packed", 0, rows))
            w.write("s", st.read_rows("out/t/scale", 0, rows))

    def sha() -> str:
        d = hashlib.sha256()
        with open(out, "rb") as f:
            while b := f.read(8 << 20):
                d.update(b)
        return d.hexdigest()

    write_file()
    out_mb = out.stat().st_size / 2**20
    report["write_ms"] = {
        "output_mib": round(out_mb, 2),
        "zarr_read_packed+scale": best(
            lambda: (st.read_rows("out/t/packed", 0, rows), st.read_rows("out/t/scale", 0, rows)), r
        ),
        "safetensors_writer (incl. zarr reads, fsync)": best(write_file, r),
        "sha256_reread": best(sha, r),
        "sha256_in_memory": best(lambda: hashlib.sha256(packed.tobytes()).hexdigest(), r),
    }

    # -- zarr vs raw by chunk size -------------------------------------------------------------
    sizes = {}
    rng = np.random.default_rng(0)
    for mib in (8, 32, 64, 128):
        n_rows = mib * 2**20 // (cols * 2)
        arr = rng.integers(0, 65535, size=(n_rows, cols), dtype=np.uint16)
        z = Staging(a.tmp / f"z{mib}")
        z.create("a", arr.shape, "BF16", n_rows)
        raw_path = a.tmp / f"raw{mib}.bin"

        def raw_write() -> None:
            with open(raw_path, "wb") as f:
                f.write(arr.data)

        def raw_read() -> np.ndarray:
            out_ = np.empty_like(arr)
            with open(raw_path, "rb", buffering=0) as f:
                f.readinto(out_.data)
            return out_

        z.write_rows("a", 0, arr)
        raw_write()
        sizes[f"{mib}MiB"] = {
            "zarr_write": best(lambda: z.write_rows("a", 0, arr), r),
            "zarr_read": best(lambda: z.read_rows("a", 0, n_rows), r),
            "raw_file_write": best(raw_write, r),
            "raw_file_read": best(raw_read, r),
            "np_copy": best(lambda: arr.copy(), r),
        }
    report["io_by_chunk_size_ms"] = sizes
    shutil.rmtree(a.tmp, ignore_errors=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
