"""The Prefect flow: one task per stage, progress artifacts, a report at the end.

The flow's only parameter is the run's `RunConfig`, so the Prefect UI renders its schema as the
run form. Stages map chunk functions over a Dask cluster from inside their task; workers never
talk to Prefect, the client reports progress a few dozen times per stage.
"""

import logging
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.states import Failed, State

from compressor.config import RunConfig
from compressor.errors import CompressorError
from compressor.pipeline import Pipeline, open_executor
from compressor.stages.executor import Executor, Progress
from compressor.stages.publish import run_lock
from compressor.summary import note_lines
from flows.history import record_history, run_row

__all__ = ["compress_checkpoint", "run_name"]

# A progress sink the CLI can hand to the flow without making it a flow parameter (a callable
# has no place in the UI's form). A plain list, not a ContextVar: Prefect's runner cloudpickles
# the flow function with its globals, and ContextVars cannot be pickled.
_extra_progress: list[Progress] = []
UPDATES_PER_STAGE = 25
# The error that failed the last in-process run, for `run_flow` to raise as the CLI expects.
_failures: list[CompressorError] = []


class _NoTracebackForOurErrors(logging.Filter):
    """Prefect logs a failed task with its traceback; for the errors this tool raises on
    purpose (a one-line message and its fix) the traceback only buries the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], CompressorError):
            record.exc_info = None
            record.exc_text = None
        return True


logging.getLogger("prefect.task_runs").addFilter(_NoTracebackForOurErrors())
logging.getLogger("prefect.flow_runs").addFilter(_NoTracebackForOurErrors())


def _quiet_distributed() -> None:
    """distributed's loggers (the parent and every child already made) at WARNING."""
    import distributed  # noqa: F401  (its import creates and configures the loggers)

    for name in ["distributed", *logging.root.manager.loggerDict]:
        if name == "distributed" or name.startswith("distributed."):
            logging.getLogger(name).setLevel(logging.WARNING)


def progress_line(
    stage: str, done: int, total: int, elapsed: float, stage_bytes: int | None
) -> str:
    """ "compress: 120/6414 chunks (1.9 %), 0.8 of 41.2 GB, 0.32 GB/s, about 2 min 8 s left":
    the bytes are the stage's input bytes in proportion to its chunks (chunks are of similar
    size), the remaining time the rate so far applied to what is left."""
    share = done / max(total, 1)
    parts = [f"{stage}: {done}/{total} chunks ({100 * share:.1f} %)"]
    rate = done / elapsed if elapsed > 0 else 0.0
    if stage_bytes:
        gb = stage_bytes / 1e9
        parts.append(f"{share * gb:.1f} of {gb:.1f} GB")
        if elapsed > 0 and done:
            parts.append(f"{share * gb / elapsed:.2f} GB/s")
    if done < total and rate > 0:
        left = (total - done) / rate
        parts.append(f"about {int(left // 60)} min {int(left % 60)} s left")
    elif done == total:
        parts.append(f"done in {elapsed:.1f} s")
    return ", ".join(parts)


class _ArtifactProgress:
    """Turns (stage, done, total) into at most ~25 progress-artifact updates per stage, each
    with chunks, GB, GB/s and the remaining time in its description and in the run's log."""

    def __init__(self, also: Progress | None) -> None:
        self.also = also
        self.artifacts: dict[str, Any] = {}
        self.last: dict[str, int] = {}
        self.started: dict[str, float] = {}
        self.stage_bytes: int | None = None  # the staged tensors' input bytes, once planned

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.also is not None:
            self.also(stage, done, total)
        step = max(1, total // UPDATES_PER_STAGE)
        if stage not in self.artifacts:
            self.started[stage] = time.perf_counter()
            self.artifacts[stage] = create_progress_artifact(
                progress=0.0, key=f"{stage}-progress", description=f"{stage}: starting"
            )
            self.last[stage] = 0
        if done == total or done - self.last[stage] >= step:
            self.last[stage] = done
            line = progress_line(
                stage, done, total, time.perf_counter() - self.started[stage], self.stage_bytes
            )
            update_progress_artifact(
                artifact_id=self.artifacts[stage],
                progress=100.0 * done / max(total, 1),
                description=line,
            )
            get_run_logger().info(line)


def run_name() -> str:
    params = flow_run.parameters or {}
    config = params.get("config") or {}
    if isinstance(config, RunConfig):
        source, preset = config.source, config.preset
    else:
        source, preset = config.get("source", "?"), config.get("preset", "?")
    return f"{Path(str(source)).name or source}-{preset}"


@task(name="plan", cache_policy=NO_CACHE)
def plan_task(pipe: Pipeline) -> dict[str, Any]:
    plan = pipe.make_plan()
    return {
        "tensors": len(plan.tensors),
        "quantized": len(plan.quantized),
        "chunks": plan.chunk_count,
    }


@task(name="ingest", cache_policy=NO_CACHE, retries=1)
def ingest_task(pipe: Pipeline, executor: Executor) -> None:
    pipe.ingest(executor)


@task(name="calibrate", cache_policy=NO_CACHE, retries=1)
def calibrate_task(pipe: Pipeline, executor: Executor) -> None:
    pipe.calibrate(executor)


@task(name="stats", cache_policy=NO_CACHE, retries=1)
def stats_task(pipe: Pipeline, executor: Executor) -> None:
    pipe.stats(executor)


@task(name="thresholds", cache_policy=NO_CACHE)
def thresholds_task(pipe: Pipeline) -> None:
    pipe.thresholds()


@task(name="compress", cache_policy=NO_CACHE, retries=1)
def compress_task(pipe: Pipeline, executor: Executor) -> None:
    pipe.compress(executor)


@task(name="write", cache_policy=NO_CACHE, retries=1)
def write_task(pipe: Pipeline, executor: Executor) -> None:
    pipe.write(executor)


@task(name="publish", cache_policy=NO_CACHE)
def publish_task(pipe: Pipeline) -> dict[str, Any]:
    report = pipe.publish()
    _report_artifacts(report)
    return report.to_dict()


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(config: RunConfig) -> dict[str, Any]:
    from compressor.evaluation import evaluate_checkpoint

    data = evaluate_checkpoint(
        config.source, config.destination, max_tokens=config.eval_tokens
    ).to_dict()
    create_markdown_artifact(
        key="evaluation",
        description="Perplexity before/after",
        markdown=(
            f"# Evaluation\n\n| model | perplexity | size |\n|---|---|---|\n"
            f"| original | {data['ppl_original']:.3f} | {data['original_bytes'] / 2**20:.1f} MB |\n"
            f"| compressed | {data['ppl_compressed']:.3f} ({data['delta_ppl_pct']:+.2f} %) | "
            f"{data['compressed_bytes'] / 2**20:.1f} MB |\n\n"
            f"{data['tokens']} tokens, window {data['window']}; weights: overall relative error "
            f"{data['weights']['total_rel_error']}, worst tensor `{data['weights']['worst_tensor']}`.\n"
        ),
    )
    return data


def _report_artifacts(report: Any) -> None:
    mb = 2**20
    worst = "\n".join(
        f"| `{t['name']}` | {t['scheme']} | {t['relative_error']:.4f} | {t['sqnr_db']:.1f} |"
        for t in report.worst(5)
    )
    timings = "\n".join(f"| {k} | {v:.2f} s |" for k, v in report.timings.items())
    create_markdown_artifact(
        key="compression-summary",
        description="Compression summary",
        markdown=(
            f"# Compressed checkpoint\n\n"
            f"**Output:** `{report.destination}`\n\n"
            f"| input | output | ratio |\n|---|---|---|\n"
            f"| {report.input_bytes / mb:.1f} MB | {report.output_bytes / mb:.1f} MB | "
            f"×{report.ratio:.2f} |\n\n"
            f"## Time per stage\n\n| stage | time |\n|---|---|\n{timings}\n\n"
            f"## Worst tensors by relative error\n\n| tensor | scheme | rel. error | SQNR dB |\n"
            f"|---|---|---|---|\n{worst}\n"
            + (
                "\n## Notes\n\n" + "\n".join(f"- {n}" for n in note_lines(report.notes))
                if report.notes
                else ""
            )
        ),
    )
    create_table_artifact(
        key="compression-tensors",
        description="Per-tensor report",
        table=[
            {
                "tensor": t["name"],
                "scheme": t["scheme"],
                "input_bytes": t["input_bytes"],
                "output_bytes": t["output_bytes"],
                "relative_error": round(t["relative_error"], 6),
            }
            for t in report.tensors
        ],
    )


@flow(name="compress-checkpoint", flow_run_name=run_name, log_prints=True)
def compress_checkpoint(config: RunConfig) -> Any:
    """Compress a safetensors checkpoint: plan → ingest → stats → thresholds → compress → write →
    publish."""
    logger = get_run_logger()
    # Prefect routes the root logger to its run logs; distributed's per-connection INFO lines
    # would drown the stage messages there. Its child loggers carry levels of their own (dask's
    # logging config), so each is set, not just the parent.
    if not config.verbose:
        _quiet_distributed()
    if config.evaluate:  # before any work: it would fail only after publishing
        from compressor.evaluation import require_eval_extra

        require_eval_extra("evaluate")
    progress = _ArtifactProgress(_extra_progress[-1] if _extra_progress else None)
    pipe = Pipeline(config, progress)
    try:
        return _run(config, pipe, progress)
    except CompressorError as e:
        # One line and its fix, as the CLI prints it: the failed state's message and a
        # markdown artifact an operator (or an automation on the failure event) reads.
        message = f"{type(e).__name__}: {e}"
        create_markdown_artifact(
            key="compression-failure",
            description="Why the compression failed, and the fix",
            markdown=f"# Compression failed\n\n```\n{e}\n```\n\nSource `{config.source}`, "
            f"destination `{config.destination}`.\n",
        )
        logger.error(message)
        _failures.append(e)
        return Failed(message=str(e))


def _run(config: RunConfig, pipe: Pipeline, progress: _ArtifactProgress) -> dict[str, Any]:
    logger = get_run_logger()
    summary = plan_task(pipe)
    progress.stage_bytes = sum(t.info.nbytes for t in pipe.plan.staged)
    logger.info("plan: %s", summary)
    if pipe.plan.up_to_date and not config.overwrite:
        report = pipe.published_report()
        logger.info("up to date: %s already holds this output", report.destination)
        return report.to_dict()
    # Publish inside the lock, as `Pipeline.run` does: it removes stale runs' partial outputs
    # and staging, which only the lock holder may do.
    with run_lock(pipe.plan):
        started = time.perf_counter()
        with open_executor(config, pipe.threaded()) as executor:
            logger.info("cluster started in %.1f s", time.perf_counter() - started)
            pipe.start_workers(executor)
            ingest_task(pipe, executor)
            if config.calibration is not None:
                calibrate_task(pipe, executor)
            stats_task(pipe, executor)
            thresholds_task(pipe)
            compress_task(pipe, executor)
            write_task(pipe, executor)
        result = publish_task(pipe)
    logger.info("published %s (×%.2f)", result["destination"], result["ratio"])
    if config.evaluate:
        result["evaluation"] = evaluate_task(config)
        logger.info(
            "perplexity %.3f → %.3f (%+.2f %%)",
            result["evaluation"]["ppl_original"],
            result["evaluation"]["ppl_compressed"],
            result["evaluation"]["delta_ppl_pct"],
        )
    record_history(config.source, run_row(config, result, result.get("evaluation")))
    return result


def run_flow(config: RunConfig, progress: Progress | None = None) -> dict[str, Any]:
    """Run the flow in this process, with an optional extra progress sink (the CLI's bars)."""
    if progress is not None:
        _extra_progress.append(progress)
    try:
        state: State[Any] = compress_checkpoint(config=config, return_state=True)  # type: ignore[assignment]
        if state.is_failed() and _failures:
            raise _failures.pop()  # the CLI prints it as it prints its own errors
        result: dict[str, Any] = state.result()  # raises what failed the run otherwise
        return result
    finally:
        _failures.clear()
        if progress is not None:
            _extra_progress.pop()
