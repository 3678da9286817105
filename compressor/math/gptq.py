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
SmolLM2-135M (int4, 32 × 512 calibration tokens, docs/accuracy.md): the weighted search takes
GPTQ from +36.9 % to +13.2 % ΔPPL; clipping a group's range trades the error of its few largest
weights for a finer step on the rest, and GPTQ then compensates the clipped weights' error. The block of lazily updated columns is a multiple of the group
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

from compressor.math.quant import QuantArgs, dequantize, qparams_from_range, quantize
from compressor.math.rounding import RoundingMode, search_qparams

__all__ = ["DAMPENING", "InputHessian", "gptq_rows", "inverse_hessian_factor"]

DAMPENING = 0.01  # λ as a fraction of mean(diag H), the GPTQ paper's and llm-compressor's default
_BLOCK = 128  # columns updated lazily together (GPTQ's "lazy batch"), a multiple of the group


@dataclass(frozen=True)
class InputHessian:
    """A layer input's XᵀX (float32, cols × cols) as the chunks of its weights receive it.

    `key` names it uniquely (its staged path): the Cholesky factor is computed once per process
    and key, not once per chunk (on a 14336-wide input that is seconds of work).
    """

    key: str
    hessian: torch.Tensor
    dampening: float = DAMPENING

    def diagonal(self) -> torch.Tensor:
        """diag(XᵀX): each input's second moment (× tokens), the per-column importance."""
        return torch.diagonal(self.hessian).to(torch.float64).clamp_min(0.0)

    def factor(self) -> tuple[torch.Tensor, torch.Tensor]:
        cache_key = (self.key, self.dampening)
        found = _FACTORS.get(cache_key)
        if found is None:
            found = inverse_hessian_factor(self.hessian, self.dampening)
            if len(_FACTORS) >= _CACHED_FACTORS:
                _FACTORS.pop(next(iter(_FACTORS)))
            _FACTORS[cache_key] = found
        return found


_CACHED_FACTORS = 8
_FACTORS: dict[tuple[str, float], tuple[torch.Tensor, torch.Tensor]] = {}


def inverse_hessian_factor(
    h: torch.Tensor, dampening: float = DAMPENING
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, dead): U the upper Cholesky factor of (H + λI)⁻¹ in float32, dead the columns with
    diag H = 0. Computed in float64; if H + λI is not positive definite in floating point,
    λ grows ×10 until it is (deterministic: the same H always gives the same U)."""
    h = h.to(torch.float64).clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    h[dead, dead] = 1.0
    mean = float(diag.mean()) if bool((~dead).any()) else 1.0
    damp = dampening * mean
    eye = torch.eye(h.shape[0], dtype=torch.float64)
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            u, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return u.to(torch.float32), dead
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
    w = x.to(torch.float32).clone()
    g = args.group_size if args.strategy == "group" else cols
    if cols % g:
        raise ValueError(f"group size {g} does not divide {cols} columns")
    ngroups = cols // g
    column_args = QuantArgs(args.bits, "int", args.symmetric, "channel")
    scale = torch.empty((rows, ngroups), dtype=x.dtype)
    zero = None if args.symmetric else torch.empty((rows, ngroups), dtype=torch.int8)
    if args.strategy == "channel":
        s, z = _params(x, column_args, x.dtype, mode, importance)
        scale[:, :1], zero = s, z
    q = torch.empty((rows, cols), dtype=torch.int16)
    block = max(g, _BLOCK // g * g) if args.strategy == "group" else _BLOCK
    for b0 in range(0, cols, block):
        b1 = min(b0 + block, cols)
        wb = w[:, b0:b1].clone()
        errors = torch.zeros_like(wb)
        ub = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            grp = col // g
            if args.strategy == "group" and col % g == 0:
                part = wb[:, i : i + g].to(x.dtype)
                imp = None if importance is None else importance[col : col + g]
                s, z = _params(part, column_args, x.dtype, mode, imp)
                scale[:, grp : grp + 1] = s
                if zero is not None:
                    assert z is not None
                    zero[:, grp : grp + 1] = z
            s_col = scale[:, grp : grp + 1]
            z_col = None if zero is None else zero[:, grp : grp + 1]
            column = wb[:, i : i + 1].to(x.dtype)
            code = quantize(column, s_col, z_col, column_args)
            q[:, col : col + 1] = code
            if bool(dead[col]):
                continue  # no input ever reaches it: nothing to compensate
            x_hat = dequantize(code, s_col, z_col, column_args, x.dtype).to(torch.float32)
            err = (wb[:, i] - x_hat[:, 0]) / ub[i, i]
            wb[:, i:] -= err[:, None] * ub[i, i:][None, :]
            errors[:, i] = err
        w[:, b0:b1] = wb
        if b1 < cols:
            w[:, b1:] -= errors @ u[b0:b1, b1:]
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
