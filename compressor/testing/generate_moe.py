"""Small test checkpoints in the layouts MoE models ship in, with their real config.json keys.

`generate_deepseek_fp8_checkpoint`: DeepSeek-V3's checkpoint layout, as DeepSeek-V3/R1 and
Kimi-K2 ship it: MLA attention (`q_a_proj`, `q_a_layernorm`, `q_b_proj`, `kv_a_proj_with_mqa`,
`kv_a_layernorm`, `kv_b_proj`, `o_proj`), dense MLPs in the first `first_k_dense_replace`
layers, then MoE layers with a router (`mlp.gate.weight`, bf16, and
`mlp.gate.e_score_correction_bias`, float32), routed experts stored per expert as 2-D tensors
(`mlp.experts.<j>.{gate,up,down}_proj.weight`) and shared experts. Every linear weight of the
layers is FP8 E4M3 with a float32 `weight_scale_inv` per 128×128 block; embeddings, norms, the
router and lm_head stay bf16; config.json has `quantization_config: {quant_method: fp8, fmt:
e4m3, activation_scheme: dynamic, weight_block_size: [128, 128]}`. Default widths make partial
blocks on both axes (kv_a_proj_with_mqa's rows, q_b_proj's inputs), as the real model has.

`generate_qwen3_moe_checkpoint`: Qwen3-MoE (bf16; q/k norms, a router per layer), experts either
per expert as 2-D tensors (Qwen's published layout) or fused 3-D as transformers v5 keeps them.
Both write one tensor at a time, so the scale benchmark can make tens of GB with them.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compressor.formats import dtypes
from compressor.formats.safetensors_io import SafetensorsWriter
from compressor.schemes.float8 import expand_blocks, fp8_block_scale, quantize_fp8

__all__ = [
    "DeepseekShape",
    "Qwen3MoeShape",
    "deepseek_tensors",
    "generate_deepseek_fp8_checkpoint",
    "generate_qwen3_moe_checkpoint",
    "write_checkpoint",
]

FP8_BLOCK = (128, 128)


@dataclass(frozen=True)
class DeepseekShape:
    hidden_size: int = 256
    intermediate_size: int = 512  # dense layers' MLP
    moe_intermediate_size: int = 128  # each expert's
    num_hidden_layers: int = 2
    first_k_dense_replace: int = 1
    n_routed_experts: int = 4
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    num_attention_heads: int = 4
    q_lora_rank: int = 192
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    vocab_size: int = 256


def _layer_shapes(shape: DeepseekShape, i: int) -> list[tuple[str, tuple[int, ...]]]:
    h, p = shape.hidden_size, f"model.layers.{i}"
    heads = shape.num_attention_heads
    qk = shape.qk_nope_head_dim + shape.qk_rope_head_dim
    out: list[tuple[str, tuple[int, ...]]] = [
        (f"{p}.input_layernorm.weight", (h,)),
        (f"{p}.self_attn.q_a_proj.weight", (shape.q_lora_rank, h)),
        (f"{p}.self_attn.q_a_layernorm.weight", (shape.q_lora_rank,)),
        (f"{p}.self_attn.q_b_proj.weight", (heads * qk, shape.q_lora_rank)),
        (
            f"{p}.self_attn.kv_a_proj_with_mqa.weight",
            (shape.kv_lora_rank + shape.qk_rope_head_dim, h),
        ),
        (f"{p}.self_attn.kv_a_layernorm.weight", (shape.kv_lora_rank,)),
        (
            f"{p}.self_attn.kv_b_proj.weight",
            (heads * (shape.qk_nope_head_dim + shape.v_head_dim), shape.kv_lora_rank),
        ),
        (f"{p}.self_attn.o_proj.weight", (h, heads * shape.v_head_dim)),
        (f"{p}.post_attention_layernorm.weight", (h,)),
    ]
    if i < shape.first_k_dense_replace:
        m = shape.intermediate_size
        return [
            *out,
            (f"{p}.mlp.gate_proj.weight", (m, h)),
            (f"{p}.mlp.up_proj.weight", (m, h)),
            (f"{p}.mlp.down_proj.weight", (h, m)),
        ]
    m = shape.moe_intermediate_size
    out += [
        (f"{p}.mlp.gate.weight", (shape.n_routed_experts, h)),
        (f"{p}.mlp.gate.e_score_correction_bias", (shape.n_routed_experts,)),
    ]
    for j in range(shape.n_routed_experts):
        e = f"{p}.mlp.experts.{j}"
        out += [
            (f"{e}.gate_proj.weight", (m, h)),
            (f"{e}.up_proj.weight", (m, h)),
            (f"{e}.down_proj.weight", (h, m)),
        ]
    s = m * shape.n_shared_experts
    return [
        *out,
        (f"{p}.mlp.shared_experts.gate_proj.weight", (s, h)),
        (f"{p}.mlp.shared_experts.up_proj.weight", (s, h)),
        (f"{p}.mlp.shared_experts.down_proj.weight", (h, s)),
    ]


def _is_fp8(name: str, dims: tuple[int, ...]) -> bool:
    """DeepSeek-V3's FP8 weights: every 2-D linear of the layers except the router."""
    return (
        name.startswith("model.layers.") and len(dims) == 2 and not name.endswith("mlp.gate.weight")
    )


def _values(name: str, dims: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if name.endswith("e_score_correction_bias"):
        return (0.01 * rng.standard_normal(dims)).astype(np.float32)
    if len(dims) == 1:
        return (1.0 + 0.05 * rng.standard_normal(dims)).astype(np.float32)
    w = rng.standard_t(df=4, size=dims).astype(np.float32) * (0.5 / math.sqrt(dims[1]))
    return w


def fp8_block_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E4M3 codes, float32 scale_inv per 128×128 block): s = absmax(block)/448, codes the
    nearest E4M3 values of w/s (DeepSeek's convention; the fp8-block scheme's math in float32)."""
    x = w.float()
    scale = fp8_block_scale(x, FP8_BLOCK)
    return quantize_fp8(x, expand_blocks(scale, FP8_BLOCK, (x.shape[0], x.shape[1]))), scale


def _deepseek_shapes(shape: DeepseekShape) -> list[tuple[str, tuple[int, ...]]]:
    names: list[tuple[str, tuple[int, ...]]] = [
        ("model.embed_tokens.weight", (shape.vocab_size, shape.hidden_size))
    ]
    for i in range(shape.num_hidden_layers):
        names += _layer_shapes(shape, i)
    names += [
        ("model.norm.weight", (shape.hidden_size,)),
        ("lm_head.weight", (shape.vocab_size, shape.hidden_size)),
    ]
    return names


def _deepseek_specs(shape: DeepseekShape) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of every stored tensor, in checkpoint order."""
    specs: list[tuple[str, str, tuple[int, ...]]] = []
    bh, bw = FP8_BLOCK
    for name, dims in _deepseek_shapes(shape):
        if _is_fp8(name, dims):
            specs.append((name, "F8_E4M3", dims))
            specs.append((name + "_scale_inv", "F32", (-(-dims[0] // bh), -(-dims[1] // bw))))
        elif name.endswith("e_score_correction_bias"):
            specs.append((name, "F32", dims))
        else:
            specs.append((name, "BF16", dims))
    return specs


def _random_fp8(
    dims: tuple[int, ...], rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random E4M3 codes (any byte but the two NaNs) and block scales in [1e-4, 1e-3): as fast
    as the disk, for benchmarks whose work does not depend on the values."""
    codes = rng.integers(0, 256, size=dims, dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x7E  # 0x7F / 0xFF are NaN in float8_e4m3fn
    bh, bw = FP8_BLOCK
    scale = rng.uniform(1e-4, 1e-3, size=(-(-dims[0] // bh), -(-dims[1] // bw)))
    return torch.from_numpy(codes).view(torch.float8_e4m3fn), torch.from_numpy(
        scale.astype(np.float32)
    )


def deepseek_tensors(
    shape: DeepseekShape, seed: int = 0, random_codes: bool = False
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every stored tensor in checkpoint order, made one at a time: FP8 weights each followed
    by their `weight_scale_inv`, the rest bf16 (float32 for the router's correction bias).
    `random_codes`: FP8 weights are random bytes (see `_random_fp8`)."""
    for index, (name, dims) in enumerate(_deepseek_shapes(shape)):
        rng = np.random.default_rng([seed, index])
        if random_codes and _is_fp8(name, dims):
            codes, scale_inv = _random_fp8(dims, rng)
            yield name, codes
            yield name + "_scale_inv", scale_inv
            continue
        values = torch.from_numpy(_values(name, dims, rng))
        if _is_fp8(name, dims):
            codes, scale_inv = fp8_block_quantize(values.bfloat16())
            yield name, codes
            yield name + "_scale_inv", scale_inv
        elif name.endswith("e_score_correction_bias"):
            yield name, values
        else:
            yield name, values.bfloat16()


def generate_deepseek_fp8_checkpoint(
    path: str | Path,
    shape: DeepseekShape | None = None,
    *,
    shard_mb: float = 1.0,
    seed: int = 0,
    random_codes: bool = False,
) -> Path:
    """Write a DeepSeek-V3-style FP8 checkpoint to `path` (created; must not exist), one
    tensor in memory at a time (so it also makes the scale benchmark's tens of GB; with
    `random_codes` in about the time the disk takes)."""
    shape = shape or DeepseekShape()
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        **shape.__dict__,
        "num_key_value_heads": shape.num_attention_heads,
        "n_group": 1,
        "topk_group": 1,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 0,
        "eos_token_id": 1,
        "quantization_config": {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": list(FP8_BLOCK),
        },
    }
    tensors = deepseek_tensors(shape, seed, random_codes)
    return write_checkpoint(path, _deepseek_specs(shape), tensors, config, shard_mb)


@dataclass(frozen=True)
class Qwen3MoeShape:
    hidden_size: int = 256
    moe_intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_experts: int = 4
    num_experts_per_tok: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 64
    vocab_size: int = 256


def _qwen3_moe_shapes(shape: Qwen3MoeShape, fused: bool) -> list[tuple[str, tuple[int, ...]]]:
    h, e, m = shape.hidden_size, shape.num_experts, shape.moe_intermediate_size
    heads, kv, d = shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab_size, h))]
    for i in range(shape.num_hidden_layers):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (heads * d, h)),
            (f"{p}.self_attn.k_proj.weight", (kv * d, h)),
            (f"{p}.self_attn.v_proj.weight", (kv * d, h)),
            (f"{p}.self_attn.o_proj.weight", (h, heads * d)),
            (f"{p}.self_attn.q_norm.weight", (d,)),
            (f"{p}.self_attn.k_norm.weight", (d,)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate.weight", (e, h)),
        ]
        if fused:  # transformers v5's own layout
            out += [
                (f"{p}.mlp.experts.gate_up_proj", (e, 2 * m, h)),
                (f"{p}.mlp.experts.down_proj", (e, h, m)),
            ]
        else:  # Qwen3-MoE's published checkpoints
            for j in range(e):
                out += [
                    (f"{p}.mlp.experts.{j}.gate_proj.weight", (m, h)),
                    (f"{p}.mlp.experts.{j}.up_proj.weight", (m, h)),
                    (f"{p}.mlp.experts.{j}.down_proj.weight", (h, m)),
                ]
    return [
        *out,
        ("model.norm.weight", (shape.hidden_size,)),
        ("lm_head.weight", (shape.vocab_size, h)),
    ]


def _qwen3_values(name: str, dims: tuple[int, ...], seed: int, index: int) -> torch.Tensor:
    """bf16 values; a fused expert tensor is made expert by expert."""
    if len(dims) == 3:
        return torch.stack(
            [_qwen3_values(name, dims[1:], seed, index * 1000 + j) for j in range(dims[0])]
        )
    values = _values(name, dims, np.random.default_rng([seed, index]))
    return torch.from_numpy(values).bfloat16()


def generate_qwen3_moe_checkpoint(
    path: str | Path,
    shape: Qwen3MoeShape | None = None,
    *,
    fused_experts: bool = False,
    shard_mb: float = 1.0,
    seed: int = 0,
) -> Path:
    """Write a Qwen3-MoE-style bf16 checkpoint: experts per expert as 2-D tensors (Qwen's
    published layout), or with `fused_experts` as transformers v5 keeps them, two 3-D tensors
    per MoE block (`mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj` (E, H, I))."""
    shape = shape or Qwen3MoeShape()
    shapes = _qwen3_moe_shapes(shape, fused_experts)
    specs = [(name, "BF16", dims) for name, dims in shapes]
    tensors = ((name, _qwen3_values(name, dims, seed, k)) for k, (name, dims) in enumerate(shapes))
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        **shape.__dict__,
        "intermediate_size": 4 * shape.moe_intermediate_size,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 0,
        "eos_token_id": 1,
    }
    return write_checkpoint(path, specs, tensors, config, shard_mb)


def write_checkpoint(
    path: str | Path,
    specs: list[tuple[str, str, tuple[int, ...]]],
    tensors: Iterator[tuple[str, torch.Tensor]],
    config: dict[str, object],
    shard_mb: float,
) -> Path:
    """Shards of about `shard_mb` MB (a weight and its `_scale_inv` stay together), the index
    and config.json; `tensors` yields the tensors of `specs` in order, one at a time. `path` is
    created (it must not exist) and removed again if anything fails."""
    root = Path(path)
    root.mkdir(parents=True, exist_ok=False)
    try:
        _write(root, specs, tensors, config, shard_mb)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return root


def _write(
    root: Path,
    specs: list[tuple[str, str, tuple[int, ...]]],
    tensors: Iterator[tuple[str, torch.Tensor]],
    config: dict[str, object],
    shard_mb: float,
) -> None:
    limit = int(shard_mb * 2**20)
    shards: list[list[tuple[str, str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dtype, dims in specs:
        nbytes = math.prod(dims) * dtypes.itemsize(dtype)
        if shards[-1] and size + nbytes > limit and not name.endswith("_scale_inv"):
            shards.append([])
            size = 0
        shards[-1].append((name, dtype, dims))
        size += nbytes
    files = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    weight_map = {}
    total = 0
    for file_name, entries in zip(files, shards, strict=True):
        with SafetensorsWriter(root / file_name, entries, metadata={"format": "pt"}) as writer:
            for name, _, _ in entries:
                made, t = next(tensors)
                assert made == name, (made, name)
                raw = dtypes.to_raw(t)
                writer.write(name, raw)
                weight_map[name] = file_name
                total += raw.nbytes
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (root / "config.json").write_text(json.dumps(config, indent=2))
