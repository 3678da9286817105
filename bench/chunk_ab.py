"""A/B of one ingest_chunk + compress_chunk (22 MiB gate_proj) under environment variants:
run it with and without MALLOC_TRIM_THRESHOLD_=65536 (what the Dask nanny sets in workers) and
ZARR_ARRAY__WRITE_EMPTY_CHUNKS=True, alternating.    python -m bench.chunk_ab
"""

import json
import os
import shutil
import time
from pathlib import Path

from bench.profile_stages import ARGS, best, find_tensor  # sets torch threads to 1
from compressor.formats.staging import Staging
from compressor.stages.compress import CompressJob, compress_chunk
from compressor.stages.ingest import IngestJob, ingest_chunk
from compressor.stages.plan import TensorPlan
from compressor.stages.thresholds import TensorThresholds


def main() -> None:
    path, info = find_tensor(
        Path("/work/bench-data/llama-1.8g"), "model.layers.0.mlp.gate_proj.weight"
    )
    rows, cols = info.shape
    root = Path(f"/work/bench-data/cc-{os.getpid()}")
    st = Staging(root)
    tp = TensorPlan(0, "w", str(path), info, ARGS, ((0, rows),))
    st.create("in/t00000", (rows, cols), "BF16", rows)
    st.create("out/t00000/packed", (rows, cols // 8), "I32", rows)
    st.create("out/t00000/scale", (rows, cols // 128), "BF16", rows)

    def ing():
        shutil.rmtree(root / "done", ignore_errors=True)
        ingest_chunk(IngestJob(st, tp, 0))

    def job():
        shutil.rmtree(root / "done", ignore_errors=True)
        compress_chunk(CompressJob(st, tp, 0, TensorThresholds()))

    ing()
    t0 = time.process_time()
    res = {"ingest_chunk_ms": best(ing, 5), "compress_chunk_ms": best(job, 5)}
    res["cpu_s"] = round(time.process_time() - t0, 2)
    shutil.rmtree(root)
    print(
        json.dumps(
            {
                "env": {k: v for k, v in os.environ.items() if k.startswith(("MALLOC", "ZARR"))},
                **res,
            }
        )
    )


if __name__ == "__main__":
    main()
