"""Parallel or sequential calibration, and how GPTQ chooses group scales: measured in-process.

    python -m bench.calibration_modes SmolLM2-135M-Instruct 32 rtn,gptq,gptq-mse,gptq-act,gptq-act-rtn,seq-gptq,seq-gptq-mse,mse,mse-w,hqq,hqq-w

For each variant the model's linear weights are replaced by their int4 (sym, g128, g64 where 128
does not divide) fake-quantized copies, layer by layer as the calibration stage walks the model
(`compressor.calibration.layers.DecoderRunner`), and perplexity is measured on 2048 tokens of
*Persuasion* ch. 1-4 in windows of 512 (calibration: the first N × 512 tokens of Pride and
Prejudice). Variants:

    rtn, mse, hqq        data-free rounding (`math.rounding`)
    mse-w, hqq-w         the same searches weighted by diag(XᵀX) (what --calibration adds)
    gptq                 GPTQ with min-max group parameters (the paper's, llm-compressor's default)
    gptq-mse             GPTQ with the weighted mse group search, columns in their order
    gptq-act             the same in static act-order (ours: `math.gptq`'s default)
    gptq-act-rtn         static act-order with min-max group parameters (llm-compressor's
                         default GPTQ)
    seq-<variant>        "sequential": each layer's XᵀX from the outputs of the already
                         quantized layers before it; otherwise "parallel" (the original model's
                         activations, what the calibration stage computes)

Prints one JSON line per variant. The model directory is looked up in the fetch cache
(`compressor fetch smollm2` first); the calibration text in /work/shared/data.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CALIBRATION_TEXT = Path("/work/shared/data/pride_and_prejudice.txt")


@dataclass
class InProcess:
    """A cached model run in-process: its directory, its safetensors reader, the float32 model,
    its original state (to restore between variants) and perplexity on 2048 tokens of
    *Persuasion* ch. 1-4 in windows of 512."""

    src: Path
    shards: Any
    model: Any
    original: dict[str, torch.Tensor]
    ppl: Callable[[], float]

    def samples(self, n: int) -> torch.Tensor:
        """The first n × 512 calibration tokens of Pride and Prejudice."""
        from compressor.calibration.samples import load_samples

        return torch.from_numpy(load_samples(CALIBRATION_TEXT, self.src, n, 512).tokens)


def in_process(name: str) -> InProcess:
    """`InProcess` for the cached model `name` (`compressor fetch` first)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compressor.evaluation.models import cache_root
    from compressor.evaluation.perplexity import perplexity, tokenize_text

    src = cache_root() / "models" / name
    repo = Path(__file__).resolve().parent.parent
    text = repo / "compressor" / "evaluation" / "data" / "persuasion_ch1-4.txt"
    tok = AutoTokenizer.from_pretrained(str(src))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    ids = tokenize_text(tok, text.read_text(), 2048)

    def ppl() -> float:
        with torch.no_grad():
            return perplexity(model, ids, window=512, bos_id=tok.bos_token_id)

    original = {k: v.clone() for k, v in model.state_dict().items()}
    shards = safe_open(str(src / "model.safetensors"), "pt")
    return InProcess(src, shards, model, original, ppl)


def main() -> None:
    from compressor.calibration.layers import DecoderRunner
    from compressor.math.gptq import activation_order, gptq_rows, inverse_hessian_factor
    from compressor.math.quant import QuantArgs
    from compressor.math.rounding import quantize_rows

    name, nsamp, variants = sys.argv[1], int(sys.argv[2]), sys.argv[3].split(",")
    bits = int(sys.argv[4]) if len(sys.argv) > 4 else 4
    run = in_process(name)
    src, model, original, ppl = run.src, run.model, run.original, run.ppl

    def read(n: str) -> torch.Tensor:
        return run.shards.get_tensor(n)

    base = ppl()
    samples = run.samples(nsamp)

    def qweight(w: torch.Tensor, h: torch.Tensor, variant: str) -> torch.Tensor:
        args = QuantArgs(bits, group_size=128 if w.shape[1] % 128 == 0 else 64)
        if variant == "rtn":
            return quantize_rows(w, args)[3]
        if variant in ("mse", "hqq"):
            return quantize_rows(w, args, variant)[3]
        if variant in ("mse-w", "hqq-w"):
            return quantize_rows(w, args, variant[:3], importance=torch.diagonal(h))[3]  # type: ignore[arg-type]
        order = activation_order(h) if variant.startswith("gptq-act") else None
        u, dead = inverse_hessian_factor(h, order=order)
        mode = "mse" if variant in ("gptq-mse", "gptq-act") else "rtn"
        return gptq_rows(w, u, dead, args, mode, torch.diagonal(h), order)[3]  # type: ignore[arg-type]

    for variant in variants:
        sequential = variant.startswith("seq-")
        v = variant.removeprefix("seq-")
        start = time.time()
        runner = DecoderRunner(src, read)
        with torch.no_grad():
            inputs = runner.layer_inputs(samples)
            hidden = inputs[0][0]
            for i in range(len(runner)):
                before = hidden
                hidden, stats = runner.run_layer(i, hidden, inputs[i][1])
                for s in stats:
                    for m in s.members:
                        q = qweight(read(m + ".weight"), s.hessian.double(), v)
                        model.state_dict()[m + ".weight"].copy_(q.float())
                if sequential:  # the next layer sees this layer's quantized output
                    out = model.model.layers[i](before, **inputs[i][1])
                    hidden = out[0] if isinstance(out, tuple) else out
        p = ppl()
        row = {"variant": variant, "samples": nsamp, "bits": bits, "ppl_original": base}
        row.update({"ppl": p, "delta_ppl_pct": 100 * (p / base - 1), "s": time.time() - start})
        print(json.dumps(row), flush=True)
        model.load_state_dict(original)


if __name__ == "__main__":
    main()
