"""Session fixtures for the end-to-end tests: generated checkpoints, cached compressed outputs,
helpers that read results with reference code (the `safetensors` package, plain numpy), and a
Prefect test server for the flow test only.

Checkpoints are small (hidden 512 / 576, 2 layers, vocab 1024) and split into ~2 MB input shards,
so every run touches several input files and still takes a second or two on two cores.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"

import numpy as np
import pytest
import torch
from hypothesis import settings as _hypothesis_settings

from compressor.testing.generate import LlamaShape as _LlamaShape
from compressor.testing.generate import generate_llama_checkpoint as _generate_llama

# Property tests draw the same examples on every run (settings made in the test modules inherit
# this profile): a CI run never fails on an example no earlier run met. Set
# HYPOTHESIS_PROFILE=explore to search afresh.
_hypothesis_settings.register_profile("ci", derandomize=True)
_hypothesis_settings.register_profile("explore", derandomize=False)
_hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

INPUT_SHAPE = {
    "hidden_size": 512,
    "intermediate_size": 1536,
    "num_hidden_layers": 2,
    "vocab_size": 1024,
}
PARTIAL_SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 2,
    "vocab_size": 1024,
}


# -- helpers (plain functions; tests import them from here) -----------------------------------
def tree_digest(root: str | Path, pattern: str = "*") -> dict[str, str]:
    """sha256 of every file under `root` matching `pattern`, keyed by relative path."""
    root = Path(root)
    out = {}
    for path in sorted(p for p in root.rglob(pattern) if p.is_file()):
        out[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def load_dir(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in `directory`, with the reference loader."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        part = load_file(str(file))
        assert not set(part) & set(tensors), f"{file}: tensor names repeated across shards"
        tensors.update(part)
    return tensors


def read_safetensors_numpy(file: str | Path) -> dict[str, tuple[str, np.ndarray]]:
    """An independent reader: name → (dtype, raw little-endian array); BF16 as uint16 bits."""
    storage = {
        "BF16": "<u2",
        "F16": "<f2",
        "F32": "<f4",
        "F64": "<f8",
        "I32": "<i4",
        "I64": "<i8",
        "I8": "i1",
    }
    data = Path(file).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, entry in header.items():
        start, end = entry["data_offsets"]
        raw = np.frombuffer(
            data,
            dtype=storage[entry["dtype"]],
            count=(end - start) // np.dtype(storage[entry["dtype"]]).itemsize,
            offset=8 + n + start,
        )
        out[name] = (entry["dtype"], raw.reshape(entry["shape"]))
    return out


def input_float64(directory: str | Path) -> dict[str, np.ndarray]:
    """Every BF16 tensor of a checkpoint as exact float64 values, decoded by hand from the bits."""
    out = {}
    for file in sorted(Path(directory).glob("*.safetensors")):
        for name, (dtype, raw) in read_safetensors_numpy(file).items():
            assert dtype == "BF16", (name, dtype)
            out[name] = (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bit-identical values."""
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, (name, a[name].dtype, b[name].dtype)
        assert a[name].shape == b[name].shape, (name, a[name].shape, b[name].shape)
        assert torch.equal(a[name], b[name]), f"{name}: values differ"


def reported_vs_float64(
    src: str | Path, out: str | Path, dense_dir: str | Path
) -> list[tuple[str, float, float]]:
    """(tensor, the relative error compression.json reports, the same figure computed here in
    float64 from the input and our float32 decompression) for every compressed tensor."""
    from compressor.formats.compressed import decompress_checkpoint

    report = json.loads((Path(out) / "compression.json").read_text())["tensors"]
    original = input_float64(src)
    dense = load_dir(decompress_checkpoint(out, dense_dir, dtype="float32"))
    rows = []
    for row in report:
        if row["scheme"] == "copy":
            continue
        x, x_hat = original[row["name"]], dense[row["name"]].double().numpy()
        expected = math.sqrt(((x - x_hat) ** 2).sum() / (x**2).sum())
        rows.append((row["name"], row["relative_error"], expected))
    return rows


def ct_decompress(compressed: str | Path, destination: str | Path) -> Path:
    """compressed-tensors' own decompressor (no code of ours involved)."""
    from compressed_tensors.entrypoints.convert import (
        CompressedTensorsDequantizer,
        convert_checkpoint,
    )

    convert_checkpoint(
        str(compressed),
        str(destination),
        CompressedTensorsDequantizer(str(compressed)),
        max_workers=1,
        device="cpu",
    )
    return Path(destination)


# -- fixtures ---------------------------------------------------------------------------------
def _generate(root: Path, shape: dict[str, int], seed: int) -> Path:
    from compressor.testing.generate import LlamaShape, generate_llama_checkpoint

    path = generate_llama_checkpoint(root, LlamaShape(**shape), dtype="BF16", shard_mb=2, seed=seed)
    shards = list(path.glob("*.safetensors"))
    assert len(shards) >= 2 and (path / "model.safetensors.index.json").is_file()
    return path


@pytest.fixture(scope="session")
def llama_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama-shaped bf16 checkpoint: hidden 512, intermediate 1536, 2 layers, vocab 1024."""
    return _generate(tmp_path_factory.mktemp("src") / "llama-512", INPUT_SHAPE, seed=0)


@pytest.fixture(scope="session")
def llama576_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hidden 576: 576 % 128 != 0, so g128 falls back to g64 for tensors with 576 inputs."""
    return _generate(tmp_path_factory.mktemp("src") / "llama-576", PARTIAL_SHAPE, seed=1)


@pytest.fixture(scope="session")
def source_digests(llama_src: Path, llama576_src: Path) -> dict[Path, dict[str, str]]:
    """The inputs' file hashes right after generation (to prove runs never modify them)."""
    return {llama_src: tree_digest(llama_src), llama576_src: tree_digest(llama576_src)}


@pytest.fixture
def destination(tmp_path: Path) -> Path:
    """A fresh output path (its parent exists, it does not)."""
    return tmp_path / "out"


@pytest.fixture(scope="session")
def compressed(
    tmp_path_factory: pytest.TempPathFactory, llama_src: Path
) -> Callable[..., tuple[Path, Any]]:
    """compressed(preset, **build_config options) → (output dir, RunReport), computed once.

    Serial (workers=0) runs of the 512-hidden checkpoint, shared by the tests that only read them.
    """
    from compressor.config import build_config
    from compressor.pipeline import compress_checkpoint

    cache: dict[tuple, tuple[Path, Any]] = {}

    def get(preset: str = "w4a16", source: Path | None = None, **options: Any) -> tuple[Path, Any]:
        src = source or llama_src
        key = (preset, str(src), tuple(sorted(options.items())))
        if key not in cache:
            dest = tmp_path_factory.mktemp(f"out-{preset}") / "compressed"
            config = build_config(str(src), str(dest), preset=preset, workers=0, **options)
            cache[key] = (dest, compress_checkpoint(config))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def ours_dense(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """ours_dense(compressed_dir, dtype=None) → our decompressed copy, computed once."""
    from compressor.formats.compressed import decompress_checkpoint

    cache: dict[tuple[str, str | None], Path] = {}

    def get(compressed_dir: Path, dtype: str | None = None) -> Path:
        key = (str(compressed_dir), dtype)
        if key not in cache:
            dest = tmp_path_factory.mktemp("dense") / "ours"
            cache[key] = decompress_checkpoint(compressed_dir, dest, dtype=dtype)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[None]:
    """A throwaway Prefect server and database for the flow test (not autouse: it costs seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


# -- S3 (moto) ---------------------------------------------------------------------------------
S3_BUCKET = "ckpt-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def s3() -> Iterator[str]:
    """A moto S3 server (a subprocess on loopback) with one bucket; the environment points
    s3fs at it. Skipped when s3fs or moto is not installed (the `test` extra has both)."""
    pytest.importorskip("moto.server")
    s3fs = pytest.importorskip("s3fs")

    from compressor.formats import storage

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {k: os.environ.get(k) for k in _ENV}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.skip("moto's S3 server did not start")
                time.sleep(0.2)
        os.environ.update(
            {
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        )
        os.environ.pop("AWS_PROFILE", None)
        s3fs.S3FileSystem.clear_instance_cache()
        fs, _ = storage.filesystem(f"s3://{S3_BUCKET}")
        fs.mkdir(S3_BUCKET)
        yield f"s3://{S3_BUCKET}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        s3fs.S3FileSystem.clear_instance_cache()


_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "AWS_PROFILE",
)


def upload_dir(local: Path, url: str) -> None:
    """Put every file under `local` at the same relative path under `url`."""
    from compressor.formats import storage

    for rel in storage.list_files(local):
        storage.put_file(local / rel, storage.join(url, rel))


# -- calibration: a tiny Llama (3 layers) and a token file ------------------------------------
TINY = _LlamaShape(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=256,
    max_position_embeddings=128,
)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _generate_llama(tmp_path_factory.mktemp("tiny") / "model", TINY, shard_mb=0.2, seed=7)


@pytest.fixture(scope="session")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 windows of 32 token ids: three calibration shards of 8, 8 and 4."""
    path = tmp_path_factory.mktemp("tokens") / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(0, TINY.vocab_size, size=(20, 32)))
    return path


def full_forward_hessians(
    src: Path, batches: list[torch.Tensor]
) -> tuple[dict[str, torch.Tensor], Any, list[Any]]:
    """The independent reference for calibration: transformers' own model of `src`, run on each
    batch of token ids with a hook on every linear but lm_head. Returns each linear's input XᵀX
    (float64, summed over the batches), the model and each batch's output."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(mod, args):  # type: ignore[no-untyped-def]
            x = args[0].reshape(-1, args[0].shape[-1]).to(torch.float64)
            seen[name] = seen[name] + x.T @ x if name in seen else x.T @ x

        return record

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            m.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        outputs = [model(input_ids=b, output_hidden_states=True) for b in batches]
    return seen, model, outputs
