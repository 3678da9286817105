"""`compressor` with two proposed settings, to measure them without editing compressor/:

1. Dask's nanny sets MALLOC_TRIM_THRESHOLD_=65536 in every worker. Setting any glibc malloc
   threshold turns off glibc's dynamic mmap threshold, so every temporary above 128 KiB (each
   256-row block's float32/float64 copies) is a fresh mmap + munmap, paid again in page faults
   on every use. Dropping the variable restores the default heap behaviour.
2. Zarr's `array.write_empty_chunks=False` (the default) compares every written chunk against
   the fill value before storing it, a full extra pass that costs ~5× the file write itself.
   Staging chunks are never empty, so True skips the check.

    python -m bench.ours_variant compress SRC DST --preset w4a16 ...   (same CLI)
"""

from __future__ import annotations

import os

os.environ.setdefault("ZARR_ARRAY__WRITE_EMPTY_CHUNKS", "True")  # inherited by the workers

import dask

dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})

from compressor.cli import app  # noqa: E402

if __name__ == "__main__":
    app()
