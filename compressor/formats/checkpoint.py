"""A Hugging Face checkpoint on disk: which shards, which tensors where, which other files.

Reading a checkpoint touches only headers (a few KB per shard); every inconsistency is reported
before any heavy work, naming the file and tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, replace
from pathlib import Path

from compressor.errors import InputError
from compressor.formats import storage
from compressor.formats.safetensors_io import SafetensorsHeader, TensorInfo, read_header

__all__ = ["INDEX_NAME", "Checkpoint", "open_checkpoint"]

INDEX_NAME = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Files of the input never copied to the output: weights are rewritten, the index regenerated.
_NOT_COPIED_SUFFIXES = (".safetensors", *_PICKLE_SUFFIXES)
# Our own report and manifest (an input that is itself an output of this tool): each output
# writes its own, and a carried one would describe the input's files, not the output's.
_OWN_FILES = ("manifest.json", "compression.json")
# Hugging Face hub cache stores: <cache>/models--org--name/{blobs,snapshots,refs}.
_HUB_STORE_PREFIXES = ("models--", "datasets--", "spaces--")


@dataclass(frozen=True)
class Checkpoint:
    """Headers of every shard of a checkpoint and the files to carry along.

    `tensors` maps each tensor name to (shard path, TensorInfo); names are unique across shards.
    `extra_files` are the non-weight files (config, tokenizer, generation config) relative to
    `root`, copied to the output as they are.
    """

    root: Path
    shards: tuple[SafetensorsHeader, ...]
    tensors: dict[str, tuple[str, TensorInfo]]
    extra_files: tuple[str, ...]
    config: dict | None
    url: str | None = None
    """The root as an fsspec URL when the checkpoint is not local (`root` is then only its
    path part, for messages); shard paths in `tensors` are URLs too."""

    @property
    def location(self) -> str:
        """The root as given: a URL, or the local directory."""
        return self.url if self.url is not None else str(self.root)

    @property
    def total_bytes(self) -> int:
        return sum(info.nbytes for _, info in self.tensors.values())

    def fingerprint(self) -> str:
        """Identity of the input: shard names, sizes, modification times and header digests.

        Cheap (no data read) and changes whenever a shard is rewritten, which is what resume needs
        to notice an input that changed between a crash and a rerun.
        """
        h = hashlib.sha256()
        for shard in self.shards:
            if storage.is_url(shard.path):  # the object's ETag (else its mtime)
                size, version = storage.size_and_version(shard.path)
                h.update(storage.name(shard.path).encode())
                h.update(f":{size}:{version}:".encode())
            else:
                stat = os.stat(shard.path)
                h.update(Path(shard.path).name.encode())
                h.update(f":{stat.st_size}:{stat.st_mtime_ns}:".encode())
            for name, info in shard.tensors.items():
                h.update(f"{name}|{info.dtype}|{info.shape}|{info.start}|{info.end};".encode())
        return h.hexdigest()[:16]


def open_checkpoint(source: str | Path) -> Checkpoint:
    """Read and cross-check a checkpoint directory (or a single .safetensors file): a local
    path or an fsspec URL (``s3://bucket/model``, see `storage`)."""
    if storage.is_url(source):
        return _open_url_checkpoint(str(source))
    path = Path(storage.local_path(source))
    if not path.exists():
        raise InputError("does not exist", path=str(path), hint="check the input path")
    if path.is_file():
        if path.suffix in _PICKLE_SUFFIXES:
            raise _pickle_refusal(path)
        if path.suffix != ".safetensors":
            raise InputError(
                "not a .safetensors file", path=str(path), hint="pass a checkpoint directory"
            )
        header = read_header(path)
        return _assemble(path.parent, [header], extra=(), config=None)

    index_path = path / INDEX_NAME
    roots = _link_roots(path)
    shard_paths: list[Path]
    shard_names: list[str] = []
    weight_map: dict[str, str] | None = None
    if index_path.exists():
        _check_link(path, INDEX_NAME, roots)
        weight_map = _read_index(index_path)
        shard_names = sorted({_index_entry(index_path, v) for v in weight_map.values()})
        shard_paths = []
        for file_name in shard_names:
            # The name must stay inside (`_index_entry` normalized it); where a link leads is
            # `_check_link`'s question.
            if Path(file_name).is_absolute() or file_name.partition("/")[0] == "..":
                raise InputError(
                    f"the index names {file_name!r}, which lies outside the checkpoint",
                    path=str(index_path),
                    hint="index file names must be relative paths inside the checkpoint directory",
                )
            try:
                exists = (path / file_name).is_file()
            except OSError as e:
                raise InputError(
                    f"the index names {file_name!r}, which cannot be opened: {e.strerror or e}",
                    path=str(index_path),
                    hint="index file names must be relative paths inside the checkpoint directory",
                ) from e
            if not exists:
                raise InputError(
                    f"the index names shard {file_name!r}, which is missing",
                    path=str(index_path),
                    hint="copy the missing shard or fix the index",
                )
            _check_link(path, file_name, roots)
            shard_paths.append(path / file_name)
    else:
        shard_paths = sorted(path.glob("*.safetensors"))
        for shard_path in shard_paths:
            _check_link(path, shard_path.name, roots)
    if not shard_paths:
        pickles = [p for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        if pickles:
            raise _pickle_refusal(pickles[0])
        raise InputError(
            "no .safetensors weights found (empty checkpoint)",
            path=str(path),
            hint="point at a Hugging Face checkpoint directory with *.safetensors files",
        )
    headers = [read_header(p) for p in shard_paths]
    if weight_map is not None:
        _check_index(index_path, weight_map, dict(zip(shard_names, headers, strict=True)))
    # Links (a hub-cache snapshot's files) are carried as regular files under their own names.
    extra = tuple(
        sorted(
            rel
            for p in path.rglob("*")
            if p.is_file()
            and p.name != INDEX_NAME
            and p.suffix not in _NOT_COPIED_SUFFIXES
            and (rel := p.relative_to(path).as_posix()) not in _OWN_FILES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
    )
    for rel in extra:
        _check_link(path, rel, roots)
    config = None
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(
                f"config.json is not valid JSON: {e}", path=str(path / "config.json")
            ) from e
        _check_config(config, str(path / "config.json"))
    return _assemble(path, headers, extra=extra, config=config)


def _open_url_checkpoint(url: str) -> Checkpoint:
    """`open_checkpoint` for a URL: the same rules, with listings from fsspec."""
    url = url.rstrip("/")
    root = Path("/" + url.partition("://")[2])
    try:
        if storage.isfile(url):
            suffix = Path(storage.name(url)).suffix
            if suffix in _PICKLE_SUFFIXES:
                raise _pickle_refusal_text(url)
            if suffix != ".safetensors":
                raise InputError("not a .safetensors file", path=url, hint="pass a checkpoint URL")
            header = read_header(url)
            return replace(
                _assemble(root.parent, [header], extra=(), config=None), url=storage.parent(url)
            )
        files = storage.list_files(url)
    except OSError as e:
        raise InputError(
            f"cannot list the checkpoint: {e.strerror or e}",
            path=url,
            hint="check the URL, the credentials and the endpoint (see docs/operations.md, "
            "Storage)",
        ) from e
    if not files:
        raise InputError("does not exist", path=url, hint="check the input URL")
    present = set(files)
    index_url = storage.join(url, INDEX_NAME)
    weight_map: dict[str, str] | None = None
    if INDEX_NAME in present:
        weight_map = _read_index(index_url)
        shard_names = []
        for file_name in sorted({_index_entry(index_url, v) for v in weight_map.values()}):
            parts = file_name.split("/")
            if file_name.startswith("/") or ".." in parts or "://" in file_name:
                raise InputError(
                    f"the index names {file_name!r}, which lies outside the checkpoint",
                    path=index_url,
                    hint="index file names must be relative paths inside the checkpoint directory",
                )
            if file_name not in present:
                raise InputError(
                    f"the index names shard {file_name!r}, which is missing",
                    path=index_url,
                    hint="copy the missing shard or fix the index",
                )
            shard_names.append(file_name)
    else:
        shard_names = [f for f in files if "/" not in f and f.endswith(".safetensors")]
    if not shard_names:
        pickles = [f for f in files if Path(f).suffix in _PICKLE_SUFFIXES]
        if pickles:
            raise _pickle_refusal_text(storage.join(url, pickles[0]))
        raise InputError(
            "no .safetensors weights found (empty checkpoint)",
            path=url,
            hint="point at a Hugging Face checkpoint directory with *.safetensors files",
        )
    headers = [read_header(storage.join(url, f)) for f in shard_names]
    if weight_map is not None:
        _check_index(index_url, weight_map, dict(zip(shard_names, headers, strict=True)))
    extra = tuple(
        f
        for f in files
        if Path(f).name != INDEX_NAME
        and f not in _OWN_FILES
        and Path(f).suffix not in _NOT_COPIED_SUFFIXES
        and not any(part.startswith(".") for part in f.split("/"))
    )
    config = None
    if "config.json" in present:
        config_url = storage.join(url, "config.json")
        try:
            config = json.loads(storage.read_text(config_url))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InputError(f"config.json is not valid JSON: {e}", path=config_url) from e
        except OSError as e:
            raise InputError(f"cannot read config.json: {e}", path=config_url) from e
        _check_config(config, config_url)
    return replace(_assemble(root, headers, extra=extra, config=config), url=url)


def _assemble(
    root: Path, headers: list[SafetensorsHeader], extra: tuple[str, ...], config: dict | None
) -> Checkpoint:
    tensors: dict[str, tuple[str, TensorInfo]] = {}
    for header in headers:
        for name, info in header.tensors.items():
            if name in tensors:
                raise InputError(
                    f"appears in two shards ({Path(tensors[name][0]).name} and "
                    f"{Path(header.path).name})",
                    path=header.path,
                    tensor=name,
                    hint="remove the duplicate; each tensor must be stored once",
                )
            tensors[name] = (header.path, info)
    if not tensors:
        raise InputError(
            "the checkpoint holds no tensors", path=str(root), hint="check the input checkpoint"
        )
    return Checkpoint(
        root=root, shards=tuple(headers), tensors=tensors, extra_files=extra, config=config
    )


def _read_index(index_path: Path | str) -> dict[str, str]:
    try:
        data = json.loads(storage.read_text(index_path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(
            f"cannot parse the index: {e}",
            path=str(index_path),
            hint="restore model.safetensors.index.json from the original checkpoint (or "
            "regenerate it: transformers' save_pretrained writes one)",
        ) from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise InputError(
            "the index has no 'weight_map' object of tensor name → file name",
            path=str(index_path),
            hint="regenerate the index (transformers' save_pretrained writes one)",
        )
    return weight_map


def _check_index(
    index_path: Path | str, weight_map: dict[str, str], by_file: dict[str, SafetensorsHeader]
) -> None:
    """`by_file`: the header of each shard, by its normalized name in the index (a relative
    path: `a/model.safetensors` and `b/model.safetensors` are two shards)."""
    headers = list(by_file.values())
    for name, file_name in weight_map.items():
        header = by_file.get(posixpath.normpath(file_name))
        if header is None or name not in header.tensors:
            raise InputError(
                f"the index places it in {file_name!r}, but that shard does not hold it",
                path=str(index_path),
                tensor=name,
                hint="regenerate the index or restore the shard",
            )
    for header in headers:
        for name in header.tensors:
            if weight_map.get(name) is None:
                raise InputError(
                    "is stored in the shard but missing from the index",
                    path=header.path,
                    tensor=name,
                    hint="regenerate the index",
                )


def _index_entry(index_path: Path | str, file_name: str) -> str:
    """A shard name from the index, normalized (`./a.safetensors` is `a.safetensors`); names no
    file system accepts (a NUL byte, an empty name) are refused here, naming the index."""
    if not file_name or "\x00" in file_name:
        raise InputError(
            f"the index names {file_name!r}, which is not a valid file name",
            path=str(index_path),
            hint="regenerate the index (transformers' save_pretrained writes one)",
        )
    return posixpath.normpath(file_name)


def _link_roots(root: Path) -> tuple[Path, ...]:
    """The directories the files of a local checkpoint may really live in: the checkpoint
    itself and, for a Hugging Face hub-cache snapshot (`models--org--name/snapshots/<rev>/`,
    whose files are links to `../../blobs/<sha256>`), that repository's store."""
    real = root.resolve()
    for d in (real, *real.parents):
        store = d.parent.parent
        if (
            d.parent.name == "snapshots"
            and store.name.startswith(_HUB_STORE_PREFIXES)
            and (store / "blobs").is_dir()
        ):
            return real, store
    return (real,)


def _check_link(root: Path, rel: str, roots: tuple[Path, ...]) -> None:
    """Refuse a file of the checkpoint that is a link leading outside `roots`: a checkpoint
    must not make the tool read (and carry into its output) files from elsewhere."""
    try:
        target = (root / rel).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise InputError(
            f"{rel!r} is a link that cannot be followed: {e}",
            path=str(root / rel),
            hint="replace the link by the file it should point to",
        ) from e
    if any(target.is_relative_to(r) for r in roots):
        return
    raise InputError(
        f"{rel!r} links to {target}, which lies outside the checkpoint",
        path=str(root / rel),
        hint="copy the file into the checkpoint instead of linking it (links may point only "
        "inside the checkpoint, or into the blobs/ of its hub-cache repository)",
    )


def _check_config(config: object, path: str) -> None:
    if not isinstance(config, dict):
        raise InputError(
            f"config.json holds a JSON {type(config).__name__}, not an object",
            path=path,
            hint="restore the model's config.json (a JSON object such as "
            '{"model_type": "llama", ...}), or remove it',
        )


def _pickle_refusal(path: Path) -> InputError:
    return _pickle_refusal_text(str(path))


def _pickle_refusal_text(path: str) -> InputError:
    return InputError(
        "pickle checkpoints (.bin/.pt/.pth) are refused: loading them can run arbitrary code",
        path=path,
        hint="convert to safetensors first, e.g. with transformers: "
        "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True) "
        "in an environment you trust",
    )
