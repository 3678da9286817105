"""`compressor.math.budget` against exhaustive search and an independent Lagrangian dual.

Instances use integer bits and errors (as floats), so every total is exact and the brute force
optimum is the true optimum. The continuous-relaxation bound is checked against its dual,
max_λ≥0 [Σ_t min_c (e_c + λ·b_c) − λ·B], maximised over all pairwise breakpoints — an independent
computation that never builds a hull.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compressor.math.budget import (
    Candidate,
    allocate_bits,
    allocate_max_error,
    bits_lower_bound,
    bits_per_weight,
    error_lower_bound,
    stored_bits,
)
from compressor.math.quant import QuantArgs
from compressor.schemes import for_args

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Instance = dict[str, list[Candidate]]


@st.composite
def instances(draw) -> Instance:
    ntensors = draw(st.integers(1, 4))
    out: Instance = {}
    for t in range(ntensors):
        k = draw(st.integers(1, 5))
        cands = [
            Candidate(f"c{i}", float(draw(st.integers(1, 40))), float(draw(st.integers(0, 100))))
            for i in range(k)
        ]
        out[f"t{t}"] = cands
    return out


def totals(choice: dict[str, Candidate]) -> tuple[float, float]:
    return sum(c.bits for c in choice.values()), sum(c.error for c in choice.values())


def all_allocations(inst: Instance):
    names = list(inst)
    for combo in itertools.product(*(inst[n] for n in names)):
        yield dict(zip(names, combo, strict=True))


def brute_min_error(inst: Instance, budget: float) -> float:
    return min(totals(a)[1] for a in all_allocations(inst) if totals(a)[0] <= budget)


def brute_min_bits(inst: Instance, max_error: float) -> float:
    return min(totals(a)[0] for a in all_allocations(inst) if totals(a)[1] <= max_error)


def breakpoints(inst: Instance, key) -> list[Fraction]:
    """All λ where some tensor's minimiser of key(c, λ) can change, plus 0."""
    out = {Fraction(0)}
    for cands in inst.values():
        for a, b in itertools.combinations(cands, 2):
            lam = key(a, b)
            if lam is not None and lam > 0:
                out.add(lam)
    return sorted(out)


def error_dual(inst: Instance, budget: float) -> Fraction:
    def lam_of(a: Candidate, b: Candidate) -> Fraction | None:
        if a.bits == b.bits:
            return None
        return (Fraction(a.error) - Fraction(b.error)) / (Fraction(b.bits) - Fraction(a.bits))

    best = None
    for lam in breakpoints(inst, lam_of):
        v = sum(min(Fraction(c.error) + lam * Fraction(c.bits) for c in cs) for cs in inst.values())
        v -= lam * Fraction(budget)
        best = v if best is None else max(best, v)
    assert best is not None
    return best


def bits_dual(inst: Instance, max_error: float) -> Fraction:
    def mu_of(a: Candidate, b: Candidate) -> Fraction | None:
        if a.error == b.error:
            return None
        return (Fraction(a.bits) - Fraction(b.bits)) / (Fraction(b.error) - Fraction(a.error))

    best = None
    for mu in breakpoints(inst, mu_of):
        v = sum(min(Fraction(c.bits) + mu * Fraction(c.error) for c in cs) for cs in inst.values())
        v -= mu * Fraction(max_error)
        best = v if best is None else max(best, v)
    assert best is not None
    return best


def spread(inst: Instance, attr: str) -> float:
    """Largest range of `attr` over one tensor's candidates: bounds any single hull step."""
    return max(
        max(getattr(c, attr) for c in cs) - min(getattr(c, attr) for c in cs)
        for cs in inst.values()
    )


# --------------------------------------------------------------------------------------------
# allocate_bits
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(instances(), st.floats(0.0, 1.0))
def test_allocate_bits_against_brute_force(inst, where):
    lo = sum(min(c.bits for c in cs) for cs in inst.values())
    hi = sum(max(c.bits for c in cs) for cs in inst.values())
    budget = float(round(lo + where * (hi - lo)))
    choice = allocate_bits(inst, budget)
    assert list(choice) == list(inst)
    assert all(choice[n] in inst[n] for n in inst)
    bits, error = totals(choice)
    assert bits <= budget
    opt = brute_min_error(inst, budget)
    lb = error_lower_bound(inst, budget)
    assert lb == float(error_dual(inst, budget))  # the relaxation bound is the LP dual
    assert lb <= opt <= error
    assert error - lb <= spread(inst, "error")  # the gap is below one hull step's error drop


@SETTINGS
@given(instances(), st.data())
def test_allocate_bits_is_exact_at_lagrangian_budgets(inst, data):
    """Budgets equal to the bits of a Lagrangian minimiser (a hull prefix): greedy = optimum."""
    lams = sorted({Fraction(0)} | {Fraction(i, 4) for i in range(1, 60)})
    lam = data.draw(st.sampled_from(lams))
    choice = {
        n: min(cs, key=lambda c: (Fraction(c.error) + lam * Fraction(c.bits), c.bits))
        for n, cs in inst.items()
    }
    budget, best = totals(choice)
    got = allocate_bits(inst, budget)
    assert totals(got)[1] == brute_min_error(inst, budget) == best
    assert error_lower_bound(inst, budget) == best


def test_local_search_reaches_a_candidate_inside_the_hull():
    inst = {
        "w": [Candidate("lo", 0.0, 10.0), Candidate("mid", 5.0, 6.0), Candidate("hi", 10.0, 0.0)]
    }
    # (5, 6) lies above the hull edge (0,10)-(10,0); the hull step of 10 bits does not fit
    assert allocate_bits(inst, 5.0)["w"].name == "mid"
    assert error_lower_bound(inst, 5.0) == 5.0  # halfway along the edge


def test_infeasible_budget_names_the_minimum():
    inst = {
        "a": [Candidate("x", 10.0, 1.0), Candidate("y", 20.0, 0.0)],
        "b": [Candidate("z", 5.0, 3.0)],
    }
    with pytest.raises(ValueError, match="at least that") as err:
        allocate_bits(inst, 14.0)
    assert "15 bits" in str(err.value)
    assert totals(allocate_bits(inst, 15.0)) == (15.0, 4.0)


def test_ties_are_deterministic_whatever_the_dict_order():
    same = [Candidate("4bit", 10.0, 5.0), Candidate("8bit", 20.0, 1.0)]
    for order in (["b", "a"], ["a", "b"]):
        inst = {n: list(same) for n in order}
        got = allocate_bits(inst, 30.0)  # room for exactly one upgrade
        assert got["a"].name == "8bit" and got["b"].name == "4bit"
        assert list(got) == order
    dup = {"a": [Candidate("first", 10.0, 1.0), Candidate("second", 10.0, 1.0)]}
    assert allocate_bits(dup, 10.0)["a"].name == "first"
    assert allocate_max_error(dup, 1.0)["a"].name == "first"


# --------------------------------------------------------------------------------------------
# allocate_max_error
# --------------------------------------------------------------------------------------------


@SETTINGS
@given(instances(), st.floats(0.0, 1.0))
def test_allocate_max_error_against_brute_force(inst, where):
    lo = sum(min(c.error for c in cs) for cs in inst.values())
    hi = sum(max(c.error for c in cs) for cs in inst.values())
    limit = float(round(lo + where * (hi - lo)))
    choice = allocate_max_error(inst, limit)
    bits, error = totals(choice)
    assert error <= limit
    opt = brute_min_bits(inst, limit)
    lb = bits_lower_bound(inst, limit)
    assert lb == float(bits_dual(inst, limit))
    assert lb <= opt <= bits
    assert bits - lb <= spread(inst, "bits")


def test_infeasible_max_error_names_the_minimum():
    inst = {
        "a": [Candidate("x", 10.0, 1.0), Candidate("y", 20.0, 0.5)],
        "b": [Candidate("z", 5.0, 3.0)],
    }
    with pytest.raises(ValueError, match=r"3\.5"):
        allocate_max_error(inst, 3.0)
    assert totals(allocate_max_error(inst, 3.5)) == (25.0, 3.5)


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="no candidates"):
        allocate_bits({"a": []}, 1.0)
    with pytest.raises(ValueError, match="no tensors"):
        allocate_bits({}, 1.0)
    with pytest.raises(ValueError, match="finite"):
        Candidate("x", float("nan"), 1.0)
    with pytest.raises(ValueError, match="error"):
        Candidate("x", 1.0, -1.0)


# --------------------------------------------------------------------------------------------
# Stored size
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        QuantArgs(4, "int", True, "group", 128),
        QuantArgs(4, "int", False, "group", 128),
        QuantArgs(3, "int", False, "group", 32),
        QuantArgs(4, "minmax", False, "group", 64),
        QuantArgs(8, "int", True, "channel"),
        QuantArgs(8, "int", False, "channel"),
        QuantArgs(2, "int", False, "tensor"),
        QuantArgs(5, "int", True, "tensor"),
    ],
    ids=lambda a: a.describe(),
)
@pytest.mark.parametrize("shape", [(96, 256), (33, 200), (1, 4096)])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_stored_bits_match_the_output_layout(args, shape, scale_dtype):
    name = {torch.bfloat16: "BF16", torch.float32: "F32"}[scale_dtype]
    specs = for_args(args).outputs("m.weight", shape, name, args)
    assert stored_bits(shape, args, scale_dtype) == 8 * sum(s.nbytes for s in specs)


def test_bits_per_weight_values():
    bpw = bits_per_weight((4096, 4096), QuantArgs(4, "int", True, "group", 128), torch.bfloat16)
    assert bpw == pytest.approx(4 + 16 / 128, abs=1e-5)
    with pytest.raises(ValueError, match="empty"):
        bits_per_weight((0, 8), QuantArgs(4), torch.bfloat16)
