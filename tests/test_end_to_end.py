"""End to end: generated Llama checkpoints → compress → checked against independent readers.

Every check here reads the output with code that is not ours: compressed-tensors' own
decompressor, the `safetensors` loader, transformers, or a numpy reference written in this file.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.config import QuantRule, Recipe, RunConfig, build_config
from compressor.errors import ConfigError, InputError, OutputError
from compressor.formats.compressed import decompress_checkpoint, inspect_checkpoint
from compressor.formats.staging import Staging
from compressor.pipeline import Pipeline, compress_checkpoint
from compressor.stages.assemble import STAGE as ASSEMBLED
from compressor.stages.executor import SerialExecutor
from tests.conftest import (
    assert_same_tensors,
    ct_decompress,
    input_float64,
    load_dir,
    read_safetensors_numpy,
    tree_digest,
)

NON_TARGETS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
LINEAR_SUFFIXES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def _linear_modules(layers: int = 2) -> list[str]:
    return [f"model.layers.{k}.{s}" for k in range(layers) for s in LINEAR_SUFFIXES]


@pytest.fixture(autouse=True)
def _inputs_untouched(source_digests):
    """After every test: the generated inputs are byte-identical to what was generated."""
    yield
    for root, digest in source_digests.items():
        assert tree_digest(root) == digest, f"{root} was modified"


# -- compressed-tensors compatibility -----------------------------------------------------------
@pytest.mark.parametrize("preset", ["w8a16", "w4a16", "w4a16-asym"])
def test_compressed_tensors_decompresses_like_us(
    preset, compressed, ours_dense, llama_src, tmp_path
):
    out, report = compressed(preset)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    assert qc["format"] == "pack-quantized"
    assert len(qc["config_groups"]) == 1
    (group,) = qc["config_groups"].values()
    assert sorted(group["targets"]) == sorted(_linear_modules())

    theirs = load_dir(ct_decompress(out, tmp_path / "ct"))
    ours = load_dir(ours_dense(out))
    assert_same_tensors(theirs, ours)
    assert not any(n.endswith(("weight_packed", "weight_scale", "weight_zero_point")) for n in ours)

    # Non-target tensors are copied bit for bit from the input.
    source = load_dir(llama_src)
    assert sorted(ours) == sorted(source)
    for name in (*NON_TARGETS, "model.layers.0.input_layernorm.weight"):
        assert ours[name].dtype == source[name].dtype == torch.bfloat16
        assert torch.equal(ours[name].view(torch.int16), source[name].view(torch.int16)), name
    # Quantized weights changed, but only within the scheme's error.
    for module in _linear_modules():
        assert ours[f"{module}.weight"].dtype == torch.bfloat16
        assert not torch.equal(ours[f"{module}.weight"], source[f"{module}.weight"])

    # The report's error figures are what a float64 recomputation from the output gives.
    written = json.loads((out / "compression.json").read_text())
    rows = {t["name"]: t for t in written["tensors"]}
    assert rows.keys() == source.keys()
    for name, row in rows.items():
        x = source[name].to(torch.float64)
        x_hat = ours[name].to(torch.float64)
        sq_err = float(((x_hat - x) ** 2).sum())
        rel = math.sqrt(sq_err / float((x * x).sum()))
        assert row["relative_error"] == pytest.approx(rel, rel=1e-6, abs=1e-12), name
        assert row["max_abs_error"] == pytest.approx(float((x_hat - x).abs().max()), rel=1e-6), name
        if row["scheme"] == "copy":
            assert rel == 0.0 and row["sqnr_db"] is None
        else:
            assert 0 < rel < (0.05 if preset == "w8a16" else 0.25), (name, rel)
            assert row["sqnr_db"] == pytest.approx(-20 * math.log10(rel), rel=1e-6)
    assert {r["relative_error"] for r in report.tensors} == {
        r["relative_error"] for r in rows.values()
    }


# -- minmax: the float-offset formula against a numpy reference ---------------------------------
def _round_bf16(v: np.ndarray) -> np.ndarray:
    """float64 → nearest bfloat16 value (ties to even), computed exactly in float64."""
    mantissa, exponent = np.frexp(v)
    return np.ldexp(np.rint(np.ldexp(mantissa, 8)), exponent - 8)


def _minmax_reference(x: np.ndarray, bits: int, group: int | None) -> np.ndarray:
    """x̂ = m + q·s with s = bf16((max-min)/(2^b-1)), m = min, q = clip(round((x-m)/s)), float64."""
    rows, cols = x.shape
    g = group or cols
    levels = 2**bits - 1
    xg = x.reshape(rows, cols // g, g)
    lo = xg.min(axis=2, keepdims=True)
    hi = xg.max(axis=2, keepdims=True)
    scale = _round_bf16((hi - lo) / levels)
    scale[scale == 0] = 1.0
    q = np.clip(np.rint((xg - lo) / scale), 0, levels)
    return (lo + q * scale).reshape(rows, cols)


@pytest.mark.parametrize(
    ("bits", "strategy"), [(4, "group"), (8, "group"), (4, "channel"), (8, "channel")]
)
def test_minmax_matches_numpy_reference(bits, strategy, compressed, ours_dense, llama_src):
    out, _ = compressed("minmax", bits=bits, strategy=strategy)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["tool"] == "checkpoint-compressor" and "quant_method" not in qc
    assert qc["format"] == "minmax-float-offset"
    (group,) = qc["config_groups"].values()
    assert group["num_bits"] == bits and group["strategy"] == strategy
    assert sorted(group["targets"]) == sorted(_linear_modules())

    x = input_float64(llama_src)
    exact = load_dir(ours_dense(out, "float32"))  # float32 holds m + q·s exactly
    rounded = load_dir(ours_dense(out))  # the default: the scale's dtype, bf16
    for module in _linear_modules():
        name = f"{module}.weight"
        ref = _minmax_reference(x[name], bits, 128 if strategy == "group" else None)
        got = exact[name].to(torch.float64).numpy()
        assert np.array_equal(got, ref), f"{name}: {np.count_nonzero(got != ref)} values differ"
        assert rounded[name].dtype == torch.bfloat16
        assert np.array_equal(rounded[name].to(torch.float64).numpy(), _round_bf16(ref)), name
    for name in NON_TARGETS:
        assert np.array_equal(rounded[name].to(torch.float64).numpy(), x[name]), name


def _offset_fit_reference(x: np.ndarray, group: int) -> np.ndarray:
    """minmax 4-bit with the hqq library's offset fit, numpy float64: scale as RTN's, offset
    from the grid through 0, moved by the group's mean error until its mean |error| stops
    falling (the move of that last pass kept), stored in bf16, codes from the stored pair."""
    rows, cols = x.shape
    xg = x.reshape(rows, cols // group, group)
    lo, hi = xg.min(axis=2, keepdims=True), xg.max(axis=2, keepdims=True)
    scale = _round_bf16((hi - lo) / 15)
    scale[scale == 0] = 1.0
    offset = np.rint(lo / scale) * scale
    best = np.full(offset.shape, np.inf)
    live = np.ones(offset.shape, dtype=bool)
    for _ in range(20):
        d = xg - (offset + np.clip(np.rint((xg - offset) / scale), 0, 15) * scale)
        err = np.abs(d).mean(axis=2, keepdims=True)
        offset = np.where(live, offset + d.mean(axis=2, keepdims=True), offset)
        live &= err < best
        best = np.minimum(best, err)
    m = _round_bf16(offset)
    return (m + np.clip(np.rint((xg - m) / scale), 0, 15) * scale).reshape(rows, cols)


def test_minmax_hqq_is_the_librarys_offset_fit(compressed, ours_dense, llama_src):
    out, _ = compressed("minmax", bits=4, rounding="hqq")
    x = input_float64(llama_src)
    exact = load_dir(ours_dense(out, "float32"))
    for module in _linear_modules():
        name = f"{module}.weight"
        ref = _offset_fit_reference(x[name], 128)
        got = exact[name].to(torch.float64).numpy()
        # a mean summed in another order can tip a near-tie: a few groups may part ways
        assert np.mean(got == ref) >= 0.999, f"{name}: {np.count_nonzero(got != ref)} differ"
        rtn = _minmax_reference(x[name], 4, 128)
        assert np.abs(got - x[name]).mean() < np.abs(rtn - x[name]).mean(), name


# -- transformers loads the output ---------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
def test_transformers_loads_w4a16_like_our_dense_copy(compressed, ours_dense, llama_src):
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    out, _ = compressed("w4a16")
    dense = ours_dense(out)
    # bf16, the checkpoint's own dtype: compressed-tensors dequantizes (q·s) in the load dtype,
    # as our decompress does in the scale's dtype, so weights and logits agree bit for bit.
    # (In float32 they would not: there compressed-tensors keeps q·s unrounded, while our
    # dense copy holds it rounded to bf16, the dtype the scales are stored in.)
    ids = torch.randint(0, 1024, (2, 24), generator=torch.Generator().manual_seed(0))

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits

    reference = AutoModelForCausalLM.from_pretrained(str(dense), dtype=torch.bfloat16)
    expected = logits(reference)
    assert expected.shape == (2, 24, 1024) and torch.isfinite(expected).all()

    # Default load: modules stay compressed (weight_packed/weight_scale) and run that way.
    compressed_model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    names = {n for n, _ in compressed_model.named_parameters()}
    assert "model.layers.0.mlp.up_proj.weight_packed" in names
    assert torch.equal(logits(compressed_model), expected)

    # Dequantized on load: every linear weight equals our decompressed one.
    dequantized = AutoModelForCausalLM.from_pretrained(
        str(out), dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    for module in _linear_modules():
        a = dequantized.get_submodule(module).weight
        b = reference.get_submodule(module).weight
        assert torch.equal(a, b), module
    assert torch.equal(logits(dequantized), expected)

    # The original (unquantized) model gives other logits: the comparison above has teeth.
    original = logits(AutoModelForCausalLM.from_pretrained(str(llama_src), dtype=torch.bfloat16))
    assert not torch.equal(original, expected)


# -- partial groups: 576 inputs ------------------------------------------------------------------
def test_group_fallback_for_576_inputs(llama576_src, compressed, ours_dense, tmp_path):
    config = build_config(str(llama576_src), str(tmp_path / "planned"), preset="w4a16", workers=0)
    plan = Pipeline(config).make_plan()
    wide = {f"{m}.weight" for m in _linear_modules() if not m.endswith("down_proj")}
    for t in plan.quantized:
        expected = 64 if t.name in wide else 128  # down_proj has 1536 inputs: g128 divides
        assert t.args is not None and t.args.group_size == expected, t.name
        assert (t.note is not None) == (t.name in wide)
    assert sorted(n.split(":")[0] for n in plan.notes) == sorted(wide)
    assert all("group 128 → 64 (576 inputs)" in n for n in plan.notes)
    assert not (tmp_path / "planned").exists()  # planning writes nothing

    out, report = compressed("w4a16", source=llama576_src)
    assert len(report.notes) == len(wide)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = {g["weights"]["group_size"]: g for g in qc["config_groups"].values()}
    assert sorted(groups) == [64, 128]
    assert sorted(groups[64]["targets"]) == sorted(m.removesuffix(".weight") for m in wide)
    assert all(t.endswith("down_proj") for t in groups[128]["targets"])
    assert qc["format"] == "mixed-precision"
    scales = read_safetensors_numpy(next(out.glob("*.safetensors")))
    assert scales["model.layers.0.self_attn.q_proj.weight_scale"][1].shape == (576, 9)
    assert scales["model.layers.0.mlp.down_proj.weight_scale"][1].shape == (576, 12)

    assert_same_tensors(load_dir(ct_decompress(out, tmp_path / "ct")), load_dir(ours_dense(out)))


def test_strict_groups_fails_before_writing_anything(llama576_src, tmp_path):
    runs = tmp_path / "runs"  # does not exist: any directory the run creates would show
    config = build_config(
        str(llama576_src), str(runs / "out"), preset="w4a16", workers=0, strict_groups=True
    )
    with pytest.raises(ConfigError) as info:
        compress_checkpoint(config)
    assert info.value.tensor == "model.layers.0.self_attn.q_proj.weight"
    assert "model.layers.0.self_attn.q_proj.weight" in str(info.value)
    assert "576" in str(info.value)
    assert not runs.exists()


@pytest.fixture(scope="module")
def odd_src(tmp_path_factory):
    """intermediate 1000: gate/up have 1000 rows (not a multiple of 32, so the last zero-point
    word is partial and the last chunk short) and down_proj 1000 inputs (no group size ≥ 32
    divides it: per-channel fallback)."""
    from compressor.testing.generate import LlamaShape, generate_llama_checkpoint

    return generate_llama_checkpoint(
        tmp_path_factory.mktemp("src") / "llama-odd",
        LlamaShape(intermediate_size=1000),
        shard_mb=2,
        seed=2,
    )


@pytest.mark.parametrize("bits", [4, 3])
def test_odd_shapes_asymmetric(bits, odd_src, compressed, ours_dense, tmp_path):
    out, report = compressed("w4a16-asym", source=odd_src, bits=bits, chunk_mb=1)
    assert sorted(report.notes) == sorted(
        f"model.layers.{k}.mlp.down_proj.weight: group 128 → per-channel (1000 inputs)"
        for k in range(2)
    )
    schemes = {t["name"]: t["scheme"] for t in report.tensors}
    assert schemes["model.layers.0.mlp.down_proj.weight"] == f"int{bits} asym channel"
    assert schemes["model.layers.0.mlp.up_proj.weight"] == f"int{bits} asym g128"
    tensors = read_safetensors_numpy(next(out.glob("*.safetensors")))
    zp = tensors["model.layers.0.mlp.up_proj.weight_zero_point"][1]
    assert zp.shape == (math.ceil(1000 * bits / 32), 4)  # packed along rows, 4 groups of 128
    assert_same_tensors(load_dir(ct_decompress(out, tmp_path / "ct")), load_dir(ours_dense(out)))


# -- determinism: serial vs LocalCluster, chunking -----------------------------------------------
def _weights_digest(out: Path) -> dict[str, str]:
    digest = tree_digest(out, "*.safetensors")
    digest.update(tree_digest(out, "model.safetensors.index.json"))
    return digest


@pytest.mark.slow
def test_serial_and_local_cluster_write_identical_bytes(llama_src, tmp_path):
    options = {"preset": "w4a16-asym", "chunk_mb": 1, "max_shard_mb": 1}
    serial = compress_checkpoint(
        build_config(str(llama_src), str(tmp_path / "serial"), workers=0, **options)
    )
    cluster = compress_checkpoint(
        build_config(str(llama_src), str(tmp_path / "cluster"), workers=2, **options)
    )
    a, b = _weights_digest(tmp_path / "serial"), _weights_digest(tmp_path / "cluster")
    assert "model.safetensors.index.json" in a
    assert len([n for n in a if n.endswith(".safetensors")]) >= 2
    assert a == b
    assert serial.output_bytes == cluster.output_bytes
    assert [t["relative_error"] for t in serial.tensors] == pytest.approx(
        [t["relative_error"] for t in cluster.tensors], rel=1e-12
    )
    # Chunking is an execution detail: one chunk per tensor gives the same bytes.
    compress_checkpoint(
        build_config(
            str(llama_src), str(tmp_path / "big"), workers=0, preset="w4a16-asym", max_shard_mb=1
        )
    )
    assert _weights_digest(tmp_path / "big") == a


# -- resume ---------------------------------------------------------------------------------------
def test_resume_skips_finished_chunks(llama_src, tmp_path, monkeypatch):
    import compressor.schemes.int_packed as int_packed

    def config(dest: str) -> RunConfig:
        return build_config(
            str(llama_src),
            str(tmp_path / dest),
            preset="w4a16-asym",
            workers=0,
            chunk_mb=1,
            keep_staging=True,
        )

    calls: list[int] = []
    real = int_packed.quantize_rows_packed

    def counting(x, *args, **kwargs):
        calls.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(int_packed, "quantize_rows_packed", counting)

    # A "crashed" run: plan, ingest, stats, thresholds and compress, but no write/publish.
    crashed = Pipeline(config("out"))
    plan = crashed.make_plan()
    assert plan.chunk_count > len(plan.quantized)  # several chunks per tensor
    executor = SerialExecutor()
    crashed.ingest(executor)
    crashed.stats(executor)  # nothing to do without pruning
    crashed.thresholds()
    crashed.compress(executor)
    staging = Staging(plan.staging_root)
    # Channel/group presets skip staging the input (compress reads the source directly).
    assert crashed.direct and staging.count_done("ingest") == 0
    assert staging.count_done(ASSEMBLED) == plan.chunk_count
    total_rows = sum(t.shape2d[0] for t in plan.quantized)
    assert sum(calls) == total_rows
    assert not (tmp_path / "out").exists()

    # Lose some finished chunks, as if the crash hit mid-stage: only those are recomputed.
    lost = sorted((plan.staging_root / "done" / ASSEMBLED).glob("*.json"))[::3]
    lost_rows = 0
    by_key = {t.key: t for t in plan.quantized}
    for marker in lost:
        key, chunk = marker.stem.split(".c")
        r0, r1 = by_key[key].chunks[int(chunk)]
        lost_rows += r1 - r0
        marker.unlink()
    calls.clear()
    resumed = compress_checkpoint(config("out"))
    assert sum(calls) == lost_rows > 0
    assert staging.count_done(ASSEMBLED) == plan.chunk_count
    assert resumed.run_key == plan.run_key

    # The resumed output is byte-identical to a clean run's (apart from the run's own report).
    calls.clear()
    compress_checkpoint(config("clean"))
    assert sum(calls) == total_rows  # a different destination: its own staging, computed afresh
    resumed_files = tree_digest(tmp_path / "out")
    clean_files = tree_digest(tmp_path / "clean")
    assert resumed_files.keys() == clean_files.keys()
    for rel in resumed_files:
        if rel not in ("compression.json", "manifest.json"):
            assert resumed_files[rel] == clean_files[rel], rel
    # The resumed run reports the same error figures as the clean one (recorded, not recomputed).
    rows = [
        json.loads((tmp_path / d / "compression.json").read_text())["tensors"]
        for d in ("out", "clean")
    ]
    assert rows[0] == rows[1]


# -- bad input --------------------------------------------------------------------------------------
def test_existing_destination_and_overwrite(llama_src, destination):
    destination.mkdir()
    (destination / "old.txt").write_text("previous output")
    config = build_config(str(llama_src), str(destination), preset="w8a16", workers=0)
    with pytest.raises(OutputError) as info:
        compress_checkpoint(config)
    assert str(destination) in str(info.value)
    assert (destination / "old.txt").read_text() == "previous output"

    compress_checkpoint(
        build_config(str(llama_src), str(destination), preset="w8a16", workers=0, overwrite=True)
    )
    assert not (destination / "old.txt").exists()
    assert (destination / "config.json").is_file() and list(destination.glob("*.safetensors"))
    leftovers = [p.name for p in destination.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers  # no .old, .partial, .lock or staging left behind


def test_destination_inside_source_is_refused(llama_src):
    inside = llama_src / "compressed"
    with pytest.raises(OutputError) as info:
        compress_checkpoint(build_config(str(llama_src), str(inside), workers=0))
    assert "inside the source" in str(info.value)
    assert not inside.exists()
    assert not any(p.name.startswith(".") for p in llama_src.iterdir())


def test_recipe_matching_nothing_is_refused(llama_src, destination):
    recipe = Recipe(quantization=[QuantRule(targets=["re:.*no_such_module.*"], bits=4)])
    config = RunConfig(
        source=str(llama_src),
        destination=str(destination),
        preset="recipe",
        recipe=recipe,
        workers=0,
    )
    with pytest.raises(ConfigError) as info:
        compress_checkpoint(config)
    assert "matches no tensor" in str(info.value)
    assert not destination.exists()


def test_nan_in_target_weight(llama_src, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(llama_src, broken)
    name = "model.layers.1.mlp.up_proj.weight"
    shard = (
        broken
        / json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"][name]
    )
    data = bytearray(shard.read_bytes())
    (n,) = np.frombuffer(bytes(data[:8]), dtype="<u8")
    start, _ = json.loads(data[8 : 8 + int(n)])[name]["data_offsets"]
    at = 8 + int(n) + start + 2 * (1100 * 512 + 3)  # row 1100, column 3: the second chunk
    data[at : at + 2] = np.array([0x7FC0], dtype="<u2").tobytes()  # bf16 NaN
    shard.write_bytes(bytes(data))
    before = tree_digest(broken)

    dest = tmp_path / "out"
    with pytest.raises(InputError) as info:
        compress_checkpoint(
            build_config(str(broken), str(dest), preset="w4a16", workers=0, chunk_mb=1)
        )
    assert info.value.tensor == name
    assert name in str(info.value) and "NaN" in str(info.value)
    assert not dest.exists()
    assert not list(tmp_path.glob(".out.partial*")) and not (tmp_path / ".out.lock").exists()
    assert tree_digest(broken) == before


# -- inspect -----------------------------------------------------------------------------------------
def test_inspect_input_and_output(llama_src, compressed):
    dense = inspect_checkpoint(llama_src)
    input_bytes = sum(t.nbytes for t in load_dir(llama_src).values())
    assert dense["total_bytes"] == dense["dense_bytes"] == input_bytes
    assert dense["ratio"] == 1.0 and dense["quantized"] == 0
    assert {t["scheme"] for t in dense["tensors"]} == {"dense"}
    assert len(dense["tensors"]) == 2 * 9 + 3

    out, report = compressed("w4a16")
    info = inspect_checkpoint(out)
    assert info["quantized"] == 14
    assert info["dense_bytes"] == input_bytes == report.input_bytes
    assert info["total_bytes"] == sum(t.nbytes for t in load_dir(out).values())
    assert info["total_bytes"] <= report.output_bytes  # shard files add their headers
    schemes = {t["name"]: t["scheme"] for t in info["tensors"]}
    assert sorted(schemes) == sorted(load_dir(llama_src))  # one row per logical weight
    for module in _linear_modules():
        assert schemes[f"{module}.weight"] == "int4 sym g128"
    for name in NON_TARGETS:
        assert schemes[name] == "dense"
    quantized = [t for t in info["tensors"] if t["scheme"] != "dense"]
    q_ratio = sum(t["dense_bytes"] for t in quantized) / sum(t["bytes"] for t in quantized)
    assert q_ratio > 3.5  # 16 bits → 4 bits + a bf16 scale per 128 weights ≈ ×3.76
    # The whole checkpoint: embeddings and lm_head (2 of 14 MB) stay dense, so ≈ ×2.77.
    linear = sum(t["dense_bytes"] for t in quantized)
    expected = input_bytes / (input_bytes - linear + linear / 16 * (4 + 16 / 128) + 14 * 16)
    assert info["ratio"] == pytest.approx(expected, rel=1e-3)
    assert info["ratio"] > 2.5

    minmax_out, _ = compressed("minmax", bits=8, strategy="channel")
    schemes = {t["name"]: t["scheme"] for t in inspect_checkpoint(minmax_out)["tensors"]}
    assert schemes["model.layers.0.mlp.down_proj.weight"] == "int8 minmax channel"
    asym_out, _ = compressed("w4a16-asym")
    schemes = {t["name"]: t["scheme"] for t in inspect_checkpoint(asym_out)["tensors"]}
    assert schemes["model.layers.0.mlp.down_proj.weight"] == "int4 asym g128"


@pytest.mark.slow
def test_transformers_loads_w4a16_asym_with_dequantize_on_load(llama_src, tmp_path):
    """transformers 5.24's default path refuses packed asymmetric zero points (it initialises
    them unpacked); `CompressedTensorsConfig(dequantize=True)` reads them, and gives our logits."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    out = tmp_path / "asym"
    compress_checkpoint(build_config(str(llama_src), str(out), preset="w4a16-asym", workers=0))
    dense = decompress_checkpoint(out, tmp_path / "dense")
    ids = torch.tensor([[1, 5, 9, 100, 3, 77, 12]])
    loaded = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.bfloat16, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    reference = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


# -- worker kind ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "preset,options,threads",
    [
        ("w4a16", {}, True),  # every chunk takes the fused kernels, read straight from the source
        ("w8a16", {}, True),
        ("w4a16", {"rounding": "mse"}, True),  # the search has fused kernels too
        ("nf4", {}, False),
        ("w4a16", {"pruning": {"sparsity": 0.5}}, False),  # staged input, torch importance
        ("w4a16", {"worker_kind": "threads", "rounding": "mse"}, True),  # asked for
        ("w4a16", {"worker_kind": "processes"}, False),
    ],
)
def test_auto_worker_kind_follows_the_work(llama_src, tmp_path, preset, options, threads):
    config = build_config(str(llama_src), str(tmp_path / "out"), preset=preset, **options)
    pipe = Pipeline(config)
    pipe.make_plan()
    assert pipe.threaded() is threads
