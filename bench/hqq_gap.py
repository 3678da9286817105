"""Where the `hqq` library's data-free lead on SmolLM2 comes from: perplexity on two texts and
the shape of each variant's weight error.

    python -m bench.hqq_gap            # needs /work/bench-data/peer-venv with hqq 0.2.8

4-bit, groups of 64 on SmolLM2-135M. Variants: the hqq library (`bench/peer_hqq.py`), ours with
integer zero points (`w4a16-asym`: rtn, hqq, mse), ours with a float offset (`minmax`, the
study layout: rtn, mse), and two diagnostics built from ours (dense, not a storable format): the hqq
and mse outputs with every group's reconstruction scaled so that its error is orthogonal to
the original weights (⟨k·ŵ − w, w⟩ = 0, "de-shrunk"). Each is scored by `compressor eval` on
2048 tokens of *Persuasion* ch. 1-4 (the tables' text) and of *Pride and Prejudice* (a second
opinion: data-free variants never see it), windows of 512. Weight statistics over all
q/k/v/o/gate/up/down weights: relative error ‖Ŵ − W‖/‖W‖, the share of the squared error on
each group's largest-magnitude weights ("extremes"), the gain ⟨Ŵ − W, W⟩/⟨W, W⟩ (negative:
the reconstruction is shrunk toward zero), and the output error with the model's own inputs,
Σ tr(ΔW XᵀX ΔWᵀ) / Σ tr(W XᵀX Wᵀ), X every linear's inputs on 16 × 512 tokens of *Pride and
Prejudice* (transformers' forward, float32). Writes bench/results/hqq-gap.json.
"""

from __future__ import annotations

import glob
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bench.accuracy import _compressor, _last_json
from compressor.evaluation.models import cache_root

SRC = cache_root() / "models" / "SmolLM2-135M-Instruct"
WORK = Path("/work/bench-data/hqq-gap")
PEER_PYTHON = "/work/bench-data/peer-venv/bin/python"
REPO = Path(__file__).resolve().parent.parent
TEXTS = {
    "persuasion": REPO / "compressor" / "evaluation" / "data" / "persuasion_ch1-4.txt",
    "pride_and_prejudice": Path("/work/shared/data/pride_and_prejudice.txt"),
}
RESULTS = Path(__file__).parent / "results" / "hqq-gap.json"
OURS = {
    "int-rtn": ["--preset", "w4a16-asym", "--group-size", "64"],
    "int-hqq": ["--preset", "w4a16-asym", "--group-size", "64", "--rounding", "hqq"],
    "int-mse": ["--preset", "w4a16-asym", "--group-size", "64", "--rounding", "mse"],
    "minmax-rtn": ["--preset", "minmax", "--bits", "4", "--group-size", "64"],
    "minmax-mse": ["--preset", "minmax", "--bits", "4", "--group-size", "64", "--rounding", "mse"],
}
GROUP = 64


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def _dense(name: str) -> Path:
    """A dense bf16 copy of variant `name` (the library's output already is one)."""
    out = WORK / name
    if name == "library":
        _run([PEER_PYTHON, str(REPO / "bench" / "peer_hqq.py"), str(SRC), str(out), "--bits", "4"])
        return out
    packed = WORK / f"{name}-packed"
    _run([_compressor(), "compress", str(SRC), str(packed), *OURS[name], "--json", "--quiet"])
    _run([_compressor(), "decompress", str(packed), str(out)])
    shutil.rmtree(packed)
    return out


def _weights(path: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for file in glob.glob(str(path / "*.safetensors")):
        found.update(load_file(file))
    return {n: w for n, w in found.items() if n.endswith("proj.weight")}


def rewritten(src: Path, out: Path, rebuild: Callable[[str, torch.Tensor], torch.Tensor]) -> Path:
    """A copy of checkpoint `src` at `out` with every projection weight t (the ones `_weights`
    reads) replaced by `rebuild(name, t)`, reshaped and cast back to t's shape and dtype."""
    shutil.copytree(src, out, dirs_exist_ok=True)
    for file in glob.glob(str(out / "*.safetensors")):
        tensors = load_file(file)
        for n, t in tensors.items():
            if n.endswith("proj.weight"):
                tensors[n] = rebuild(n, t).reshape(t.shape).to(t.dtype)
        save_file(tensors, file, metadata={"format": "pt"})
    return out


def _deshrunk(name: str, original: dict[str, torch.Tensor]) -> Path:
    """Variant `name` with each group's reconstruction scaled by k = ⟨w, w⟩ / ⟨ŵ, w⟩."""

    def deshrink(n: str, t: torch.Tensor) -> torch.Tensor:
        w = original[n].double().reshape(t.shape[0], -1, GROUP)
        h = t.double().reshape(w.shape)
        dot = (h * w).sum(2, keepdim=True)
        k = torch.where(dot > 0, (w * w).sum(2, keepdim=True) / dot, torch.ones_like(dot))
        return h * k

    return rewritten(WORK / name, WORK / f"{name}-deshrunk", deshrink)


def _input_moments(windows: int = 16, length: int = 512) -> dict[str, torch.Tensor]:
    """XᵀX (float64) of every linear's input but lm_head's, keyed by its weight's name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = TEXTS["pride_and_prejudice"].read_text()[:400_000]
    ids = AutoTokenizer.from_pretrained(SRC)(text, return_tensors="pt").input_ids[0]
    ids = ids[: windows * length].reshape(windows, length)
    model = AutoModelForCausalLM.from_pretrained(SRC, dtype=torch.float32)
    moments: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: Any) -> None:
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            moments[name] = moments.get(name, 0) + x.T @ x

        return hook

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            module.register_forward_hook(keep(f"{name}.weight"))
    with torch.no_grad():
        for window in ids:
            model(window[None])
    return moments


def _stats(
    path: Path, original: dict[str, torch.Tensor], moments: dict[str, torch.Tensor]
) -> dict[str, float]:
    got = _weights(path)
    err2 = sig2 = ext2 = cross = out_err = out_sig = 0.0
    for n, w0 in original.items():
        xtx = moments[n]
        w0 = w0.double()
        d = got[n].double() - w0
        out_err += float((d @ xtx).mul(d).sum())
        out_sig += float((w0 @ xtx).mul(w0).sum())
        w = w0.reshape(w0.shape[0], -1, GROUP)
        e = d.reshape(w.shape)
        a = w.abs()
        extremes = a >= a.amax(2, keepdim=True)
        err2 += float(e.pow(2).sum())
        sig2 += float(w.pow(2).sum())
        ext2 += float((e.pow(2) * extremes).sum())
        cross += float((e * w).sum())
    return {
        "rel_error": round((err2 / sig2) ** 0.5, 4),
        "extremes_share": round(ext2 / err2, 3),
        "gain": round(cross / sig2, 4),
        "output_error": round(out_err / out_sig, 5),
    }


def _ppl(path: Path, src: Path = SRC, texts: dict[str, Path] = TEXTS) -> dict[str, float]:
    """ΔPPL % of the dense checkpoint `path` against `src` on each of `texts`."""
    out = {}
    for label, text in texts.items():
        cmd = [_compressor(), "eval", str(src), str(path), "--text", str(text)]
        cmd += ["--tokens", "2048", "--window", "512", "--json"]
        out[label] = round(_last_json(_run(cmd))["delta_ppl_pct"], 1)
    return out


def main() -> None:
    missing = [
        f"{path} ({fix})"
        for path, fix in (
            (SRC, "run `compressor fetch smollm2`"),
            (Path(PEER_PYTHON), "make a venv there with torch==2.13.0 hqq==0.2.8 transformers"),
            (TEXTS["pride_and_prejudice"], "the shared data folder"),
        )
        if not path.exists()
    ]
    if missing:
        raise SystemExit("hqq_gap needs: " + "; ".join(missing))
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    original = _weights(SRC)
    moments = _input_moments()
    rows: list[dict[str, Any]] = []
    try:
        paths = {name: _dense(name) for name in ["library", *OURS]}
        for name in ("int-hqq", "int-mse"):
            paths[f"{name}-deshrunk"] = _deshrunk(name, original)
        for name, path in paths.items():
            rows.append(
                {"variant": name, **_stats(path, original, moments), "delta_ppl_pct": _ppl(path)}
            )
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
    RESULTS.write_text(json.dumps({"model": "SmolLM2-135M-Instruct", "rows": rows}, indent=1))
    print("\n| variant | ΔPPL % Persuasion | ΔPPL % Pride and Prejudice | weight rel. error | extremes' share | gain | output error |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        p = r["delta_ppl_pct"]
        print(f"| {r['variant']} | {p['persuasion']:+.1f} | {p['pride_and_prejudice']:+.1f} | {r['rel_error']} | {r['extremes_share']} | {r['gain']:+.4f} | {r['output_error']} |")  # fmt: skip


if __name__ == "__main__":
    main()
