"""Accuracy on a real model (SmolLM2-135M-Instruct, fetched from PyPI and cached).

- w8a16 raises perplexity by under 1 % on a few hundred tokens of Pride and Prejudice;
- the w4a16 output loaded by transformers (through compressed-tensors) computes the same logits
  as our decompressed copy.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compressor.config import build_config
from compressor.evaluation import evaluate_checkpoint, fetch_smollm2
from compressor.formats.compressed import decompress_checkpoint
from compressor.pipeline import compress_checkpoint

pytestmark = pytest.mark.slow

TEXT = Path(__file__).parents[1] / "data" / "pride_and_prejudice_ch1-3.txt"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return fetch_smollm2()


def test_w8a16_costs_under_one_percent_perplexity(smollm2: Path, tmp_path: Path) -> None:
    out = tmp_path / "w8a16"
    compress_checkpoint(build_config(str(smollm2), str(out), preset="w8a16", workers=0))
    report = evaluate_checkpoint(str(smollm2), str(out), TEXT.read_text(), max_tokens=256)
    assert report.compressed_loader == "compressed-tensors"
    assert report.tokens == 256
    # "Raises by under 1 %": on SmolLM2 int8 per channel measured -1.5 % here (a decrease).
    assert report.delta_ppl_pct < 1.0, report.to_dict()
    assert report.weights.total_rel_error < 0.02
    assert report.compression_ratio is not None and report.compression_ratio > 1.5


def test_w4a16_transformers_loading_equals_our_decompress(smollm2: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "w4a16"
    compress_checkpoint(build_config(str(smollm2), str(out), preset="w4a16", workers=0))
    dense = decompress_checkpoint(out, tmp_path / "dense")
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ids = tokenizer(TEXT.read_text()[:600], return_tensors="pt").input_ids[:, :96]
    logits = []
    for path in (out, dense):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            logits.append(model(ids).logits)
        del model
    assert torch.equal(logits[0], logits[1])


PERSUASION = Path(__file__).parents[2] / "compressor/evaluation/data/persuasion_ch1-4.txt"


def test_gptq_beats_rtn_on_unseen_text(smollm2: Path, tmp_path: Path) -> None:
    """GPTQ calibrated on Persuasion, scored on Pride and Prejudice (unseen): transformers loads
    the output as any w4a16 checkpoint, and its perplexity cost is well below RTN's."""
    rtn, gptq = tmp_path / "rtn", tmp_path / "gptq"
    compress_checkpoint(build_config(str(smollm2), str(rtn), preset="w4a16", workers=0))
    calibration = {"path": str(PERSUASION), "samples": 8, "seq_len": 256}
    compress_checkpoint(
        build_config(
            str(smollm2),
            str(gptq),
            preset="w4a16",
            rounding="gptq",
            calibration=calibration,
            workers=2,
        )
    )
    text = TEXT.read_text()
    plain = evaluate_checkpoint(str(smollm2), str(rtn), text, max_tokens=512)
    calibrated = evaluate_checkpoint(str(smollm2), str(gptq), text, max_tokens=512)
    assert calibrated.compressed_loader == "compressed-tensors"
    assert calibrated.compression_ratio == plain.compression_ratio  # the same format and size
    assert calibrated.delta_ppl_pct < 0.75 * plain.delta_ppl_pct, (
        calibrated.delta_ppl_pct,
        plain.delta_ppl_pct,
    )
