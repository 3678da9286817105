"""Defaults shared by the code, the infra manifests and their tests (one place to change them)."""

from __future__ import annotations

__all__ = [
    "CHUNK_MB",
    "DASK_DASHBOARD_PORT",
    "DASK_SCHEDULER_PORT",
    "DEPLOYMENT_NAME",
    "FLOW_NAME",
    "MAX_SHARD_MB",
    "PREFECT_API_PORT",
    "SERVE_DEPLOYMENT_NAME",
    "WORK_POOL",
]

DASK_SCHEDULER_PORT = 8786
DASK_DASHBOARD_PORT = 8787
PREFECT_API_PORT = 4200
WORK_POOL = "compress-pool"
FLOW_NAME = "compress-checkpoint"
DEPLOYMENT_NAME = "compress-checkpoint"  # prefect.yaml's, registered with `prefect deploy`
# `compressor serve`'s: a name of its own, so `prefect deploy` never silently replaces it
SERVE_DEPLOYMENT_NAME = "compress-checkpoint-served"

# A chunk is a block of whole rows of one tensor of about this many input bytes. Tens of MB keeps
# per-task overhead small next to the work while bounding worker memory (a few chunks at a time).
CHUNK_MB = 32
# Output shards are cut at about this size, like transformers' save_pretrained default.
MAX_SHARD_MB = 5 * 1024
