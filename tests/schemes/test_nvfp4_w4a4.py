"""NVFP4 W4A4 (preset `nvfp4`): the weights of `nvfp4a16` plus a static input global scale per
module, measured by the calibration stage, and an `input_activations` block that asks the server
to quantize each linear's input to NVFP4 at run time.

Checked against independent readers: the scale equals 448·6 over the largest input magnitude
that transformers' own full forward hands each linear on the same tokens; the weights are
nvfp4a16's, byte for byte (compressed-tensors' decompression of those is tested in
test_float4); transformers (through compressed-tensors) loads the
output, reads our input scales and quantizes activations with them, which a reference written
here (float32 NVFP4 quantize-dequantize of each linear's input on the dense model) reproduces.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.config import QuantRule, build_config
from compressor.formats.compressed import decompress_checkpoint
from compressor.formats.verify import verify_checkpoint
from compressor.pipeline import Pipeline, compress_checkpoint
from tests.conftest import assert_same_tensors, load_dir

pytest.importorskip("transformers")

FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _config(src: Path, dest: Path, tokens: Path, **options):  # type: ignore[no-untyped-def]
    calibration = {"path": str(tokens), "samples": 20, "seq_len": 32}
    return build_config(str(src), str(dest), calibration=calibration, workers=0, **options)


@pytest.fixture(scope="module")
def run(tiny_llama: Path, token_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    dest = tmp_path_factory.mktemp("w4a4") / "out"
    pipe = Pipeline(_config(tiny_llama, dest, token_file, preset="nvfp4", keep_staging=True))
    pipe.run()
    return pipe


@pytest.fixture(scope="module")
def w4a4(run: Pipeline) -> Path:
    return Path(run.config.destination)


def _input_absmax(src: Path, tokens: np.ndarray) -> dict[str, float]:
    """max |x| of every linear's input (but lm_head) in transformers' float32 model, one
    window at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    seen: dict[str, float] = {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(mod, args):  # type: ignore[no-untyped-def]
            seen[name] = max(seen.get(name, 0.0), float(args[0].abs().max()))

        return record

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            m.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for row in torch.from_numpy(tokens):
            model(input_ids=row[None])
    return seen


def test_input_global_scales_are_448x6_over_the_full_models_input_absmax(
    tiny_llama: Path, token_file: Path, w4a4: Path
) -> None:
    stored = load_dir(w4a4)
    expected = _input_absmax(tiny_llama, np.load(token_file))
    assert len(expected) == 21
    for module, absmax in expected.items():
        g = stored[f"{module}.input_global_scale"]
        assert g.dtype == torch.float32 and g.shape == (1,)
        assert g.item() == pytest.approx(448.0 * 6.0 / absmax, rel=1e-5), module
    # vLLM keeps one input scale per fused module: q/k/v (and gate/up) read one input
    for layer in range(3):
        p = f"model.layers.{layer}"
        qkv = {stored[f"{p}.self_attn.{m}_proj.input_global_scale"].item() for m in "qkv"}
        gate_up = {stored[f"{p}.mlp.{m}_proj.input_global_scale"].item() for m in ("gate", "up")}
        assert len(qkv) == 1 and len(gate_up) == 1


def test_weights_are_nvfp4a16s_and_compressed_tensors_decompresses_them_to_ours(
    tiny_llama: Path, token_file: Path, w4a4: Path, tmp_path: Path
) -> None:
    assert verify_checkpoint(w4a4).ok
    group = json.loads((w4a4 / "config.json").read_text())["quantization_config"]
    (only,) = group["config_groups"].values()
    inputs = only["input_activations"]
    assert (inputs["type"], inputs["num_bits"], inputs["group_size"]) == ("float", 4, 16)
    assert (inputs["strategy"], inputs["dynamic"]) == ("tensor_group", "local")
    from compressed_tensors.quantization import QuantizationConfig

    parsed = QuantizationConfig.model_validate(group)  # compressed-tensors' own schema
    assert parsed.config_groups["group_0"].input_activations.dynamic == "local"
    a16 = tmp_path / "a16"
    compress_checkpoint(build_config(str(tiny_llama), str(a16), preset="nvfp4a16", workers=0))
    ours, weight_only = load_dir(w4a4), load_dir(a16)
    for name, value in weight_only.items():
        assert torch.equal(ours[name], value), name
    assert sorted(set(ours) - set(weight_only)) == sorted(
        n.replace("weight_global_scale", "input_global_scale")
        for n in weight_only
        if n.endswith("weight_global_scale")
    )
    # the weights decode as nvfp4a16's do (which compressed-tensors' converter checks in
    # test_float4; its converter refuses W4A4, whose input scales outlive dequantization)
    dense = load_dir(decompress_checkpoint(w4a4, tmp_path / "ours"))
    assert not any("global_scale" in n for n in dense)
    assert_same_tensors(dense, load_dir(decompress_checkpoint(a16, tmp_path / "a16-dense")))


def _nvfp4_qdq(x: torch.Tensor, global_scale: float) -> torch.Tensor:
    """NVFP4 quantize-dequantize of activations, written from the format's definition: per 16
    inputs, scale s = fp8_e4m3(G · absmax / 6), codes the nearest E2M1 value of x·G/s (a tie
    goes to the even code, as round-to-nearest-even does), value code · s / G. absmax / 6 is
    rounded to the activations' dtype first, in the order compressed-tensors computes it (a
    scale on an FP8 tie, e.g. G·absmax/6 = 46, otherwise rounds the other way)."""
    shape = x.shape
    v = x.float().reshape(-1, 16)
    g = torch.tensor(global_scale, dtype=torch.float32)
    per_code = (x.reshape(-1, 16).abs().amax(dim=1, keepdim=True) / 6).float()
    s = (per_code * g).to(torch.float8_e4m3fn).float()
    step = torch.where(s == 0, torch.ones_like(s), s / g)
    scaled = (v / step).clamp(-6, 6)
    distance = (scaled.abs()[..., None] - FP4_VALUES).abs()
    closest = distance == distance.amin(-1, keepdim=True)
    even = (torch.arange(8) % 2 == 0).float() + 1  # among equally close codes, the even one
    nearest = FP4_VALUES[(closest.float() * even).argmax(-1)]
    return (torch.sign(scaled) * nearest * step).reshape(shape).to(x.dtype)


def test_transformers_quantizes_activations_with_our_input_scales(
    w4a4: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    stored = load_dir(w4a4)
    dense_dir = decompress_checkpoint(w4a4, tmp_path / "dense")
    ids = torch.tensor([[1, 5, 9, 22, 7, 100, 3, 64]])
    with torch.no_grad():
        loaded = AutoModelForCausalLM.from_pretrained(w4a4, dtype=torch.bfloat16)(ids).logits
        reference_model = AutoModelForCausalLM.from_pretrained(dense_dir, dtype=torch.bfloat16)
        weight_only = reference_model(ids).logits
        for name, m in reference_model.named_modules():
            if isinstance(m, torch.nn.Linear) and name != "lm_head":
                g = stored[f"{name}.input_global_scale"].item()
                m.register_forward_pre_hook(lambda mod, a, g=g: (_nvfp4_qdq(a[0], g),))
        reference = reference_model(ids).logits
    assert (loaded.float() - weight_only.float()).abs().max().item() > 0.05  # not weight-only
    assert torch.equal(loaded, reference)


def test_only_max_abs_is_computed_when_nothing_reads_the_hessians(run: Pipeline) -> None:
    """W4A4 alone reads max |x|: no XᵀX array is staged (the products are skipped)."""
    calibration = run.calibration
    assert calibration is not None and len(calibration.stats) == 21
    assert all(s.path is None and s.absmax > 0 for s in calibration.stats.values())
    root = Path(str(run.staging.root))
    assert (root / "calib" / "tokens").exists()
    assert not (root / "calib" / "h").exists() and not (root / "calib" / "part").exists()


def test_w4a4_needs_calibration_and_mixes_with_weight_only_groups(
    tiny_llama: Path, token_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(Exception, match="need calibration data"):
        build_config(str(tiny_llama), str(tmp_path / "x"), preset="nvfp4")
    with pytest.raises(Exception, match=r"goes with method fp8 .* or nvfp4"):
        QuantRule(method="int", activations="nvfp4")
    with pytest.raises(Exception, match="drop activations nvfp4"):
        QuantRule(method="mxfp4", activations="nvfp4")
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text(
        "version: 1\n"
        "quantization:\n"
        '  - {targets: ["re:.*self_attn.*"], method: nvfp4, activations: nvfp4}\n'
        '  - {targets: ["re:.*mlp.*"], method: nvfp4}\n'
    )
    dest = tmp_path / "mixed"
    compress_checkpoint(_config(tiny_llama, dest, token_file, recipe_path=recipe))
    assert verify_checkpoint(dest).ok
    groups = json.loads((dest / "config.json").read_text())["quantization_config"]["config_groups"]
    by_inputs = {g["input_activations"] is not None: g["targets"] for g in groups.values()}
    assert all("mlp" in t for t in by_inputs[False]) and len(by_inputs[False]) == 9
    assert all("self_attn" in t for t in by_inputs[True]) and len(by_inputs[True]) == 12
    stored = load_dir(dest)
    assert "model.layers.0.self_attn.q_proj.input_global_scale" in stored
    assert "model.layers.0.mlp.up_proj.input_global_scale" not in stored
