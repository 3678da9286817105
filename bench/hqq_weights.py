"""Why the `hqq` library's data-free 4-bit beats ours on the two test models: weight errors.

    python -m bench.hqq_weights            # main venv; runs the hqq side in the peer venv

Relative weight error ‖W − Ŵ‖ / ‖W‖ of asymmetric 4-bit group quantization, per set of weights:

- SmolLM2's linear weights at groups of 32, 64 and 128: they were converted from the Q4_1 GGUF,
  so they lie on a grid of 16 levels per block of 32 with a *float* offset (`w = d·q + m`);
- Gemma 3 270M's linear weights at g64, by module (its GGUF: q/k/v/gate/up mostly Q5_0, o/down
  mostly Q4_K, whose sub-blocks of 32 also carry a float minimum);
- generated continuous weights (Gaussian, Student-t with 4 degrees of freedom), 576 × 1536, at g64.

Columns: the hqq library (0.2.8, its 4-bit defaults: min-max scale, zero point rounded, then
its proximal iterations move the zero point again, so it ends as a float), plain min-max with a
float zero point (no optimisation), plain min-max with an integer zero point (what
compressed-tensors and vLLM store), and ours (`math/rounding.py`: rtn, mse, hqq, all with
integer zero points). Writes bench/results/hqq-weights.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np

MODELS = Path.home() / ".cache/checkpoint-compressor/models"
PEER_PYTHON = "/work/bench-data/peer-venv/bin/python"
RESULTS = Path(__file__).parent / "results" / "hqq-weights.json"


def _sets(synthetic: str) -> list[tuple[str, int, dict]]:
    """(label, group, {name: float32 weight}) for every measured set."""
    import torch
    from safetensors.torch import load_file

    def linears(model: str) -> dict[str, torch.Tensor]:
        found: dict[str, torch.Tensor] = {}
        for file in glob.glob(str(MODELS / model / "*.safetensors")):
            found.update(load_file(file))
        return {n: w.float() for n, w in found.items() if n.endswith("proj.weight")}

    smol = linears("SmolLM2-135M-Instruct")
    sets = [(f"SmolLM2 (Q4_1 source), g{g}", g, smol) for g in (32, 64, 128)]
    gemma = linears("gemma-3-270m")
    by_kind: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for n, w in gemma.items():
        by_kind[n.split(".")[-2]][n] = w
    sets += [(f"Gemma 3 {kind}, g64", 64, by_kind[kind]) for kind in sorted(by_kind)]
    gen = np.load(synthetic)
    sets += [(f"generated {k}, g64", 64, {k: torch.from_numpy(gen[k])}) for k in gen.files]
    return sets


def _error(pairs: list[tuple[object, object]]) -> float:
    num = sum(float(((r - w) ** 2).sum()) for r, w in pairs)  # type: ignore[operator]
    den = sum(float((w**2).sum()) for _, w in pairs)  # type: ignore[operator]
    return round((num / den) ** 0.5, 4)


def peer_side(synthetic: str) -> dict[str, dict[str, float]]:
    import torch
    from hqq.core.quantize import Quantizer

    def minmax(w: torch.Tensor, g: int, integer: bool) -> torch.Tensor:
        x = w.reshape(-1, g)
        lo, hi = x.min(1, keepdim=True)[0], x.max(1, keepdim=True)[0]
        if integer:  # the stored integer zero point: the range must hold 0 exactly
            lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        s = ((hi - lo) / 15).clamp_min(1e-12)
        z = -lo / s
        z = torch.round(z) if integer else z
        q = torch.round(x / s + z).clamp(0, 15)
        return ((q - z) * s).reshape(w.shape)

    out: dict[str, dict[str, float]] = {}
    for label, g, weights in _sets(synthetic):
        lib, flt, intz = [], [], []
        for w in weights.values():
            codes, meta = Quantizer.quantize(
                w, nbits=4, channel_wise=True, group_size=g, optimize=True, round_zero=True,
                axis=1, bitpack=False, compute_dtype=torch.float32, device="cpu",
            )  # fmt: skip
            lib.append((Quantizer.dequantize(codes, meta).reshape(w.shape), w))
            flt.append((minmax(w, g, False), w))
            intz.append((minmax(w, g, True), w))
        out[label] = {
            "hqq library": _error(lib),
            "min-max, float zero": _error(flt),
            "min-max, integer zero": _error(intz),
        }
    return out


def our_side(synthetic: str) -> dict[str, dict[str, float]]:
    import torch

    from compressor.math.quant import QuantArgs
    from compressor.math.rounding import quantize_rows

    torch.set_num_threads(1)
    out: dict[str, dict[str, float]] = {}
    for label, g, weights in _sets(synthetic):
        args = QuantArgs(bits=4, symmetric=False, strategy="group", group_size=g)
        row: dict[str, float] = {}
        for mode in ("rtn", "mse", "hqq"):
            pairs = []
            for w in weights.values():
                w16 = w.to(torch.bfloat16)  # what the checkpoint stores (exact for these)
                blocks = [quantize_rows(w16[r : r + 256], args, mode)[3] for r in range(0, len(w16), 256)]  # fmt: skip
                pairs.append((torch.cat(blocks).float(), w))
            row[f"ours, {mode}"] = _error(pairs)
        out[label] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=["peer", "ours"], help=argparse.SUPPRESS)
    p.add_argument("--synthetic", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.side:
        side = peer_side if a.side == "peer" else our_side
        print(json.dumps(side(a.synthetic)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        synthetic = str(Path(tmp) / "generated.npz")
        shape = (576, 1536)
        gaussian = (rng.standard_normal(shape) * 0.02).astype(np.float32)
        student = (rng.standard_t(4.0, shape) * 0.02).astype(np.float32)
        # bfloat16-representable, as a checkpoint's weights are (truncate the low 16 bits)
        to_bf16 = lambda x: (x.view(np.uint32) & 0xFFFF0000).view(np.float32)  # noqa: E731
        np.savez(synthetic, gaussian=to_bf16(gaussian), student_t4=to_bf16(student))
        rows: dict[str, dict[str, float]] = defaultdict(dict)
        for python, side in ((PEER_PYTHON, "peer"), (sys.executable, "ours")):
            done = subprocess.run(
                [python, "-m", "bench.hqq_weights", "--side", side, "--synthetic", synthetic],
                check=True, capture_output=True, text=True, cwd=Path(__file__).parent.parent,
            )  # fmt: skip
            for label, figures in json.loads(done.stdout.splitlines()[-1]).items():
                rows[label].update(figures)
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    columns = list(next(iter(rows.values())))
    print("| weights | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for label, figures in rows.items():
        print(f"| {label} | " + " | ".join(f"{figures[c]:.4f}" for c in columns) + " |")


if __name__ == "__main__":
    main()
