"""hqq's iteration schedule against perplexity, in-process, calibration run once.

    python -m bench.hqq_schedule SmolLM2-135M-Instruct 32 15:0.3:1.3,5:1.5:2 w3,w3-cal,w4,w4-cal

Each schedule is `iterations:beta:kappa` (β's start in code units and its growth per
iteration; `compressor.math.rounding`'s defaults are 15:0.3:1.3). Each scheme is one of
w4 (int4 sym g128, g64 where 128 does not divide), w3 (int3 sym g64), w4asym (int4 asym g128)
and w3asym (int3 asym g64), with `-cal` for the search weighted by the calibration's
diag(XᵀX), as `--rounding hqq --calibration` runs it. The model's decoder linears are replaced
by their hqq fake-quantized copies (the torch search, which the fused kernel's tests hold to
it) and perplexity is measured on 2048 tokens of *Persuasion* ch. 1-4 in windows of 512; the
calibration is the first N × 512 tokens of Pride and Prejudice, every input's XᵀX from the
original model (what the calibration stage computes). One JSON line per (schedule, scheme),
printed and appended to bench/results/hqq-schedule-MODEL.jsonl.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

SCHEMES = {
    "w4": (4, True, 128),
    "w3": (3, True, 64),
    "w4asym": (4, False, 128),
    "w3asym": (3, False, 64),
}


def main() -> None:
    from bench.calibration_modes import in_process
    from compressor.calibration.layers import DecoderRunner
    from compressor.math import rounding
    from compressor.math.quant import QuantArgs

    name, nsamp = sys.argv[1], int(sys.argv[2])
    results = Path(__file__).parent / "results" / f"hqq-schedule-{name}.jsonl"
    schedules = [tuple(s.split(":")) for s in sys.argv[3].split(",")]
    schemes = sys.argv[4].split(",")
    run = in_process(name)
    f, model, original, ppl = run.shards, run.model, run.original, run.ppl
    base = ppl()
    # one calibration walk: each decoder linear's diag(XᵀX)
    importance: dict[str, torch.Tensor] = {}
    if any(s.endswith("-cal") for s in schemes):
        samples = run.samples(nsamp)
        runner = DecoderRunner(run.src, f.get_tensor)
        with torch.no_grad():
            inputs = runner.layer_inputs(samples)
            hidden = inputs[0][0]
            for i in range(len(runner)):
                hidden, stats = runner.run_layer(i, hidden, inputs[i][1])
                for s in stats:
                    assert s.hessian is not None
                    for m in s.members:
                        importance[m] = torch.diagonal(s.hessian.double()).clone()
        members = sorted(importance)
    else:
        members = sorted(
            k.removesuffix(".weight")
            for k in f.keys()  # noqa: SIM118 (safe_open has no __iter__)
            if ".layers." in k and k.endswith("_proj.weight")
        )

    for iters, beta, kappa in schedules:
        rounding.HQQ_ITERATIONS = int(iters)
        rounding._HQQ_BETA = float(beta)
        rounding._HQQ_KAPPA = float(kappa)
        for scheme in schemes:
            bits, sym, group = SCHEMES[scheme.removesuffix("-cal")]
            weighted = scheme.endswith("-cal")
            start = time.time()
            for m in members:
                w = f.get_tensor(m + ".weight")
                g = group if w.shape[1] % group == 0 else 64
                args = QuantArgs(bits, symmetric=sym, group_size=g)
                imp = importance[m] if weighted else None
                q = rounding.quantize_rows(w, args, "hqq", importance=imp)[3]
                model.state_dict()[m + ".weight"].copy_(q.float())
            p = ppl()
            row = {
                "schedule": f"{iters}:{beta}:{kappa}",
                "scheme": scheme,
                "samples": nsamp if weighted else 0,
                "ppl_original": base,
                "ppl": p,
                "delta_ppl_pct": round(100 * (p / base - 1), 2),
                "s": round(time.time() - start, 1),
                "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            }
            print(json.dumps(row), flush=True)
            with results.open("a") as out:
                out.write(json.dumps(row) + "\n")
            model.load_state_dict(original)


if __name__ == "__main__":
    main()
