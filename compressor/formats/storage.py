"""Local paths and fsspec URLs (``s3://``, ``gs://``, ``file://``) behind one small interface.

Local paths keep using the operating system directly (positioned reads on a raw file, `os.stat`,
`os.replace`): nothing here slows them down. Anything with a ``scheme://`` prefix other than
``file://`` goes through fsspec, which picks the filesystem by scheme (s3fs for ``s3://``,
gcsfs for ``gs://``: install the one you need). ``file://PATH`` is treated as the local PATH.

Credentials and endpoints come from each backend's standard configuration, never from our
config: for S3, boto's environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, ``AWS_REGION``, and ``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3`` for an
S3-compatible server such as MinIO), or fsspec's own configuration (``FSSPEC_S3_ENDPOINT_URL``,
``FSSPEC_S3='{"endpoint_url": ...}'`` or a file in ``~/.config/fsspec/``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any, cast

__all__ = [
    "READ_BLOCK_BYTES",
    "UrlPath",
    "as_path",
    "copy_file",
    "create_exclusive",
    "exists",
    "file_size",
    "filesystem",
    "is_url",
    "isdir",
    "isfile",
    "join",
    "list_dir",
    "list_files",
    "local_path",
    "name",
    "open_read",
    "parent",
    "put_file",
    "read_bytes",
    "read_json",
    "read_text",
    "remove",
    "size_and_version",
    "write_bytes",
    "write_text",
]

READ_BLOCK_BYTES = 8 * 1024 * 1024
"""Block size for URL reads. Our reads are exact ranges (a header, a row block), so fsspec's
read-ahead cache is off and each read is one ranged request of exactly the bytes asked for."""


def is_url(path: str | os.PathLike[str]) -> bool:
    """True for ``scheme://…`` other than ``file://`` (those go through fsspec)."""
    text = os.fspath(path)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme != "file" and len(scheme) > 1


def shown(location: str) -> str:
    """A location as reports and manifests show it: a URL as given, a local path absolute."""
    return location if is_url(location) else str(Path(local_path(location)).resolve())


def local_path(path: str | os.PathLike[str]) -> str:
    """`path` as a local path string (``file://`` stripped); URLs are returned unchanged."""
    text = os.fspath(path)
    return text[len("file://") :] if text.startswith("file://") else text


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem for `url` and the path inside it (storage options from the
    backend's standard environment/config). Listing caches are dropped, so every call sees
    what is there now (other processes write the same prefixes)."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def _fs(url: str) -> tuple[Any, str]:
    fs, path = filesystem(url)
    fs.invalidate_cache()
    return fs, path


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """`base` joined with `parts` by "/" (URLs) or as paths (local)."""
    text = os.fspath(base)
    if is_url(text):
        return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(local_path(text), *parts))


def parent(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    if is_url(text):
        scheme, _, rest = text.rstrip("/").partition("://")
        head = rest.rsplit("/", 1)[0] if "/" in rest else rest
        return f"{scheme}://{head}"
    return str(Path(local_path(text)).parent)


def name(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    if is_url(text):
        return text.rstrip("/").rsplit("/", 1)[-1]
    return Path(local_path(text)).name


def open_read(path: str | os.PathLike[str]) -> io.RawIOBase:
    """A binary file for positioned reads (`seek` + `readinto`): an unbuffered OS file locally,
    an fsspec file without read-ahead for URLs. Raises OSError (FileNotFoundError…)."""
    text = os.fspath(path)
    if not is_url(text):
        return open(local_path(text), "rb", buffering=0)
    fs, p = filesystem(text)
    try:
        f = fs.open(p, "rb", block_size=READ_BLOCK_BYTES, cache_type="none")
        return cast(io.RawIOBase, f)
    except OSError:
        raise
    except Exception as e:  # backends raise their own errors for permissions, bad buckets…
        raise OSError(str(e)) from e


def file_size(f: Any) -> int:
    """Size of a file returned by `open_read`."""
    size = getattr(f, "size", None)
    if isinstance(size, int):
        return size
    return os.fstat(f.fileno()).st_size


def exists(path: str | os.PathLike[str]) -> bool:
    text = os.fspath(path)
    if not is_url(text):
        return os.path.exists(local_path(text))
    fs, p = _fs(text)
    return bool(fs.exists(p))


def isfile(path: str | os.PathLike[str]) -> bool:
    text = os.fspath(path)
    if not is_url(text):
        return os.path.isfile(local_path(text))
    fs, p = _fs(text)
    return bool(fs.isfile(p))


def isdir(path: str | os.PathLike[str]) -> bool:
    """A local directory, or a URL prefix under which at least one object exists."""
    text = os.fspath(path)
    if not is_url(text):
        return os.path.isdir(local_path(text))
    fs, p = _fs(text)
    return bool(fs.isdir(p))


def list_files(root: str | os.PathLike[str]) -> list[str]:
    """Every file under `root`, as sorted "/"-separated paths relative to it."""
    text = os.fspath(root)
    if not is_url(text):
        base = Path(local_path(text))
        return sorted(p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file())
    fs, p = _fs(text)
    p = p.rstrip("/")
    found = fs.find(p)
    return sorted(f[len(p) + 1 :] for f in found if f.startswith(p + "/"))


def size_and_version(path: str | os.PathLike[str]) -> tuple[int, str]:
    """The file's size and a token that changes when it is rewritten: the modification time
    locally, the object's ETag (else its modification time) for URLs."""
    text = os.fspath(path)
    if not is_url(text):
        st = os.stat(local_path(text))
        return st.st_size, str(st.st_mtime_ns)
    fs, p = _fs(text)
    info = fs.info(p)
    token = info.get("ETag") or info.get("etag") or info.get("LastModified") or info.get("mtime")
    token = token or info.get("updated") or info.get("md5Hash") or ""
    return int(info.get("size") or 0), str(token).strip('"')


def read_text(path: str | os.PathLike[str]) -> str:
    text = os.fspath(path)
    if not is_url(text):
        return Path(local_path(text)).read_text()
    fs, p = filesystem(text)
    with fs.open(p, "rb") as f:
        return f.read().decode("utf-8")  # type: ignore[no-any-return]


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """A whole (small) file's bytes."""
    text = os.fspath(path)
    if not is_url(text):
        return Path(local_path(text)).read_bytes()
    fs, p = filesystem(text)
    return fs.cat_file(p)  # type: ignore[no-any-return]


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """`write_text` for bytes."""
    text = os.fspath(path)
    if not is_url(text):
        target = Path(local_path(text))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return
    fs, p = filesystem(text)
    fs.pipe_file(p, data)


def list_dir(path: str | os.PathLike[str]) -> list[str]:
    """Names of the entries directly under `path` (files and directories/prefixes); [] if it
    does not exist."""
    text = os.fspath(path)
    if not is_url(text):
        folder = Path(local_path(text))
        return sorted(e.name for e in folder.iterdir()) if folder.is_dir() else []
    fs, p = _fs(text)
    try:
        entries = fs.ls(p, detail=False)
    except FileNotFoundError:
        return []
    return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(read_text(path))


def write_text(path: str | os.PathLike[str], data: str) -> None:
    """Write a whole (small) file. Local: parent directories are created. An object store's
    PUT is atomic, so readers see the old object or the new one."""
    text = os.fspath(path)
    if not is_url(text):
        target = Path(local_path(text))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(data)
        return
    fs, p = filesystem(text)
    fs.pipe_file(p, data.encode("utf-8"))


def put_file(local: str | os.PathLike[str], url: str) -> None:
    """Upload (URL) or copy (local) the local file `local` to `url`."""
    if not is_url(url):
        target = Path(local_path(url))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(local, target)
        return
    fs, p = filesystem(url)
    fs.put_file(os.fspath(local), p)


def copy_file(source: str, target: str) -> None:
    """Copy one file between any two locations (server-side within one object store)."""
    if not is_url(source):
        put_file(local_path(source), target)
        return
    fs, p = filesystem(source)
    if is_url(target):
        fs2, p2 = filesystem(target)
        if fs2 is fs:
            fs.copy(p, p2)
            return
        with fs.open(p, "rb") as fin, fs2.open(p2, "wb") as fout:
            shutil.copyfileobj(fin, fout, READ_BLOCK_BYTES)
        return
    Path(local_path(target)).parent.mkdir(parents=True, exist_ok=True)
    fs.get_file(p, local_path(target))


def remove(path: str | os.PathLike[str]) -> None:
    """Remove a file, a directory tree or every object under a prefix; missing is fine."""
    text = os.fspath(path)
    if not is_url(text):
        target = Path(local_path(text))
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
        return
    fs, p = _fs(text)
    with contextlib.suppress(FileNotFoundError):
        fs.rm(p, recursive=True)


def create_exclusive(url: str, data: str) -> bool | None:
    """Create `url` only if it does not exist: True if created, False if it already existed,
    None if the backend cannot create conditionally (the caller then goes without a lock).
    Uses S3's conditional write (``If-None-Match: *``), which AWS S3, MinIO and recent moto
    honour."""
    fs, p = filesystem(url)
    if type(fs).__name__ != "S3FileSystem":
        return None
    try:
        fs.pipe_file(p, data.encode("utf-8"), IfNoneMatch="*")
    except FileExistsError:
        return False
    except OSError as e:
        if "PreconditionFailed" in str(e) or "412" in str(e):
            return False
        raise
    except (TypeError, ValueError, NotImplementedError):
        return None
    return True


class UrlPath:
    """The few `pathlib.Path` operations the stages use on a directory, for a URL prefix:
    ``/``, `parent`, `name`, `exists`, `is_dir`, `mkdir` (a no-op: object stores have no
    directories). `str()` gives the URL; `Path(...)` of it would mangle ``//``, so code that may
    get one passes `str(root)` to the helpers here."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def __truediv__(self, part: str) -> UrlPath:
        return UrlPath(join(self.url, str(part)))

    def __str__(self) -> str:
        return self.url

    def __fspath__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"UrlPath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UrlPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __reduce__(self) -> tuple[Any, ...]:
        return (UrlPath, (self.url,))

    @property
    def parent(self) -> UrlPath:
        return UrlPath(parent(self.url))

    @property
    def name(self) -> str:
        return name(self.url)

    def exists(self) -> bool:
        return exists(self.url)

    def is_dir(self) -> bool:
        return isdir(self.url)

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        return None


def as_path(location: str | os.PathLike[str]) -> Path | UrlPath:
    """A `Path` for a local location (``file://`` stripped), a `UrlPath` for a URL."""
    text = os.fspath(location)
    return UrlPath(text) if is_url(text) else Path(local_path(text))
