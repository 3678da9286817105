from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from compressor.errors import InputError
from compressor.evaluation.perplexity import perplexity, score_tokens, tokenize_text

from .conftest import TINY_VOCAB, tiny_llama, train_tokenizer

BOS = 0


@pytest.fixture(scope="module")
def model64():
    return tiny_llama(seed=1, dtype=torch.float64)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    return torch.randint(2, TINY_VOCAB, (100,), generator=gen)


def direct_nll(model, inputs: list[int], targets: list[int], first_row: int) -> float:
    """Sum of -log p(targets[k] | inputs[: first_row + k + 1]) from one forward pass,
    with log-softmax done by hand in numpy float64."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([inputs])).logits[0].to(torch.float64).numpy()
    rows = logits[first_row : first_row + len(targets)]
    m = rows.max(axis=1, keepdims=True)
    logz = (m + np.log(np.exp(rows - m).sum(axis=1, keepdims=True)))[:, 0]
    return float(-(rows[np.arange(len(targets)), targets] - logz).sum())


def test_one_window_with_bos_matches_direct_float64(model64, ids):
    seq = ids[:50].tolist()
    result = score_tokens(model64, ids[:50], window=64, bos_id=BOS)
    expected = direct_nll(model64, [BOS, *seq], seq, 0)
    assert result.predicted == 50 and result.windows == 1 and result.tokens == 50
    assert result.nll_sum == pytest.approx(expected, rel=1e-12)
    ppl = perplexity(model64, ids[:50], window=64, bos_id=BOS)
    assert ppl == pytest.approx(math.exp(expected / 50), rel=1e-12)


def test_one_window_without_bos_skips_first_token(model64, ids):
    seq = ids[:50].tolist()
    result = score_tokens(model64, ids[:50], window=64, bos_id=None)
    assert result.predicted == 49
    assert result.nll_sum == pytest.approx(direct_nll(model64, seq, seq[1:], 0), rel=1e-12)


def test_disjoint_windows_sum_of_windows(model64, ids):
    result = score_tokens(model64, ids, window=32, bos_id=BOS)
    assert result.windows == 4 and result.predicted == 100
    expected = 0.0
    for begin in range(0, 100, 32):
        seq = ids[begin : begin + 32].tolist()
        expected += direct_nll(model64, [BOS, *seq], seq, 0)
    assert result.nll_sum == pytest.approx(expected, rel=1e-12)


def test_overlapping_windows_score_each_token_once(model64, ids):
    result = score_tokens(model64, ids, window=40, stride=20, bos_id=BOS)
    # windows start at 0, 20, 40, 60 (the last reaches the end); every token scored once
    assert result.windows == 4 and result.predicted == 100
    expected = direct_nll(model64, [BOS, *ids[:40].tolist()], ids[:40].tolist(), 0)
    for begin in (20, 40, 60):
        seq = ids[begin : begin + 40].tolist()
        new = seq[20:]  # only tokens past the previous window's end, with 20 tokens of context
        expected += direct_nll(model64, [BOS, *seq], new, 20)
    assert result.nll_sum == pytest.approx(expected, rel=1e-12)

    no_bos = score_tokens(model64, ids, window=40, stride=20, bos_id=None)
    assert no_bos.predicted == 99


def test_deterministic_and_model_state_kept(ids):
    model = tiny_llama(seed=2)
    model.train()
    a = perplexity(model, ids, window=32, bos_id=BOS)
    b = perplexity(model, ids, window=32, bos_id=BOS)
    assert a == b
    assert model.training
    assert 1.0 < a < 10 * TINY_VOCAB


@pytest.mark.parametrize(
    ("window", "stride"),
    [(0, None), (16, 0), (16, 17)],
)
def test_bad_windows_rejected(model64, ids, window, stride):
    with pytest.raises(InputError):
        score_tokens(model64, ids, window=window, stride=stride, bos_id=BOS)


def test_too_few_tokens(model64):
    with pytest.raises(InputError):
        score_tokens(model64, torch.tensor([5]), bos_id=None)
    assert score_tokens(model64, torch.tensor([5]), bos_id=BOS).predicted == 1


def test_tokenize_text_truncates(text):
    tok = train_tokenizer(text)
    ids = tokenize_text(tok, text, 300)
    assert ids.dtype == torch.int64 and ids.shape == (300,)
    assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"][:300]
    assert tok.bos_token_id not in ids.tolist()
    with pytest.raises(InputError):
        tokenize_text(tok, "a", 10)
