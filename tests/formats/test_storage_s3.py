"""Input, staging and output through s3:// URLs, against moto's S3 server on loopback.

The server runs as a subprocess (``python -m moto.server``) on a free port; s3fs finds it through
``AWS_ENDPOINT_URL`` (botocore's standard variable), with dummy credentials. Skipped when s3fs
or moto is not installed (the `test` extra installs both).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from compressor.config import build_config
from compressor.errors import InputError, OutputError
from compressor.formats import storage
from compressor.formats.checkpoint import open_checkpoint
from compressor.formats.compressed import decompress_checkpoint
from compressor.formats.safetensors_io import (
    iter_byte_blocks,
    read_header,
    read_rows,
)
from compressor.formats.verify import verify_checkpoint
from compressor.pipeline import compress_checkpoint
from compressor.stages.publish import destination_lock
from compressor.testing.generate import LlamaShape, generate_llama_checkpoint
from tests.conftest import S3_BUCKET
from tests.conftest import upload_dir as _upload

BUCKET = S3_BUCKET
SHAPE = LlamaShape(hidden_size=256, intermediate_size=512, num_hidden_layers=2, vocab_size=512)


def _download(url: str, local: Path) -> Path:
    for rel in storage.list_files(url):
        storage.copy_file(storage.join(url, rel), str(local / rel))
    return local


def _digests(root: Path, pattern: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob(pattern))}


@pytest.fixture(scope="module")
def model(s3: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    """(local checkpoint, its s3:// copy, a local w4a16 reference output)."""
    root = tmp_path_factory.mktemp("s3ckpt")
    local = generate_llama_checkpoint(root / "model", SHAPE, dtype="BF16", shard_mb=1, seed=3)
    url = f"{s3}/model"
    _upload(local, url)
    reference = root / "reference"
    compress_checkpoint(build_config(str(local), str(reference), preset="w4a16", workers=0))
    return local, url, reference


def test_reads_through_urls(model: tuple[Path, str, Path]) -> None:
    local, url, _ = model
    ckpt, remote = open_checkpoint(local), open_checkpoint(url)
    assert remote.url == url
    assert list(remote.tensors) == list(ckpt.tensors)
    assert remote.extra_files == ckpt.extra_files
    assert remote.config == ckpt.config
    assert remote.fingerprint() != ""
    for name, (path, info) in list(remote.tensors.items())[:4]:
        local_path, local_info = ckpt.tensors[name]
        assert info == local_info
        assert path.startswith("s3://")
        assert read_header(path).tensors == read_header(local_path).tensors
        rows = min(3, info.num_rows)
        assert (read_rows(path, info, 0, rows) == read_rows(local_path, info, 0, rows)).all()
        blocks = b"".join(bytes(b) for b in iter_byte_blocks(path, info, 4096))
        assert blocks == b"".join(bytes(b) for b in iter_byte_blocks(local_path, local_info))


def test_input_errors_name_the_url(s3: str) -> None:
    with pytest.raises(InputError, match="does not exist"):
        open_checkpoint(f"{s3}/no-such-model")
    with pytest.raises(InputError, match="cannot read file"):
        read_header(f"{s3}/no-such-model/model.safetensors")
    storage.write_bytes(f"{s3}/short/model.safetensors", b"abc")
    with pytest.raises(InputError, match="too short"):
        open_checkpoint(f"{s3}/short")


@pytest.mark.slow  # a full run against moto: ~10-20 s
def test_s3_to_s3_with_s3_staging(s3: str, model: tuple[Path, str, Path], tmp_path: Path) -> None:
    _, url, reference = model
    out = f"{s3}/out"
    config = build_config(url, out, preset="w4a16", workers=0, staging_dir=f"{s3}/staging")
    compress_checkpoint(config)

    files = storage.list_files(out)
    assert "manifest.json" in files and "compression.json" in files
    got = _download(out, tmp_path / "out")
    assert _digests(got, "*.safetensors") == _digests(reference, "*.safetensors")
    assert _digests(got, "config.json") == _digests(reference, "config.json")
    # Nothing left behind: no partial prefix, no lock, staging removed.
    assert not any(".partial-" in e or e.endswith(".lock") for e in storage.list_dir(s3))
    assert storage.list_files(f"{s3}/staging") == []
    assert [str(p) for p in verify_checkpoint(got).problems] == []
    dense = decompress_checkpoint(got, tmp_path / "dense")
    assert any(dense.glob("*.safetensors"))


@pytest.mark.slow  # a full run against moto: ~10-20 s
def test_local_to_s3_default_staging(
    s3: str, model: tuple[Path, str, Path], tmp_path: Path
) -> None:
    local, _, reference = model
    out = f"{s3}/from-local"
    compress_checkpoint(build_config(str(local), out, preset="w4a16", workers=0))
    got = _download(out, tmp_path / "out")
    assert _digests(got, "*.safetensors") == _digests(reference, "*.safetensors")
    assert (got / "manifest.json").is_file()
    assert not storage.list_files(f"{s3}/.from-local.staging")


@pytest.mark.slow  # a full run against moto: ~10-20 s
def test_s3_to_local(model: tuple[Path, str, Path], tmp_path: Path) -> None:
    local, url, reference = model
    out = tmp_path / "out"
    compress_checkpoint(build_config(url, str(out), preset="w4a16", workers=0))
    assert _digests(out, "*.safetensors") == _digests(reference, "*.safetensors")
    assert _digests(out, "*.json").keys() == _digests(reference, "*.json").keys()
    extras = sorted(p.name for p in local.iterdir() if not p.name.endswith(".safetensors"))
    assert all((out / name).exists() for name in extras if name != "model.safetensors.index.json")


def test_url_destination_lock(s3: str) -> None:
    dest = f"{s3}/locked"
    with destination_lock(dest), pytest.raises(OutputError, match="another run"):  # noqa: SIM117
        with destination_lock(dest):
            pass
    with destination_lock(dest):  # released
        pass
