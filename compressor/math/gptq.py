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

Parameters. Groups (strategy group) get their scale/zero when the loop reaches their first
column, from the *updated* weights of the group (the error already pushed into it counts), by
`rounding.search_qparams` with the group's diag(H) as importance (`mode` mse, the default: a
clipping search that minimises Σ_j H_jj (w_j − ŵ_j)² over the group), or from the group's min and
max (`mode` rtn, what the GPTQ paper and llm-compressor's default observer do). Measured on
SmolLM2-135M (int4, 32 × 512 calibration tokens, bench/calibration_modes.py): the weighted
search takes GPTQ from +36.9 % to +13.2 % ΔPPL; clipping a group's range trades the error of
its few largest weights for a finer step on the rest, and GPTQ then compensates the clipped
weights' error. The block of lazily updated columns is a multiple of the group
size, so a group's weights are complete when its parameters are chosen. The channel strategy
takes its scales from the whole original row, before the loop (as llm-compressor does).
Codes go through `quant.quantize` with the stored (already rounded) scale, and x̂ is
`quant.dequantize` of those codes: the output is exactly what a loader reconstructs.

Columns no calibration token reached (diag H = 0) are "dead": their weights never meet a
non-zero input, so they are quantized as they are and feed no error back (H_jj := 1).
Act-order (quantizing columns by decreasing diag H) is not implemented: compressed-tensors
stores it as a `g_idx` permutation that vLLM's fused q/k/v and gate/up loaders handle only on
some kernels, and the static order keeps every output a plain pack-quantized checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.math.quant import (
    QuantArgs,
    compute_dtype,
    dequantize,
    finite_code_bounds,
    qparams_from_range,
    quantized_range,
)
from compressor.math.rounding import RoundingMode, search_qparams

__all__ = ["DAMPENING", "InputHessian", "gptq_rows", "inverse_hessian_factor"]

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

    def diagonal(self) -> torch.Tensor:
        """diag(XᵀX): each input's second moment (× tokens), the per-column importance."""
        return torch.diagonal(self.hessian).to(torch.float64).clamp_min(0.0)

    def factor(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, dead), as `inverse_hessian_factor` returns them."""
        if self.staged_factor is None:
            return inverse_hessian_factor(self.hessian)
        return self.staged_factor, torch.diagonal(self.hessian) == 0


def inverse_hessian_factor(
    h: torch.Tensor, dampening: float = DAMPENING
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U the upper Cholesky factor of (H + λI)⁻¹, dead the columns with diag H = 0.

    float32, as GPTQ's reference and llm-compressor compute it, in place where possible: three
    (cols, cols) float32 matrices at most (14336 inputs: 2.5 GB), and half float64's time. If
    H + λI is not positive definite in floating point, λ grows ×10 until it is
    (deterministic: the same H always gives the same U)."""
    h = h.to(torch.float32, copy=True)
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Quantize a (rows, cols) block with GPTQ: codes q (int16, signed as `quant.quantize`),
    scale (rows, ngroups) in x's dtype, zero (int8 or None) and x̂ in x's dtype.

    `u`, `dead` from `inverse_hessian_factor` of the layer's H; `importance` (cols,) weights the
    per-group parameter search when `mode` is mse or hqq (diag H is the natural choice).
    """
    if args.method != "int" or args.strategy not in ("group", "channel"):
        raise ValueError("GPTQ here writes int schemes with a scale per group or channel")
    rows, cols = x.shape
    if u.shape != (cols, cols):
        raise ValueError(f"Hessian factor {tuple(u.shape)} does not match {cols} input columns")
    work = compute_dtype(x.dtype)  # as `quant.quantize` divides: float32 for 16-bit weights
    g = args.group_size if args.strategy == "group" else cols
    if cols % g:
        raise ValueError(f"group size {g} does not divide {cols} columns")
    ngroups = cols // g
    column_args = QuantArgs(args.bits, "int", args.symmetric, "channel")
    qmin, qmax = quantized_range(args)
    scale = torch.empty((rows, ngroups), dtype=x.dtype)
    zero = None if args.symmetric else torch.empty((rows, ngroups), dtype=torch.int8)
    if args.strategy == "channel":
        s, z = _params(x, column_args, x.dtype, mode, importance)
        scale[:, :1], zero = s, z
    # Transposed working copy: a column of the weights is a contiguous row here, and the
    # error feedback a rank-1 update of contiguous rows (torch.addr_, no temporaries).
    wt = x.T.to(work).contiguous()
    ut = u.to(work)
    codes = torch.empty((cols, rows), dtype=work)
    block = max(g, _BLOCK // g * g) if args.strategy == "group" else _BLOCK
    s_col = z_col = bounds = None
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        wb = wt[b0:b1]  # a view: the feedback lands in wt
        errors = torch.zeros_like(wb)
        ub = ut[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            grp = col // g
            if s_col is None or (args.strategy == "group" and col % g == 0):
                if args.strategy == "group":
                    part = wb[i : i + g].T.to(x.dtype)
                    imp = None if importance is None else importance[col : col + g]
                    s, z = _params(part, column_args, x.dtype, mode, imp)
                    scale[:, grp : grp + 1] = s
                    if zero is not None:
                        assert z is not None
                        zero[:, grp : grp + 1] = z
                stored_s = scale[:, grp : grp + 1]
                stored_z = None if zero is None else zero[:, grp : grp + 1]
                s_col = stored_s[:, 0].to(work)
                z_col = None if stored_z is None else stored_z[:, 0].to(work)
                found = finite_code_bounds(stored_s, stored_z, column_args)
                bounds = (
                    None if found is None else (found[0][:, 0].to(work), found[1][:, 0].to(work))
                )
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
    q = codes.T.to(torch.int16)
    return q, scale, zero, dequantize(q, scale, zero, args, x.dtype)


def _params(
    x: torch.Tensor,
    args: QuantArgs,
    dtype: torch.dtype,
    mode: RoundingMode,
    importance: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One (rows, 1) parameter set for the block `x` (one group or whole rows)."""
    if mode == "rtn":
        lo = x.amin(dim=1, keepdim=True)
        hi = x.amax(dim=1, keepdim=True)
        return qparams_from_range(lo, hi, args, dtype)
    return search_qparams(x, args, dtype, mode, importance)
