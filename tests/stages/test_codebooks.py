"""Codebook quantization end to end: NF4 against a numpy reference, k-means against
single-process Lloyd from the same start, serial against a local cluster (byte-identical)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from compressor.config import build_config
from compressor.errors import ConfigError
from compressor.formats.compressed import decompress_checkpoint, inspect_checkpoint
from compressor.formats.verify import verify_checkpoint
from compressor.math.codebook import (
    NF4_CODE,
    histogram_counts,
    init_centroids,
    kmeans_assign,
    kmeans_reference,
)
from compressor.math.pack import unpack_rows
from compressor.pipeline import compress_checkpoint
from compressor.schemes.codebook import nf4_quantize_rows
from compressor.stages.plan import make_plan
from compressor.testing.generate import LlamaShape, generate_llama_checkpoint

SHAPE = LlamaShape(hidden_size=256, intermediate_size=512, num_hidden_layers=1, vocab_size=256)
TARGETS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")
# F32 with intermediate 2048: down_proj (256, 2048) spans two 1 MB chunks, so its k-means sums
# really are reduced across chunks (k-means is exact but slow on CPU: few, small targets).
WIDE = LlamaShape(hidden_size=256, intermediate_size=2048, num_hidden_layers=1, vocab_size=256)
KMEANS_TARGETS = ("self_attn.q_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return generate_llama_checkpoint(tmp_path_factory.mktemp("codebooks") / "m", SHAPE, shard_mb=1)


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("codebooks") / "wide"
    return generate_llama_checkpoint(root, WIDE, dtype="F32", shard_mb=4)


def _tensors(root: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(root.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


def _compress(model: Path, out: Path, workers: int = 0, **options) -> Path:
    compress_checkpoint(build_config(str(model), str(out), workers=workers, chunk_mb=1, **options))
    return out


def _nf4_reference(w: np.ndarray) -> np.ndarray:
    """NF4 in the row-blocked layout, float64 numpy: absmax per 64 values of a row, the nearest
    code by counting midpoints strictly below x/absmax, x̂ = float32(code)·float32(absmax)."""
    code = np.array(NF4_CODE, dtype=np.float64)
    mid = (code[:-1] + code[1:]) / 2
    out = np.empty(w.shape, dtype=np.float32)
    for b0 in range(0, w.shape[1], 64):
        block = w[:, b0 : b0 + 64].astype(np.float64)
        absmax = np.abs(block).max(axis=1, keepdims=True)
        ratio = block / np.where(absmax == 0, 1.0, absmax)
        index = (ratio[..., None] > mid).sum(axis=-1)
        out[:, b0 : b0 + 64] = code.astype(np.float32)[index] * absmax.astype(np.float32)
    return out


def test_nf4_rows_match_the_reference_for_any_width() -> None:
    g = torch.Generator().manual_seed(0)
    for cols in (64, 100, 7, 129):
        x = torch.randn(33, cols, generator=g).to(torch.bfloat16)
        x[3] = 0  # an all-zero row: absmax 0, codes 7
        codes, absmax = nf4_quantize_rows(x)
        assert codes.shape == (33, cols) and absmax.shape == (33, -(-cols // 64))
        x_hat = torch.tensor(NF4_CODE, dtype=torch.float32)[codes.long()]
        x_hat = x_hat * absmax.repeat_interleave(64, dim=1)[:, :cols]
        assert torch.equal(x_hat, torch.from_numpy(_nf4_reference(x.float().numpy())))


def test_nf4_end_to_end(model: Path, tmp_path: Path) -> None:
    out = _compress(model, tmp_path / "nf4", preset="nf4")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (
        qc["tool"] == "checkpoint-compressor"
        and "quant_method" not in qc
        and qc["format"] == "codebook"
    )
    assert qc["config_groups"]["group_0"]["type"] == "nf4"
    assert verify_checkpoint(out).ok, verify_checkpoint(out).problems
    stored = _tensors(out)
    m = "model.layers.0.mlp.down_proj"
    assert stored[f"{m}.weight_nf4"].dtype == torch.int32
    assert stored[f"{m}.weight_nf4"].shape == (256, 512 * 4 // 32)
    assert stored[f"{m}.weight_absmax"].dtype == torch.float32
    assert stored[f"{m}.weight_absmax"].shape == (256, 512 // 64)
    assert f"{m}.weight" not in stored
    schemes = {r["name"]: r["scheme"] for r in inspect_checkpoint(out)["tensors"]}
    assert schemes[f"{m}.weight"] == "nf4 b64"

    dense = _tensors(decompress_checkpoint(out, tmp_path / "nf4-dense"))
    source = _tensors(model)
    for target in TARGETS:
        name = f"model.layers.0.{target}.weight"
        w = source[name]
        expected = torch.from_numpy(_nf4_reference(w.float().numpy())).to(w.dtype)
        assert dense[name].dtype == w.dtype
        assert torch.equal(dense[name], expected), name
        error = (dense[name].double() - w.double()).norm() / w.double().norm()
        assert error < 0.15, (name, float(error))
    assert torch.equal(dense["lm_head.weight"], source["lm_head.weight"])  # copied


KMEANS_CASES = {  # bits, init, iterations
    "kmeans4-histogram": (4, "histogram", 3),
    "kmeans3-uniform": (3, "uniform", 2),
}


def _kmeans_recipe(case: str, tmp_path: Path, targets: tuple[str, ...]) -> dict:
    bits, init, iterations = KMEANS_CASES[case]
    recipe = tmp_path / f"{case}.yaml"
    recipe.write_text(
        f"quantization:\n  - method: kmeans\n    targets: {json.dumps(list(targets))}\n"
        f"    bits: {bits}\n    kmeans_iterations: {iterations}\n    kmeans_init: {init}\n"
    )
    return {"recipe_path": recipe}


@pytest.mark.parametrize("case", list(KMEANS_CASES))
def test_kmeans_codebook_equals_single_process_kmeans(
    wide: Path, tmp_path: Path, case: str
) -> None:
    bits, init, iterations = KMEANS_CASES[case]
    names = tuple(f"model.layers.0.{t}" for t in KMEANS_TARGETS)
    options = _kmeans_recipe(case, tmp_path, names)
    plan = make_plan(build_config(str(wide), str(tmp_path / case), chunk_mb=1, **options))
    assert len(plan.by_name["model.layers.0.mlp.down_proj.weight"].chunks) == 2
    out = _compress(wide, tmp_path / case, **options)
    report = json.loads((out / "compression.json").read_text())
    assert report["kmeans"]["model.layers.0.mlp.down_proj.weight"]["iterations"] == iterations
    assert verify_checkpoint(out).ok, verify_checkpoint(out).problems
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["tool"] == "checkpoint-compressor" and "quant_method" not in qc
    assert qc["config_groups"]["group_0"]["type"] == "kmeans"
    stored = _tensors(out)
    dense = _tensors(decompress_checkpoint(out, tmp_path / f"{case}-dense"))
    source = _tensors(wide)
    schemes = {r["name"]: r["scheme"] for r in inspect_checkpoint(out)["tensors"]}
    for target in KMEANS_TARGETS:
        m = f"model.layers.0.{target}"
        w = source[f"{m}.weight"]
        assert schemes[f"{m}.weight"] == f"kmeans {bits}-bit"
        lo, hi = float(w.min()), float(w.max())
        histogram = histogram_counts(w, lo, hi, 4096) if init == "histogram" else None
        start = init_centroids(lo, hi, 2**bits, histogram)
        expected = kmeans_reference(w, start, iterations).to(torch.float32)
        codebook = stored[f"{m}.weight_codebook"]
        assert codebook.dtype == torch.float32 and codebook.shape == (2**bits,)
        assert torch.equal(codebook, expected), m
        rows, cols = w.shape
        assert stored[f"{m}.weight_indices"].shape == (rows, -(-cols * bits // 32))
        indices = unpack_rows(stored[f"{m}.weight_indices"], bits, cols).long()
        assert torch.equal(indices, kmeans_assign(w, codebook))  # the nearest stored centroid
        assert torch.equal(dense[f"{m}.weight"], codebook[indices].to(w.dtype))


def test_verify_names_codebook_config_problems(model: Path, tmp_path: Path) -> None:
    out = _compress(model, tmp_path / "nf4", preset="nf4")
    config = json.loads((out / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    group["targets"] = [*group["targets"][1:], "model.layers.0.mlp.nothing"]
    (out / "config.json").write_text(json.dumps(config))
    problems = [p.message for p in verify_checkpoint(out).problems]
    assert any("no quantization config group targets it" in p for p in problems), problems
    group["targets"].append("model.layers.0.mlp.down_proj")
    group["dtype"] = "I32"
    (out / "config.json").write_text(json.dumps(config))
    problems = [p.message for p in verify_checkpoint(out).problems]
    assert any("dtype must be BF16" in p for p in problems), problems


def test_transformers_refuses_our_layouts(model: Path, tmp_path: Path) -> None:
    """Our blocks carry no quant_method, so transformers refuses them instead of loading random
    weights in place of the packed ones."""
    from transformers import AutoModelForCausalLM

    for preset in ("nf4", "minmax"):
        out = tmp_path / preset
        compress_checkpoint(build_config(str(model), str(out), preset=preset, workers=0))
        with pytest.raises(ValueError, match="quant_method"):
            AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"preset": "nf4", "bits": 3}, "fixed 4-bit code"),
        ({"preset": "nf4", "strategy": "channel"}, "drop strategy"),
        ({"preset": "kmeans4", "group_size": 64}, "drop group_size"),
        ({"preset": "kmeans4", "pruning": {"sparsity": 0.5}}, "pruning is not supported"),
        ({"preset": "nf4", "budget": {"target_bits": 4.5}}, "budget"),
    ],
)
def test_codebook_config_errors_say_what_to_use(model: Path, tmp_path, options, message) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(str(model), str(tmp_path / "out"), **options)


def test_codebook_and_integer_rules_are_not_mixed(model: Path, tmp_path: Path) -> None:
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text(
        'quantization:\n  - targets: ["re:.*mlp.*"]\n    method: nf4\n  - targets: ["Linear"]\n'
    )
    with pytest.raises(ConfigError, match="cannot be mixed"):
        build_config(str(model), str(tmp_path / "out"), recipe_path=recipe)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["nf4", "kmeans4", "kmeans3-uniform"])
def test_serial_and_cluster_outputs_are_byte_identical(
    model: Path, wide: Path, tmp_path: Path, case: str
) -> None:
    if case == "kmeans3-uniform":  # down_proj spans two chunks
        options = _kmeans_recipe(case, tmp_path, ("model.layers.0.mlp.down_proj",))
        model = wide
    else:
        options = {"preset": case}
    serial = _compress(model, tmp_path / "serial", **options)
    cluster = _compress(model, tmp_path / "cluster", workers=2, **options)
    files = sorted(p.name for p in serial.glob("*.safetensors"))
    assert files == sorted(p.name for p in cluster.glob("*.safetensors"))
    for name in [*files, "config.json"]:
        assert (serial / name).read_bytes() == (cluster / name).read_bytes(), name
    assert verify_checkpoint(cluster).ok


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_codebook_codes_on_cuda_match_the_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(256, 200, generator=g) * torch.rand(1, 200, generator=g) * 4).to(
        torch.bfloat16
    )
    codes, absmax = nf4_quantize_rows(x)
    cuda_codes, cuda_absmax = nf4_quantize_rows(x.cuda())
    assert torch.equal(codes, cuda_codes.cpu()) and torch.equal(absmax, cuda_absmax.cpu())
    centroids = init_centroids(float(x.min()), float(x.max()), 8).to(torch.float32).double()
    assert torch.equal(kmeans_assign(x, centroids), kmeans_assign(x.cuda(), centroids).cpu())
