"""Calibrated methods side by side: ours (GPTQ, activation-weighted mse/hqq) against
llm-compressor's GPTQ, on the same model, calibration tokens and evaluation text, in one run.

    python -m bench.calibrated --model smollm2
    python -m bench.calibrated --model gemma3-270m --only w4-rtn,w4-gptq,w4-llmc
    python -m bench.calibrated --render-only

- Calibration: Pride and Prejudice (the full novel, `/work/shared/data` or `--calibration-text`),
  `--samples` windows of `--seq-len` tokens, cut by `compressor.calibration.samples` and saved
  once as a token file that both sides read (ours with `--calibration FILE.npy`, the peer with
  bench/peer_gptq.py): identical token ids.
- Evaluation: *Persuasion* chapters 1-4 (shipped in compressor/evaluation/data, never the
  calibration text), `--tokens` tokens in windows of `--window`, through `compressor eval`.
- The peer runs in its own venv (/work/bench-data/peer-venv, built by bench/run.py: torch 2.13.0
  CPU + llmcompressor), with llm-compressor's defaults for GPTQ (sequential pipeline, static
  act-order, dampening 0.01, min-max observer) and our group sizes (SmolLM2's 576-wide inputs
  take g64 where g128 does not divide, as our planner falls back).

Results: bench/results/calibrated-<model>.json (rewritten after every row), rendered into
docs/accuracy.md between the calibrated markers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.accuracy import (
    REPO,
    RESULTS,
    _compressor,
    _last_json,
    _machine,
    _safetensors_bytes,
    _tail,
    _target_bits,
    measured_when,
    replace_block,
)

START = "<!-- calibrated:results:start -->"
END = "<!-- calibrated:results:end -->"
EVAL_TEXT = REPO / "compressor" / "evaluation" / "data" / "persuasion_ch1-4.txt"
CAL_TEXT = Path("/work/shared/data/pride_and_prejudice.txt")
PEER_PY = Path(os.environ.get("BENCH_DATA", "/work/bench-data")) / "peer-venv" / "bin" / "python"

# scheme key → (label, our flags, the peer's bits, asym, group size by input width)
SCHEMES: dict[str, tuple[str, list[str], int, bool, int]] = {
    "w4": ("W4A16 sym g128", ["--preset", "w4a16"], 4, False, 128),
    "w4asym": ("W4A16 asym g128", ["--preset", "w4a16-asym"], 4, True, 128),
    "w3": (
        "W3A16 sym g64",
        ["--preset", "w4a16", "--bits", "3", "--group-size", "64"],
        3,
        False,
        64,
    ),
    "w8": ("W8A16 sym channel", ["--preset", "w8a16"], 8, False, 0),
    "w4g64asym": (
        "W4A16 asym g64",
        ["--preset", "w4a16-asym", "--group-size", "64"],
        4,
        True,
        64,
    ),
    # our float-offset study layout (not served): how much of the hqq library's lead a float
    # offset gives back on these GGUF-born models (its hqq is the library's own offset fit)
    "w4g64minmax": (
        "W4 minmax g64 (float offset, study layout)",
        ["--preset", "minmax", "--bits", "4", "--group-size", "64"],
        4,
        True,
        64,
    ),
    "nvfp4a16": ("NVFP4 W4A16", ["--preset", "nvfp4a16"], 4, False, 16),
    # W4A4: activations quantized too; its input scales always come from the calibration
    "nvfp4": ("NVFP4 W4A4", ["--preset", "nvfp4"], 4, False, 16),
    # pruning only (zeros stored densely in bf16): what the importance measure costs
    "s24": ("2:4 sparse, bf16", ["--preset", "dense", "--structure", "2:4"], 16, False, 0),
}
FP4_PEER = {"nvfp4": "NVFP4"}  # scheme key → the peer's preset (round to nearest, calibrated)
# method key → (label, extra flags, calibrated)
METHODS: dict[str, tuple[str, list[str], bool]] = {
    "rtn": ("ours, RTN (data-free)", [], False),
    "hqq": ("ours, hqq (data-free)", ["--rounding", "hqq"], False),
    "mse": ("ours, mse (data-free)", ["--rounding", "mse"], False),
    "mse-cal": ("ours, mse weighted by calibration", ["--rounding", "mse"], True),
    "hqq-cal": ("ours, hqq weighted by calibration", ["--rounding", "hqq"], True),
    "gptq": ("ours, GPTQ", ["--method", "gptq"], True),
    "gptq-natural": ("ours, GPTQ in column order", ["--method", "gptq", "--no-act-order"], True),
    "awq": ("ours, AWQ scaling + RTN", ["--method", "awq"], True),
    "llmc": ("llm-compressor GPTQ", [], True),
    "llmc-awq": ("llm-compressor AWQ", [], True),
    "hqq-lib": ("hqq library 0.2.8 (data-free)", [], False),
    "magnitude": ("ours, magnitude", [], False),
    "wanda": ("ours, Wanda, input norms from calibration", ["--importance", "activation"], True),
}
DEFAULT = [
    "w4-rtn", "w4-hqq", "w4-mse", "w4-mse-cal", "w4-hqq-cal", "w4-gptq", "w4-gptq-natural", "w4-awq", "w4-llmc", "w4-llmc-awq",
    "w3-rtn", "w3-hqq", "w3-mse", "w3-mse-cal", "w3-hqq-cal", "w3-gptq", "w3-gptq-natural", "w3-awq", "w3-llmc", "w3-llmc-awq",
    "w4asym-rtn", "w4asym-gptq", "w4asym-gptq-natural", "w4asym-awq", "w4asym-llmc", "w4asym-llmc-awq",
    "w8-rtn", "w8-gptq", "w8-gptq-natural", "w8-llmc",
    "w4g64asym-rtn", "w4g64asym-mse", "w4g64asym-hqq", "w4g64asym-hqq-lib",
    "w4g64minmax-rtn", "w4g64minmax-mse", "w4g64minmax-hqq", "w4g64minmax-hqq-cal",
    "nvfp4a16-rtn", "nvfp4-rtn", "nvfp4-llmc",
    "s24-magnitude", "s24-wanda",
]  # fmt: skip


def _peer_groups(src: Path, group: int) -> dict[str, int]:
    """Target pattern → group size for the peer, with our fallback where `group` does not
    divide an input width (SmolLM2: 576 → 64)."""
    cfg = json.loads((src / "config.json").read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"] * cfg.get("head_dim", hidden // cfg["num_attention_heads"])

    def fit(width: int) -> int:
        if group == 0:
            return 0
        g = group
        while width % g:
            g //= 2
        return g

    return {
        "re:.*(q|k|v)_proj$": fit(hidden),
        "re:.*o_proj$": fit(heads),
        "re:.*(gate|up)_proj$": fit(hidden),
        "re:.*down_proj$": fit(inter),
    }


def _eval(src: Path, dst: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [_compressor(), "eval", str(src), str(dst), "--text", str(EVAL_TEXT)]
    cmd += ["--tokens", str(args.tokens), "--window", str(args.window), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"eval exited {proc.returncode}: {_tail(proc.stderr or proc.stdout)}")
    return _last_json(proc.stdout)


def run_row(src: Path, key: str, tokens: Path, args: argparse.Namespace) -> dict[str, Any]:
    scheme, method = key.split("-", 1)
    s_label, s_flags, bits, asym, group = SCHEMES[scheme]
    m_label, m_flags, calibrated = METHODS[method]
    dst = Path(os.environ.get("BENCH_DATA", "/work/bench-data")) / "calibrated" / key
    shutil.rmtree(dst, ignore_errors=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"key": key, "scheme": s_label, "method": m_label}
    if method == "hqq-lib":
        cmd = [str(PEER_PY), str(REPO / "bench" / "peer_hqq.py"), str(src), str(dst)]
        cmd += ["--bits", str(bits), "--group", str(group)]
        row["command"] = (
            f"peer-venv/bin/python bench/peer_hqq.py $SRC $DST --bits {bits} --group {group}"
        )
    elif method == "llmc" and scheme in FP4_PEER:
        cmd = [str(PEER_PY), str(REPO / "bench" / "peer_gptq.py"), str(src), str(dst)]
        cmd += [str(tokens), "--preset", FP4_PEER[scheme]]
        row["command"] = (
            f"peer-venv/bin/python bench/peer_gptq.py $SRC $DST tokens.npy --preset {FP4_PEER[scheme]}"
        )
        row["method"] = "llm-compressor, round to nearest"
    elif method.startswith("llmc"):
        awq = method == "llmc-awq"
        cmd = [str(PEER_PY), str(REPO / "bench" / "peer_gptq.py"), str(src), str(dst)]
        cmd += [str(tokens), "--bits", str(bits), "--groups"]
        cmd += [json.dumps(_peer_groups(src, group))] + (["--asym"] if asym else [])
        cmd += ["--awq"] if awq else []
        row["command"] = (
            "peer-venv/bin/python bench/peer_gptq.py $SRC $DST tokens.npy "
            f"--bits {bits}{' --asym' if asym else ''}{' --awq' if awq else ''} "
            "--groups '<as ours>'"
        )
    else:
        flags = [*s_flags, *m_flags]
        if scheme == "nvfp4":
            row["method"] = "ours, round to nearest (input scales calibrated)"
        if calibrated or scheme == "nvfp4":
            flags += ["--calibration", "$TOKENS"]
        row["command"] = f"compressor compress $SRC $DST {' '.join(flags)} --workers 2"
        flags = [str(tokens) if f == "$TOKENS" else f for f in flags]
        cmd = [_compressor(), "compress", str(src), str(dst), *flags]
        cmd += ["--workers", str(args.workers), "--json", "--quiet"]
    print(f"[{key}] {' '.join(cmd)}", flush=True)
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        row["compress_s"] = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0:
            row["error"] = f"exited {proc.returncode}: {_tail(proc.stderr or proc.stdout)}"
            return row
        if method.startswith("llmc") or method == "hqq-lib":
            row["peer"] = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            report = _last_json(proc.stdout)
            row["timings_s"] = report.get("timings_s")
            row["target_bits_per_weight"] = _target_bits(report)
        row["output_bytes"] = _safetensors_bytes(dst)
        ev = _eval(src, dst, args)
        row.update(
            {
                "ppl_original": ev["ppl_original"],
                "ppl": ev["ppl_compressed"],
                "delta_ppl_pct": ev["delta_ppl_pct"],
                "loader": ev.get("compressed_loader"),
                "total_rel_error": ev.get("weights", {}).get("total_rel_error"),
            }
        )
        return row
    except (subprocess.TimeoutExpired, RuntimeError) as e:
        row["error"] = str(e)
        return row
    finally:
        shutil.rmtree(dst, ignore_errors=True)


def render_model(result: dict[str, Any]) -> str:
    m = result.get("machine", {})
    rows = result["rows"]
    ppl0 = next((r["ppl_original"] for r in rows if r.get("ppl_original")), None)
    machine = f"{m.get('cpu', '?')} ({m.get('cpus')} cores, torch {m.get('torch')})"
    when = measured_when(result, machine)
    when = when[0].upper() + when[1:]
    lines = [
        f"### {result['model']}",
        "",
        f"{when}; calibration {result['samples']} × {result['seq_len']} tokens of "
        f"Pride and Prejudice (the same ids for both tools); evaluation {result['tokens']} tokens "
        f"of Persuasion ch. 1-4, windows of {result['window']}; original perplexity "
        f"{ppl0:.3f}."
        if ppl0
        else "",
        "",
        "| scheme | method | perplexity | ΔPPL % | weight rel. error | time s | command |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        if "error" in r:
            err = r["error"].splitlines()[-1][:200].replace("|", "\\|")
            lines.append(f"| {r['scheme']} | {r['method']} | failed: {err} | | | | |")
            continue
        mark = " ‡" if r.get("measured") else ""
        lines.append(
            f"| {r['scheme']} | {r['method']}{mark} | {r['ppl']:.3f} | {r['delta_ppl_pct']:+.1f} "
            f"| {r['total_rel_error']:.4f} | {r['compress_s']:.0f} | `{r['command']}` |"
        )
    return "\n".join(lines)


def write_doc() -> None:
    parts = [
        render_model(json.loads(p.read_text()))
        for p in sorted(
            RESULTS.glob("calibrated-*.json"), key=lambda q: (q.stem != "calibrated-smollm2", q)
        )
    ]
    replace_block(START, END, "\n\n".join(parts) or "_No results yet._")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3-270m"])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--calibration-text", type=Path, default=CAL_TEXT)
    p.add_argument("--only", default="")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)
    if args.render_only:
        write_doc()
        return 0
    fetched = subprocess.run([_compressor(), "fetch", args.model], capture_output=True, text=True)
    if fetched.returncode != 0:
        print(f"fetch failed: {_tail(fetched.stderr)}", file=sys.stderr)
        return 1
    src = Path(fetched.stdout.strip().splitlines()[-1])
    import numpy as np

    from compressor.calibration.samples import load_samples

    work = Path(os.environ.get("BENCH_DATA", "/work/bench-data")) / "calibrated"
    work.mkdir(parents=True, exist_ok=True)
    tokens = work / f"tokens-{args.model}.npy"
    samples = load_samples(args.calibration_text, src, args.samples, args.seq_len)
    np.save(tokens, samples.tokens)
    keys = [k for k in args.only.split(",") if k] or DEFAULT
    out = RESULTS / f"calibrated-{args.model}.json"
    previous = {r["key"]: r for r in json.loads(out.read_text())["rows"]} if out.exists() else {}
    result = {
        "model": args.model,
        "samples": int(samples.tokens.shape[0]),
        "seq_len": args.seq_len,
        "tokens": args.tokens,
        "window": args.window,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "rows": [],
    }
    if args.only and previous:  # a subset: the rows kept say when they were measured
        before = json.loads(out.read_text())
        result["earlier"] = before.get(
            "earlier", f"{before['date']} on {before.get('machine', {}).get('cpu', '?')}"
        )
    for key in keys:
        row = run_row(src, key, tokens, args)
        row["load_avg"] = os.getloadavg()
        if args.only and previous:
            row["measured"] = f"{result['date']} on {result['machine'].get('cpu', '?')}"
        previous[key] = row
        order = {k: i for i, k in enumerate(DEFAULT)}
        result["rows"] = sorted(previous.values(), key=lambda r: order.get(r["key"], 99))
        out.write_text(json.dumps(result, indent=2) + "\n")
        write_doc()
        print(f"[{key}] " + (row.get("error") or f"ΔPPL {row['delta_ppl_pct']:+.1f} %"), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
