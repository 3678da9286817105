"""Compression history per model, kept in Prefect: one keyed table artifact per model,
`compression-history-<model>`, whose latest version holds one row per run (the Artifacts page
shows it, and Prefect keeps every earlier version under the same key).

Each flow run that publishes reads the key's latest table, appends its row and creates the next
version; `compressor history MODEL` reads the latest table back through the API.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path
from typing import Any

__all__ = ["history_key", "read_history", "record_history", "run_row"]

_KEY_CHARS = re.compile(r"[^a-z0-9-]+")


def history_key(model: str) -> str:
    """The artifact key of a model (Prefect keys: lowercase letters, digits and dashes)."""
    name = Path(model.rstrip("/")).name or model
    return "compression-history-" + (_KEY_CHARS.sub("-", name.lower()).strip("-") or "model")


def run_row(config: Any, report: dict[str, Any], evaluation: dict[str, Any] | None) -> dict:
    """One history row: date, preset, ratio, stored bits per quantized weight, ΔPPL when the
    run evaluated, wall time and input GB/s."""
    quantized = [t for t in report["tensors"] if t["scheme"] != "copy"]
    weights = sum(math.prod(t["shape"]) for t in quantized)
    bits = 8 * sum(t["output_bytes"] for t in quantized) / weights if weights else None
    wall = report["timings_s"].get("total") or sum(report["timings_s"].values())
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "preset": config.preset,
        "ratio": round(report["ratio"], 3),
        "bits_per_weight": None if bits is None else round(bits, 3),
        "delta_ppl_pct": None if evaluation is None else round(evaluation["delta_ppl_pct"], 2),
        "wall_s": round(wall, 1),
        "gb_per_s": round(report["input_bytes"] / 1e9 / wall, 3) if wall else None,
        "destination": report["destination"],
    }


def read_history(model: str) -> list[dict[str, Any]]:
    """The rows of the model's latest history table ([] when it has none)."""
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactCollectionFilter,
        ArtifactCollectionFilterKey,
    )

    with get_client(sync_client=True) as client:
        latest = client.read_latest_artifacts(
            artifact_filter=ArtifactCollectionFilter(
                key=ArtifactCollectionFilterKey(any_=[history_key(model)])
            )
        )
    if not latest:
        return []
    data = latest[0].data
    rows = json.loads(data) if isinstance(data, str) else data
    return list(rows or [])


def record_history(model: str, row: dict[str, Any]) -> list[dict[str, Any]]:
    """Append `row` to the model's history (a new version of its keyed table artifact)."""
    from prefect.artifacts import create_table_artifact

    rows = [*read_history(model), row]
    create_table_artifact(
        key=history_key(model),
        table=rows,
        description=f"Compression history of {Path(model).name or model}: one row per run",
    )
    return rows
