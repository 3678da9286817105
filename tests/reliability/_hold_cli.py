"""The real CLI, held at a known point, for tests that must act on a run in the middle of a stage.

`python tests/reliability/_hold_cli.py ARGS` runs `compressor ARGS` (`compressor.cli.main`, as
`python -m compressor.cli` does) with one change when COMPRESSOR_TEST_HOLD_DIR is set: once a
process has recorded COMPRESSOR_TEST_HOLD_AFTER (default 1) finished chunks of stage
COMPRESSOR_TEST_HOLD_STAGE (default: any stage), every chunk it finishes from then on waits,
after its completion marker is written, until HOLD_DIR/release exists; while it waits,
HOLD_DIR/held-<pid> exists. The change is made at import, so it also reaches the local worker
processes: multiprocessing's spawn imports this file in each of them (as `__mp_main__`).

A test waits for a held-* file, so it knows the run is inside that stage with that many chunks
done and the rest not, and then signals, kills or inspects it: nothing depends on how fast the
machine is. Nothing of this is in the product; without the variable this is the plain CLI.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

HOLD_DIR = os.environ.get("COMPRESSOR_TEST_HOLD_DIR")


def _hold(folder: Path) -> None:
    (folder / f"held-{os.getpid()}").touch()
    while not (folder / "release").exists():
        time.sleep(0.05)  # a SIGINT/SIGTERM of the main thread lands here, as in any wait


def _install(folder: Path) -> None:
    from compressor.formats.staging import Staging

    stage_wanted = os.environ.get("COMPRESSOR_TEST_HOLD_STAGE", "")
    after = int(os.environ.get("COMPRESSOR_TEST_HOLD_AFTER", "1"))
    original = Staging.mark_done
    lock = threading.Lock()
    done = 0

    def mark_done(self: Staging, stage: str, *args: Any, **kwargs: Any) -> None:
        nonlocal done
        original(self, stage, *args, **kwargs)
        if stage_wanted and stage != stage_wanted:
            return
        with lock:
            done += 1
            reached = done >= after
        if reached:
            _hold(folder)

    Staging.mark_done = mark_done  # type: ignore[method-assign]


if HOLD_DIR:
    _install(Path(HOLD_DIR))

if __name__ == "__main__":
    from compressor.cli import main

    sys.argv[0] = "compressor"
    main()
