"""Accuracy sweep: every configuration through the real CLI, then ``compressor eval``.

For one model (``smollm2`` or ``gemma3-270m``, fetched into the user cache at run time; nothing
of the model is written into the repository) each configuration runs as

    compressor compress SRC DST <flags> --workers 2 --json --quiet
    compressor eval SRC DST --tokens 512 --json

into a fresh destination under ``/work/bench-data/accuracy/`` (``BENCH_DATA`` moves it), which is
deleted after measuring. A configuration that fails is recorded with its error and skipped.
Results go to ``bench/results/accuracy-<model>.json`` (rewritten after every configuration, so a
partial run keeps what it measured) and the tables of every ``accuracy-*.json`` present are
rendered into ``docs/accuracy.md`` between markers; the prose around them is left alone.

    python -m bench.accuracy --model smollm2
    python -m bench.accuracy --model smollm2 --only w4a16,w4a16-mse   # a subset, merged in
    python -m bench.accuracy --render-only                            # re-render the doc
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
DOC = REPO / "docs" / "accuracy.md"
START = "<!-- accuracy:results:start -->"
END = "<!-- accuracy:results:end -->"

# (key, label, flags). The flags follow `compressor compress SRC DST`.
CONFIGS: list[tuple[str, str, list[str]]] = [
    ("w8a16", "w8a16", ["--preset", "w8a16"]),
    ("w4a16", "w4a16 (RTN)", ["--preset", "w4a16"]),
    ("w4a16-mse", "w4a16, mse rounding", ["--preset", "w4a16", "--rounding", "mse"]),
    ("w4a16-hqq", "w4a16, hqq rounding", ["--preset", "w4a16", "--rounding", "hqq"]),
    ("w4a16-asym", "w4a16-asym", ["--preset", "w4a16-asym"]),
    ("minmax-8", "minmax 8 bit", ["--preset", "minmax", "--bits", "8"]),
    ("minmax-4", "minmax 4 bit", ["--preset", "minmax", "--bits", "4"]),
    ("fp8", "fp8 (W8A8 dynamic)", ["--preset", "fp8"]),
    ("fp8-block", "fp8-block (128×128, W8A8)", ["--preset", "fp8-block"]),
    ("nvfp4a16", "nvfp4a16", ["--preset", "nvfp4a16"]),
    ("mxfp4a16", "mxfp4a16", ["--preset", "mxfp4a16"]),
    ("budget-4.25", "automatic budget 4.25 bits", ["--target-bits", "4.25"]),
    ("budget-4.5", "automatic budget 4.5 bits", ["--target-bits", "4.5"]),
    (
        "prune-tensor",
        "prune 50 % per tensor (dense)",
        ["--preset", "dense", "--sparsity", "0.5", "--sparsity-scope", "tensor"],
    ),
    (
        "prune-global",
        "prune 50 % global (dense)",
        ["--preset", "dense", "--sparsity", "0.5", "--sparsity-scope", "global"],
    ),
    (
        "prune-2of4",
        "prune 2:4 (dense)",
        ["--preset", "dense", "--sparsity", "0.5", "--structure", "2:4"],
    ),
    (
        "w4a16-2of4",
        "w4a16 + 2:4",
        ["--preset", "w4a16", "--sparsity", "0.5", "--structure", "2:4"],
    ),
]


def _data_root() -> Path:
    return Path(os.environ.get("BENCH_DATA", "/work/bench-data")) / "accuracy"


def _compressor() -> str:
    exe = Path(sys.executable).parent / "compressor"
    return str(exe) if exe.exists() else "compressor"


def _safetensors_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def _tail(text: str, n: int = 2500) -> str:
    """The end of an error output without progress bars, ANSI codes or traceback frames."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    keep = []
    for line in text.replace("\r", "\n").splitlines():
        s = line.strip()
        if not s or "it/s]" in s or "s/it]" in s or s.startswith(("File ", "^", "~")):
            continue
        keep.append(line.rstrip())
    if any(k.startswith("Traceback") for k in keep):  # the frames say little; keep the end
        i = next(i for i, k in enumerate(keep) if k.startswith("Traceback"))
        keep = keep[:i] + keep[-1:]
    text = "\n".join(keep)
    return text if len(text) <= n else "…" + text[-n:]


def _last_json(stdout: str) -> dict[str, Any]:
    """The JSON document on stdout (anything printed before the first '{' is ignored)."""
    start = stdout.find("{")
    if start < 0:
        raise ValueError("no JSON on stdout")
    return json.loads(stdout[start:])


def _target_bits(report: dict[str, Any]) -> float | None:
    """Stored bits per weight over the tensors the run changed (scheme != copy)."""
    elems = 0
    out = 0
    for t in report.get("tensors", []):
        if t.get("scheme") == "copy":
            continue
        n = 1
        for d in t.get("shape", []):
            n *= d
        elems += n
        out += t.get("output_bytes", 0)
    return 8 * out / elems if elems else None


def _schemes(report: dict[str, Any]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in report.get("tensors", []):
        counts[t.get("scheme", "?")] = counts.get(t.get("scheme", "?"), 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _display_cmd(model: str, flags: list[str], workers: int) -> str:
    return f"compressor compress $SRC $DST {' '.join(flags)} --workers {workers} --json --quiet"


def run_config(
    model: str, src: Path, key: str, label: str, flags: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    dst = _data_root() / f"{model}-{key}-{stamp}-{os.getpid()}"
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    cmd = [_compressor(), "compress", str(src), str(dst), *flags]
    cmd += ["--workers", str(args.workers), "--json", "--quiet"]
    row: dict[str, Any] = {
        "key": key,
        "label": label,
        "flags": flags,
        "command": _display_cmd(model, flags, args.workers),
        "eval_command": f"compressor eval $SRC $DST --tokens {args.tokens} --json",
    }
    print(f"[{key}] {' '.join(cmd)}", flush=True)
    try:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        row["compress_s"] = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0:
            row["error"] = f"compress exited {proc.returncode}: {_tail(proc.stderr or proc.stdout)}"
            return row
        try:
            report = _last_json(proc.stdout)
        except ValueError as exc:
            row["error"] = f"compress report unreadable: {exc}: {_tail(proc.stdout)}"
            return row
        row["output_bytes"] = _safetensors_bytes(dst)
        row["report_ratio"] = report.get("ratio")
        row["target_bits_per_weight"] = _target_bits(report)
        row["schemes"] = _schemes(report)
        row["fallback_notes"] = sum("→" in n for n in report.get("notes", []))

        ecmd = [_compressor(), "eval", str(src), str(dst), "--tokens", str(args.tokens), "--json"]
        t0 = time.perf_counter()
        proc = subprocess.run(ecmd, capture_output=True, text=True, timeout=args.timeout)
        row["eval_s"] = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0:
            # The checkpoint does not load as it is (e.g. transformers refuses it): measure our
            # own dense reconstruction instead, and say so. Sizes stay those of DST.
            row["load_error"] = (
                f"eval exited {proc.returncode}: {_tail(proc.stderr or proc.stdout)}"
            )
            dense = dst.with_name(dst.name + "-dense")
            dcmd = [_compressor(), "decompress", str(dst), str(dense), "--dtype", "float32"]
            dec = subprocess.run(dcmd, capture_output=True, text=True, timeout=args.timeout)
            if dec.returncode != 0:
                row["error"] = row.pop("load_error")
                row["decompress_error"] = _tail(dec.stderr or dec.stdout)
                return row
            row["eval_via"] = "compressor decompress --dtype float32, then eval of the dense copy"
            ecmd[3] = str(dense)
            try:
                proc = subprocess.run(ecmd, capture_output=True, text=True, timeout=args.timeout)
            finally:
                shutil.rmtree(dense, ignore_errors=True)
            row["eval_s"] = round(time.perf_counter() - t0, 1)
            if proc.returncode != 0:
                row["error"] = f"eval exited {proc.returncode}: {_tail(proc.stderr or proc.stdout)}"
                return row
        ev = _last_json(proc.stdout)
        weights = ev.get("weights", {})
        row.update(
            {
                "loader": ev.get("compressed_loader"),
                "ppl_original": ev.get("ppl_original"),
                "ppl": ev.get("ppl_compressed"),
                "delta_ppl_pct": ev.get("delta_ppl_pct"),
                "eval_ratio": ev.get("compression_ratio"),
                "predicted_tokens": ev.get("predicted_tokens"),
                "window": ev.get("window"),
                "total_rel_error": weights.get("total_rel_error"),
                "total_sqnr_db": weights.get("total_sqnr_db"),
                "worst_tensor": weights.get("worst_tensor"),
                "tensors_exact": weights.get("tensors_exact"),
                "tensors_compared": weights.get("tensors_compared"),
            }
        )
        return row
    except subprocess.TimeoutExpired as exc:
        row["error"] = f"timed out after {exc.timeout} s"
        return row
    finally:
        if not args.keep and dst.exists():
            shutil.rmtree(dst, ignore_errors=True)


def _is_target(name: str, ndim: int) -> bool:
    """The CLI's default targets: 2-D weights of linear layers (not embeddings or lm_head)."""
    return ndim == 2 and name.endswith(".weight") and "embed" not in name and "lm_head" not in name


def source_norms(src: Path) -> dict[str, Any]:
    """‖W‖² (float64) over all tensors and over the default targets of the source checkpoint.

    ``compressor eval`` reports the relative error over *all* tensors, which the exact (copied)
    embedding dilutes, heavily so for Gemma's 262k-row table. When every non-target is exact,
    the error over the targets alone is ``total · sqrt(‖all‖² / ‖targets‖²)``.
    """
    from safetensors import safe_open

    files = [src] if src.is_file() else sorted(src.glob("*.safetensors"))
    total = target = 0.0
    n_all = n_targets = 0
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118  (safe_open is not a mapping)
                t = fh.get_tensor(name).double()
                sq = float((t * t).sum())
                total += sq
                n_all += 1
                if _is_target(name, t.ndim):
                    target += sq
                    n_targets += 1
    return {"all_sq": total, "targets_sq": target, "tensors": n_all, "targets": n_targets}


def target_rel_error(row: dict[str, Any], norms: dict[str, Any] | None) -> float | None:
    total = row.get("total_rel_error")
    if total is None or not norms or not norms.get("targets_sq"):
        return None
    if row.get("tensors_exact") != row.get("tensors_compared", 0) - norms["targets"]:
        return None  # something besides the targets changed: the conversion does not hold
    return float(total * (norms["all_sq"] / norms["targets_sq"]) ** 0.5)


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().split()
        info["mem_gb"] = round(int(mem[1]) / 1024**2, 1)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def _fmt(x: Any, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def _summary(error: str, n: int = 300) -> str:
    """One line for the table: the error's last line, plus the first mismatch line if any."""
    lines = [x.strip() for x in error.splitlines() if x.strip()]
    first = lines[0].split(":", 1)[0] if lines else ""
    parts = [first + ":" if first != lines[-1] else "", lines[-1] if lines else ""]
    mismatch = next((x for x in lines if "MISMATCH" in x and "Reinit" in x), None)
    if mismatch:
        parts.append("(" + " ".join(mismatch.replace("|", " ").split()) + ")")
    text = " ".join(p for p in parts if p)
    return text if len(text) <= n else text[: n - 1] + "…"


def _machine_text(m: dict[str, Any]) -> str:
    """The machine of a results file, as the table's header names it."""
    return (
        f"{m.get('cpu', '?')} ({m.get('cpus', '?')} cores, {m.get('mem_gb', '?')} GB, "
        f"torch {m.get('torch', '?')}, CPU, float32 eval)"
    )


def measured_when(result: dict[str, Any], machine: str) -> str:
    """When a results table was measured: "measured DATE on MACHINE", or, where rows from a
    later run (`--only`) carry their own date (`measured`, marked ‡ in the table), both."""
    later = sorted({r["measured"] for r in result["rows"] if r.get("measured")})
    if not later:
        return f"measured {result.get('date', '?')} on {machine}"
    earlier = result.get("earlier", f"{result.get('date', '?')} on {machine}")
    return f"rows marked ‡ measured {'; '.join(later)}, the others {earlier}"


def render_model(result: dict[str, Any]) -> str:
    rows = result["rows"]
    orig_bytes = result.get("original_bytes")
    ppl0 = next((r.get("ppl_original") for r in rows if r.get("ppl_original") is not None), None)
    m = result.get("machine", {})
    when = measured_when(result, _machine_text(m))
    lines = [
        f"### {result['model']}",
        "",
        f"Source `{result.get('source_name', '?')}`; {when}; {result.get('tokens')} tokens, "
        f"window {result.get('window', 256)}.",
        "",
        "| configuration | exact command | output MB | ratio | target bits/w | perplexity "
        "| ΔPPL % | weight rel. error, all tensors | weight rel. error, targets |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    if orig_bytes:
        lines.append(
            f"| original bf16 | `compressor fetch {result['model']}` | {orig_bytes / 1e6:.1f} "
            f"| 1.00 | 16 | {_fmt(ppl0, '.3f')} | 0.0 | 0 | 0 |"
        )
    notes: list[str] = []
    for r in rows:
        cmd = f"`{r['command']}`"
        if "error" in r:
            err = _summary(r["error"]).replace("|", "\\|")
            lines.append(f"| {r['label']} | {cmd} | failed: {err} | | | | | | |")
            continue
        out = r.get("output_bytes")
        ratio = orig_bytes / out if orig_bytes and out else None
        label = r["label"] + (" ‡" if r.get("measured") else "")
        if "load_error" in r:
            label += " ¹"
            notes.append(
                f"¹ {r['label']}: transformers does not load the output "
                f"({_summary(r['load_error'])}); its perplexity and weight error are those "
                "of `compressor decompress --dtype float32` of the same output."
            )
        lines.append(
            f"| {label} | {cmd} | {_fmt(out / 1e6 if out else None, '.1f')} "
            f"| {_fmt(ratio, '.2f')} | {_fmt(r.get('target_bits_per_weight'), '.2f')} "
            f"| {_fmt(r.get('ppl'), '.3f')} | {_fmt(r.get('delta_ppl_pct'), '+.1f')} "
            f"| {_fmt(r.get('total_rel_error'), '.4f')} "
            f"| {_fmt(target_rel_error(r, result.get('norms')), '.4f')} |"
        )
    if notes:
        lines += ["", *dict.fromkeys(notes)]
    missing = [k for k, _, _ in CONFIGS if k not in {r["key"] for r in rows}]
    if missing:
        lines += ["", f"Not measured in this run: {', '.join(missing)}."]
    return "\n".join(lines)


def render_all() -> str:
    parts = []
    paths = sorted(RESULTS.glob("accuracy-*.json"), key=lambda q: (q.stem != "accuracy-smollm2", q))
    for path in paths:
        parts.append(render_model(json.loads(path.read_text())))
    return "\n\n".join(parts) if parts else "_No results yet._"


def replace_block(start: str, end: str, body: str) -> None:
    """Put `body` between the markers `start` and `end` of docs/accuracy.md (appended with its
    markers when they are absent); the text around them is left alone."""
    block = f"{start}\n{body}\n{end}"
    text = DOC.read_text() if DOC.exists() else "# Accuracy\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


def write_doc() -> None:
    replace_block(START, END, render_all())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3-270m"])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated config keys (merged into results)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    p.add_argument("--keep", action="store_true", help="keep the compressed destinations")
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)

    if args.render_only:
        for path in sorted(RESULTS.glob("accuracy-*.json")):  # older results lack the norms
            res = json.loads(path.read_text())
            if "norms" not in res:
                fetched = subprocess.run(
                    [_compressor(), "fetch", res["model"]], capture_output=True, text=True
                )
                if fetched.returncode == 0:
                    res["norms"] = source_norms(Path(fetched.stdout.strip().splitlines()[-1]))
                    path.write_text(json.dumps(res, indent=2) + "\n")
        write_doc()
        print(f"wrote {DOC}")
        return 0

    fetched = subprocess.run(
        [_compressor(), "fetch", args.model], capture_output=True, text=True, check=False
    )
    if fetched.returncode != 0:
        print(f"fetch {args.model} failed: {_tail(fetched.stderr)}", file=sys.stderr)
        return 1
    src = Path(fetched.stdout.strip().splitlines()[-1])

    by_key = {c[0]: c for c in CONFIGS}
    only = [k for k in args.only.split(",") if k]
    unknown = [k for k in only if k not in by_key]
    if unknown:
        print(f"unknown configuration(s) {unknown}; known: {list(by_key)}", file=sys.stderr)
        return 2
    wanted = [by_key[k] for k in only] if only else CONFIGS  # --only: in the order given
    out_path = RESULTS / f"accuracy-{args.model}.json"
    RESULTS.mkdir(parents=True, exist_ok=True)
    previous: dict[str, Any] = {}
    before: dict[str, Any] = {}
    if args.only and out_path.exists():
        before = json.loads(out_path.read_text())
        previous = {r["key"]: r for r in before.get("rows", [])}
    result: dict[str, Any] = {
        "model": args.model,
        "source_name": src.name,
        "original_bytes": _safetensors_bytes(src),
        "tokens": args.tokens,
        "window": 256,
        "workers": args.workers,
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "load_avg_start": os.getloadavg(),
        "norms": source_norms(src),
        "rows": [],
    }

    if previous:  # a subset: the rows kept say when they were measured
        machine = _machine_text(before.get("machine", {}))
        result["earlier"] = before.get("earlier", f"{before.get('date', '?')} on {machine}")

    def save() -> None:
        order = [k for k, _, _ in CONFIGS]
        merged = {**previous, **{r["key"]: r for r in result["rows"]}}
        doc = {**result, "rows": sorted(merged.values(), key=lambda r: order.index(r["key"]))}
        out_path.write_text(json.dumps(doc, indent=2) + "\n")
        write_doc()

    for key, label, flags in wanted:
        row = run_config(args.model, src, key, label, flags, args)
        row["load_avg"] = os.getloadavg()
        if previous:
            row["measured"] = f"{result['date']} on {result['machine'].get('cpu', '?')}"
        result["rows"].append(row)
        if "error" in row:
            print(f"[{key}] FAILED: {row['error'][:300]}", flush=True)
        else:
            print(
                f"[{key}] {row['output_bytes'] / 1e6:.1f} MB ppl {row['ppl']:.3f} "
                f"Δ {row['delta_ppl_pct']:+.1f}% rel.err {row['total_rel_error']:.4f} "
                f"({row['compress_s']}+{row['eval_s']} s)",
                flush=True,
            )
        save()
    print(f"wrote {out_path} and {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
