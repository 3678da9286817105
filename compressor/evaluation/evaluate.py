"""Compare a compressed checkpoint with its original: perplexity, size and weight error.

Both checkpoints are loaded with transformers, one after the other (never both models in memory
at once), and scored on the same tokens with :func:`compressor.evaluation.perplexity.score_tokens`.

How the compressed checkpoint is loaded depends on its ``config.json``:

* no ``quantization_config``: a dense checkpoint, loaded as is;
* ``quantization_config.quant_method == "compressed-tensors"`` (e.g. our ``pack-quantized``
  output): transformers loads it through compressed-tensors, the way users load it. In that
  default mode the state dict holds ``weight_packed`` / ``weight_scale`` / ``weight_shape`` until
  the first forward pass decompresses the modules in place; the weights are compared after
  scoring, when they are dense. (``CompressedTensorsConfig(dequantize=True)`` would dequantize at
  load time, but transformers 5.24 applies the first config group's group size to every module
  there, so mixed-precision checkpoints, e.g. with a group-size fallback, fail to load that way.)
* any other ``quantization_config`` (this project's own layouts): ``dense_loader(compressed_dir,
  tmpdir)`` must write a dense checkpoint into ``tmpdir`` and return its directory (this is
  the project's decompressor, injected by the caller), which is then loaded like a dense one.

The models run in float32 by default although checkpoints are usually bf16: upcasting is exact,
costs little for the small models this is meant for, and keeps the activations' rounding noise
(about 0.1 % of perplexity in bf16) out of the ΔPPL being measured. One exception: a checkpoint
whose config quantizes activations with NVFP4 (W4A4) runs in bfloat16, the dtype compressed-
tensors decompresses FP4 weights to; its float32 path fails at the first forward, and the
dequantize-on-load fallback would drop the activation quantization, i.e. score it as W4A16.

Results are bitwise reproducible for a fixed device, dtype and number of torch threads; the
thread count changes the last bits (CPU BLAS splits its sums by thread; about 1e-6 relative in
perplexity). On a busy CPU, ``torch.set_num_threads(1)`` is both reproducible and often much
faster than oversubscribed OpenMP threads.
"""

from __future__ import annotations

import gc
import json
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from compressor.errors import InputError
from compressor.evaluation.perplexity import PerplexityResult, score_tokens, tokenize_text
from compressor.evaluation.weights import WeightComparison, compare_weights

__all__ = [
    "DEFAULT_TEXT_NAME",
    "DenseLoader",
    "EvalReport",
    "checkpoint_bytes",
    "default_text",
    "evaluate",
]

DenseLoader = Callable[[Path, Path], Path]
"""``dense_loader(compressed_dir, tmpdir) -> dense_dir``: decompress into ``tmpdir``."""

DEFAULT_TEXT_NAME = "pride_and_prejudice_ch1-3.txt"


def default_text() -> str:
    """Chapters 1–3 of *Pride and Prejudice* (public domain), shipped as package data."""
    return (
        resources.files("compressor.evaluation")
        .joinpath("data", DEFAULT_TEXT_NAME)
        .read_text(encoding="utf-8")
    )


def checkpoint_bytes(checkpoint_dir: Path) -> int:
    """Total size of the ``*.safetensors`` files directly in ``checkpoint_dir``."""
    return sum(p.stat().st_size for p in Path(checkpoint_dir).glob("*.safetensors"))


@dataclass(frozen=True)
class EvalReport:
    """Result of :func:`evaluate`. ``delta_ppl_pct = 100 * (ppl_compressed / ppl_original - 1)``;
    ``compression_ratio = original_bytes / compressed_bytes``."""

    original_dir: str
    compressed_dir: str
    compressed_loader: str  # "dense", "compressed-tensors[ (dequantize on load)]", "dense_loader…"
    device: str
    dtype: str
    window: int
    stride: int
    bos_id: int | None
    tokens: int
    predicted_tokens: int
    ppl_original: float
    ppl_compressed: float
    delta_ppl_pct: float
    original_bytes: int
    compressed_bytes: int
    compression_ratio: float | None  # None when the compressed side has no *.safetensors
    weights: WeightComparison

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (infinite SQNRs, i.e. exact tensors, become ``None``)."""
        return {
            "original_dir": self.original_dir,
            "compressed_dir": self.compressed_dir,
            "compressed_loader": self.compressed_loader,
            "device": self.device,
            "dtype": self.dtype,
            "window": self.window,
            "stride": self.stride,
            "bos_id": self.bos_id,
            "tokens": self.tokens,
            "predicted_tokens": self.predicted_tokens,
            "ppl_original": self.ppl_original,
            "ppl_compressed": self.ppl_compressed,
            "delta_ppl_pct": self.delta_ppl_pct,
            "original_bytes": self.original_bytes,
            "compressed_bytes": self.compressed_bytes,
            "compression_ratio": self.compression_ratio,
            "weights": self.weights.to_dict(),
        }


def _read_config(checkpoint_dir: Path) -> dict[str, Any]:
    path = checkpoint_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputError("checkpoint has no config.json", path=str(checkpoint_dir)) from exc
    except ValueError as exc:
        raise InputError(f"config.json is not valid JSON: {exc}", path=str(path)) from exc
    if not isinstance(config, dict):
        raise InputError("config.json is not a JSON object", path=str(path))
    return config


def _quant_method(config: dict[str, Any]) -> str | None:
    qc = config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        return "unknown"
    if qc.get("tool") == "checkpoint-compressor":  # our own layouts carry no quant_method
        return "checkpoint-compressor"
    return str(qc.get("quant_method", "unknown"))


def _fp4_inputs(config: dict[str, Any]) -> bool:
    """Whether a config group quantizes activations to 4-bit floats (NVFP4 W4A4)."""
    groups = (config.get("quantization_config") or {}).get("config_groups") or {}
    return any(
        isinstance(g, dict)
        and isinstance(g.get("input_activations"), dict)
        and (g["input_activations"].get("type"), g["input_activations"].get("num_bits"))
        == ("float", 4)
        for g in groups.values()
    )


def _load_model(path: Path, dtype: torch.dtype, device: str, **kwargs: Any):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        # A caller may pass a quantization_config on purpose on top of the checkpoint's.
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config`.*")
        try:
            model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
        except (OSError, ValueError, ImportError, RuntimeError) as exc:
            raise InputError(
                f"transformers cannot load the checkpoint: {exc}", path=str(path)
            ) from exc
    if dtype == torch.float32:
        # compressed-tensors decompresses FP4 layouts to bfloat16 whatever dtype was asked
        # for (on load with dequantize=True); widen such weights (exactly) so a float32
        # evaluation does not mix dtypes.
        for param in model.parameters():
            if param.dtype in (torch.bfloat16, torch.float16):
                param.data = param.data.float()
    return model.to(device).eval()


def _with_original_config(dense_dir: Path, original_dir: Path, view: Path) -> Path:
    """A directory with ``dense_dir``'s files (symlinked) and the original's config files, for
    a dense_loader that writes only weights."""
    view.mkdir()
    for item in dense_dir.iterdir():
        (view / item.name).symlink_to(item.resolve())
    for name in ("config.json", "generation_config.json"):
        if (original_dir / name).is_file() and not (view / name).exists():
            shutil.copyfile(original_dir / name, view / name)
    return view


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate(
    original_dir: Path,
    compressed_dir: Path,
    text: str,
    max_tokens: int = 512,
    device: str = "cpu",
    dense_loader: DenseLoader | None = None,
    *,
    window: int = 256,
    stride: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> EvalReport:
    """Perplexity of both checkpoints on the first ``max_tokens`` tokens of ``text``, their sizes
    and the per-tensor error of the compressed model's (dequantized) weights.

    The tokenizer comes from ``original_dir``; each window gets the tokenizer's BOS token
    prepended (its EOS token when it has no BOS). The original weights are read from its
    safetensors files one tensor at a time; the compressed side's dense weights are the loaded
    model's state dict (see the module docstring for how each kind of checkpoint is loaded).
    """
    from transformers import AutoTokenizer

    original_dir, compressed_dir = Path(original_dir), Path(compressed_dir)
    stride = window if stride is None else stride
    orig_method = _quant_method(_read_config(original_dir))
    if orig_method is not None:
        raise InputError(
            f"the original checkpoint is quantized ({orig_method}); it must be dense",
            path=str(original_dir),
        )
    comp_method = _quant_method(_read_config(compressed_dir))
    if comp_method not in (None, "compressed-tensors") and dense_loader is None:
        raise InputError(
            f"the checkpoint's quantization_config has quant_method {comp_method!r}, "
            "which transformers cannot load",
            path=str(compressed_dir),
            hint="pass a dense_loader (the project's decompressor) to evaluate it",
        )

    tokenizer = AutoTokenizer.from_pretrained(original_dir)
    bos_id = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )
    ids = tokenize_text(tokenizer, text, max_tokens)

    def run(
        path: Path, compare: bool, as_dtype: torch.dtype = dtype, **kwargs: Any
    ) -> tuple[PerplexityResult, WeightComparison | None]:
        # Load, score and (for the compressed side) compare; the model is freed on return.
        model = _load_model(path, as_dtype, device, **kwargs)
        try:
            result = score_tokens(
                model, ids, window=window, stride=stride, bos_id=bos_id, device=device
            )
        except RuntimeError as exc:
            # e.g. compressed-tensors' run-compressed FP4 layers decompress to bfloat16 at the
            # first forward, inside a float32 model; the next loader (dequantize on load) works
            raise InputError(
                f"transformers cannot run the checkpoint: {exc}", path=str(path)
            ) from exc

        weights = compare_weights(original_dir, model.state_dict()) if compare else None
        del model
        _free_memory()
        return result, weights

    orig, _ = run(original_dir, compare=False)

    with tempfile.TemporaryDirectory(prefix="compressor-eval-") as tmp:
        kwargs: dict[str, Any] = {}
        load_dir = compressed_dir
        if comp_method is None:
            loader = "dense"
        elif comp_method == "compressed-tensors" and _fp4_inputs(_read_config(compressed_dir)):
            loader = "compressed-tensors (bfloat16, NVFP4 activations)"
            kwargs["as_dtype"] = torch.bfloat16
        elif comp_method == "compressed-tensors":
            loader = "compressed-tensors"
        else:
            assert dense_loader is not None  # checked above, before the slow part
            loader = "dense_loader"
            load_dir = Path(dense_loader(compressed_dir, Path(tmp)))
            if not (load_dir / "config.json").is_file():
                load_dir = _with_original_config(load_dir, original_dir, Path(tmp) / "with-config")
            elif _quant_method(_read_config(load_dir)) is not None:
                raise InputError(
                    "dense_loader returned a checkpoint that is still quantized",
                    path=str(load_dir),
                )
        try:
            comp, weights = run(load_dir, compare=True, **kwargs)
        except InputError:
            # W4A4 (its own loader) included: no fallback may drop its activations' scheme
            if loader != "compressed-tensors":
                raise
            # transformers 5.24's default (run-compressed) path initialises asymmetric zero
            # points unpacked and refuses the packed ones compressed-tensors writes; its
            # dequantize-on-load path reads them (but mishandles mixed group sizes, which the
            # default path loads). One of the two loads every checkpoint we write.
            from transformers import CompressedTensorsConfig

            try:
                loader = "compressed-tensors (dequantize on load)"
                kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
                comp, weights = run(load_dir, compare=True, **kwargs)
            except InputError:
                if dense_loader is None:  # asymmetric and mixed group sizes: neither path loads
                    raise
                loader = "dense_loader (transformers could not load it)"
                load_dir = Path(dense_loader(compressed_dir, Path(tmp)))
                if not (load_dir / "config.json").is_file():
                    load_dir = _with_original_config(load_dir, original_dir, Path(tmp) / "cfg")
                comp, weights = run(load_dir, compare=True)
    assert weights is not None

    if orig.predicted != comp.predicted:  # same ids and windows: cannot happen
        raise AssertionError("the two models scored different numbers of tokens")
    original_bytes = checkpoint_bytes(original_dir)
    compressed_bytes = checkpoint_bytes(compressed_dir)
    return EvalReport(
        original_dir=str(original_dir),
        compressed_dir=str(compressed_dir),
        compressed_loader=loader,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        window=window,
        stride=stride,
        bos_id=bos_id,
        tokens=orig.tokens,
        predicted_tokens=orig.predicted,
        ppl_original=orig.perplexity,
        ppl_compressed=comp.perplexity,
        delta_ppl_pct=100.0 * (comp.perplexity / orig.perplexity - 1.0),
        original_bytes=original_bytes,
        compressed_bytes=compressed_bytes,
        compression_ratio=original_bytes / compressed_bytes if compressed_bytes else None,
        weights=weights,
    )
