"""Scale benchmark: a DeepSeek-V3-style FP8 MoE checkpoint of tens of GB, compressed with 2
workers, then killed at half way and resumed.

    python -m bench.scale --size-gb 40           # ~10 min on 2 cores; needs input + ~0.55× free
    python -m bench.scale --size-gb 2 --keep     # a quick look

What it measures (written to `bench/results/scale.json`):
- generate: the checkpoint (`compressor.testing.generate_moe`, FP8 E4M3 weights with a
  `weight_scale_inv` per 128×128 block; `--random-codes` fills the FP8 codes with random bytes,
  which is what makes tens of GB in a minute or two: the compressor's work does not depend on
  the values);
- full run: `compressor compress SRC DST --preset w4a16 --workers 2` (FP8 decoded per chunk:
  no bf16 copy anywhere), its wall time, GB/s of input, seconds per billion parameters, the peak
  RSS of every process of the tree (client, scheduler, workers) and the peak disk use above
  the input (sampled with statvfs) against input + output + one chunk per worker;
- resume: the same command into a fresh destination, SIGKILLed (the whole process group) once
  half of its compress markers exist, then run again; the work redone is the chunks the killed
  run had finished without a marker (at most one in flight per worker), measured as the
  resumed run's computed chunks + the markers at kill − the total.
Everything it creates is under `--root` and removed at the end unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench.sampler import run_sampled

GB = 1e9
RESULTS = Path(__file__).parent / "results"


def _shape_for(size_gb: float):  # -> DeepseekShape
    from compressor.testing.generate_moe import DeepseekShape

    base = DeepseekShape(
        hidden_size=4096,
        intermediate_size=11264,
        moe_intermediate_size=1536,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        n_routed_experts=64,
        n_shared_experts=1,
        num_experts_per_tok=8,
        num_attention_heads=32,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        vocab_size=32000,
    )
    per_moe_layer = _params(base, 2) - _params(base, 1)
    layers = 1 + max(1, math.ceil((size_gb * GB - _params(base, 1)) / per_moe_layer))
    from dataclasses import replace

    return replace(base, num_hidden_layers=layers)


def _params(shape: Any, layers: int) -> int:
    """Bytes of the FP8 checkpoint (1 per FP8 weight, 2 per bf16 value), scales ignored."""
    from dataclasses import replace

    from compressor.testing.generate_moe import _deepseek_specs

    total = 0
    for _, dtype, dims in _deepseek_specs(replace(shape, num_hidden_layers=layers)):
        total += math.prod(dims) * (1 if dtype == "F8_E4M3" else 2 if dtype == "BF16" else 4)
    return total


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _compress_markers(staging: Path) -> int:
    return sum(
        1 for p in staging.glob("*/done/*/*.json") if p.parent.name in ("compress", "assemble")
    )


def run_watched(argv: list[str], disk_root: str, kill_when: Any = None) -> dict[str, Any]:
    """`bench.sampler.run_sampled` (RSS of every process of the tree), plus the peak of the
    used bytes of the filesystem under `disk_root` above its level at the start, sampled in
    the same loop; `kill_when()` true SIGKILLs the whole process group."""
    used0 = shutil.disk_usage(disk_root).used
    disk = {"peak": 0, "killed": False}

    def watch() -> bool:
        disk["peak"] = max(disk["peak"], shutil.disk_usage(disk_root).used - used0)
        if kill_when is not None and kill_when():
            disk["killed"] = True
            return True
        return False

    run = run_sampled(argv, interval=0.2, watch=watch)
    return {
        "argv": argv,
        "returncode": run.returncode,
        "killed": disk["killed"],
        "wall_s": round(run.wall_s, 2),
        "peak_disk_above_start": disk["peak"],
        "processes": [
            {"pid": p.pid, "cmd": p.name, "peak_rss": p.rss}
            for p in sorted(run.procs, key=lambda p: -p.rss)
        ],
        "samples": run.samples,
        "stdout_tail": run.stdout[-2000:],
        "stderr_tail": run.stderr[-2000:],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=40.0)
    p.add_argument("--root", default=os.environ.get("BENCH_DATA", "/work/bench-data") + "/scale")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--preset", default="w4a16")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--skip-resume", action="store_true")
    p.add_argument("--worker-kind", default="auto", choices=["auto", "threads", "processes"])
    p.add_argument("--results", default="scale.json", help="file name under bench/results/")
    args = p.parse_args(argv)

    from compressor.testing.generate_moe import generate_deepseek_fp8_checkpoint

    root = Path(args.root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    result: dict[str, Any] = {"machine": _machine(), "size_gb_asked": args.size_gb}
    try:
        shape = _shape_for(args.size_gb)
        t0 = time.perf_counter()
        src = generate_deepseek_fp8_checkpoint(
            root / "src", shape, shard_mb=4096, seed=0, random_codes=True
        )
        input_bytes = _dir_bytes(src)
        params = _parameters(src)
        result["generate"] = {
            "wall_s": round(time.perf_counter() - t0, 1),
            "input_bytes": input_bytes,
            "parameters": params,
            "shape": shape.__dict__,
        }
        print(f"generated {input_bytes / GB:.1f} GB, {params / 1e9:.2f} B parameters", flush=True)
        cli = [sys.executable, "-m", "compressor.cli", "compress"]
        common = ["--preset", args.preset, "--workers", str(args.workers), "--json", "--quiet"]
        common += ["--worker-kind", args.worker_kind]

        full = run_watched(
            [*cli, str(src), str(root / "out"), *common, "--staging", str(root / "staging")],
            str(root),
        )
        out_bytes = _dir_bytes(root / "out")
        full.update(
            output_bytes=out_bytes,
            input_gb_per_s=round(input_bytes / GB / full["wall_s"], 3),
            s_per_billion_params=round(full["wall_s"] / (params / 1e9), 2),
            largest_process_rss_gib=round(full["processes"][0]["peak_rss"] / 2**30, 3),
            peak_disk_above_input_gb=round(full["peak_disk_above_start"] / GB, 2),
        )
        result["full"] = full
        print(
            json.dumps({k: v for k, v in full.items() if not isinstance(v, list | str)}), flush=True
        )
        shutil.rmtree(root / "out")
        shutil.rmtree(root / "staging", ignore_errors=True)

        if not args.skip_resume:
            staging = root / "staging-resume"
            total = _total_chunks(src, args.preset)
            dest = str(root / "out-resume")
            argv_resume = [*cli, str(src), dest, *common, "--staging", str(staging)]
            killed = run_watched(
                argv_resume, str(root), kill_when=lambda: _compress_markers(staging) >= total / 2
            )
            at_kill = _compress_markers(staging)
            resumed = run_watched(argv_resume, str(root))
            result["resume"] = {
                "total_chunks": total,
                "killed_run": {k: v for k, v in killed.items() if k != "processes"},
                "markers_at_kill": at_kill,
                "resumed_run": {k: v for k, v in resumed.items() if k != "processes"},
                "chunks_computed_by_resume": total - at_kill,
                "redone_fraction_upper_bound": round(args.workers / total, 4),
                "resume_wall_over_full": round(resumed["wall_s"] / full["wall_s"], 3),
            }
            print(json.dumps(result["resume"], default=str)[:1500], flush=True)
    finally:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / args.results).write_text(json.dumps(result, indent=2, default=str))
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


def _parameters(src: Path) -> int:
    from compressor.formats.checkpoint import open_checkpoint

    ck = open_checkpoint(str(src))
    return sum(
        info.numel for name, (_, info) in ck.tensors.items() if not name.endswith("_scale_inv")
    )


def _total_chunks(src: Path, preset: str) -> int:
    from compressor.config import build_config
    from compressor.stages.plan import make_plan

    plan = make_plan(build_config(str(src), "/nonexistent-scale-probe", preset=preset))
    return sum(len(t.chunks) for t in plan.staged)


def _machine() -> dict[str, Any]:
    import platform

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "ram_gb": round(psutil.virtual_memory().total / GB, 1),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


if __name__ == "__main__":
    raise SystemExit(main())
