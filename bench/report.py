"""Render a bench/run.py result as Markdown into docs/benchmarks.md (between markers).

    python -m bench.report bench/results/latest.json     # re-render the doc from a result

Only the part between `<!-- bench:results:start -->` and `<!-- bench:results:end -->` is
replaced; the rest of the document (profile findings, notes) is left as written.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

START = "<!-- bench:results:start -->"
END = "<!-- bench:results:end -->"
GiB = 2**30


def _gib(n: int | None) -> str:
    return f"{n / GiB:.2f}" if n else "–"


def _s(x: float | None) -> str:
    return f"{x:.2f}" if isinstance(x, (int, float)) else "–"


def render(r: dict[str, Any]) -> str:
    m, s = r["machine"], r["summary"]
    ck = r["checkpoint"]
    lines = [
        f"Run {r['date']} (git {m['git']}), {r['bench_wall_s']:.0f} s in all.",
        "",
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['ram_gib']} GiB RAM, disk {m['disk']},"
        f" Linux {m['kernel']}, Python {m['python']}, torch {m['torch']}.",
        f"- Checkpoint: {ck['bytes'] / 1e9:.2f} GB bf16,"
        f" {len(ck.get('shards', [])) or '?'} shards, {ck.get('shape', {}).get('num_hidden_layers', '?')}"
        " layers of hidden 2048 / intermediate 5632 (`bench/generate.py`, seed 0).",
    ]
    if r.get("checkpoint_2x"):
        c2 = r["checkpoint_2x"]
        lines.append(
            f"- Doubled checkpoint: {c2['bytes'] / 1e9:.2f} GB, {len(c2.get('shards', []))} shards,"
            f" {c2.get('shape', {}).get('num_hidden_layers', '?')} layers."
        )
    if r.get("peer"):
        lines.append(f"- Peer: {r['peer']['package']} {r['peer']['version']} (`model_free_ptq`).")
    lines += [
        f"- Command: `{r['command']}`",
        "",
        "Medians over the rounds (each round runs every case once, order alternating);"
        " RSS is the peak over all rounds, sampled every 50 ms over the whole process tree.",
        "",
        "| case | wall s | in-call s | CPU s | input GB/s | output | ratio | largest proc RSS GiB"
        " (anon) | sum RSS GiB | largest process |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    names = {
        "cp": "`cp -r` (floor)",
        "ours": "ours, 2 workers",
        "ours-w1": "ours, 1 worker",
        "ours-2x": "ours, 2× checkpoint",
        "ours-tuned": "ours + proposed settings",
        "peer": "model_free_ptq, 2 threads",
    }
    for case, row in s.items():
        if "error" in row:
            lines.append(f"| {names.get(case, case)} | failed: {row['error'][:80]} |||||||")
            continue
        inner = row.get("call_s") or (row.get("timings_s") or {}).get("total")
        lines.append(
            f"| {names.get(case, case)} | {_s(row['wall_s'])} | {_s(inner)} | {_s(row.get('cpu_s'))} |"
            f" {_s(row['input_gb_s'])} | {row['output_bytes'] / 1e9:.3f} GB |"
            f" {_s(row['ratio'])} | {_gib(row['peak_rss_largest_proc'])}"
            f" ({_gib(row['peak_anon_largest_proc'])}) | {_gib(row['peak_rss_sum'])} |"
            f" {row['largest_proc']} |"
        )
    if "cp" in s and "sync_s" in s["cp"]:
        lines += [
            "",
            f"`cp -r` + `sync` (our writer fsyncs; cp does not): {_s(s['cp']['cp_plus_sync_s'])} s.",
        ]
    stage_rows = [(c, row) for c, row in s.items() if "timings_s" in row]
    if stage_rows:
        keys = list(stage_rows[0][1]["timings_s"])
        lines += [
            "",
            "Stage times (s, medians; `process` = interpreter start, imports, CLI and exit"
            " outside the pipeline's `total`; fixed = plan + cluster_start):",
            "",
            "| case | " + " | ".join(keys) + " | process | fixed |",
            "| --- | " + " | ".join("---:" for _ in keys) + " | ---: | ---: |",
        ]
        for c, row in stage_rows:
            t = row["timings_s"]
            lines.append(
                f"| {names.get(c, c)} | "
                + " | ".join(_s(t.get(k)) for k in keys)
                + f" | {_s(row['process_overhead_s'])} | {_s(row['fixed_overhead_s'])} |"
            )
    if r.get("targets"):
        lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
        for t in r["targets"]:
            lines.append(f"| {t['target']} | {t['measured']} | {'yes' if t['met'] else '**no**'} |")
    ratios = same_round_ratios(r.get("runs", {}))
    if ratios:
        lines += [
            "",
            "Same-round ratios (each pair ran back to back, so machine drift cancels):",
            "",
            "| round | " + " | ".join(ratios[0][1]) + " |",
            "| --- | " + " | ".join("---:" for _ in ratios[0][1]) + " |",
        ]
        for rnd, row in ratios:
            lines.append(f"| {rnd} | " + " | ".join(_s(v) for v in row.values()) + " |")
    lines += ["", "All runs (wall s, in order of rounds; 1-min load average before each run):", ""]
    for case, row in s.items():
        if "wall_s_all" in row:
            extra = f"; in-call {row['call_s_all']}" if "call_s_all" in row else ""
            lines.append(
                f"- {names.get(case, case)}: {row['wall_s_all']}{extra}"
                f" (load {row.get('loadavg_1m_before')})"
            )
    return "\n".join(lines)


def same_round_ratios(runs: dict[str, list[dict[str, Any]]]) -> list[tuple[int, dict[str, Any]]]:
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for case, rs in runs.items():
        for x in rs:
            if x.get("returncode") == 0:
                by_round.setdefault(x["round"], {})[case] = x

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    out = []
    for rnd, c in sorted(by_round.items()):
        w = {k: v.get("wall_s") for k, v in c.items()}
        comp = {k: (v.get("timings_s") or {}).get("compress") for k, v in c.items()}
        cpu = {k: v.get("cpu_s") for k, v in c.items()}
        out.append(
            (
                rnd,
                {
                    "ours / peer wall": ratio(w.get("ours"), w.get("peer")),
                    "ours / peer CPU s": ratio(cpu.get("ours"), cpu.get("peer")),
                    "ours / cp wall": ratio(w.get("ours"), w.get("cp")),
                    "tuned / peer wall": ratio(w.get("ours-tuned"), w.get("peer")),
                    "tuned / ours wall": ratio(w.get("ours-tuned"), w.get("ours")),
                    "compress w1 / w2": ratio(comp.get("ours-w1"), comp.get("ours")),
                },
            )
        )
    return out


def update_doc(doc: Path, result: dict[str, Any]) -> None:
    block = f"{START}\n{render(result)}\n{END}"
    text = doc.read_text() if doc.exists() else f"# Benchmarks\n\n{START}\n{END}\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


if __name__ == "__main__":
    src = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results/latest.json")
    update_doc(
        Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md",
        json.loads(src.read_text()),
    )
