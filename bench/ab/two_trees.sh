#!/usr/bin/env bash
# A/B of compressor trees on the 1.8 GB benchmark checkpoint (python -m bench.generate --size-gb 1.8
# --shards 2 /work/bench-data/llama-1.8g). Make the trees first, e.g.
#   git worktree add --detach /work/start 251d7ca; git worktree add --detach /work/mainhead 920fa67
# Each run imports its tree through PYTHONPATH from /tmp (python -m puts the cwd first on sys.path).
# A/B: compress wall time of the session-start code vs HEAD on the 1.8 GB checkpoint, alternating.
set -u
SRC=/work/bench-data/llama-1.8g
PY=/work/main/.venv/bin/python
run() {  # $1 label  $2 tree
  cd /tmp
  rm -rf /work/bench-data/out-$1 /work/bench-data/.out-$1.*; sync
  local t0=$(date +%s.%N)
  PYTHONPATH=$2 PREFECT_SERVER_ANALYTICS_ENABLED=false $PY -m compressor.cli compress $SRC /work/bench-data/out-$1 --preset w4a16 --json --quiet --workers 2 > /tmp/ab-$1.json 2>/tmp/ab-$1.err
  local rc=$?
  local t1=$(date +%s.%N)
  echo "$1 rc=$rc wall=$(echo "$t1 - $t0" | bc) $(python3 -c "import json;d=json.load(open('/tmp/ab-$1.json'));t=d['timings_s'];print({k:t[k] for k in ('compress','digest','write','publish','total') if k in t})" 2>/dev/null)"
}
run start /work/start; run head /work/main   # warm-up (numba caches, page cache)
for r in 1 2 3; do
  if [ $((r % 2)) -eq 1 ]; then run start /work/start; run head /work/main; else run head /work/main; run start /work/start; fi
done
sha256sum /work/bench-data/out-start/model*.safetensors /work/bench-data/out-head/model*.safetensors
