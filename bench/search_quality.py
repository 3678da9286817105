"""The data-free searches' weight error against RTN's, and what mse's walk gives up.

    python -m bench.search_quality

For each set of weights, scheme and weighting this prints the summed Σ w·(x − x̂)² (float64,
`reconstruction_error`) of: the best candidate of mse's whole grid per group, mse's choice
(`rounding._mse` walks 9 of the 20 shrunk candidates, int symmetric, or 14 of 60, asymmetric)
and hqq's, each relative to RTN's. Weights: Student-t (4 d.o.f.) 512 × 1024, and three of
SmolLM2's linear weights (first 512 rows) when `fetch_smollm2` has cached the model. "weighted"
draws a per-column importance rand⁴ (seeded), as activation statistics skew it. Runs against
an older checkout too (PYTHONPATH=<checkout>), to compare its searches on the same weights.
Writes bench/results/search-quality.json (or --out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from compressor.evaluation.models import cache_root
from compressor.math import rounding
from compressor.math.quant import QuantArgs, group_ranges, qparams_from_range
from compressor.math.rounding import reconstruction_error, search_qparams

RESULTS = Path(__file__).parent / "results" / "search-quality.json"
SMOLLM2_TENSORS = (
    "model.layers.3.self_attn.q_proj.weight",
    "model.layers.3.mlp.down_proj.weight",
    "model.layers.20.mlp.gate_proj.weight",
)
SCHEMES = (
    QuantArgs(bits=4, symmetric=True, strategy="group", group_size=128),
    QuantArgs(bits=4, symmetric=False, strategy="group", group_size=64),
    QuantArgs(bits=3, symmetric=False, strategy="group", group_size=64),
)


def weights() -> Iterator[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    chi2 = torch.randn((4, 512, 1024), generator=g).pow(2).sum(0)
    t = torch.randn((512, 1024), generator=g) / (chi2 / 4).sqrt() * 0.02
    yield "Student-t", t.to(torch.bfloat16)
    model = cache_root() / "models" / "SmolLM2-135M-Instruct"
    files = sorted(model.glob("*.safetensors"))
    if not files:
        print(f"(no SmolLM2 under {model}: generated weights only)")
        return
    with safe_open(str(files[0]), "pt") as f:
        for name in SMOLLM2_TENSORS:
            yield "SmolLM2 " + name.removeprefix("model.layers."), f.get_tensor(name)[:512]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(RESULTS))
    a = p.parse_args()
    rows = []
    for label, x in weights():
        x = x.to(torch.bfloat16)
        for weighted in (False, True):
            g = torch.Generator().manual_seed(1)
            imp = (
                torch.rand(x.shape[1], dtype=torch.float64, generator=g) ** 4 if weighted else None
            )
            for args in SCHEMES:
                lo, hi = group_ranges(x, args)
                rtn = qparams_from_range(lo, hi, args, torch.bfloat16)
                base = reconstruction_error(x, *rtn, args, imp)
                grid = rounding._mse_candidates(lo, hi, args, torch.bfloat16, rounding.MSE_GRID)
                flat = [c for row in grid for c in (row if isinstance(row, list) else [row])]
                every = torch.stack([base] + [reconstruction_error(x, *c, args, imp) for c in flat])
                found = {
                    mode: reconstruction_error(
                        x, *search_qparams(x, args, torch.bfloat16, mode, imp), args, imp
                    )
                    for mode in ("mse", "hqq")
                }
                rows.append(
                    {
                        "weights": label,
                        "weighted": weighted,
                        "scheme": args.describe(),
                        "candidates": int(every.shape[0] - 1),
                        "grid_vs_rtn": round(float(every.min(0).values.sum() / base.sum()), 4),
                        "mse_vs_rtn": round(float(found["mse"].sum() / base.sum()), 4),
                        "hqq_vs_rtn": round(float(found["hqq"].sum() / base.sum()), 4),
                    }
                )
                print(rows[-1], flush=True)
    out = Path(a.out)
    out.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print("\n| weights | weighted | scheme | mse whole grid | mse | hqq |\n| --- | --- | --- | ---: | ---: | ---: |")  # fmt: skip
    for r in rows:
        print(f"| {r['weights']} | {'yes' if r['weighted'] else 'no'} | {r['scheme']} | {r['grid_vs_rtn']} | {r['mse_vs_rtn']} | {r['hqq_vs_rtn']} |")  # fmt: skip


if __name__ == "__main__":
    main()
