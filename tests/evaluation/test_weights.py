from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from compressor.errors import InputError
from compressor.evaluation import weights as weights_mod
from compressor.evaluation.weights import SafetensorsCheckpoint, compare_weights, tensor_error


def numpy_figures(w: torch.Tensor, w_hat: torch.Tensor) -> tuple[float, float, float]:
    a = w.to(torch.float64).numpy()
    d = w_hat.to(torch.float64).numpy() - a
    rel = np.linalg.norm(d) / np.linalg.norm(a)
    sqnr = 10 * np.log10(np.sum(a * a) / np.sum(d * d))
    return float(rel), float(sqnr), float(np.abs(d).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tensor_error_matches_numpy(dtype, monkeypatch):
    monkeypatch.setattr(weights_mod, "_CHUNK_ELEMENTS", 1000)  # exercise the chunking
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=gen).to(dtype)
    w_hat = (w.float() + 0.01 * torch.randn(64, 96, generator=gen)).to(dtype)
    err = tensor_error("w", w, w_hat)
    rel, sqnr, max_abs = numpy_figures(w, w_hat)
    assert err.rel_error == pytest.approx(rel, rel=1e-12)
    assert err.sqnr_db == pytest.approx(sqnr, rel=1e-12)
    assert err.max_abs_error == pytest.approx(max_abs, rel=1e-12)
    assert err.shape == (64, 96) and err.numel == 64 * 96 and not err.exact
    assert err.sqnr_db == pytest.approx(-20 * math.log10(err.rel_error), rel=1e-12)


def test_exact_tensor_is_infinite_sqnr():
    w = torch.randn(8, 8)
    err = tensor_error("w", w, w.clone())
    assert err.exact and err.rel_error == 0.0 and err.sqnr_db == math.inf
    d = err.to_dict()
    assert d["sqnr_db"] is None and d["rel_error"] == 0.0 and d["exact"] is True
    json.dumps(d, allow_nan=False)


def test_shape_mismatch_names_tensor():
    with pytest.raises(InputError, match=r"layer\.weight"):
        tensor_error("layer.weight", torch.zeros(2, 3), torch.zeros(3, 2))


def test_compare_checkpoint_dirs_and_state_dicts(tmp_path):
    gen = torch.Generator().manual_seed(1)
    ref = {
        "a.weight": torch.randn(16, 32, generator=gen).to(torch.bfloat16),
        "b.weight": torch.randn(32, generator=gen),
        "steps": torch.arange(4),  # not floating point: skipped
        "only_ref": torch.ones(3),
    }
    approx = {
        "a.weight": (ref["a.weight"].float() * 1.01).to(torch.bfloat16),
        "b.weight": ref["b.weight"].clone(),
        "steps": torch.arange(4),
        "only_approx": torch.ones(3),
    }
    (tmp_path / "ref").mkdir()
    (tmp_path / "app").mkdir()
    # the reference split over two shards
    save_file({k: ref[k] for k in ("a.weight", "steps")}, tmp_path / "ref" / "m-1.safetensors")
    save_file({k: ref[k] for k in ("b.weight", "only_ref")}, tmp_path / "ref" / "m-2.safetensors")
    save_file(approx, tmp_path / "app" / "model.safetensors")

    ckpt = SafetensorsCheckpoint(tmp_path / "ref")
    assert set(ckpt) == set(ref) and len(ckpt) == 4
    assert torch.equal(ckpt["a.weight"], ref["a.weight"])

    for r, a in [
        (tmp_path / "ref", tmp_path / "app"),
        (tmp_path / "ref", approx),
        (ref, tmp_path / "app"),
        (ref, approx),
    ]:
        cmp = compare_weights(r, a)
        assert [t.name for t in cmp.tensors] == ["a.weight", "b.weight"]
        assert cmp.only_in_reference == ("only_ref",)
        assert cmp.only_in_approx == ("only_approx",)
        a_err, b_err = cmp.tensors
        assert b_err.exact
        rel, sqnr, _ = numpy_figures(ref["a.weight"], approx["a.weight"])
        assert a_err.rel_error == pytest.approx(rel, rel=1e-12)
        assert a_err.sqnr_db == pytest.approx(sqnr, rel=1e-12)
        # the totals treat all compared tensors as one vector; only a.weight has error
        a64, b64 = ref["a.weight"].double(), ref["b.weight"].double()
        d = approx["a.weight"].double() - a64
        total = math.sqrt(float(d.square().sum()) / float(a64.square().sum() + b64.square().sum()))
        assert cmp.total_rel_error == pytest.approx(total, rel=1e-12)
        assert cmp.worst is a_err
        json.dumps(cmp.to_dict(), allow_nan=False)


def test_empty_checkpoint_dir(tmp_path):
    with pytest.raises(InputError, match=r"no \*\.safetensors"):
        SafetensorsCheckpoint(tmp_path)


def test_inputs_are_not_modified():
    w = torch.randn(10, 10, dtype=torch.float64)
    w_hat = w + 0.5
    before = w_hat.clone()
    err = tensor_error("w", w, w_hat)
    assert torch.equal(w_hat, before)
    assert err.max_abs_error == pytest.approx(0.5)
