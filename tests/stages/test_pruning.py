"""Pruning end to end: real checkpoints, the real pipeline, numpy references."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import load_file

from compressor.config import build_config
from compressor.errors import ConfigError, InputError
from compressor.formats.compressed import decompress_checkpoint
from compressor.pipeline import compress_checkpoint
from compressor.stages.plan import is_default_linear
from compressor.testing.generate import LlamaShape, generate_llama_checkpoint

SHAPE = LlamaShape(hidden_size=256, intermediate_size=1536, num_hidden_layers=2, vocab_size=512)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return generate_llama_checkpoint(tmp_path_factory.mktemp("prune") / "model", SHAPE, shard_mb=1)


def _load(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _targets(weights: dict[str, torch.Tensor]) -> list[str]:
    return [
        n
        for n, w in weights.items()
        if n.endswith(".weight") and w.ndim == 2 and "embed" not in n and "lm_head" not in n
    ]


def _run(model: Path, dest: Path, preset: str = "dense", workers: int = 0, **pruning) -> Path:
    compress_checkpoint(
        build_config(
            str(model), str(dest), preset=preset, workers=workers, chunk_mb=1, pruning=pruning
        )
    )
    return dest


def _dense(path: Path, tmp: Path) -> dict[str, torch.Tensor]:
    return _load(decompress_checkpoint(path, tmp / f"{path.name}-dense"))


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_global_threshold_is_the_exact_quantile(model, tmp_path, workers):
    out = _run(model, tmp_path / "global", workers=workers, sparsity=0.5, scope="global")
    original, pruned = _load(model), _load(out)
    names = _targets(original)
    imp = np.concatenate([original[n].float().abs().numpy().ravel() for n in names])
    k = int(np.floor(0.5 * imp.size))
    report = json.loads((out / "compression.json").read_text())
    (scope,) = report["pruning_scopes"]
    assert scope["pruned"] == k
    assert scope["threshold"] == np.quantile(imp, (k - 0.5) / imp.size, method="inverted_cdf")
    kept_min, pruned_max, removed = np.inf, -np.inf, 0
    for n in names:
        w, p = original[n].float().abs().numpy(), pruned[n].float().numpy()
        gone = (p == 0) & (w != 0)
        removed += int((p == 0).sum())
        if gone.any():
            pruned_max = max(pruned_max, float(w[gone].max()))
        if (p != 0).any():
            kept_min = min(kept_min, float(w[p != 0].min()))
        assert np.array_equal(p[p != 0], original[n].float().numpy()[p != 0])  # kept: untouched
    assert kept_min >= pruned_max  # every kept |w| ≥ every pruned |w|, across all targets
    assert abs(removed - k) <= int((imp == 0).sum()) + 1


def test_nm_with_quantization(model, tmp_path):
    out = _run(model, tmp_path / "nm", preset="w4a16", sparsity=0.5, structure="2:4")
    dense = _dense(out, tmp_path)
    for n in _targets(_load(model)):
        groups = dense[n].float().reshape(dense[n].shape[0], -1, 4)
        assert int((groups != 0).sum(dim=2).max()) <= 2, n


def test_gradient_and_activation_importance_match_numpy(model, tmp_path):
    original = _load(model)
    names = _targets(original)
    rng = np.random.default_rng(7)
    grads_dir = tmp_path / "grads"
    grads_dir.mkdir()
    grads = {n: rng.standard_normal(tuple(original[n].shape)).astype(np.float16) for n in names}
    save_file(grads, str(grads_dir / "model.safetensors"))
    acts = {
        n.removesuffix(".weight"): np.abs(rng.standard_normal(original[n].shape[1])).astype(
            np.float32
        )
        for n in names
    }
    acts_file = tmp_path / "acts.safetensors"
    save_file(acts, str(acts_file))

    for kind, side in (
        ("gradient", {"gradients": str(grads_dir)}),
        ("activation", {"activations": str(acts_file)}),
    ):
        out = _run(model, tmp_path / kind, sparsity=0.5, importance=kind, **side)
        pruned = _load(out)
        for n in names:
            w = original[n].float().numpy()
            if kind == "gradient":
                imp = np.abs(w * grads[n].astype(np.float32))
            else:
                imp = (np.abs(w) * acts[n.removesuffix(".weight")][None, :]).astype(np.float32)
            flat = imp.ravel()
            k = int(np.floor(0.5 * flat.size))
            # Reference: the k lowest by (importance, position) — a stable sort.
            expected = np.zeros(flat.size, dtype=bool)
            expected[np.argsort(flat, kind="stable")[:k]] = True
            got = (pruned[n].float().numpy() == 0).ravel() & (w.ravel() != 0)
            assert np.array_equal(got, expected & (w.ravel() != 0)), (kind, n)


def test_bitmask_round_trip_is_exact(model, tmp_path):
    dense_out = _run(model, tmp_path / "dense", sparsity=0.5)
    bitmask_out = _run(model, tmp_path / "bitmask", sparsity=0.5, sparse_format="bitmask")
    a, b = _load(dense_out), _dense(bitmask_out, tmp_path)
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]), n
    # About 56 % of the dense bytes for 50 % unstructured bf16.
    t = next(n for n in _targets(a) if "mlp" in n)
    m = t.removesuffix(".weight")
    parts = _load(bitmask_out)
    stored = sum(
        parts[f"{m}.{s}"].numel() * parts[f"{m}.{s}"].element_size()
        for s in ("weight_values", "weight_bitmask", "weight_row_offsets")
    )
    assert 0.55 < stored / (a[t].numel() * 2) < 0.58


def test_bad_pruning_input_fails_before_heavy_work(model, tmp_path):
    original = _load(model)
    names = _targets(original)
    grads_dir = tmp_path / "g"
    grads_dir.mkdir()
    save_file(
        {n: np.zeros((3, 3), np.float32) for n in names}, str(grads_dir / "model.safetensors")
    )
    dest = tmp_path / "out"
    with pytest.raises(InputError, match="gradient"):
        _run(model, dest, sparsity=0.5, importance="gradient", gradients=str(grads_dir))
    save_file(
        {names[0]: np.zeros(tuple(original[names[0]].shape), np.float32)},
        str(grads_dir / "model.safetensors"),
    )
    with pytest.raises(InputError, match=names[1].replace(".", r"\.")):
        _run(model, dest, sparsity=0.5, importance="gradient", gradients=str(grads_dir))
    acts = tmp_path / "a.safetensors"
    save_file({n.removesuffix(".weight"): np.ones(7, np.float32) for n in names}, str(acts))
    with pytest.raises(InputError, match="activation-norm"):
        _run(model, dest, sparsity=0.5, importance="activation", activations=str(acts))
    for bad in (
        {"sparsity": 1.0},
        {"sparsity": -0.1},
        {"structure": "4:4"},
        {"structure": "4:2"},
        {"importance": "gradient"},
    ):
        with pytest.raises(ConfigError):
            _run(model, dest, **bad)
    assert not dest.exists()
    assert not list(tmp_path.glob(".out.*"))  # no staging or partial output either


def test_default_pruning_targets_are_the_linear_weights(model):
    original = _load(model)
    from compressor.formats.safetensors_io import TensorInfo

    chosen = [
        n
        for n, w in original.items()
        if is_default_linear(n, TensorInfo(n, "BF16", tuple(w.shape), 0, 0))
    ]
    assert sorted(chosen) == sorted(_targets(original))


def test_row_structure_prunes_the_same_count_in_every_row(model, tmp_path):
    """structure="row": floor(s·cols) weights per output row, the least important of that row."""
    out = _run(model, tmp_path / "row", sparsity=0.25, structure="row")
    original, pruned = _load(model), _load(out)
    for n in _targets(original):
        w, p = original[n].float().abs().numpy(), pruned[n].float().numpy()
        k = int(np.floor(0.25 * w.shape[1]))
        assert ((p == 0) & (w != 0)).sum(axis=1).max() <= k
        assert ((p == 0).sum(axis=1) >= k).all(), n
        gone, kept = np.where(p == 0, w, -np.inf), np.where(p != 0, w, np.inf)
        assert (gone.max(axis=1) <= kept.min(axis=1)).all(), n  # within each row


def test_normalized_global_scope_ranks_by_relative_magnitude(model, tmp_path):
    """normalize=True: importance |w| / mean|w| per tensor, then one global threshold."""
    out = _run(model, tmp_path / "norm", sparsity=0.5, scope="global", normalize=True)
    original, pruned = _load(model), _load(out)
    names = _targets(original)
    rel = {n: original[n].float().abs().double().numpy() for n in names}
    rel = {n: a / a.mean() for n, a in rel.items()}
    total = sum(a.size for a in rel.values())
    removed = sum(int((pruned[n].float().numpy() == 0).sum()) for n in names)
    assert abs(removed - int(np.floor(0.5 * total))) <= 1
    pruned_max = max(float(rel[n][pruned[n].float().numpy() == 0].max()) for n in names)
    kept_min = min(float(rel[n][pruned[n].float().numpy() != 0].min()) for n in names)
    assert kept_min >= pruned_max * (1 - 1e-6)
    # Tensors of larger magnitude lose no larger share than plain |w| would make them lose.
    shares = {n: float((pruned[n].float().numpy() == 0).mean()) for n in names}
    assert max(shares.values()) - min(shares.values()) < 0.2


def test_schedule_gives_matching_tensors_their_own_sparsity(model, tmp_path):
    out = _run(model, tmp_path / "sched", sparsity=0.5, schedule={"re:.*down_proj.*": 0.75})
    original, pruned = _load(model), _load(out)
    report = json.loads((out / "compression.json").read_text())
    for n in _targets(original):
        share = float((pruned[n].float().numpy() == 0).mean())
        expected = 0.75 if "down_proj" in n else 0.5
        assert abs(share - expected) < 0.01, (n, share)
    scoped = [s for s in report["pruning_scopes"] if "down_proj" in json.dumps(s)]
    assert scoped, report["pruning_scopes"]
