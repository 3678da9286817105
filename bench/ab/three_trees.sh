#!/usr/bin/env bash
# A/B of compressor trees on the 1.8 GB benchmark checkpoint (python -m bench.generate --size-gb 1.8
# --shards 2 /work/bench-data/llama-1.8g). Make the trees first, e.g.
#   git worktree add --detach /work/start 251d7ca; git worktree add --detach /work/mainhead 920fa67
# Each run imports its tree through PYTHONPATH from /tmp (python -m puts the cwd first on sys.path).
set -u
SRC=/work/bench-data/llama-1.8g
PY=/work/main/.venv/bin/python
run() {
  cd /tmp
  rm -rf /work/bench-data/out-$1 /work/bench-data/.out-$1.*; sync
  PYTHONPATH=$2 PREFECT_SERVER_ANALYTICS_ENABLED=false $PY -m compressor.cli compress $SRC /work/bench-data/out-$1 --preset w4a16 --json --quiet --workers 2 > /tmp/ab-$1.json 2>/tmp/ab-$1.err
  echo "$1 $(python3 -c "import json;d=json.load(open('/tmp/ab-$1.json'));t=d['timings_s'];print(' '.join(f'{k}={t[k]}' for k in ('compress','digest','total') if k in t))")"
}
run pre /work/mainhead
for r in 1 2 3 4 5; do
  run start /work/start; run pre /work/mainhead; run head /work/main
done
