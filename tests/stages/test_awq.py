"""AWQ through the real pipeline (`--method awq`): the folded scales leave the model's function
unchanged before rounding (Llama's w / s norms and Gemma's (1 + w) / s − 1 ones, checked with
transformers' own models), the output loads in transformers and is closer to the original than
plain rounding on tokens the calibration never saw, and what it cannot combine with is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from compressor.config import build_config
from compressor.errors import ConfigError
from compressor.pipeline import Pipeline, compress_checkpoint
from compressor.stages.executor import SerialExecutor
from tests.conftest import load_dir

pytest.importorskip("transformers")


def _config(src: Path, dest: Path, tokens: Path | None, **options):  # type: ignore[no-untyped-def]
    calibration = {"path": str(tokens), "samples": 20, "seq_len": 32} if tokens else None
    return build_config(
        str(src), str(dest), calibration=calibration, **{"workers": 0, "group_size": 32, **options}
    )


def _scaling(src: Path, tokens: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    pipe = Pipeline(_config(src, tmp_path / "out", tokens, rounding="awq"))
    pipe.make_plan()
    executor = SerialExecutor()
    pipe.ingest(executor)
    pipe.calibrate(executor)
    pipe.stats(executor)
    return pipe.scaling


def _folded_logits(src: Path, scaling, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[no-untyped-def]
    """The original model's logits, and those of the same model with the scales applied to its
    float32 weights (no rounding)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    with torch.no_grad():
        before = model(ids).logits
        params = dict(model.named_parameters())
        for name, s in scaling.columns.items():
            params[name].mul_(torch.from_numpy(s)[None, :])
        for name, s in scaling.rows.items():
            params[name].div_(torch.from_numpy(s)[:, None])
        for name, folded in scaling.norms.items():
            params[name].copy_(torch.from_numpy(folded))
        after = model(ids).logits
    return before, after


def test_folding_keeps_a_llama_s_function(
    tiny_llama: Path, token_file: Path, tmp_path: Path
) -> None:
    scaling = _scaling(tiny_llama, token_file, tmp_path)
    # 3 layers x (input norm → q/k/v, MLP norm → gate/up, up → down); v → o is skipped: with
    # grouped-query attention o_proj's inputs are not v_proj's outputs
    assert len(scaling.alphas) == 9 and len(scaling.norms) == 6 and len(scaling.rows) == 3
    assert not any("v_proj" in p for p in scaling.alphas)
    assert all(0 <= a < 1 for a in scaling.alphas.values())
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 256, size=(2, 16)))
    before, after = _folded_logits(tiny_llama, scaling, ids)
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4)
    assert any(not np.allclose(s, 1.0) for s in scaling.columns.values())


def test_folding_keeps_a_gemma_s_function_with_its_one_plus_w_norms(
    token_file: Path, tmp_path: Path
) -> None:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,  # no GQA: v_proj → o_proj is scaled too
        head_dim=32,
        max_position_embeddings=128,
        sliding_window=16,
    )
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.3)  # (1 + w) norms with real weights
    src = tmp_path / "gemma"
    model.save_pretrained(src)
    scaling = _scaling(src, token_file, tmp_path)
    assert any("pre_feedforward_layernorm" in n for n in scaling.norms)
    assert any(p.endswith("v_proj.weight") for p in scaling.rows)
    ids = torch.from_numpy(np.random.default_rng(2).integers(0, 256, size=(2, 16)))
    before, after = _folded_logits(src, scaling, ids)
    assert torch.allclose(before, after, rtol=1e-3, atol=1e-3)


def test_awq_output_loads_and_beats_plain_rounding_on_unseen_tokens(
    tiny_llama: Path, token_file: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    awq, rtn = tmp_path / "awq", tmp_path / "rtn"
    report = compress_checkpoint(_config(tiny_llama, awq, token_file, rounding="awq"))
    compress_checkpoint(_config(tiny_llama, rtn, None))
    assert any(n.startswith("awq: 9 module groups scaled") for n in report.notes)
    # o_proj reads the attention output, which GQA's v_proj does not produce: no group, noted
    assert any(
        n.startswith("awq: 3 weight(s) in no scaled group (e.g. model.layers.0.self_attn.o_proj")
        for n in report.notes
    ), report.notes
    stored, original = load_dir(awq), load_dir(tiny_llama)
    norm = "model.layers.0.input_layernorm.weight"
    assert stored[norm].dtype == original[norm].dtype and not torch.equal(
        stored[norm], original[norm]
    )
    assert torch.equal(stored["model.norm.weight"], original["model.norm.weight"])  # untouched
    ids = torch.from_numpy(np.random.default_rng(5).integers(0, 256, size=(8, 32)))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32)(ids).logits
        errors = {
            d.name: float(
                (
                    (
                        AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.bfloat16)(
                            ids
                        ).logits.float()
                        - ref
                    )
                    ** 2
                ).mean()
            )
            for d in (awq, rtn)
        }
    assert errors["awq"] < 0.9 * errors["rtn"], errors  # measured 0.232 against 0.305
    recorded = json.loads((awq / "compression.json").read_text())
    assert recorded["config"]["recipe"]["quantization"][0]["scaling"] == "awq"


def test_awq_refuses_what_it_cannot_combine_with(tiny_llama: Path, token_file: Path) -> None:
    with pytest.raises(ConfigError, match="awq scales inputs by their activations"):
        _config(tiny_llama, Path("/tmp/x"), None, rounding="awq")
    with pytest.raises(ConfigError, match="does not combine with a budget"):
        _config(tiny_llama, Path("/tmp/x"), token_file, rounding="awq", budget={"target_bits": 4.5})
    with pytest.raises(ConfigError, match="scaling awq goes with method int"):
        build_config(str(tiny_llama), "/tmp/x", preset="fp8", rounding="awq")


def test_awq_with_no_group_to_scale_is_refused_before_the_model_runs(
    tiny_llama: Path, token_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only q_proj takes awq: q/k/v cannot share scales, and nothing else is scaled."""
    from compressor.stages import calibrate as calibrate_stage

    def never(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the model ran before the refusal")

    monkeypatch.setattr(calibrate_stage, "check", never)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "version: 1\nquantization:\n"
        '  - {targets: ["re:.*q_proj$"], group_size: 32, scaling: awq}\n'
        "  - {targets: [Linear], group_size: 32}\n"
    )
    dest = tmp_path / "out"
    with pytest.raises(ConfigError, match="awq finds no module group to scale") as refused:
        compress_checkpoint(_config(tiny_llama, dest, token_file, recipe_path=recipe))
    assert refused.value.tensor == "model.layers.0.self_attn.q_proj.weight"
    assert not dest.exists()
