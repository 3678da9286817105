"""Compress every new checkpoint that lands under a folder or an object-store prefix.

A training job writes `<root>/step-12000/`; the `watch-checkpoints` flow, on a schedule (or
started by an event, see docs/operations.md), finds every complete checkpoint directly under
`root` and runs the compress flow for it and each preset, into
`<destination_root>/<checkpoint>-<preset>`, as subflow runs.

- **Complete** means `open_checkpoint` accepts it: config.json, every shard the index names,
  each as long as its header says. A checkpoint still being written fails that and is left for
  the next pass (the compress run's own input stamps catch one that changes during its run).
- **Exactly once**: a compress run whose destination already holds the output of this exact
  input and configuration is a no-op ("up to date": the run key covers the input files' stamps,
  the tool version and every byte-changing option), so a repeated event or pass never compresses
  a checkpoint twice, and a pass that overlaps a running compression waits on its lock, then
  finds it up to date.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.states import State

from compressor.config import RunConfig
from compressor.errors import CompressorError
from compressor.formats import storage
from compressor.formats.checkpoint import open_checkpoint

__all__ = ["landed_checkpoints", "watch_checkpoints"]


def landed_checkpoints(root: str) -> tuple[list[str], dict[str, str]]:
    """The complete checkpoints directly under `root` (local folder or URL prefix), and for
    the others found there, why each is not ready yet."""
    ready, waiting = [], {}
    for entry in storage.list_dir(root):
        location = storage.join(root, entry)
        if not storage.isdir(location) or not storage.exists(storage.join(location, "config.json")):
            continue
        try:
            open_checkpoint(location)
        except CompressorError as e:
            waiting[location] = str(e).splitlines()[0]
            continue
        ready.append(location)
    return ready, waiting


@flow(name="watch-checkpoints", log_prints=True)
def watch_checkpoints(
    root: str,
    destination_root: str,
    presets: list[str] | None = None,
    workers: int = 0,
    scheduler: str | None = None,
) -> list[dict[str, Any]]:
    """Compress every complete checkpoint under `root` with each preset (default w4a16) into
    `destination_root/<name>-<preset>`; outputs already up to date are left as they are."""
    logger = get_run_logger()
    ready, waiting = landed_checkpoints(root)
    for location, why in waiting.items():
        logger.info("not ready yet, next pass: %s (%s)", location, why)
    from flows.compress import compress_checkpoint

    done = []
    for location in ready:
        for preset in presets or ["w4a16"]:
            destination = storage.join(destination_root, f"{storage.name(location)}-{preset}")
            config = RunConfig(
                source=location,
                destination=destination,
                preset=preset,  # type: ignore[arg-type]
                workers=workers,
                scheduler=scheduler,
            )
            state: State[Any] = compress_checkpoint(config=config, return_state=True)  # type: ignore[assignment]
            record = {"source": location, "destination": destination, "preset": preset}
            if state.is_failed():  # one bad checkpoint does not stop the others
                logger.error("%s → %s failed: %s", location, destination, state.message)
                done.append({**record, "outcome": "failed", "message": state.message})
                continue
            report = state.result()
            up_to_date = any(n.startswith("up to date") for n in report.get("notes", []))
            outcome = "up to date" if up_to_date else "compressed"
            logger.info("%s → %s: %s", location, destination, outcome)
            done.append({**record, "outcome": outcome})
    return done
