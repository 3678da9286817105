"""Verify a published checkpoint: its manifest, its own consistency, its quantization config.

`compressor verify DST` runs `verify_checkpoint`, which reads files only (no Dask, no Prefect)
and collects every problem it finds, each naming the file:

- `manifest.json` exists and is ``{"version": 1, "files": {relative path: {"sha256", "size"}}}``
  with paths inside the directory;
- every listed file exists as a regular file with its size and sha256 (a flipped byte, a
  truncated, replaced or deleted file);
- no file exists that the manifest does not list (`manifest.json` itself excepted);
- index ↔ shards ↔ headers: every safetensors header is valid, the index names only shards inside
  the directory that exist, every index entry's shard holds that tensor, every tensor of every
  shard is in the index, every shard is in the index, no tensor is stored twice, and several
  shards come with an index;
- `config.json` parses, and its `quantization_config` (absent for a dense output) too:
  compressed-tensors' own pydantic model (`QuantizationConfig.model_validate`) when that package
  is installed, structural checks always (they also cover our `minmax-float-offset`,
  `sparse-bitmask` and `codebook` blocks);
- every packed module has its scale and shape (and zero point or minimum where its scheme needs
  one) with the dtypes and shapes its config group implies, no dense weight beside it, and every
  module a config group names is packed and none that `ignore` names is;
- every codebook module (NF4: codes, absmax, shape; k-means: indices, codebook, shape) has the
  dtypes and shapes its config group implies, a finite absmax/codebook, and is declared, and
  every declared one exists;
- every sparse-bitmask module has values, bitmask, row offsets and shape that agree with each
  other (bits kept per row = row offset steps, offsets end at the number of values) and is
  declared in `quantization_config`, and every declared one exists.

Integrity, not authenticity: whoever can rewrite the files can rewrite the manifest too. Keep a
copy of the manifest's own sha256 elsewhere when that matters.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from compressor import schemes
from compressor.errors import CompressorError, InputError
from compressor.formats.checkpoint import INDEX_NAME, Checkpoint, open_checkpoint
from compressor.formats.compressed import CompressedModule, quantized_modules
from compressor.formats.identity import checkpoint_files, sha256_of, stamp_of
from compressor.formats.quant_config import OUR_TOOL, is_ours
from compressor.formats.safetensors_io import read_tensor

__all__ = ["MANIFEST_NAME", "REPORT_NAME", "Problem", "VerifyResult", "verify_checkpoint"]

MANIFEST_NAME = "manifest.json"
"""sha256 and size of every other file of a published checkpoint; written last."""
REPORT_NAME = "compression.json"
"""Our report: resolved config, input fingerprint, tool version, per-tensor figures."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


@dataclass
class VerifyResult:
    root: Path
    files: int = 0  # files whose size and sha256 matched the manifest
    tensors: int = 0
    modules: int = 0  # compressed (packed or bitmask) modules whose parts were checked
    source_files: int = 0  # input files whose size and sha256 matched the manifest's record
    source_mismatches: int = 0  # problems that say the output was not made from `source`
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, rel: str | Path | None, message: str) -> None:
        path = self.root / rel if rel else self.root
        self.problems.append(Problem(str(path), message))


def verify_checkpoint(path: str | Path, source: str | Path | None = None) -> VerifyResult:
    """Check a published checkpoint directory; the result lists every problem found.

    With `source`, also prove that the output was made from exactly that input: every file the
    run read (shards, index, config.json, carried-over files) must be in SRC with the size and
    sha256 that the manifest's "source" section records, and SRC must hold no other such file.

    Raises:
        InputError: `path` is not a directory (nothing to verify), or `source` cannot be opened.
    """
    root = Path(path)
    if not root.is_dir():
        raise InputError(
            "does not exist" if not root.exists() else "is not a directory",
            path=str(root),
            hint="pass the output directory that `compressor compress` wrote",
        )
    result = VerifyResult(root)
    _check_manifest(result)
    checkpoint = _check_structure(result)
    qc = _check_quantization_config(result)
    if checkpoint is not None and qc is not None:
        _check_modules(result, checkpoint, qc)
    _check_report(result)
    if source is not None:
        _check_source(result, str(source))
    return result


# -- manifest ---------------------------------------------------------------------------------
def _safe_relative(rel: str) -> bool:
    p = PurePosixPath(rel)
    return bool(rel) and not p.is_absolute() and ".." not in p.parts and "\\" not in rel


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def _read_manifest(result: VerifyResult) -> dict[str, dict[str, Any]] | None:
    manifest = result.root / MANIFEST_NAME
    if not manifest.is_file() or manifest.is_symlink():
        result.add(
            MANIFEST_NAME,
            "is missing, so no file can be checked against it (it is written last: the "
            "checkpoint may be incomplete)",
        )
        return None
    try:
        data = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        result.add(MANIFEST_NAME, f"cannot be parsed: {e}")
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if (
        not isinstance(data, dict)
        or data.get("version") != 1
        or not isinstance(files, dict)
        or not all(
            isinstance(entry, dict)
            and isinstance(entry.get("sha256"), str)
            and type(entry.get("size")) is int
            for entry in files.values()
        )
    ):
        result.add(
            MANIFEST_NAME,
            'is not {"version": 1, "files": {path: {"sha256": hex, "size": int}}}',
        )
        return None
    return files


def _check_manifest(result: VerifyResult) -> None:
    root = result.root
    files = _read_manifest(result)
    if files is None:
        return
    for rel, entry in sorted(files.items()):
        if not _safe_relative(rel):
            result.add(MANIFEST_NAME, f"lists {rel!r}, a path outside the checkpoint directory")
            continue
        target = root / rel
        if target.is_symlink():
            result.add(rel, "is a symbolic link; a published checkpoint holds regular files only")
            continue
        if not target.is_file():
            result.add(rel, "is listed in manifest.json but missing (deleted after publishing)")
            continue
        try:
            size = target.stat().st_size
            digest = _sha256(target) if size == entry["size"] else ""
        except OSError as e:
            result.add(rel, f"cannot be read: {e.strerror or e}")
            continue
        if size != entry["size"]:
            result.add(
                rel,
                f"is {size} bytes but manifest.json records {entry['size']}: the file was "
                "truncated, extended or replaced after publishing",
            )
            continue
        if digest != entry["sha256"]:
            result.add(
                rel,
                "sha256 differs from manifest.json: its content changed after publishing "
                "(corruption or tampering)",
            )
            continue
        result.files += 1
    for found in sorted(root.rglob("*")):
        if found.is_dir() and not found.is_symlink():
            continue
        rel = found.relative_to(root).as_posix()
        if rel != MANIFEST_NAME and rel not in files:
            result.add(rel, "is not listed in manifest.json: it was added after publishing")


# -- index, shards, headers -------------------------------------------------------------------
def _check_structure(result: VerifyResult) -> Checkpoint | None:
    root = result.root
    try:
        checkpoint = open_checkpoint(root)
    except InputError as e:
        result.add(_relative(root, e.path), _describe(e))
        return None
    result.tensors = len(checkpoint.tensors)
    on_disk = sorted(p.name for p in root.glob("*.safetensors") if p.is_file())
    index = root / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]  # parsed by open_checkpoint
        named = {Path(f).name for f in weight_map.values()}
        for name in on_disk:
            if name not in named:
                result.add(name, f"is a shard that {INDEX_NAME} does not reference")
    elif len(on_disk) > 1:
        result.add(
            INDEX_NAME,
            f"is missing but the checkpoint has {len(on_disk)} shards; loaders need the index",
        )
    return checkpoint


def _relative(root: Path, path: str | None) -> str | None:
    if not path:
        return None
    p = Path(path)
    try:
        return p.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(p)


def _describe(error: CompressorError) -> str:
    return f"tensor {error.tensor!r}: {error.message}" if error.tensor else error.message


# -- config.json ------------------------------------------------------------------------------
_NO_CONFIG: dict[str, Any] = {}  # config.json has no quantization_config: a dense model


def _check_quantization_config(result: VerifyResult) -> dict[str, Any] | None:
    """The quantization_config block ({} when there is none), or None when it is unusable."""
    config_path = result.root / "config.json"
    if not config_path.is_file():
        result.add("config.json", "is missing; loaders need it (and its quantization_config)")
        return None
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        result.add("config.json", f"cannot be parsed: {e}")
        return None
    if not isinstance(config, dict):
        result.add("config.json", "is not a JSON object")
        return None
    if "quantization_config" not in config:
        return _NO_CONFIG
    qc = config["quantization_config"]
    if not isinstance(qc, dict):
        result.add("config.json", "quantization_config is not an object")
        return None
    method, fmt = qc.get("quant_method"), qc.get("format")
    scheme = schemes.by_format(fmt)
    ours = is_ours(qc)
    if scheme is not None and ours == scheme.ours and (ours or method == "compressed-tensors"):
        errors = scheme.config_errors(qc)
        for other in schemes.all_schemes():
            if other is not scheme:
                errors += other.extension_errors(qc)
    else:
        known = ", ".join(s.format for s in schemes.all_schemes() if s.ours)
        errors = [
            f"quant_method {OUR_TOOL if ours else method!r} with format {fmt!r} is not one this "
            f"tool writes (compressed-tensors pack-quantized or float-quantized; "
            f"checkpoint-compressor {known})"
        ]
    for message in errors:
        result.add("config.json", f"quantization_config: {message}")
    return None if errors else qc


# -- packed and bitmask modules ---------------------------------------------------------------
def _owned() -> dict[str, tuple[str, ...] | None]:
    """Part suffix → the root parts, one of which must exist for the same module (from every
    scheme's parts). A bare `weight_scale` is not checked: other tools store scales of unpacked
    weights (fp8)."""
    owners: dict[str, list[str]] = {}
    for scheme in schemes.all_schemes():
        for part in scheme.parts:
            if part not in scheme.root_parts and part not in ("weight", "weight_scale"):
                owners.setdefault(f".{part}", []).extend(f".{r}" for r in scheme.root_parts)
    table: dict[str, tuple[str, ...] | None] = {".weight_scale": None}
    table.update({k: tuple(dict.fromkeys(v)) for k, v in owners.items()})
    return table


def _matches(pattern: str, module: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    return pattern == module


def _check_modules(result: VerifyResult, checkpoint: Checkpoint, qc: dict[str, Any]) -> None:
    root, tensors = result.root, checkpoint.tensors
    owned = _owned()

    def where(name: str) -> str | None:
        return _relative(root, tensors[name][0]) if name in tensors else "config.json"

    for name, (file, info) in tensors.items():
        for suffix, owners in owned.items():
            module = name.removesuffix(suffix)
            if not name.endswith(suffix) or owners is None:
                continue
            if not any(f"{module}{o}" in tensors for o in owners):
                result.add(where(name), f"tensor {name!r} has no {module}{owners[0]}")
        if name.endswith(".weight_shape"):
            if info.dtype != "I64" or info.shape != (2,):
                result.add(
                    where(name), f"tensor {name!r} is {info.dtype} {list(info.shape)}, not I64 [2]"
                )
                return  # reading the modules would fail on it
            if min(int(v) for v in read_tensor(file, info)) < 1:
                result.add(where(name), f"tensor {name!r} holds a non-positive dimension")
                return
    try:
        modules = quantized_modules(checkpoint)
    except InputError as e:
        result.add(_relative(root, e.path), _describe(e))
        return
    packed = {n.removesuffix(".weight_packed") for n in tensors if n.endswith(".weight_packed")}
    for name in sorted(packed - set(modules)):  # quantized_modules skips ignored ones
        result.add(
            where(f"{name}.weight_packed"),
            f"module {name!r} is packed but quantization_config's ignore names it, so "
            "loaders would read it as a dense layer",
        )
    for compressed in modules.values():
        for at, message in compressed.scheme.verify_module(tensors, compressed, where):
            result.add(at, message)
        result.modules += 1
        if "weight" not in compressed.parts and f"{compressed.module}.weight" in tensors:
            result.add(
                where(f"{compressed.module}.weight"),
                f"module {compressed.module!r} is stored both dense and compressed",
            )
    _check_declared(result, qc, modules)


def _check_declared(
    result: VerifyResult, qc: dict[str, Any], modules: dict[str, CompressedModule]
) -> None:
    """What config.json declares matches what the shards hold, both ways: every module a
    scheme's block (or extension) names exactly is stored that way (unless ignored), and every
    module stored as a sparse bitmask is declared (the other schemes' discovery already refuses
    an undeclared module)."""
    ignore = [p for p in qc.get("ignore", []) if p != "Linear"]
    for scheme in schemes.all_schemes():
        declared = scheme.declared(qc) if _owns_or_extends(scheme, qc) else {}
        stored = {m for m, c in modules.items() if c.scheme is scheme}
        if scheme.sized_after_compress:  # sparse bitmask: stored must be declared too
            for module in sorted(stored - set(declared)):
                result.add(
                    "config.json",
                    f"module {module!r} is stored as a sparse bitmask, which quantization_config "
                    "does not declare",
                )
        for module, part in sorted(declared.items()):
            if module in stored or any(_matches(p, module) for p in ignore):
                continue
            if not scheme.sized_after_compress:
                result.add(
                    "config.json",
                    f"quantization_config targets module {module!r}, but no shard holds "
                    f"{module}.{part}",
                )
            else:
                result.add(
                    "config.json",
                    f"quantization_config declares module {module!r} a sparse bitmask, but no "
                    f"shard holds {module}.{part}",
                )


def _owns_or_extends(scheme: schemes.Scheme, qc: dict[str, Any]) -> bool:
    """The block is this scheme's own, or may carry its extension (the bitmask list)."""
    return schemes.by_format(qc.get("format")) is scheme or scheme.sized_after_compress


# -- the source it was made from ---------------------------------------------------------------
_SIDE_PREFIXES = ("gradients/", "activations/")  # side inputs of pruning: not part of SRC


def _check_source(result: VerifyResult, source: str) -> None:
    before = len(result.problems)
    _compare_source(result, source)
    result.source_mismatches = len(result.problems) - before


def _compare_source(result: VerifyResult, source: str) -> None:
    recorded = _recorded_source(result)
    if recorded is None:
        return
    checkpoint = open_checkpoint(source)
    present = dict(checkpoint_files(checkpoint, source))
    expected = {n: e for n, e in recorded.items() if not n.startswith(_SIDE_PREFIXES)}
    for name in sorted(set(present) - set(expected)):
        result.add(
            MANIFEST_NAME,
            f"the source holds {name!r}, which is not among the files this output was made from",
        )
    for name, entry in sorted(expected.items()):
        location = present.get(name)
        if location is None:
            result.add(MANIFEST_NAME, f"was made from {name!r}, which the source does not hold")
            continue
        try:
            size, _ = stamp_of(location)
            digest = sha256_of(location) if size == entry["size"] else ""
        except OSError as e:
            result.add(MANIFEST_NAME, f"cannot read the source's {name!r}: {e.strerror or e}")
            continue
        if digest != entry["sha256"]:
            result.add(
                MANIFEST_NAME,
                f"was made from another {name!r}: the source's file has "
                + (f"sha256 {digest[:12]}…" if digest else f"{size} bytes")
                + f", the output was made from sha256 {entry['sha256'][:12]}… "
                f"({entry['size']} bytes)",
            )
            continue
        result.source_files += 1


def _recorded_source(result: VerifyResult) -> dict[str, dict[str, Any]] | None:
    try:
        data = json.loads((result.root / MANIFEST_NAME).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # already reported by the manifest check
    source = data.get("source") if isinstance(data, dict) else None
    files = source.get("files") if isinstance(source, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and type(e.get("size")) is int
        for e in files.values()
    ):
        result.add(
            MANIFEST_NAME,
            "records no source digests, so the input it was made from cannot be checked "
            "(written by an older version: recompress to get them)",
        )
        return None
    return files


# -- compression.json -------------------------------------------------------------------------
def _check_report(result: VerifyResult) -> None:
    report = result.root / REPORT_NAME
    if not report.is_file():
        return  # not required: checkpoints of other tools have none
    try:
        data = json.loads(report.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        result.add(REPORT_NAME, f"cannot be parsed: {e}")
        return
    if not isinstance(data, dict) or not data.get("input_fingerprint") or not data.get("version"):
        result.add(REPORT_NAME, "does not record the input fingerprint and the tool version")
