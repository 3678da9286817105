"""GPTQ's math against a float64 textbook implementation, RTN, and the output error it minimises."""

from __future__ import annotations

import pytest
import torch

from compressor.math.gptq import InputHessian, activation_order, gptq_rows, inverse_hessian_factor
from compressor.math.quant import QuantArgs, dequantize, quantize, quantized_range
from compressor.math.rounding import quantize_rows


def _hessian(cols: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """XᵀX of correlated inputs with uneven scales (as real activations are)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) * 0.3 + torch.eye(cols)
    x = torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ mix
    x *= torch.linspace(0.2, 3.0, cols, dtype=torch.float64)
    return x.T @ x


def _weights(rows: int, cols: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)


def _output_error(x: torch.Tensor, x_hat: torch.Tensor, h: torch.Tensor) -> float:
    """tr(ΔW H ΔWᵀ) in float64: the squared output error summed over the calibration tokens."""
    d = x_hat.to(torch.float64) - x.to(torch.float64)
    return float(torch.einsum("ij,jk,ik->", d, h, d))


def _textbook_gptq(
    x: torch.Tensor, h: torch.Tensor, args: QuantArgs, order: list[int] | None = None
) -> torch.Tensor:
    """GPTQ written directly from the paper in float64: one column at a time, the full
    remaining update after each column (no lazy blocks), min-max parameters per group taken
    when the group starts. With `order` (static act-order, as llm-compressor describes it): the
    columns walked in that order through the factor of H permuted alike, every group's min-max
    parameters taken first from the original weights. Returns the codes in column order."""
    rows, cols = x.shape
    g = args.group_size if args.strategy == "group" else cols
    walk = list(range(cols)) if order is None else order
    hp = h[walk][:, walk]
    hd = hp + 0.01 * torch.diagonal(h).mean() * torch.eye(cols, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    w = x.to(torch.float64)[:, walk].clone()
    col_args = QuantArgs(args.bits, "int", args.symmetric, "channel")
    codes = torch.empty(rows, cols, dtype=torch.int16)
    from compressor.math.quant import qparams_from_range

    def minmax(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        b = block.to(x.dtype)
        return qparams_from_range(b.amin(1, keepdim=True), b.amax(1, keepdim=True), col_args, x.dtype)  # fmt: skip

    fixed = [minmax(x[:, c : c + g]) for c in range(0, cols, g)]
    for j in range(cols):
        c = walk[j]
        if order is not None:
            s, z = fixed[c // g]
        elif j % g == 0:
            s, z = minmax(w[:, j : j + g])
        q = quantize(w[:, j : j + 1].float(), s, z, col_args)
        codes[:, c : c + 1] = q
        wq = dequantize(q, s, z, col_args, x.dtype).to(torch.float64)[:, 0]
        err = (w[:, j] - wq) / u[j, j]
        w[:, j:] -= err[:, None] * u[j, j:][None, :]
    return codes


ARGS = [
    QuantArgs(4, group_size=64),
    QuantArgs(4, symmetric=False, group_size=64),
    QuantArgs(3, group_size=32),
    QuantArgs(8, strategy="channel"),
]


@pytest.mark.parametrize("args", ARGS, ids=lambda a: a.describe())
def test_codes_match_the_textbook_algorithm(args: QuantArgs) -> None:
    """With min-max group parameters, the lazy-block float32 implementation makes the same
    rounding decisions as the float64 textbook one (a code may differ only where the two
    precisions land on opposite sides of a rounding boundary)."""
    x, h = _weights(48, 256), _hessian(256)
    u, dead = inverse_hessian_factor(h)
    q, *_ = gptq_rows(x, u, dead, args, "rtn")
    reference = _textbook_gptq(x, h, args)
    assert (q != reference).float().mean().item() < 0.002


@pytest.mark.parametrize("args", ARGS, ids=lambda a: a.describe())
def test_act_order_matches_the_textbook_algorithm(args: QuantArgs) -> None:
    """Static act-order: columns by decreasing diag H through the permuted factor, parameters
    fixed first; codes back in column order, as the float64 textbook walk makes them."""
    x, h = _weights(48, 256), _hessian(256, seed=4)
    order = activation_order(h)
    assert torch.equal(order, torch.argsort(torch.diagonal(h), descending=True))
    assert order.tolist() != list(range(256))  # the walk is not the natural order here
    u, dead = inverse_hessian_factor(h, order=order)
    q, *_ = gptq_rows(x, u, dead, args, "rtn", order=order)
    reference = _textbook_gptq(x, h, args, order.tolist())
    assert (q != reference).float().mean().item() < 0.002
    # and not the natural order's codes: the order changes the result
    assert (q != _textbook_gptq(x, h, args)).float().mean().item() > 0.05


def test_act_order_puts_dead_inputs_last_and_keeps_ties_in_column_order() -> None:
    h = torch.diag(torch.tensor([2.0, 0.0, 5.0, 2.0, 0.0, 7.0], dtype=torch.float64))
    assert activation_order(h).tolist() == [5, 2, 0, 3, 1, 4]
    u, dead = inverse_hessian_factor(h, order=activation_order(h))
    assert dead.tolist() == [False, False, False, False, True, True]
    assert torch.isfinite(u).all()


@pytest.mark.parametrize("args", ARGS, ids=lambda a: a.describe())
def test_act_order_lowers_the_output_error_of_inputs_with_uneven_scales(args: QuantArgs) -> None:
    """The reason for it: with correlated inputs of uneven second moment (e^N(0,1) here; real
    activations have outlier channels), rounding the strongest first leaves their error to the
    weaker columns after them: 0.58-0.76 of the natural order's output error on these."""
    cols = 256
    g = torch.Generator().manual_seed(5)
    mix = torch.randn(cols, cols, generator=g, dtype=torch.float64) * 0.3 + torch.eye(cols)
    inputs = torch.randn(4096, cols, generator=g, dtype=torch.float64) @ mix
    inputs *= torch.exp(torch.randn(cols, generator=g, dtype=torch.float64))
    h = inputs.T @ inputs
    x = _weights(64, cols)
    u, dead = inverse_hessian_factor(h)
    natural = gptq_rows(x, u, dead, args, "mse", torch.diagonal(h))[3]
    order = activation_order(h)
    u, dead = inverse_hessian_factor(h, order=order)
    q, scale, zero, ordered = gptq_rows(x, u, dead, args, "mse", torch.diagonal(h), order)
    assert torch.equal(ordered, dequantize(q, scale, zero, args, x.dtype))
    assert _output_error(x, ordered, h) < 0.85 * _output_error(x, natural, h)


@pytest.mark.parametrize("args", ARGS, ids=lambda a: a.describe())
@pytest.mark.parametrize("mode", ["rtn", "mse"])
def test_output_error_is_lower_than_rtn(args: QuantArgs, mode: str) -> None:
    x, h = _weights(64, 256), _hessian(256)
    u, dead = inverse_hessian_factor(h)
    q, scale, zero, x_hat = gptq_rows(x, u, dead, args, mode)  # type: ignore[arg-type]
    rtn = quantize_rows(x, args)[3]
    assert _output_error(x, x_hat, h) < 0.8 * _output_error(x, rtn, h)
    # x̂ is exactly what a loader decodes from the stored codes and parameters
    assert torch.equal(x_hat, dequantize(q, scale, zero, args, x.dtype))
    qmin, qmax = quantized_range(args)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    assert scale.dtype == x.dtype and scale.shape == (64, args.groups_per_row(256))


@pytest.mark.parametrize("args", ARGS, ids=lambda a: a.describe())
def test_uncorrelated_inputs_make_it_round_to_nearest(args: QuantArgs) -> None:
    """H = I: no column's error can be compensated by another, so GPTQ is RTN, bit for bit."""
    x = _weights(32, 128)
    u, dead = inverse_hessian_factor(torch.eye(128, dtype=torch.float64))
    *_, x_hat = gptq_rows(x, u, dead, args, "rtn")
    assert torch.equal(x_hat, quantize_rows(x, args)[3])


def test_dead_inputs_feed_no_error_back() -> None:
    """Inputs no token reached (diag H = 0) are quantized as they are, and leave the other
    columns' result as if they did not exist."""
    cols = 128
    h = _hessian(cols)
    h[:, 5] = 0
    h[5, :] = 0
    x = _weights(16, cols)
    u, dead = inverse_hessian_factor(h)
    assert dead.tolist() == [j == 5 for j in range(cols)]
    q, scale, zero, x_hat = gptq_rows(x, u, dead, QuantArgs(4, strategy="channel"), "rtn")
    assert torch.isfinite(x_hat).all()
    col_args = QuantArgs(4, strategy="channel")
    alone = quantize(x[:, 5:6], scale, zero, col_args)
    assert torch.equal(q[:, 5:6], alone)


def test_block_size_does_not_change_the_result() -> None:
    """Rows are independent: a chunk of rows gives the rows' result in the whole tensor."""
    x, h = _weights(96, 256), _hessian(256)
    u, dead = inverse_hessian_factor(h)
    args = QuantArgs(4, group_size=64)
    whole = gptq_rows(x, u, dead, args)
    part = gptq_rows(x[32:64], u, dead, args)
    assert torch.equal(whole[0][32:64], part[0])
    assert torch.equal(whole[1][32:64], part[1])


def test_singular_hessian_gets_more_dampening() -> None:
    """A rank-deficient H (fewer tokens than inputs) still factors, deterministically."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 64, generator=g, dtype=torch.float64)
    h = x.T @ x  # rank 8
    u1, _ = inverse_hessian_factor(h, dampening=1e-12)
    u2, _ = inverse_hessian_factor(h, dampening=1e-12)
    assert torch.isfinite(u1).all() and torch.equal(u1, u2)


def test_input_hessian_uses_the_staged_factor() -> None:
    h = _hessian(64).to(torch.float32)
    h[3, :] = 0
    h[:, 3] = 0
    u, dead = inverse_hessian_factor(h)
    staged = InputHessian(h, u)
    assert staged.factor()[0] is u  # as staged, not computed again
    assert torch.equal(staged.factor()[1], dead)
    computed = InputHessian(h).factor()
    assert torch.equal(computed[0], u) and torch.equal(computed[1], dead)
    assert torch.equal(staged.diagonal(), torch.diagonal(h).to(torch.float64))


def test_input_hessian_in_act_order_factors_the_permuted_matrix() -> None:
    h = _hessian(64, seed=6).to(torch.float32)
    h[3, :] = 0
    h[:, 3] = 0
    order = activation_order(h)
    u, dead = inverse_hessian_factor(h, order=order)
    ordered = InputHessian(h, ordered=True)
    assert torch.equal(ordered.order(), order)
    assert torch.equal(ordered.factor()[0], u) and torch.equal(ordered.factor()[1], dead)
    assert dead.tolist() == [j == 63 for j in range(64)]  # the dead input walks last
    staged = InputHessian(h, u, ordered=True)
    assert staged.factor()[0] is u and torch.equal(staged.factor()[1], dead)
    assert InputHessian(h).order() is None


def test_refuses_what_it_cannot_write() -> None:
    x, h = _weights(8, 96), _hessian(96)
    u, dead = inverse_hessian_factor(h)
    with pytest.raises(ValueError, match="does not divide"):
        gptq_rows(x, u, dead, QuantArgs(4, group_size=64))
    with pytest.raises(ValueError, match="int schemes"):
        gptq_rows(x, u, dead, QuantArgs(4, method="minmax", symmetric=False, group_size=32))
    with pytest.raises(ValueError, match="does not match"):
        gptq_rows(x[:, :64], u, dead, QuantArgs(4, group_size=32))
