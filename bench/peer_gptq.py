"""The calibrated peer: llm-compressor's GPTQ (`oneshot` + `GPTQModifier`), run by
bench/accuracy.py with the peer venv's python (bench/run.py builds it: torch 2.13.0 CPU +
llmcompressor).

    /work/bench-data/peer-venv/bin/python bench/peer_gptq.py SRC DST TOKENS.npy \\
        --bits 4 --groups '{"re:.*down_proj$": 128, "re:.*_proj$": 64}' [--asym]
    /work/bench-data/peer-venv/bin/python bench/peer_gptq.py SRC DST TOKENS.npy --preset NVFP4

With `--awq` it runs llm-compressor's AWQ instead of GPTQ (`AWQModifier`, its defaults: duo
scaling, the architecture's mappings, then round to nearest with the same config groups; its
memory pinning, which needs a GPU, is skipped).
With `--preset NAME` it runs one of compressed-tensors' preset schemes with llm-compressor's
calibrated round-to-nearest modifier instead (`QuantizationModifier(scheme=NAME)`; NVFP4: W4A4,
the input global scales observed on the calibration tokens).

TOKENS.npy holds the calibration windows (n, seq_len) that our own run uses (bench/accuracy.py
writes them with `compressor.calibration.samples.load_samples`), so both sides calibrate on
identical token ids. Everything else is llm-compressor's default for GPTQ: its sequential
pipeline (each layer calibrated on the outputs of the already-quantized layers before it),
static act-order, dampening 0.01, block 128, min-max observer. The model runs in float32 (as
ours does) and is saved as it is: a compressed-tensors checkpoint (save_compressed; its
unquantized tensors and scales in float32) and prints one JSON line: seconds of the oneshot call, versions.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("tokens")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--groups", default="{}", help="JSON: target pattern → group size")
    p.add_argument("--asym", action="store_true")
    p.add_argument("--preset", default="", help="a compressed-tensors preset scheme, no GPTQ")
    p.add_argument("--awq", action="store_true", help="AWQ + round to nearest, not GPTQ")
    a = p.parse_args()

    import importlib.metadata

    import numpy as np
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokens = np.load(a.tokens)
    data = Dataset.from_dict(
        {"input_ids": tokens.tolist(), "attention_mask": np.ones_like(tokens).tolist()}
    )
    groups = {}
    for k, (target, size) in enumerate(json.loads(a.groups).items()):
        weights = QuantizationArgs(
            num_bits=a.bits,
            type="int",
            symmetric=not a.asym,
            strategy="group" if size else "channel",
            group_size=size or None,
        )
        groups[f"group_{k}"] = QuantizationScheme(targets=[target], weights=weights)
    model = AutoModelForCausalLM.from_pretrained(a.src, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(a.src)
    recipe: GPTQModifier | QuantizationModifier | list = GPTQModifier(
        config_groups=groups, ignore=["lm_head"]
    )
    if a.awq:
        from llmcompressor.modifiers.transform import AWQModifier
        from llmcompressor.pipelines.cache import IntermediatesCache

        # llm-compressor 0.14's AWQ pins its cached activations in memory before each grid
        # search (for faster host-to-GPU copies); pinning needs an accelerator and fails on a
        # CPU-only machine. It changes no value: skip it.
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None

        rtn = QuantizationModifier(config_groups=groups, ignore=["lm_head"])
        recipe = [AWQModifier(), rtn]
    if a.preset:
        recipe = QuantizationModifier(targets="Linear", scheme=a.preset, ignore=["lm_head"])
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=data,
        recipe=recipe,
        max_seq_length=tokens.shape[1],
        num_calibration_samples=tokens.shape[0],
        shuffle_calibration_samples=False,
    )
    seconds = time.perf_counter() - start
    model.save_pretrained(a.dst, save_compressed=True)
    tokenizer.save_pretrained(a.dst)
    print(
        json.dumps(
            {
                "seconds": round(seconds, 2),
                "llmcompressor": importlib.metadata.version("llmcompressor"),
                "compressed_tensors": importlib.metadata.version("compressed-tensors"),
                "transformers": importlib.metadata.version("transformers"),
            }
        )
    )


if __name__ == "__main__":
    main()
