"""GPTQ (Frantar et al. 2022): quantize a row block column by column, pushing each column's
rounding error onto the columns not yet quantized through the inverse input Hessian.

Notation as in `quant` (rows are output channels, columns the input dimension):

    x      weights (rows, cols); W the float32 working copy that absorbs the error feedback
    H      the layer's input Hessian XᵀX (cols, cols), summed over calibration tokens
    U      upper Cholesky factor of (H + λI)⁻¹, λ = `dampening`·mean(diag H)

For column j (in order): q_j = Q(W_j), e_j = (W_j − x̂_j) / U_jj, and W_k −= e_j·U_jk for k > j.
This minimises the layer's output error ‖(x − x̂)X‖² greedily, one column at a time.
Rows never interact, so a row block with the layer's H is an independent job: chunks stay
independent, exactly like the data-free paths (the property `stages.compress` relies on).

Parameters. In column order, groups (strategy group) get their scale/zero when the loop reaches
their first column, from the *updated* weights of the group (the error already pushed into it
counts); in act-order (below), before the loop, from the original weights. Either way by
`rounding.search_qparams` with the group's diag(H) as importance (`mode` mse, the default: a
clipping search that minimises Σ_j H_jj (w_j − ŵ_j)² over the group), or from the group's min and
max (`mode` rtn, what the GPTQ paper and llm-compressor's default observer do). Measured on
SmolLM2-135M (int4, 32 × 512 calibration tokens, bench/calibration_modes.py, column order): the
weighted search takes GPTQ from +36.9 % to +13.2 % ΔPPL; clipping a group's range trades the error of
its few largest weights for a finer step on the rest, and GPTQ then compensates the clipped
weights' error. The block of lazily updated columns is a multiple of the group
size, so a group's weights are complete when its parameters are chosen. The channel strategy
takes its scales from the whole original row, before the loop (as llm-compressor does).
Codes go through `quant.quantize` with the stored (already rounded) scale, and x̂ is
`quant.dequantize` of those codes: the output is exactly what a loader reconstructs.

Columns no calibration token reached (diag H = 0) are "dead": their weights never meet a
non-zero input, so they are quantized as they are and feed no error back (H_jj := 1).
Static act-order (`order`, llm-compressor's `actorder="static"`, its default): the columns are
quantized by decreasing diag H, so the inputs that matter most are rounded first, while the
most error can still be pushed onto the columns after them. Every group's parameters are then
chosen before the loop, from the original weights (a group's columns are scattered through the
order), and the groups stay the contiguous runs of columns the format stores: the output is a
plain pack-quantized checkpoint with no `g_idx`, which is what sets it apart from "group"
act-order (a `g_idx` permutation that vLLM's fused loaders handle only on some kernels; not
implemented). Measured with 32 × 512 calibration tokens, ΔPPL on an unseen text, column order →
act-order (docs/accuracy.md): SmolLM2-135M int4 +16.4 → +9.9 %, int3 g64 +76.6 → +50.3 %, int4
asym +13.2 → +7.1 %; Gemma 3 270M int4 +12.5 → +12.3 %, but int3 g64 +49.4 → +58.0 %, hence
`--no-act-order`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.math.quant import (
    QuantArgs,
    compute_dtype,
    dequantize,
    finite_code_bounds,
    group_ranges,
    qparams_from_range,
    quantized_range,
)
from compressor.math.rounding import RoundingMode, search_qparams

__all__ = ["DAMPENING", "InputHessian", "activation_order", "gptq_rows", "inverse_hessian_factor"]

DAMPENING = 0.01  # λ as a fraction of mean(diag H), the GPTQ paper's and llm-compressor's default
_BLOCK = 128  # columns updated lazily together (GPTQ's "lazy batch"), a multiple of the group


@dataclass(frozen=True)
class InputHessian:
    """A layer input's XᵀX (float32, cols × cols) as the chunks of its weights receive it, with
    GPTQ's factor U when the calibration stage staged it (once per input, not per chunk or
    worker: on a 14336-wide input the factor is a minute of work). Without it, `factor()`
    computes U with the default dampening (for direct use of the math)."""

    hessian: torch.Tensor
    staged_factor: torch.Tensor | None = None
    ordered: bool = False  # static act-order: U factors H with rows and columns in `order()`

    def diagonal(self) -> torch.Tensor:
        """diag(XᵀX): each input's second moment (× tokens), the per-column importance."""
        return torch.diagonal(self.hessian).to(torch.float64).clamp_min(0.0)

    def order(self) -> torch.Tensor | None:
        """The order GPTQ walks the columns in: `activation_order` if ordered, else None."""
        return activation_order(self.hessian) if self.ordered else None

    def factor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, dead) of H in `order()`, as `inverse_hessian_factor` returns them."""
        order = self.order()
        if self.staged_factor is None:
            return inverse_hessian_factor(self.hessian, order=order)
        diag = torch.diagonal(self.hessian)
        return self.staged_factor, (diag if order is None else diag[order]) == 0


def activation_order(h: torch.Tensor) -> torch.Tensor:
    """Static act-order's column order: by decreasing diag H, ties in column order (a stable
    sort, so the same H always gives the same order, on every worker); columns no token reached
    (diag 0) come last."""
    return torch.argsort(torch.diagonal(h).to(torch.float64), descending=True, stable=True)


def inverse_hessian_factor(
    h: torch.Tensor, dampening: float = DAMPENING, order: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U the upper Cholesky factor of (H + λI)⁻¹, dead the columns with diag H = 0;
    with `order`, of H's rows and columns taken in that order (static act-order), dead too.

    float32, as GPTQ's reference and llm-compressor compute it, in place where possible: three
    (cols, cols) float32 matrices at most (14336 inputs: 2.5 GB), and half float64's time. If
    H + λI is not positive definite in floating point, λ grows ×10 until it is
    (deterministic: the same H always gives the same U). λ is a share of mean(diag H), which no
    order changes."""
    if order is None:
        h = h.to(torch.float32, copy=True)
    else:  # the permuted copy is the working copy (its row-permuted temporary is freed at once)
        h = h.to(torch.float32).index_select(0, order).index_select(1, order)
    diag = torch.diagonal(h)  # a view: edits land in h
    dead = diag == 0
    diag[dead] = 1.0
    mean = float(diag.mean(dtype=torch.float64))
    damp = dampening * mean
    added = 0.0
    for _ in range(8):
        diag.add_(damp - added)
        added = damp
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            del h, diag
            inv = torch.cholesky_inverse(chol)
            del chol
            u, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return u, dead
            raise ValueError("the inverse input Hessian is not positive definite")
        damp = damp * 10 if damp > 0 else 1e-6 * max(mean, 1e-30)
    raise ValueError("the input Hessian is not positive definite even after dampening")


def gptq_rows(
    x: torch.Tensor,
    u: torch.Tensor,
    dead: torch.Tensor,
    args: QuantArgs,
    mode: RoundingMode = "mse",
    importance: torch.Tensor | None = None,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Quantize a (rows, cols) block with GPTQ: codes q (int16, signed as `quant.quantize`),
    scale (rows, ngroups) in x's dtype, zero (int8 or None) and x̂ in x's dtype.

    `u`, `dead` from `inverse_hessian_factor` of the layer's H (with the same `order`, when the
    columns are walked in one: static act-order, every group's parameters chosen first from the
    original weights); `importance` (cols,) weights the per-group parameter search when `mode` is
    mse or hqq (diag H is the natural choice). Codes and parameters come back in column order.
    """
    if args.method != "int" or args.strategy not in ("group", "channel"):
        raise ValueError("GPTQ here writes int schemes with a scale per group or channel")
    rows, cols = x.shape
    if u.shape != (cols, cols):
        raise ValueError(f"Hessian factor {tuple(u.shape)} does not match {cols} input columns")
    if order is not None and order.shape != (cols,):
        raise ValueError(f"column order {tuple(order.shape)} does not match {cols} input columns")
    work = compute_dtype(x.dtype)  # as `quant.quantize` divides: float32 for 16-bit weights
    g = args.group_size if args.strategy == "group" else cols
    if cols % g:
        raise ValueError(f"group size {g} does not divide {cols} columns")
    ngroups = cols // g
    column_args = QuantArgs(args.bits, "int", args.symmetric, "channel")
    qmin, qmax = quantized_range(args)
    static = order is not None or args.strategy == "channel"
    fixed: list[_Column] = []
    if static:  # every group's parameters first, from the original weights
        scale, zero = _params(x, args, x.dtype, mode, importance)
        fixed = _columns_of(scale, zero, column_args, work)
    else:  # filled as the walk reaches each group
        scale = torch.empty((rows, ngroups), dtype=x.dtype)
        zero = None if args.symmetric else torch.empty((rows, ngroups), dtype=torch.int8)
    # Transposed working copy: a column of the weights is a contiguous row here, and the
    # error feedback a rank-1 update of contiguous rows (torch.addr_, no temporaries).
    wt = (x.T if order is None else x.T.index_select(0, order)).to(work).contiguous()
    group_of = ((torch.arange(cols) if order is None else order) // g).tolist()  # walk position
    ut = u.to(work)
    codes = torch.empty((cols, rows), dtype=work)
    block = max(g, _BLOCK // g * g) if args.strategy == "group" else _BLOCK
    at = -1  # the group whose parameters s_col, z_col, bounds hold
    s_col: torch.Tensor | None = None
    z_col: torch.Tensor | None = None
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        wb = wt[b0:b1]  # a view: the feedback lands in wt
        errors = torch.zeros_like(wb)
        ub = ut[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            grp = group_of[col]
            if grp != at:
                at = grp
                if static:
                    s_col, z_col, bounds = fixed[grp]
                else:  # a group's first column: its parameters from the updated weights
                    part = wb[i : i + g].T.to(x.dtype)
                    imp = None if importance is None else importance[col : col + g]
                    s, z = _params(part, column_args, x.dtype, mode, imp)
                    scale[:, grp : grp + 1] = s
                    if zero is not None:
                        assert z is not None
                        zero[:, grp : grp + 1] = z
                    sel = slice(grp, grp + 1)
                    z_sel = None if zero is None else zero[:, sel]
                    s_col, z_col, bounds = _columns_of(scale[:, sel], z_sel, column_args, work)[0]
            assert s_col is not None
            # quant.quantize, one column: round(w / s) + z, clamped (and kept finite)
            q = torch.div(wb[i], s_col).round_()
            if z_col is not None:
                q.add_(z_col)
            q.clamp_(qmin, qmax)
            if bounds is not None:
                q = torch.minimum(torch.maximum(q, bounds[0]), bounds[1])
            codes[col] = q
            if bool(dead[col]):
                continue  # no input ever reaches it: nothing to compensate
            # quant.dequantize, one column: (q − z)·s in the work dtype, rounded to the scale's
            x_hat = q - z_col if z_col is not None else q.clone()
            x_hat = x_hat.mul_(s_col).to(x.dtype).to(work)
            err = wb[i].sub(x_hat).div_(ub[i, i])
            if i + 1 < b1 - b0:
                wb[i + 1 :].addr_(ub[i, i + 1 :], err, alpha=-1.0)
            errors[i] = err
        if b1 < cols:
            wt[b1:].addmm_(ut[b0:b1, b1:].T, errors, alpha=-1.0)
    if order is not None:  # back to column order
        codes = torch.empty_like(codes).index_copy_(0, order, codes)
    q = codes.T.to(torch.int16)
    return q, scale, zero, dequantize(q, scale, zero, args, x.dtype)


_Column = tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, torch.Tensor] | None]


def _columns_of(
    scale: torch.Tensor, zero: torch.Tensor | None, args: QuantArgs, work: torch.dtype
) -> list[_Column]:
    """Each group's stored parameters as one column's quantization takes them: scale, zero and
    the finite code bounds (None where every code is finite) as (rows,) vectors in `work`."""
    found = finite_code_bounds(scale, zero, args)
    s_t = scale.T.to(work)
    z_t = None if zero is None else zero.T.to(work)
    b_t = None if found is None else (found[0].T.to(work), found[1].T.to(work))
    return [
        (
            s_t[k].contiguous(),
            None if z_t is None else z_t[k].contiguous(),
            None if b_t is None else (b_t[0][k].contiguous(), b_t[1][k].contiguous()),
        )
        for k in range(scale.shape[1])
    ]


def _params(
    x: torch.Tensor,
    args: QuantArgs,
    dtype: torch.dtype,
    mode: RoundingMode,
    importance: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (rows, ngroups) parameters of the block `x` under `args`."""
    if mode == "rtn":
        return qparams_from_range(*group_ranges(x, args), args, dtype)
    return search_qparams(x, args, dtype, mode, importance)
