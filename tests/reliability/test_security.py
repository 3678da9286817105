"""Security properties: local services on loopback, names from headers that cannot escape the
staging directory, the report's provenance, and the documented hardening. (Pickle refusal and
index paths outside the checkpoint are cases of test_bad_input.py.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from compressor import __version__
from compressor.config import build_config
from compressor.formats.checkpoint import open_checkpoint
from compressor.pipeline import compress_checkpoint, open_executor
from compressor.stages.executor import DaskExecutor

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


@pytest.mark.slow
def test_local_cluster_binds_to_loopback(tmp_path: Path) -> None:
    config = build_config(str(tmp_path / "src"), str(tmp_path / "out"), workers=1)
    with open_executor(config) as executor:
        assert isinstance(executor, DaskExecutor)
        info = executor.client.scheduler_info()
        assert executor.client.scheduler.address.startswith("tcp://127.0.0.1:")
        assert info["workers"]
        assert all(addr.startswith("tcp://127.0.0.1:") for addr in info["workers"])
        link = executor.client.dashboard_link
        assert link is None or "127.0.0.1" in link


def test_hostile_tensor_names_stay_inside_staging(tmp_path: Path) -> None:
    names = [
        "../../escape/up_proj.weight",
        "/abs/model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.a/../../b.weight",
    ]
    src = tmp_path / "src"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file(
        {n: torch.randn(64, 128, generator=g).bfloat16() for n in names}, str(src / "m.safetensors")
    )
    box = tmp_path / "box"
    box.mkdir()
    before = {p for p in tmp_path.rglob("*")}
    config = build_config(
        str(src), str(box / "out"), workers=0, keep_staging=True, staging_dir=str(box / "stg")
    )
    report = compress_checkpoint(config)
    assert sorted(t["name"] for t in report.tensors if t["scheme"] != "copy") == sorted(names)
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(p.is_relative_to(box) for p in created), created
    part = re.compile(
        r"lock|in|out|done|ingest|compress|assemble|assemble-copy|digest|shards|packed|scale|zero|min|zarr\.json|c|c(\.\d+)+|\d+|(t\d{5}|sources)(\.c\d{5}\.json)?"
    )
    for path in (box / "stg").rglob("*"):
        rel = path.relative_to(box / "stg")  # <run key>/in/t00000/..., never a tensor name
        assert all(part.fullmatch(p) for p in rel.parts[1:]), rel
    assert not (Path("/abs")).exists()


def test_report_records_fingerprint_and_version(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    save_file(
        {"model.layers.0.mlp.up_proj.weight": torch.ones(32, 128).bfloat16()},
        str(src / "model.safetensors"),
    )
    dest = tmp_path / "out"
    compress_checkpoint(build_config(str(src), str(dest), workers=0))
    report = json.loads((dest / "compression.json").read_text())
    assert report["version"] == __version__
    assert report["tool"] == "checkpoint-compressor"
    assert report["input_fingerprint"] == open_checkpoint(src).fingerprint()
    manifest = json.loads((dest / "manifest.json").read_text())
    assert "compression.json" in manifest["files"]


def test_operations_guide_covers_security() -> None:
    text = DOCS.read_text()
    section = text[text.index("## Security") :]
    for needed in (
        "127.0.0.1",
        "--tls-ca-file",
        "require-encryption",
        "PREFECT_SERVER_API_AUTH_STRING",
        "PREFECT_API_AUTH_STRING",
        "pickle",
        "compressor verify",
    ):
        assert needed.lower() in section.lower(), needed
