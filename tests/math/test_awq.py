"""AWQ's scale search on the calibration statistic: the error it minimises is the output error
over the tokens (checked against X ΔWᵀ in float64), α = 0 is plain rounding, and scales help
when a few input channels carry large activations."""

from __future__ import annotations

import pytest
import torch

from compressor.math.awq import GRID, fake_quantize, output_error, search_scale
from compressor.math.quant import QuantArgs

ARGS = QuantArgs(bits=4, symmetric=True, strategy="group", group_size=32)


def _inputs(tokens: int = 512, cols: int = 128, outliers: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, cols, generator=g)
    x[:, :outliers] *= 30.0  # a few channels with large activations, as in LLMs
    return x


def test_output_error_is_the_error_of_the_outputs_on_the_tokens() -> None:
    x = _inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    delta = w - fake_quantize(w, ARGS)
    direct = float(((x.double() @ delta.double().T) ** 2).sum())
    assert output_error(delta, x.T @ x) == pytest.approx(direct, rel=1e-6)


def test_alpha_zero_is_plain_rounding_and_the_search_beats_it_on_outlier_channels() -> None:
    x = _inputs()
    h = x.T @ x
    weights = [torch.randn(96, 128, generator=torch.Generator().manual_seed(k)) for k in (2, 3)]
    found = search_scale(weights, [ARGS, ARGS], h, x.shape[0], dtype=torch.float32)
    assert len(found.errors) == 2 * GRID  # plain, then duo
    plain = sum(output_error(w - fake_quantize(w, ARGS), h) for w in weights)
    assert found.errors[0] == pytest.approx(plain)
    assert found.alpha > 0 and min(found.errors) < 0.8 * plain
    s = found.scale
    assert float(s.max() * s.min()) == pytest.approx(1.0, rel=1e-5)
    assert bool((s[:4] > s[4:].max()).all())  # the large channels are scaled up
    # the chosen scales give the error reported for them
    chosen = sum(output_error(w - fake_quantize(w * s, ARGS) / s, h) for w in weights)
    assert chosen == pytest.approx(min(found.errors))


def test_uniform_activations_make_the_plain_grid_plain_rounding() -> None:
    """All channels alike: every α of the plain form gives s = 1 (the duo form still follows
    the weights' magnitudes)."""
    h = torch.eye(128) * 512.0
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(4))
    found = search_scale([w], [ARGS], h, 512, dtype=torch.float32)
    assert len(set(found.errors[:GRID])) == 1
    if not found.duo:
        assert torch.equal(found.scale, torch.ones(128))
