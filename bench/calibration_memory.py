"""Peak memory of the calibration stage, against the number of decoder layers.

    python -m bench.calibration_memory SRC TOKENS.npy [--samples 8] [--seq-len 256]

Runs plan → ingest → calibrate of `compressor compress SRC … --method gptq --calibration
TOKENS.npy` serially in this process (the work one calibration shard does on a worker) and
prints, as one JSON line, the process's peak RSS before and after the stage, the checkpoint's
bytes, and one decoder layer's float32 bytes. Generate checkpoints that differ only in depth
(`compressor generate DIR --layers N --hidden-size 2048 --intermediate-size 5632 --vocab-size
32000`) to see that the peak follows one layer, not the model.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("src", type=Path)
    p.add_argument("tokens", type=Path)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    a = p.parse_args()

    from compressor.config import build_config
    from compressor.pipeline import Pipeline
    from compressor.stages.executor import SerialExecutor

    work = Path(tempfile.mkdtemp(prefix="calmem-"))
    try:
        calibration = {"path": str(a.tokens), "samples": a.samples, "seq_len": a.seq_len}
        config = build_config(
            str(a.src), str(work / "out"), rounding="gptq", calibration=calibration, workers=0
        )
        pipe = Pipeline(config)
        pipe.make_plan()
        executor = SerialExecutor()
        pipe.ingest(executor)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        pipe.calibrate(executor)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        layer = sum(
            t.info.numel * 4 for t in pipe.plan.tensors if t.name.startswith("model.layers.0.")
        )
        cfg = json.loads((a.src / "config.json").read_text())
        print(
            json.dumps(
                {
                    "layers": cfg["num_hidden_layers"],
                    "checkpoint_bytes": pipe.plan.checkpoint.total_bytes,
                    "layer_float32_bytes": layer,
                    "peak_rss_before_calibrate": before,
                    "peak_rss_after_calibrate": after,
                    "calibrate_s": pipe.timings["calibrate"],
                    "samples": a.samples,
                    "seq_len": a.seq_len,
                }
            )
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
