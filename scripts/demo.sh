#!/usr/bin/env bash
# The main job, end to end on the embedded default: a local Dask cluster and a temporary local
# Prefect API start by themselves. Compresses a generated Llama-shaped checkpoint with w4a16 as a
# Prefect flow run, then shows the output's inspect table.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-venv.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false
work="${DEMO_DIR:-$PWD/.cache/demo}"
rm -rf "$work/w4a16"
[ -d "$work/llama-tiny" ] || .venv/bin/compressor generate "$work/llama-tiny" --hidden-size 768 --intermediate-size 2048 --layers 4 --vocab-size 4096 --shard-mb 16
.venv/bin/compressor compress "$work/llama-tiny" "$work/w4a16" --preset w4a16 --prefect
.venv/bin/compressor inspect "$work/w4a16" --limit 12
