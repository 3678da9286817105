"""Deterministic Llama-shaped checkpoints for tests, demos and benchmarks.

Weights have heavy tails (Student-t, 4 degrees of freedom) and a few outlier input channels, as
trained LLM weights do, so range handling matters. The output is an ordinary Hugging Face
checkpoint directory (`config.json`, size-based shards with `model.safetensors.index.json`,
`generation_config.json`) that `transformers.AutoModelForCausalLM` loads. Shards are written
tensor by tensor with the streaming writer, so memory stays at one tensor whatever the size.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from compressor.errors import ConfigError
from compressor.formats import dtypes
from compressor.formats.safetensors_io import SafetensorsWriter

__all__ = ["LlamaShape", "generate_llama_checkpoint", "llama_tensor_shapes"]


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int = 512
    intermediate_size: int = 1536
    num_hidden_layers: int = 2
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    vocab_size: int = 1024
    max_position_embeddings: int = 512

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


def llama_tensor_shapes(shape: LlamaShape) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes in transformers' LlamaForCausalLM naming, in model order."""
    h, i = shape.hidden_size, shape.intermediate_size
    kv = shape.num_key_value_heads * shape.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab_size, h))]
    for layer in range(shape.num_hidden_layers):
        p = f"model.layers.{layer}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (i, h)),
            (f"{p}.mlp.up_proj.weight", (i, h)),
            (f"{p}.mlp.down_proj.weight", (h, i)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (shape.vocab_size, h))]
    return out


def _tensor(name: str, dims: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """float32 weights: norms near 1; matrices heavy-tailed with a few loud input channels."""
    if len(dims) == 1:
        return (1.0 + 0.05 * rng.standard_normal(dims)).astype(np.float32)
    _rows, cols = dims
    w = rng.standard_t(df=4, size=dims).astype(np.float32) * (0.5 / math.sqrt(cols))
    outliers = rng.choice(cols, size=max(1, cols // 128), replace=False)
    w[:, outliers] *= 8.0
    return w


def _iter_tensors(shape: LlamaShape, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    for index, (name, dims) in enumerate(llama_tensor_shapes(shape)):
        # One generator per tensor keyed by (seed, index): any tensor can be made on its own.
        rng = np.random.default_rng([seed, index])
        yield name, _tensor(name, dims, rng)


def generate_llama_checkpoint(
    path: str | Path,
    shape: LlamaShape | None = None,
    *,
    dtype: str = "BF16",
    shard_mb: float = 4.0,
    seed: int = 0,
) -> Path:
    """Write a Llama-shaped checkpoint to `path` (created; must not exist) and return it.

    `dtype` is a safetensors dtype name (BF16, F16, F32). Tensors go to shards of about
    `shard_mb` MB in model order; with more than one shard an index file is written.

    Raises:
        ConfigError: a size below 1, heads that do not divide the width, another dtype, a
            shard size ≤ 0 or a negative seed (checked before anything is created).
        FileExistsError: `path` exists.
    """
    shape = shape or LlamaShape()
    _check_options(shape, dtype, shard_mb, seed)
    root = Path(path)
    root.mkdir(parents=True, exist_ok=False)
    try:
        return _write(root, shape, dtype, shard_mb, seed)
    except BaseException:  # nothing half-written stays behind (a full disk, Ctrl-C)
        shutil.rmtree(root, ignore_errors=True)
        raise


_DTYPES = ("BF16", "F16", "F32")


def _check_options(shape: LlamaShape, dtype: str, shard_mb: float, seed: int) -> None:
    """Refuse sizes and options that make no loadable model, before anything is created."""
    sizes = {
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "vocab_size": shape.vocab_size,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "max_position_embeddings": shape.max_position_embeddings,
    }
    flags = {
        "hidden_size": "--hidden-size",
        "intermediate_size": "--intermediate-size",
        "num_hidden_layers": "--layers",
        "vocab_size": "--vocab-size",
    }
    for name, value in sizes.items():
        if value < 1:
            raise ConfigError(
                f"{name} must be at least 1, got {value}",
                hint=f"pass a positive {flags.get(name, name)}",
            )
    if shape.hidden_size % shape.num_attention_heads:
        raise ConfigError(
            f"hidden_size {shape.hidden_size} is not a multiple of the "
            f"{shape.num_attention_heads} attention heads",
            hint="use a hidden size that is a multiple of 64 (one head per 64)",
        )
    if shape.num_attention_heads % shape.num_key_value_heads:
        raise ConfigError(
            f"{shape.num_attention_heads} attention heads cannot share "
            f"{shape.num_key_value_heads} key/value heads",
            hint="use a hidden size that is a multiple of 128",
        )
    if dtype not in _DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}", hint=f"use one of {', '.join(_DTYPES)}")
    if not (shard_mb > 0 and math.isfinite(shard_mb)):
        raise ConfigError(f"shard size must be positive, got {shard_mb}", hint="e.g. --shard-mb 4")
    if seed < 0:
        raise ConfigError(f"seed must be non-negative, got {seed}", hint="e.g. --seed 0")


def _write(root: Path, shape: LlamaShape, dtype: str, shard_mb: float, seed: int) -> Path:
    torch_dtype = dtypes.torch_dtype(dtype)
    limit = int(shard_mb * 2**20)
    itemsize = dtypes.itemsize(dtype)

    # Assign tensors to shards by size first: the writer needs each shard's entries up front.
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in llama_tensor_shapes(shape):
        nbytes = math.prod(dims) * itemsize
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    weight_map: dict[str, str] = {}
    total = 0
    tensors = _iter_tensors(shape, seed)
    for file_name, entries in zip(names, shards, strict=True):
        with SafetensorsWriter(
            root / file_name, [(n, dtype, d) for n, d in entries], metadata={"format": "pt"}
        ) as writer:
            for name, _ in entries:
                tensor_name, values = next(tensors)
                assert tensor_name == name
                raw = dtypes.to_raw(torch.from_numpy(values).to(torch_dtype))
                writer.write(name, raw)
                weight_map[name] = file_name
                total += raw.nbytes
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **{k: v for k, v in asdict(shape).items()},
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": str(torch_dtype).removeprefix("torch."),
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2)
    )
    return root
