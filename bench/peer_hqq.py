"""The data-free peer: the `hqq` library's own half-quadratic quantizer (hqq 0.2.8, run by
bench/calibrated.py with the peer venv's python), applied to every linear layer but lm_head.

    /work/bench-data/peer-venv/bin/python bench/peer_hqq.py SRC DST --bits 4 --group 64

Each weight goes through `hqq.core.quantize.Quantizer.quantize` with the settings of hqq's
`BaseQuantizeConfig` (groups along the input dimension, `optimize=True`, zero points rounded at
4 bits, scales and zero points kept in float32 here) and is decoded back with
`Quantizer.dequantize`; the decoded weights are saved as a dense bfloat16 checkpoint, which
`compressor eval` scores like any other. Prints one JSON line: seconds, versions.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=64)
    a = p.parse_args()

    import torch
    from hqq.core.quantize import Quantizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(a.src, dtype=torch.float32)
    start = time.perf_counter()
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or name == "lm_head":
                continue
            w = module.weight.data
            codes, meta = Quantizer.quantize(
                w,
                nbits=a.bits,
                channel_wise=True,
                group_size=a.group,
                optimize=True,
                round_zero=a.bits == 4,
                axis=1,
                bitpack=False,
                compute_dtype=torch.float32,
                device="cpu",
            )
            module.weight.data = Quantizer.dequantize(codes, meta).reshape(w.shape).to(w.dtype)
    seconds = time.perf_counter() - start
    model.to(torch.bfloat16).save_pretrained(a.dst)
    AutoTokenizer.from_pretrained(a.src).save_pretrained(a.dst)
    print(
        json.dumps(
            {
                "seconds": round(seconds, 2),
                "hqq": importlib.metadata.version("hqq"),
                "transformers": importlib.metadata.version("transformers"),
            }
        )
    )


if __name__ == "__main__":
    main()
