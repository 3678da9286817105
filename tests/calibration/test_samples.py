"""Calibration windows from text and token files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from compressor.calibration.samples import file_digest, load_samples
from compressor.errors import ConfigError


def test_token_stream_is_cut_into_disjoint_windows(tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    np.save(path, np.arange(100))
    s = load_samples(path, tmp_path, samples=3, seq_len=16)
    assert s.tokens.shape == (3, 16) and s.tokens.dtype == np.int64
    assert s.tokens.ravel().tolist() == list(range(48))
    assert s.note is None


def test_short_data_gives_fewer_windows_and_says_so(tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    np.save(path, np.arange(40))
    s = load_samples(path, tmp_path, samples=8, seq_len=16)
    assert s.tokens.shape == (2, 16)
    assert s.note is not None and "2 window(s), not the 8" in s.note
    with pytest.raises(ConfigError, match="less than one window of 64"):
        load_samples(path, tmp_path, samples=8, seq_len=64)


def test_rows_are_used_as_given(tmp_path: Path) -> None:
    path = tmp_path / "rows.npy"
    rows = np.arange(60).reshape(3, 20)
    np.save(path, rows)
    s = load_samples(path, tmp_path, samples=2, seq_len=10)
    assert s.tokens.tolist() == rows[:2, :10].tolist()
    with pytest.raises(ConfigError, match="fewer than the sequence length 32"):
        load_samples(path, tmp_path, samples=2, seq_len=32)


@pytest.mark.parametrize(
    "content, message",
    [(np.array([0.5, 1.5]), "integer array"), (np.array([-1, 2, 3]), "non-negative")],
)
def test_bad_token_files_are_refused(tmp_path: Path, content: np.ndarray, message: str) -> None:
    path = tmp_path / "bad.npy"
    np.save(path, content)
    with pytest.raises(ConfigError, match=message):
        load_samples(path, tmp_path, samples=1, seq_len=2)


def test_text_is_tokenized_with_the_source_tokenizer_and_a_bos_per_window() -> None:
    pytest.importorskip("transformers")
    from compressor.evaluation.models import fetch_smollm2

    src = fetch_smollm2()
    text = Path(__file__).parents[2] / "compressor/evaluation/data/persuasion_ch1-4.txt"
    s = load_samples(text, src, samples=4, seq_len=64)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    stream = tok(text.read_text(), add_special_tokens=False)["input_ids"]
    assert s.tokens.shape == (4, 64)
    assert (s.tokens[:, 0] == tok.bos_token_id).all()
    assert s.tokens[:, 1:].ravel().tolist() == stream[: 4 * 63]


def test_digest_names_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the calibration file"):
        file_digest(tmp_path / "absent.txt")
