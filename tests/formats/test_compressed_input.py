"""Compressed checkpoints as inputs: any layout a registered scheme reads is decoded chunk by
chunk and compressed again, byte for byte as if its `compressor decompress` output had been
the input; its parts are consumed and its config block replaced. Checkpoints compressed in a
way no scheme reads are still refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from compressor.config import build_config
from compressor.errors import InputError
from compressor.formats.compressed import decompress_checkpoint
from compressor.formats.verify import verify_checkpoint
from compressor.pipeline import compress_checkpoint
from compressor.stages.plan import make_plan
from compressor.testing.generate import LlamaShape, generate_llama_checkpoint
from tests.conftest import assert_same_tensors, load_dir

SHAPE = LlamaShape(hidden_size=256, intermediate_size=512, num_hidden_layers=2, vocab_size=256)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_llama_checkpoint(tmp_path_factory.mktemp("ci") / "src", SHAPE, shard_mb=1)


@pytest.mark.parametrize(
    ("first", "second"),
    [("w8a16", "w4a16"), ("fp8", "w4a16-asym"), ("w4a16-asym", "fp8-block"), ("nf4", "w8a16")],
)
def test_a_compressed_input_is_compressed_again_from_its_dense_values(
    src: Path, tmp_path: Path, first: str, second: str
) -> None:
    once = tmp_path / "once"
    compress_checkpoint(build_config(str(src), str(once), preset=first, workers=0))
    twice = tmp_path / "twice"
    compress_checkpoint(build_config(str(once), str(twice), preset=second, workers=0))
    assert verify_checkpoint(twice).ok
    dense = decompress_checkpoint(once, tmp_path / "dense")
    reference = tmp_path / "reference"
    compress_checkpoint(build_config(str(dense), str(reference), preset=second, workers=0))
    assert_same_tensors(load_dir(twice), load_dir(reference))
    config = json.loads((twice / "config.json").read_text())
    assert (
        config["quantization_config"]
        == json.loads((reference / "config.json").read_text())["quantization_config"]
    )


def test_a_compressed_input_decoded_dense(src: Path, tmp_path: Path) -> None:
    """preset dense: the output is the input's dense model, no quantization block left."""
    once = tmp_path / "once"
    compress_checkpoint(build_config(str(src), str(once), preset="w4a16", workers=0))
    out = tmp_path / "dense"
    compress_checkpoint(build_config(str(once), str(out), preset="dense", workers=0))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert_same_tensors(load_dir(out), load_dir(decompress_checkpoint(once, tmp_path / "d")))


def test_a_layout_no_scheme_reads_is_refused(src: Path, tmp_path: Path) -> None:
    """A GPTQ-style checkpoint (quant_method gptq, `qweight` tensors): not ours to decode."""
    import shutil

    gptq = tmp_path / "gptq"
    shutil.copytree(src, gptq)
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (gptq / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match=r"already compressed .*gptq"):
        make_plan(build_config(str(gptq), str(tmp_path / "out"), preset="w4a16"))
