"""End-to-end benchmark: ours vs llm-compressor's model_free_ptq vs a plain copy, in one run.

    python -m bench.run --repeats 3

Cases (each a fresh subprocess whose whole process tree is sampled for RSS every 50 ms):

    cp         `cp -r SRC DST` on the same disk (the floor), then `sync` timed on its own
    ours       `compressor compress SRC DST --preset w4a16 --json --quiet --workers 2`
    ours-w1    the same with `--workers 1` (stage scaling: compress stage 1 vs 2 workers)
    ours-2x    ours on the doubled checkpoint (RSS must not grow with the checkpoint)
    ours-tuned ours with two settings proposed by the profile (bench/ours_variant.py)
    peer       llm-compressor `model_free_ptq(..., scheme="W4A16", max_workers=2, device="cpu")`
               in its own venv (bench/peer_ptq.py times the call itself and the process)

Rounds run every case once, alternating the order (A B C, C B A, ...), so a drifting machine
moves all cases alike; medians are reported. Destinations are removed and `sync`ed between runs
(outside the timings). The input stays hot in the page cache for every case (the first round
warms it), so the figures are CPU + write bound, as on a machine that just downloaded the model.

Results: bench/results/<name>.json and the results section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.sampler import run_sampled

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("BENCH_DATA", "/work/bench-data"))
PEER_VENV = DATA / "peer-venv"
RESULTS = REPO / "bench" / "results"
DOC = REPO / "docs" / "benchmarks.md"
GiB = 2**30

TARGETS = {
    "wall_vs_peer": 0.5,  # ours end-to-end ≤ 0.5 × model_free_ptq
    "wall_vs_copy": 3.0,  # ours end-to-end ≤ 3 × cp -r
    "largest_proc_rss_gib": 1.0,  # largest single process ≤ 1 GiB
    "scaling_w2_vs_w1": 1.6,  # compress stage ≥ 1.6× faster with 2 workers
}


# -- set-up ------------------------------------------------------------------------------------
def ensure_checkpoint(path: Path, size_gb: float, shards: int) -> dict[str, Any]:
    from bench.generate import generate, shape_for_size, shard_mb_for

    shape = shape_for_size(size_gb)
    print(f"[bench] checkpoint {path} ({size_gb} GB)", file=sys.stderr, flush=True)
    return generate(path, shape, shard_mb=shard_mb_for(shape, shards))


def ensure_peer_venv() -> Path:
    """python -m venv; torch 2.13.0 (the CPU wheel on disk) FIRST; then llmcompressor."""
    py = PEER_VENV / "bin" / "python"
    probe = [str(py), "-c", "import llmcompressor, psutil"]
    if py.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return py
    print(f"[bench] installing the peer into {PEER_VENV}", file=sys.stderr, flush=True)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # never an unpinned (CUDA) torch
    subprocess.run([*pip, "llmcompressor", "psutil"], check=True)
    return py


def peer_version(py: Path) -> str:
    r = subprocess.run(
        [str(py), "-c", "import importlib.metadata as m; print(m.version('llmcompressor'))"],
        capture_output=True,
        text=True,
    )
    return r.stdout.strip() or "?"


def clean(path: Path) -> None:
    """Remove a destination and everything our tool leaves beside it, then flush to disk."""
    for p in [path, *path.parent.glob(f".{path.name}.*")]:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()
    subprocess.run(["sync"], check=False)


# -- cases -------------------------------------------------------------------------------------
def case_cp(src: Path, dst: Path, _: argparse.Namespace) -> dict[str, Any]:
    s = run_sampled(["cp", "-r", str(src), str(dst)])
    t0 = time.perf_counter()
    subprocess.run(["sync"], check=True)
    sync_s = time.perf_counter() - t0
    out = s.summary()
    out["sync_s"] = round(sync_s, 3)
    out["output_bytes"] = dir_bytes(dst)
    return out


def case_ours(
    src: Path, dst: Path, a: argparse.Namespace, workers: int, variant: bool = False
) -> dict[str, Any]:
    cli = (
        [sys.executable, "-m", "bench.ours_variant"]
        if variant
        else [str(Path(sys.executable).with_name("compressor"))]
    )
    argv = [
        *cli,
        "compress",
        str(src),
        str(dst),
        "--preset",
        "w4a16",
        "--json",
        "--quiet",
        "--workers",
        str(workers),
    ]
    if a.chunk_mb:
        argv += ["--chunk-mb", str(a.chunk_mb)]
    s = run_sampled(argv, cwd=str(REPO))
    out = s.summary()
    if s.returncode != 0:
        out["error"] = s.stderr[-2000:]
        return out
    report = json.loads(s.stdout)
    timings = report["timings_s"]
    out.update(
        {
            "timings_s": timings,
            "output_bytes": dir_bytes(dst),
            "shards_bytes": report["output_bytes"],
            "ratio": round(report["ratio"], 3),
            # Python start-up + imports + CLI + exit (outside the pipeline's own `total`).
            "process_overhead_s": round(s.wall_s - timings["total"], 3),
            "fixed_overhead_s": round(timings["plan"] + timings["cluster_start"], 3),
        }
    )
    return out


def case_peer(src: Path, dst: Path, a: argparse.Namespace) -> dict[str, Any]:
    py = PEER_VENV / "bin" / "python"
    argv = [str(py), str(REPO / "bench" / "peer_ptq.py"), str(src), str(dst), "--workers", "2"]
    s = run_sampled(argv)
    out = s.summary()
    if s.returncode != 0:
        out["error"] = s.stderr[-2000:]
        return out
    inner = json.loads(s.stdout.strip().splitlines()[-1])
    out.update(inner)
    out["output_bytes"] = dir_bytes(dst)
    out["process_overhead_s"] = round(s.wall_s - inner["call_s"], 3)
    return out


def cpu_pressure() -> float | None:
    """Share of the last 10 s in which some runnable task waited for a CPU (PSI), percent."""
    try:
        line = Path("/proc/pressure/cpu").read_text().splitlines()[0]
        return float(line.split("avg10=")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


# -- machine -----------------------------------------------------------------------------------
def machine(path: Path) -> dict[str, Any]:
    import psutil

    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    df = (
        subprocess.run(["df", "-hT", str(path)], capture_output=True, text=True)
        .stdout.splitlines()[-1]
        .split()
    )
    dev = df[0].rsplit("/", 1)[-1]
    rotational = Path(f"/sys/block/{dev}/queue/rotational")
    git = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "compressor"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    import torch

    return {
        "nproc": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / GiB, 1),
        "cpu": cpu,
        "disk": f"{df[0]} {df[1]} {df[2]} (rotational={rotational.read_text().strip() if rotational.exists() else '?'})",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git": git + (" (compressor/ modified)" if dirty else ""),
    }


# -- driver ------------------------------------------------------------------------------------
def med(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


def summarize(runs: dict[str, list[dict[str, Any]]], inputs: dict[str, int]) -> dict[str, Any]:
    s: dict[str, Any] = {}
    for case, rs in runs.items():
        ok = [r for r in rs if r.get("returncode") == 0]
        if not ok:
            s[case] = {"error": rs[-1].get("error", "failed") if rs else "not run"}
            continue
        row: dict[str, Any] = {
            "n": len(ok),
            "wall_s": med([r["wall_s"] for r in ok]),
            "wall_s_all": [r["wall_s"] for r in ok],
            "peak_rss_largest_proc": max(r["peak_rss_largest_proc"] for r in ok),
            "peak_anon_largest_proc": max(r["peak_anon_largest_proc"] for r in ok),
            "largest_proc": ok[0]["largest_proc"],
            "peak_rss_sum": max(r["peak_rss_sum"] for r in ok),
            "peak_anon_sum": max(r["peak_anon_sum"] for r in ok),
            "output_bytes": ok[-1].get("output_bytes"),
            "cpu_s": med([r.get("cpu_s") for r in ok]),
            "loadavg_1m_before": [r.get("loadavg_1m_before") for r in ok],
        }
        src_bytes = inputs["2x" if case == "ours-2x" else "1x"]
        row["input_gb_s"] = round(src_bytes / 1e9 / row["wall_s"], 3)
        row["ratio"] = round(src_bytes / row["output_bytes"], 3) if row["output_bytes"] else None
        if "timings_s" in ok[0]:
            keys = list(dict.fromkeys(k for r in ok for k in r["timings_s"]))
            row["timings_s"] = {k: med([r["timings_s"].get(k) for r in ok]) for k in keys}
            row["process_overhead_s"] = med([r["process_overhead_s"] for r in ok])
            row["fixed_overhead_s"] = med([r["fixed_overhead_s"] for r in ok])
        if "call_s" in ok[0]:
            row["call_s"] = med([r["call_s"] for r in ok])
            row["call_s_all"] = [r["call_s"] for r in ok]
        if "sync_s" in ok[0]:
            row["sync_s"] = med([r["sync_s"] for r in ok])
            row["cp_plus_sync_s"] = med([r["wall_s"] + r["sync_s"] for r in ok])
        s[case] = row
    return s


def verdicts(s: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    ours, peer, cp, w1 = (s.get(k, {}) for k in ("ours", "peer", "cp", "ours-w1"))
    if ours.get("wall_s") and peer.get("wall_s"):
        r = ours["wall_s"] / peer["wall_s"]
        out.append(
            {
                "target": "end-to-end wall ≤ 0.5× model_free_ptq (process wall)",
                "measured": f"{r:.2f}× ({ours['wall_s']:.1f} s vs {peer['wall_s']:.1f} s;"
                f" vs its in-call time {ours['wall_s'] / peer['call_s']:.2f}×)",
                "met": r <= TARGETS["wall_vs_peer"],
            }
        )
    if ours.get("wall_s") and cp.get("wall_s"):
        r = ours["wall_s"] / cp["wall_s"]
        out.append(
            {
                "target": "total wall ≤ 3× cp -r",
                "measured": f"{r:.2f}× cp -r ({cp['wall_s']:.2f} s);"
                f" {ours['wall_s'] / cp['cp_plus_sync_s']:.2f}× cp -r + sync"
                f" ({cp['cp_plus_sync_s']:.2f} s)",
                "met": r <= TARGETS["wall_vs_copy"],
            }
        )
    if ours.get("peak_rss_largest_proc"):
        big = ours["peak_rss_largest_proc"] / GiB
        two = s.get("ours-2x", {}).get("peak_rss_largest_proc")
        grow = (
            f"; 2× checkpoint: {two / GiB:.2f} GiB ({two / ours['peak_rss_largest_proc']:.2f}×)"
            if two
            else ""
        )
        out.append(
            {
                "target": "largest process peak RSS ≤ 1 GiB, not growing with 2× checkpoint",
                "measured": f"{big:.2f} GiB{grow}",
                "met": big <= TARGETS["largest_proc_rss_gib"]
                and (two is None or two <= 1.1 * ours["peak_rss_largest_proc"]),
            }
        )
    c2 = ours.get("timings_s", {}).get("compress")
    c1 = w1.get("timings_s", {}).get("compress")
    if c1 and c2:
        out.append(
            {
                "target": "compress stage 2 workers ≥ 1.6× faster than 1",
                "measured": f"{c1 / c2:.2f}× ({c1:.2f} s → {c2:.2f} s)",
                "met": c1 / c2 >= TARGETS["scaling_w2_vs_w1"],
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="rounds (each runs every case once)")
    p.add_argument("--size-gb", type=float, default=1.8)
    p.add_argument("--src", type=Path, help="checkpoint (default: generated under BENCH_DATA)")
    p.add_argument(
        "--cases",
        default="cp,ours,peer,ours-w1,ours-2x",
        help="comma list of cp, ours, peer, ours-w1, ours-2x, ours-tuned (bench/ours_variant.py);"
        " case:N runs it in the first N rounds only",
    )
    p.add_argument("--chunk-mb", type=int, help="pass --chunk-mb to ours")
    p.add_argument("--name", default="latest", help="results file bench/results/NAME.json")
    p.add_argument("--no-doc", action="store_true", help="do not update docs/benchmarks.md")
    a = p.parse_args(argv)

    # "case:N" runs the case in the first N rounds only (for slow, secondary cases).
    rounds_of = {}
    for c in (c.strip() for c in a.cases.split(",")):
        if c:
            name, _, n = c.partition(":")
            rounds_of[name] = int(n) if n else a.repeats
    cases = list(rounds_of)
    src = a.src or DATA / f"llama-{a.size_gb:g}g"
    src_desc = ensure_checkpoint(src, a.size_gb, 2) if not a.src else {}
    src2 = DATA / f"llama-{2 * a.size_gb:g}g"
    src2_desc = ensure_checkpoint(src2, 2 * a.size_gb, 4) if "ours-2x" in cases else {}
    peer_py = ensure_peer_venv() if "peer" in cases else None
    inputs = {
        "1x": sum(f.stat().st_size for f in src.glob("*.safetensors")),
        "2x": sum(f.stat().st_size for f in src2.glob("*.safetensors")) if src2_desc else 0,
    }
    out_root = DATA / "out"
    out_root.mkdir(parents=True, exist_ok=True)

    runners = {
        "cp": lambda d: case_cp(src, d, a),
        "ours": lambda d: case_ours(src, d, a, 2),
        "ours-w1": lambda d: case_ours(src, d, a, 1),
        "ours-2x": lambda d: case_ours(src2, d, a, 2),
        "ours-tuned": lambda d: case_ours(src, d, a, 2, variant=True),
        "peer": lambda d: case_peer(src, d, a),
    }
    # Warm the page cache for the inputs (every case then reads them from memory).
    for s_ in (src, src2 if src2_desc else None):
        if s_:
            subprocess.run(f"cat {s_}/*.safetensors > /dev/null", shell=True, check=True)

    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    started = time.time()
    for r in range(a.repeats):
        order = cases if r % 2 == 0 else cases[::-1]
        for case in (c for c in order if r < rounds_of[c]):
            dst = out_root / case
            clean(dst)
            load = os.getloadavg()[0]
            pressure = cpu_pressure()
            res = runners[case](dst)
            res["round"] = r
            res["loadavg_1m_before"] = round(load, 2)
            res["cpu_pressure_some_avg10_before"] = pressure
            runs[case].append(res)
            brief = {
                k: res.get(k)
                for k in ("wall_s", "call_s", "cpu_s", "peak_rss_largest_proc", "loadavg_1m_before")
            }
            if res.get("timings_s"):
                brief["timings_s"] = res["timings_s"]
            if res.get("error"):
                brief["error"] = res["error"][-400:]
            print(f"[bench] round {r} {case}: {json.dumps(brief)}", file=sys.stderr, flush=True)
            clean(dst)

    summary = summarize(runs, inputs)
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m bench.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "bench_wall_s": round(time.time() - started, 1),
        "machine": machine(DATA),
        "checkpoint": {"path": str(src), "bytes": inputs["1x"], **src_desc},
        "checkpoint_2x": {"path": str(src2), "bytes": inputs["2x"], **src2_desc}
        if src2_desc
        else None,
        "peer": {"package": "llmcompressor", "version": peer_version(peer_py)} if peer_py else None,
        "summary": summary,
        "targets": verdicts(summary),
        "runs": runs,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{a.name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"[bench] wrote {path}", file=sys.stderr)
    if not a.no_doc:
        from bench.report import update_doc

        update_doc(DOC, result)
        print(f"[bench] updated {DOC}", file=sys.stderr)
    print(json.dumps({"summary": summary, "targets": result["targets"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
