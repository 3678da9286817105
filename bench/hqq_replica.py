"""What the `hqq` library's data-free lead on SmolLM2 is made of: its optimiser rewritten from
its description, checked against the library's own output, then stored the ways a format can.

    python -m bench.hqq_replica        # the library check needs /work/bench-data/peer-venv
    python -m bench.hqq_replica --model gemma3-270m --only float32,offset-bf16,integer-zero

hqq 0.2.8's `optimize_weights_proximal` (the default of `Quantizer.quantize`, settings of
`bench/peer_hqq.py`: 4 bits, groups of 64 along the input, zero rounded first) works on the
inverse scale a = 15/(max − min) and a float zero z:

    z ← round(−min·a);  repeat ≤ 20 times:
        q ← clamp(round(x·a + z), 0, 15);  r ← (q − z)/a
        e ← shrink_0.7(x − r, β = 10);     z ← mean(q − (x − e)·a)
        stop after the first pass whose whole-tensor mean |x − r| did not fall

The shrink's threshold |x − r|^(−0.3)/β is about 0.5 for residuals of a few 1e-3, far above
every residual of these weights, so e = 0 and the loop is a least-squares fit of z alone, the
scale staying at the full range (no clipping). Rows, each scored by `compressor eval` like
`bench.hqq_gap` (2048 tokens of *Persuasion* ch. 1-4 and of *Pride and Prejudice*, windows
of 512), weight error ‖Ŵ − W‖/‖W‖ over all q/k/v/o/gate/up/down weights, and the share of the
squared error that is each group's mean ("bias"):

    replica, float32           the loop above, s = 1/a and z in float32 (the library's storage)
    replica, scale bf16        s stored in bfloat16, codes recomputed from the stored (s, m)
    replica, offset bf16       the offset m = −z·s stored in bfloat16 (our `minmax` layout's
                               offset dtype), codes recomputed
    replica, scale+offset bf16 both (what `--preset minmax` stores)
    replica, integer zero      z rounded to an integer, s in bfloat16 (compressed-tensors'
                               asymmetric int: codes clamp(round(x/s) + z))
    fit from min, float32      the same fit started from m = min instead of the rounded zero

With the peer venv present, the replica is compared with the library's own dequantized
weights (`bench/peer_hqq.py`) and the largest difference printed. Writes
bench/results/hqq-replica-MODEL.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch

from bench.hqq_gap import PEER_PYTHON, REPO, TEXTS, _ppl, _run, _weights, rewritten
from compressor.evaluation.models import cache_root

GROUP = 64
LEVELS = 15  # 4 bits, unsigned codes
WORK = Path("/work/bench-data/hqq-replica")
RESULTS = Path(__file__).parent / "results"
MODELS = {"smollm2": "SmolLM2-135M-Instruct", "gemma3-270m": "gemma-3-270m"}

Params = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # groups (n, g), inverse scale a, zero z


def _shrink(r: torch.Tensor, beta: float = 10.0, p: float = 0.7) -> torch.Tensor:
    """hqq's generalised soft threshold for the ℓ_p loss."""
    a = r.abs()
    return torch.sign(r) * torch.relu(a - a.add(1e-8).pow(p - 1) / beta)


def library_fit(w: torch.Tensor, start: str = "rounded zero", iterations: int = 20) -> Params:
    """The library's parameters for one weight: groups, inverse scale a, float zero z."""
    x = w.float().reshape(-1, GROUP)
    lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    span = hi - lo
    a = torch.where(span.abs() <= 1e-4, torch.ones_like(span), LEVELS / span).clamp(max=2e4)
    z = torch.round(-lo * a) if start == "rounded zero" else -lo * a
    best = float("inf")
    for _ in range(iterations):
        q = torch.round(x * a + z).clamp(0, LEVELS)
        r = (q - z) / a
        z = torch.mean(q - (x - _shrink(x - r)) * a, 1, keepdim=True)
        error = float((x - r).abs().mean())
        if error >= best:
            break
        best = error
    return x, a, z


def _offset_layout(x: torch.Tensor, s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """x̂ = m + q·s with q = clamp(round((x − m)/s)): codes from the stored parameters."""
    q = torch.round((x - m) / s).clamp(0, LEVELS)
    return m + q * s


def stored(params: Params, storage: str) -> torch.Tensor:
    """The reconstruction of `params` under one storage (see the module doc)."""
    x, a, z = params
    s = 1.0 / a
    bf16 = torch.bfloat16

    def snap(t: torch.Tensor) -> torch.Tensor:
        return t.to(bf16).float()

    if storage == "float32":
        return (torch.round(x * a + z).clamp(0, LEVELS) - z) * s
    if storage == "integer zero":
        sb = snap(s)
        zi = torch.round(z).clamp(0, LEVELS)
        return (torch.round(x / sb).add(zi).clamp(0, LEVELS) - zi) * sb
    sb = snap(s) if "scale" in storage else s
    m = -z * sb
    return _offset_layout(x, sb, snap(m) if "offset" in storage else m)


ROWS: dict[str, tuple[str, str, str]] = {  # --only key: (label, start, storage)
    "float32": ("replica, float32", "rounded zero", "float32"),
    "scale-bf16": ("replica, scale bf16", "rounded zero", "scale bf16"),
    "offset-bf16": ("replica, offset bf16", "rounded zero", "offset bf16"),
    "bf16": ("replica, scale+offset bf16", "rounded zero", "scale+offset bf16"),
    "integer-zero": ("replica, integer zero", "rounded zero", "integer zero"),
    "from-min": ("fit from min, float32", "min", "float32"),
}


def _dense(src: Path, key: str) -> Path:
    """A copy of `src` with every projection weight replaced by row `key`'s reconstruction."""
    _, start, storage = ROWS[key]
    return rewritten(src, WORK / key, lambda _, w: stored(library_fit(w, start), storage))


def _weight_stats(path: Path, original: dict[str, torch.Tensor]) -> dict[str, float]:
    got = _weights(path)
    err2 = sig2 = bias2 = 0.0
    for name, w in original.items():
        e = (got[name].double() - w.double()).reshape(-1, GROUP)
        err2 += float(e.pow(2).sum())
        bias2 += float(e.mean(1).pow(2).sum()) * GROUP
        sig2 += float(w.double().pow(2).sum())
    return {"rel_error": round((err2 / sig2) ** 0.5, 4), "bias_share": round(bias2 / err2, 4)}


def arguments(bench: str, rows: Iterable[str]) -> tuple[str, Path, list[str]]:
    """`--model` and `--only` (keys of `rows`), checked: (model key, its checkpoint, keys)."""
    rows = list(rows)
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    parser.add_argument("--only", default=",".join(rows), help="comma-separated row keys")
    a = parser.parse_args()
    keys = a.only.split(",")
    if unknown := sorted(set(keys) - set(rows)):
        raise SystemExit(f"--only: unknown {unknown}; choose from {sorted(rows)}")
    src = cache_root() / "models" / MODELS[a.model]
    missing = [str(path) for path in (src, *TEXTS.values()) if not path.exists()]
    if missing:
        raise SystemExit(f"{bench} needs {missing} (`compressor fetch {a.model}`, shared data)")
    return a.model, src, keys


HEADS = {"rel_error": "weight rel. error", "bias_share": "bias share"}


def report(name: str, model: str, rows: list[dict[str, object]], columns: list[str]) -> None:
    """Write bench/results/NAME-MODEL.json and print the rows as a table: ΔPPL on both texts,
    then `columns` (keys of each row)."""
    out = RESULTS / f"{name}-{model}.json"
    out.write_text(json.dumps({"model": MODELS[model], "rows": rows}, indent=1))
    heads = " | ".join(HEADS.get(c, c) for c in columns)
    print(f"\n| variant | ΔPPL % Persuasion | ΔPPL % Pride and Prejudice | {heads} |")
    print("| --- | ---: | ---: |" + " ---: |" * len(columns))
    for r in rows:
        p = r["delta_ppl_pct"]
        assert isinstance(p, dict)
        rest = " | ".join(str(r[c]) for c in columns)
        print(f"| {r['variant']} | {p['persuasion']:+.1f} | {p['pride_and_prejudice']:+.1f} | {rest} |")  # fmt: skip


def main() -> None:
    model, src, keys = arguments("hqq_replica", ROWS)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    original = _weights(src)
    rows: list[dict[str, object]] = []
    try:
        if Path(PEER_PYTHON).exists():  # the replica first, against the library's own output
            library = WORK / "library"
            _run([PEER_PYTHON, str(REPO / "bench" / "peer_hqq.py"), str(src), str(library)])
            theirs = _weights(library)
            ours = _weights(_dense(src, "float32"))
            worst = max(float((ours[n].float() - theirs[n].float()).abs().max()) for n in ours)
            same = sum(bool(torch.equal(ours[n], theirs[n])) for n in ours)
            print(f"replica vs library: {same}/{len(ours)} weights identical, max |Δ| {worst:.3g}")
            shutil.rmtree(library)
        for key in keys:
            path = WORK / key
            if not path.exists():  # the float32 row may stand from the check above
                _dense(src, key)
            row = {
                "variant": ROWS[key][0],
                **_weight_stats(path, original),
                "delta_ppl_pct": _ppl(path, src),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(path)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    report("hqq-replica", model, rows, ["rel_error", "bias_share"])


if __name__ == "__main__":
    main()
