"""The calibration stage and the methods that use it, through the real pipeline.

A tiny generated Llama (3 layers, tests/calibration/conftest.py's TINY) calibrated on a token
file of 20 windows: three shards. Checked: the staged statistics equal XᵀX of a full
transformers forward; gptq's bytes are the same serially and on two worker processes;
compressed-tensors decodes them to our own reconstruction; a run that dies in the middle of
calibration resumes at the next layer of every shard; bad calibration options are refused
before any work.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.config import build_config
from compressor.errors import ConfigError
from compressor.pipeline import Pipeline, compress_checkpoint
from compressor.stages import calibrate as calibrate_stage
from tests.conftest import ct_decompress, full_forward_hessians, load_dir, tree_digest

pytest.importorskip("transformers")


def _config(  # type: ignore[no-untyped-def]
    src: Path, dest: Path, tokens: Path | None, act_order: bool = True, **options
):
    given = {"path": str(tokens), "samples": 20, "seq_len": 32, "act_order": act_order}
    calibration = given if tokens else None
    return build_config(str(src), str(dest), calibration=calibration, **{"workers": 0, **options})


def _calibrated(config):  # type: ignore[no-untyped-def]
    """A pipeline planned, ingested and calibrated serially, in this process."""
    from compressor.stages.executor import SerialExecutor

    pipe = Pipeline(config)
    pipe.make_plan()
    executor = SerialExecutor()
    pipe.ingest(executor)
    pipe.calibrate(executor)
    assert pipe.calibration is not None
    return pipe


def _full_forward_hessians(src: Path, tokens: np.ndarray) -> dict[str, torch.Tensor]:
    """One window at a time: no batch effects."""
    return full_forward_hessians(src, [row[None] for row in torch.from_numpy(tokens)])[0]


def test_staged_statistics_equal_the_full_models(
    tiny_llama: Path,
    token_file: Path,
    tmp_path: Path,
) -> None:
    pipe = _calibrated(_config(tiny_llama, tmp_path / "out", token_file, rounding="gptq"))
    cal = pipe.calibration
    assert cal is not None and cal.samples == 20 and cal.seq_len == 32
    expected = _full_forward_hessians(tiny_llama, np.load(token_file))
    assert sorted(cal.stats) == sorted(f"{m}.weight" for m in expected)
    for module, h in expected.items():
        stat = cal.stats[f"{module}.weight"]
        assert stat.tokens == 20 * 32
        got = calibrate_stage.load_hessian(pipe.staging, stat).to(torch.float64)
        assert torch.allclose(got, h, rtol=1e-4, atol=1e-2), module
    # q/k/v read one staged array
    q, k = (cal.stats[f"model.layers.1.self_attn.{p}_proj.weight"].path for p in "qk")
    assert q == k


@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_factor_is_staged_in_act_order_unless_turned_off(
    tiny_llama: Path, token_file: Path, tmp_path: Path, act_order: bool
) -> None:
    """The calibration stage stages each input's factor of H in static act-order (the
    default) or in column order, and says which: compress walks the columns to match."""
    from compressor.math.gptq import activation_order, inverse_hessian_factor

    config = _config(tiny_llama, tmp_path / "out", token_file, act_order, rounding="gptq")
    pipe = _calibrated(config)
    for name, stat in pipe.calibration.stats.items():
        assert stat.ordered is act_order, name
        h = calibrate_stage.load_hessian(pipe.staging, stat)
        u = calibrate_stage.load_factor(pipe.staging, stat)
        with calibrate_stage.one_thread():
            expected, _ = inverse_hessian_factor(
                h, 0.01, activation_order(h) if act_order else None
            )
        assert u is not None and torch.equal(u, expected), name


def test_gptq_bytes_do_not_depend_on_the_workers_and_ct_reads_them(
    tiny_llama: Path,
    token_file: Path,
    tmp_path: Path,
) -> None:
    serial = tmp_path / "serial"
    compress_checkpoint(_config(tiny_llama, serial, token_file, rounding="gptq"))
    two = tmp_path / "two"
    compress_checkpoint(_config(tiny_llama, two, token_file, rounding="gptq", workers=2))
    a, b = tree_digest(serial, "*.safetensors"), tree_digest(two, "*.safetensors")
    assert a == b
    # the same format as any int preset: compressed-tensors decodes exactly our reconstruction
    ours = load_dir(Path(str(ct_decompress(serial, tmp_path / "ct"))))
    from compressor.formats.compressed import decompress_checkpoint

    mine = load_dir(decompress_checkpoint(serial, tmp_path / "mine"))
    for name, t in ours.items():
        assert torch.equal(t.to(mine[name].dtype), mine[name]), name
    # and it is not RTN's output, nor GPTQ's in column order
    rtn = tmp_path / "rtn"
    compress_checkpoint(_config(tiny_llama, rtn, None))
    assert tree_digest(rtn, "*.safetensors") != a
    natural = tmp_path / "natural"
    compress_checkpoint(_config(tiny_llama, natural, token_file, False, rounding="gptq"))
    assert tree_digest(natural, "*.safetensors") != a
    # the CLI's --no-act-order is that option
    from tests.reliability._util import compress_args, run_cli

    options = ["--method", "gptq", "--calibration", str(token_file), "--no-act-order"]
    options += ["--calibration-samples", "20", "--calibration-seq-len", "32", "--workers", "0"]
    cli = tmp_path / "cli"
    done = run_cli(compress_args(tiny_llama, cli, *options))
    assert done.returncode == 0, done.stderr
    assert tree_digest(cli, "*.safetensors") == tree_digest(natural, "*.safetensors")


def test_weighted_rounding_uses_the_statistics(
    tiny_llama: Path,
    token_file: Path,
    tmp_path: Path,
) -> None:
    """mse with calibration weights each input by its second moment: a different output from
    mse without, and a smaller output error Σ tr(ΔW H ΔWᵀ) on the calibration tokens."""
    weighted, plain = tmp_path / "weighted", tmp_path / "plain"
    compress_checkpoint(_config(tiny_llama, weighted, token_file, rounding="mse"))
    compress_checkpoint(_config(tiny_llama, plain, None, rounding="mse"))
    assert tree_digest(weighted, "*.safetensors") != tree_digest(plain, "*.safetensors")
    from compressor.formats.compressed import decompress_checkpoint

    original = load_dir(tiny_llama)
    hessians = _full_forward_hessians(tiny_llama, np.load(token_file))

    def output_error(out: Path) -> float:
        dense = load_dir(decompress_checkpoint(out, tmp_path / f"{out.name}-dense"))
        total = 0.0
        for module, h in hessians.items():
            d = dense[f"{module}.weight"].double() - original[f"{module}.weight"].double()
            total += float(torch.einsum("ij,jk,ik->", d, h, d))
        return total

    assert output_error(weighted) < output_error(plain)


def test_a_run_that_fails_mid_calibration_resumes_at_the_next_layer(
    tiny_llama: Path,
    token_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reference = tmp_path / "reference"
    compress_checkpoint(_config(tiny_llama, reference, token_file, rounding="gptq"))

    dest = tmp_path / "out"
    config = _config(tiny_llama, dest, token_file, rounding="gptq", keep_staging=True)
    from compressor.calibration.layers import DecoderRunner

    real = DecoderRunner.run_layer
    calls: list[int] = []

    def failing(self, i, hidden, kwargs, hessians=True):  # type: ignore[no-untyped-def]
        calls.append(i)
        if len(calls) == 5:  # shard 0 finished (3 layers), shard 1 dies in its second layer
            raise RuntimeError("killed")
        return real(self, i, hidden, kwargs, hessians)

    monkeypatch.setattr(DecoderRunner, "run_layer", failing)
    with pytest.raises(RuntimeError, match="killed"):
        compress_checkpoint(config)
    assert not dest.exists()
    calls.clear()
    monkeypatch.setattr(DecoderRunner, "run_layer", lambda *a: calls.append(a[1]) or real(*a))
    compress_checkpoint(config)
    # shard 0: nothing; shard 1: layers 1 and 2; shard 2: all three
    assert calls == [1, 2, 0, 1, 2]
    assert tree_digest(reference, "*.safetensors") == tree_digest(dest, "*.safetensors")


def test_gptq_without_calibration_is_refused() -> None:
    with pytest.raises(ConfigError, match="rounding gptq needs calibration data"):
        build_config("/x", "/y", rounding="gptq")
    with pytest.raises(ConfigError, match="with rounding rtn it would run the model for nothing"):
        build_config("/x", "/y", calibration={"path": "/t.npy"})
    build_config("/x", "/y", calibration={"path": "/t.npy"}, budget={"target_bits": 4.5})
    with pytest.raises(ConfigError, match="rounding gptq writes integer codes"):
        build_config("/x", "/y", preset="minmax", rounding="gptq")


def test_calibration_needs_config_json_and_the_file(
    tiny_llama: Path,
    token_file: Path,
    tmp_path: Path,
) -> None:
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for f in tiny_llama.glob("*.safetensors*"):
        shutil.copy(f, bare / f.name)
    shutil.copy(next(tiny_llama.glob("*.index.json")), bare / "model.safetensors.index.json")
    with pytest.raises(ConfigError, match=r"needs its config\.json"):
        Pipeline(_config(bare, tmp_path / "o1", token_file, rounding="gptq")).make_plan()
    with pytest.raises(ConfigError, match="cannot read the calibration file"):
        Pipeline(
            _config(tiny_llama, tmp_path / "o2", tmp_path / "absent.npy", rounding="gptq")
        ).make_plan()
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_budget_with_calibration_measures_the_output_error(
    tiny_llama: Path,
    token_file: Path,
    tmp_path: Path,
) -> None:
    """--target-bits with calibration ranks candidates by Σ_rows ΔW H ΔWᵀ (H per token), not by
    the weights' squared error; and the run (with gptq) completes under the budget."""
    from compressor.math.quant import QuantArgs
    from compressor.math.rounding import quantize_rows
    from compressor.stages.executor import SerialExecutor
    from compressor.stages.stats import candidate_errors

    config = _config(
        tiny_llama, tmp_path / "out", token_file, rounding="gptq", budget={"target_bits": 4.5}
    )
    pipe = _calibrated(config)
    executor = SerialExecutor()
    cands = [QuantArgs(4, group_size=64), QuantArgs(8, strategy="channel")]
    got = candidate_errors(pipe.plan, pipe.staging, cands, executor, None, pipe.calibration)
    name = "model.layers.2.mlp.down_proj.weight"
    stat = pipe.calibration.stats[name]
    h = calibrate_stage.load_hessian(pipe.staging, stat).double() / stat.tokens
    w = load_dir(tiny_llama)[name]
    for k, args in enumerate(cands):
        w_hat = torch.cat(
            [
                quantize_rows(w[r : r + 64], args, "mse", importance=torch.diagonal(h))[3]
                for r in range(0, w.shape[0], 64)
            ]
        )
        d = w_hat.double() - w.double()
        assert got[name].errors[k] == pytest.approx(float(((d @ h) * d).sum()), rel=1e-9)
    assert got[name].signal == pytest.approx(float(((w.double() @ h) * w.double()).sum()))
    report = compress_checkpoint(config)
    assert report.ratio > 1


def test_wanda_reads_its_input_norms_from_the_calibration(
    tiny_llama: Path,
    token_file: Path,
    tmp_path: Path,
) -> None:
    """Pruning importance "activation" without an activations file scores |w|·‖x_j‖ with the
    calibration's input norms: it prunes the weights that an activations file of the float64
    norms of transformers' own forward on the same tokens prunes, and not magnitude's."""
    from safetensors.numpy import save_file

    h = _full_forward_hessians(tiny_llama, np.load(token_file))
    norms = tmp_path / "norms.safetensors"
    save_file({m: torch.diagonal(x).sqrt().float().numpy() for m, x in h.items()}, str(norms))
    pruning = {"sparsity": 0.5, "importance": "activation"}
    calibrated = compress_checkpoint(
        _config(tiny_llama, tmp_path / "cal", token_file, preset="dense", pruning=pruning)
    )
    assert calibrated.ratio == pytest.approx(1.0, abs=0.01)
    for dest, options in (
        ("file", {**pruning, "activations": str(norms)}),
        ("magnitude", {"sparsity": 0.5}),
    ):
        compress_checkpoint(
            _config(tiny_llama, tmp_path / dest, None, preset="dense", pruning=options)
        )
    cal, file, magnitude = (load_dir(tmp_path / d) for d in ("cal", "file", "magnitude"))
    pruned = [n for n in h if f"{n}.weight" in cal]
    assert len(pruned) == len(h) == 21
    agree = differ = total = 0
    for module in pruned:
        name = f"{module}.weight"
        mask = cal[name] == 0
        assert mask.float().mean() == pytest.approx(0.5, abs=0.01), name
        agree += int((mask == (file[name] == 0)).sum())
        differ += int((mask != (magnitude[name] == 0)).sum())
        total += mask.numel()
    assert agree / total > 0.999  # float32 sums against float64: ties at the threshold only
    assert differ / total > 0.05


def test_wanda_needs_calibration_or_an_activations_file(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--calibration FILE .* or --activations FILE"):
        _config(
            tiny_llama,
            tmp_path / "out",
            None,
            preset="dense",
            pruning={"sparsity": 0.5, "importance": "activation"},
        )
