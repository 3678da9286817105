from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from compressor.errors import InputError
from compressor.evaluation.evaluate import checkpoint_bytes, default_text, evaluate

from .conftest import TEXT_FILE, decode_pack_quantized


def assert_identical(report) -> None:
    # Same weights, same tokens, one thread (see conftest._one_torch_thread): bitwise equal.
    assert report.delta_ppl_pct == 0.0
    assert report.ppl_original == report.ppl_compressed
    assert math.isfinite(report.ppl_original) and report.ppl_original > 1.0
    assert report.weights.tensors
    assert all(t.exact for t in report.weights.tensors)
    assert report.weights.total_rel_error == 0.0
    assert report.weights.total_sqnr_db == math.inf
    assert report.weights.worst is None
    assert report.compression_ratio == 1.0
    json.dumps(report.to_dict(), allow_nan=False)


def test_default_text_is_the_test_text():
    assert default_text() == TEXT_FILE.read_text(encoding="utf-8")
    assert default_text().startswith("PRIDE AND PREJUDICE")


def test_evaluate_against_itself(tiny_dir, text):
    report = evaluate(tiny_dir, tiny_dir, text, max_tokens=200)
    assert_identical(report)
    assert report.compressed_loader == "dense"
    assert report.tokens == 200 and report.predicted_tokens == 200
    assert report.bos_id == 0 and report.window == 256 and report.stride == 256
    assert report.dtype == "float32" and report.device == "cpu"
    n_tensors = len(load_file(tiny_dir / "model.safetensors"))
    assert len(report.weights.tensors) == n_tensors
    assert report.original_bytes == checkpoint_bytes(tiny_dir) > 0


def test_evaluate_pack_quantized_via_compressed_tensors(tiny_dir, tiny_pack_quantized_dir, text):
    report = evaluate(tiny_dir, tiny_pack_quantized_dir, text, max_tokens=200, window=64)
    assert report.compressed_loader == "compressed-tensors"
    assert report.predicted_tokens == 200
    assert math.isfinite(report.ppl_compressed) and report.delta_ppl_pct != 0.0
    assert report.compression_ratio is not None and report.compression_ratio > 1.5

    # The compared weights are exactly what the checkpoint encodes, q * scale, as the model
    # (loaded by transformers in float32, decompressed by its first forward pass) computes it.
    original = load_file(tiny_dir / "model.safetensors")
    expected = decode_pack_quantized(tiny_pack_quantized_dir, torch.float32)
    by_name = {t.name: t for t in report.weights.tensors}
    assert set(by_name) == set(original)
    assert len(expected) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    for name, ref in original.items():
        err = by_name[name]
        if name not in expected:
            assert err.exact, name  # norms, embeddings and lm_head are left alone
            continue
        d = expected[name].double() - ref.double()
        assert err.err_sq == pytest.approx(float(d.square().sum()), rel=1e-9), name
        assert 15.0 < err.sqnr_db < 30.0, name  # int4, groups of 32
    assert not report.weights.only_in_reference


def test_evaluate_with_dense_loader(tiny_dir, tmp_path, text):
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "model.safetensors").write_bytes(b"\0" * 1000)  # stands for our own layout
    config = json.loads((tiny_dir / "config.json").read_text())
    config["quantization_config"] = {"tool": "checkpoint-compressor", "format": "codebook"}
    (ours / "config.json").write_text(json.dumps(config))

    calls: list[tuple[Path, Path]] = []

    def dense_loader(compressed_dir: Path, tmpdir: Path) -> Path:
        calls.append((compressed_dir, tmpdir))
        out = tmpdir / "dense"
        out.mkdir()
        shutil.copy(tiny_dir / "model.safetensors", out)  # no config.json: the original's is used
        return out

    with pytest.raises(InputError, match="dense_loader"):
        evaluate(tiny_dir, ours, text, max_tokens=64)
    report = evaluate(tiny_dir, ours, text, max_tokens=64, dense_loader=dense_loader)
    assert calls and calls[0][0] == ours and not calls[0][1].exists()  # tmpdir cleaned up
    assert report.compressed_loader == "dense_loader"
    assert report.compressed_bytes == 1000
    assert report.delta_ppl_pct == 0.0
    assert all(t.exact for t in report.weights.tensors)


def test_quantized_original_is_rejected(tiny_dir, tiny_pack_quantized_dir, text):
    with pytest.raises(InputError, match="must be dense"):
        evaluate(tiny_pack_quantized_dir, tiny_dir, text, max_tokens=64)


@pytest.mark.slow
def test_smollm2_against_itself(smollm2_dir, text):
    report = evaluate(smollm2_dir, smollm2_dir, text, max_tokens=64, window=64)
    assert_identical(report)
    assert report.tokens == 64
    assert report.ppl_original < 100
    assert report.weights.only_in_approx == ("lm_head.weight",)  # tied to the embedding
    assert report.dtype == str(torch.float32).removeprefix("torch.")


def test_evaluate_scores_nvfp4_w4a4_with_its_activations_quantized(tiny_dir, tmp_path, text):
    """W4A4 runs in bfloat16 through compressed-tensors, activations quantized on the fly (the
    float32 path fails, and dequantize-on-load would score it as W4A16): its perplexity differs
    from that of the same weights without activation quantization (nvfp4a16)."""
    from compressor.config import build_config
    from compressor.pipeline import compress_checkpoint

    corpus = tmp_path / "calibration.txt"
    corpus.write_text(text)
    w4a4, a16 = tmp_path / "w4a4", tmp_path / "a16"
    calibration = {"path": str(corpus), "samples": 4, "seq_len": 64}
    compress_checkpoint(
        build_config(str(tiny_dir), str(w4a4), preset="nvfp4", calibration=calibration, workers=0)
    )
    compress_checkpoint(build_config(str(tiny_dir), str(a16), preset="nvfp4a16", workers=0))
    report = evaluate(tiny_dir, w4a4, text, max_tokens=200, window=64)
    weight_only = evaluate(tiny_dir, a16, text, max_tokens=200, window=64)
    assert report.compressed_loader == "compressed-tensors (bfloat16, NVFP4 activations)"
    assert weight_only.compressed_loader != report.compressed_loader
    assert math.isfinite(report.ppl_compressed)
    assert report.ppl_compressed != pytest.approx(weight_only.ppl_compressed, rel=1e-3)
