"""Fixtures for the evaluation tests: the test text, tiny offline models, the SmolLM2 cache.

Tiny models are random LlamaForCausalLM checkpoints with a byte-level BPE tokenizer trained on the
test text: no download. Tests marked ``slow`` use the real SmolLM2-135M-Instruct, fetched once into
``$COMPRESSOR_CACHE_DIR`` (or the default cache, ~/.cache/checkpoint-compressor), so CI can keep
the cache between runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

DATA = Path(__file__).resolve().parent.parent / "data"
TEXT_FILE = DATA / "pride_and_prejudice_ch1-3.txt"
TINY_VOCAB = 384
GROUP = 32


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Run each test with one intra-op thread.

    CPU results depend on the thread count (MKL splits reductions differently; MKL may even
    change its thread count at run time), so two loads of the same model can differ in the last
    bits; with one thread they are bitwise reproducible, which the ΔPPL == 0 checks rely on.
    It is also much faster on a busy machine: on 2 shared cores at load 10, evaluating
    SmolLM2 against itself took 55 s with 2 threads (OpenMP threads waiting for each other)
    and 17 s with one.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def text() -> str:
    return TEXT_FILE.read_text(encoding="utf-8")


def tiny_config(vocab_size: int = TINY_VOCAB, **overrides):
    from transformers import LlamaConfig

    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model: Any = LlamaForCausalLM(tiny_config(**overrides))
    # The default init (std 0.02) gives near-uniform predictions; widen it so that the tokens
    # actually differ in probability and errors in the scoring would show.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    return model.to(dtype).eval()


def train_tokenizer(text: str, vocab_size: int = TINY_VOCAB):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, text) -> Path:
    """A dense bf16 tiny Llama checkpoint with its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-dense")
    tokenizer = train_tokenizer(text)
    assert len(tokenizer) <= TINY_VOCAB
    tiny_llama(dtype=torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def int4_group_scales(weight: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    out_f, in_f = weight.shape
    amax = weight.float().reshape(out_f, in_f // group, group).abs().amax(-1)
    return (amax / 7.0).clamp(min=1e-8).to(weight.dtype)


def is_quantized_linear(name: str, tensor: torch.Tensor) -> bool:
    return (
        name.endswith(".weight")
        and tensor.ndim == 2
        and "embed_tokens" not in name
        and "lm_head" not in name
    )


def write_pack_quantized(dense_dir: Path, out_dir: Path, group: int = GROUP) -> Path:
    """Write a compressed-tensors ``pack-quantized`` (int4 symmetric, groups of ``group``) copy
    of ``dense_dir`` using compressed-tensors' own packer."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    weight_args = {
        "num_bits": 4,
        "type": "int",
        "symmetric": True,
        "strategy": "group",
        "group_size": group,
        "dynamic": False,
    }
    scheme = QuantizationScheme(targets=["Linear"], weights=weight_args, format="pack-quantized")
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in load_file(dense_dir / "model.safetensors").items():
        if not is_quantized_linear(name, tensor):
            tensors[name] = tensor
            continue
        packed = PackedQuantizationCompressor.compress(
            {"weight": tensor, "weight_scale": int4_group_scales(tensor, group)}, scheme
        )
        base = name.removesuffix(".weight")
        tensors.update({f"{base}.{key}": value for key, value in packed.items()})
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dense_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weight_args,
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": ["lm_head"],
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def decode_pack_quantized(
    checkpoint_dir: Path, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The dense weights a pack-quantized checkpoint stands for: ``q * scale`` per group,
    multiplied in `dtype` — by default the scale's dtype (bf16), as compressed-tensors'
    decompressor does; a model loaded by transformers in float32 multiplies in float32."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    tensors = load_file(checkpoint_dir / "model.safetensors")
    dense: dict[str, torch.Tensor] = {}
    for name, packed in tensors.items():
        if not name.endswith(".weight_packed"):
            continue
        base = name.removesuffix(".weight_packed")
        scale = tensors[f"{base}.weight_scale"]
        shape = torch.Size(tensors[f"{base}.weight_shape"].tolist())
        q = unpack_from_int32(packed, 4, shape)
        assert int(q.min()) >= -8 and int(q.max()) <= 7
        out_f, in_f = shape
        work = dtype or scale.dtype
        groups = q.reshape(out_f, in_f // GROUP, GROUP).to(work)
        dense[f"{base}.weight"] = (groups * scale.to(work)[..., None]).reshape(out_f, in_f)
    return dense


@pytest.fixture(scope="session")
def tiny_pack_quantized_dir(tmp_path_factory, tiny_dir) -> Path:
    return write_pack_quantized(tiny_dir, tmp_path_factory.mktemp("tiny-pack") / "ckpt")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a bf16 HF checkpoint, fetched once into the shared cache."""
    from compressor.evaluation.models import fetch_smollm2

    return fetch_smollm2(None)  # $COMPRESSOR_CACHE_DIR, else ~/.cache/checkpoint-compressor
