"""GPTQ's compress stage on 1 and 2 workers: the stage's own seconds from each run's report.

    python -m bench.gptq_scaling [--model smollm2] [--rounds 3] [--samples 8]

Runs `compressor compress SRC DST --preset w4a16 --method gptq --calibration TOKENS --workers N`
for N = 1 and 2, alternating, `--rounds` times each, and reads `timings_s.compress` from the
report: the stage where GPTQ's column loop runs (calibration, which precedes it, is timed
separately and does not depend on the stage being measured). Also checks that the outputs are
byte-identical. Writes bench/results/gptq-scaling.json. Run it on a quiet machine: the figure is
a ratio of two CPU-bound times on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from bench.calibrated import CAL_TEXT, _compressor

RESULTS = Path(__file__).parent / "results" / "gptq-scaling.json"


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--samples", type=int, default=8)
    a = p.parse_args()
    from compressor.calibration.samples import load_samples

    exe = _compressor()
    fetched = subprocess.run([exe, "fetch", a.model], check=True, capture_output=True, text=True)
    src = Path(fetched.stdout.strip().splitlines()[-1])
    runs: dict[int, list[dict]] = {1: [], 2: []}
    digests: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens.npy"
        np.save(tokens, load_samples(CAL_TEXT, src, a.samples, 512).tokens)
        for r in range(a.rounds):
            for workers in (1, 2):
                dst = Path(tmp) / f"w{workers}-r{r}"
                cmd = [
                    exe, "compress", str(src), str(dst), "--preset", "w4a16", "--method", "gptq",
                    "--calibration", str(tokens), "--calibration-samples", str(a.samples),
                    "--workers", str(workers), "--json", "--quiet",
                ]  # fmt: skip
                done = subprocess.run(cmd, check=True, capture_output=True, text=True)
                report = json.loads(done.stdout)
                timings = report["timings_s"]
                runs[workers].append(timings)
                digests.add(_digest(dst))
                shutil.rmtree(dst)
                print(workers, "workers: compress", timings["compress"], "s", flush=True)
    median = {w: statistics.median(t["compress"] for t in runs[w]) for w in runs}
    result = {
        "model": a.model,
        "samples": a.samples,
        "compress_s": {w: [t["compress"] for t in runs[w]] for w in runs},
        "calibrate_s": {w: [t.get("calibrate") for t in runs[w]] for w in runs},
        "speedup_median": round(median[1] / median[2], 2),
        "identical_outputs": len(digests) == 1,
    }
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
