"""Digest: the sha256 of every file the output depends on, and the check that none changed.

One job per source file (`Plan.sources`: shards, index, config.json, carried-over files, side
inputs), run on the workers like any chunk: it reads the file once in 8 MiB blocks, then checks
that the file's stamp is still the one the plan took. Its completion marker records digest and
stamp, so a resumed run (same run key, hence same stamps) does not read the file again.

`check_unchanged` is the last gate before publishing: every stamp must still equal the plan's.
Between the plan's stamp and that check no byte of any source changed, so the digests are those
of the bytes every chunk read, and `manifest.json` can record them (formats/identity.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from compressor.errors import InputError
from compressor.formats.identity import SourceFile, changed_files, sha256_of, stamp_of
from compressor.formats.staging import Staging
from compressor.stages.executor import Executor, Progress

__all__ = [
    "STAGE",
    "DigestJob",
    "SourceChanged",
    "check_unchanged",
    "digest_file",
    "digest_sources",
]

STAGE = "digest"
_MARKER_KEY = "sources"


class SourceChanged(InputError):
    """A source file was written while the run read it: nothing is published."""


@dataclass(frozen=True)
class DigestJob:
    staging: Staging
    index: int  # position in Plan.sources (the marker's number)
    file: SourceFile


def digest_file(job: DigestJob) -> tuple[str, str]:
    """(name, sha256) of one source file; idempotent (its marker records the result)."""
    f = job.file
    recorded = job.staging.done(STAGE, _MARKER_KEY, job.index)
    if recorded is not None and recorded.get("name") == f.name and recorded.get("stamp") == f.stamp:
        return f.name, str(recorded["sha256"])
    try:
        digest = sha256_of(f.location)
        now = stamp_of(f.location)
    except OSError as e:
        raise InputError(
            f"cannot be read: {e.strerror or e}",
            path=f.location,
            hint="check that the input is complete and readable, then rerun",
        ) from e
    if now != (f.size, f.stamp):
        raise _changed([f])
    job.staging.mark_done(
        STAGE, _MARKER_KEY, job.index, {"name": f.name, "stamp": f.stamp, "sha256": digest}
    )
    return f.name, digest


def digest_sources(
    sources: Sequence[SourceFile],
    staging: Staging,
    executor: Executor,
    progress: Progress | None = None,
) -> dict[str, str]:
    """sha256 of every source file, by name (largest files first, so they overlap the rest)."""
    jobs = [DigestJob(staging, k, f) for k, f in enumerate(sources)]
    jobs.sort(key=lambda j: -j.file.size)
    return dict(executor.map(digest_file, jobs, STAGE, progress))


def check_unchanged(sources: Sequence[SourceFile]) -> None:
    """Raise `SourceChanged` if any source file's stamp moved since the plan."""
    names = set(changed_files(sources))
    changed = [f for f in sources if f.name in names]
    if changed:
        raise _changed(changed)


def _changed(files: Sequence[SourceFile]) -> SourceChanged:
    shown = ", ".join(f.name for f in files[:5]) + (
        f" and {len(files) - 5} more" if len(files) > 5 else ""
    )
    return SourceChanged(
        f"the input changed while this run read it ({shown}); nothing was published, because the "
        "output would mix bytes of the old and the new input",
        path=files[0].location,
        hint="rerun the same command once the input is no longer being written: the new input "
        "gets a new run key, so no chunk of the old one is reused",
    )
