"""The rule that a run never writes where it reads, checked before any work.

A run reads its inputs (the source checkpoint, pruning's side inputs) and writes its outputs (the
destination, the staging store, a temporary directory). An output that equals, contains or lies
inside an input could destroy it (`--overwrite` replaces the destination, staging is removed after
success), so every such pair is refused up front. Local paths are compared after resolving
symlinks and `..`, then again by identity, (st_dev, st_ino): a directory reached through a bind
mount or a second name, and a file of an existing output that is a hard link to an input file,
are the same object whatever their names. An input's symlinks count as inputs too (a Hugging
Face hub snapshot's shards are links into the repository's `blobs/`). URLs (fsspec) are compared
as strings: aliasing on an object store is not visible from here.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from compressor.errors import OutputError
from compressor.formats import storage

__all__ = ["Overlap", "check_disjoint", "check_parent_writable", "overlap"]

_Identity = tuple[int, int]


@dataclass(frozen=True)
class Overlap:
    """How an output overlaps an input.

    `kind`: "equal", "inside" (the output lies inside the input), "contains" (the input lies
    inside the output) or "hard link" (a file of the existing output is an input file under
    another name). `via`: the path that matched when it is not the input as given (a link
    target of the input, or the hard-linked output file).
    """

    kind: Literal["equal", "inside", "contains", "hard link"]
    via: str | None = None


def check_disjoint(
    inputs: Mapping[str, str | os.PathLike[str]],
    outputs: Mapping[str, str | os.PathLike[str]],
    may_contain: Collection[str] = (),
) -> None:
    """Raise `OutputError` (naming the output) if any output overlaps any input.

    Keys describe the paths for the message ("the source checkpoint", "the destination").
    Outputs named in `may_contain` may hold an input: they are only written inside a fresh
    subdirectory of their own (a `--staging` directory holds `<staging>/<run key>/`).
    """
    for out_what, out_path in outputs.items():
        for in_what, in_path in inputs.items():
            found = overlap(os.fspath(in_path), os.fspath(out_path))
            if found is None or (found.kind == "contains" and out_what in may_contain):
                continue
            linked = f"{found.via}, which {in_what} links to"
            if found.kind == "hard link":
                message = f"{out_what} holds {found.via}, a hard link to a file of {in_what}"
            elif found.kind == "equal":
                message = f"{out_what} is {linked}" if found.via else f"{out_what} is {in_what}"
            elif found.kind == "inside":
                message = f"{out_what} lies inside {linked if found.via else in_what}"
            else:
                message = (
                    f"{out_what} contains {linked}"
                    if found.via
                    else f"{in_what} lies inside {out_what}"
                )
            hint = (
                f"choose another {out_what.removeprefix('the ')}, or remove that file from it"
                if found.kind == "hard link"
                else f"choose {_a(out_what)} that neither lies inside nor contains {in_what}"
            )
            raise OutputError(
                message, path=os.fspath(out_path), hint=f"{hint}; inputs are never modified"
            )


def overlap(source: str, output: str) -> Overlap | None:
    """How `output` overlaps `source` (a file or directory), or None when they are disjoint."""
    if storage.is_url(source) or storage.is_url(output):
        src_text = storage.local_path(source).rstrip("/")
        out_text = storage.local_path(output).rstrip("/")
        if src_text == out_text:
            return Overlap("equal")
        if out_text.startswith(src_text + "/"):
            return Overlap("inside")
        if src_text.startswith(out_text + "/"):
            return Overlap("contains")
        return None
    given = _resolve(Path(storage.local_path(source)))
    out = _resolve(Path(storage.local_path(output)))
    sources: list[tuple[Path, str | None]] = [
        (given, None),
        *((t, str(t)) for t in _link_targets(given)),
    ]
    for src, via in sources:
        if out == src or _same(out, src):
            return Overlap("equal", via)
    for src, via in sources:
        if out.is_relative_to(src) or _identity(src) in _ancestor_identities(out):
            return Overlap("inside", via)
        if src.is_relative_to(out) or _identity(out) in _ancestor_identities(src):
            return Overlap("contains", via)
    shared = _shared_file(given, out)
    return Overlap("hard link", shared) if shared else None


def check_parent_writable(path: str | os.PathLike[str], what: str = "the destination") -> None:
    """Raise `OutputError` unless a run can create `path` and its temporary siblings: the
    nearest existing ancestor of its parent is a directory in which a file can be created.

    The probe creates and removes a file rather than asking `os.access`, which says yes to
    root on a read-only mount or in /proc. URLs are not checked here.
    """
    text = os.fspath(path)
    if storage.is_url(text):
        return
    parent = Path(storage.local_path(text)).absolute().parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(
            f"cannot create {what}: {parent} is not a directory",
            path=text,
            hint=f"choose {_a(what)} whose parent is a directory",
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".compressor-probe-", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(
            f"cannot create {what}: {parent} is not writable ({e.strerror or e})",
            path=text,
            hint=f"choose {_a(what)} in a directory you can write to",
        ) from e


def _a(what: str) -> str:
    """For hints: "the destination" becomes "a destination"."""
    return "a " + what.removeprefix("the ")


def _resolve(path: Path) -> Path:
    """`path` with links and `..` resolved; a link loop leaves the absolute path."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def _identity(path: Path) -> _Identity | None:
    try:
        st = path.stat()
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _same(a: Path, b: Path) -> bool:
    ia = _identity(a)
    return ia is not None and ia == _identity(b)


def _ancestor_identities(path: Path) -> set[_Identity | None]:
    """Identities of `path` and every existing ancestor (None never matches: it is removed)."""
    found = {_identity(p) for p in (path, *path.parents)}
    found.discard(None)
    return found


def _files(root: Path, follow: bool) -> Iterator[Path]:
    """Every file under `root` (or `root` itself when it is a file); directory links are not
    followed (walking one could leave the tree or loop)."""
    if root.is_file() if follow else (root.is_file() and not root.is_symlink()):
        yield root
        return
    if not root.is_dir() or root.is_symlink():
        return
    for directory, _, names in os.walk(root):
        for name in names:
            yield Path(directory, name)


def _link_targets(root: Path) -> list[Path]:
    """Where the symlinks inside an input directory point (resolved): inputs too."""
    if not root.is_dir():
        return []
    found = []
    for directory, dirs, names in os.walk(root):
        for name in (*dirs, *names):
            p = Path(directory, name)
            if p.is_symlink():
                try:
                    found.append(p.resolve())
                except (OSError, RuntimeError):  # a link loop (RuntimeError before 3.13)
                    continue
    return found


def _shared_file(source: Path, output: Path) -> str | None:
    """The name (relative to `output`) of an existing output file that is a hard link to (the
    same inode as) a file of the source, or None."""
    if not output.exists():
        return None
    out_files: dict[_Identity, Path] = {}
    for p in _files(output, follow=False):
        try:
            st = p.lstat()
        except OSError:
            continue
        if not p.is_symlink():
            out_files[st.st_dev, st.st_ino] = p
    if not out_files:
        return None
    for p in _files(source, follow=True):
        ident = _identity(p)
        found = out_files.get(ident) if ident is not None else None
        if found is not None:
            return str(found.relative_to(output)) if found != output else found.name
    return None
