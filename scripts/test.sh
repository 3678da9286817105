#!/usr/bin/env bash
# Install what the tests need into .venv, then lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup-venv.sh test,eval
# vLLM's CPU build in .venv-vllm/ for tests/serving (vLLM as the judge of our outputs).
./scripts/setup-vllm.sh
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.cache/prefect}"
mkdir -p "$PREFECT_HOME"  # Prefect creates only the last level itself
.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/python -m pytest -q "$@"
