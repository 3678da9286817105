"""The compression job: plan → ingest (+ range stats) → calibrate → stats → thresholds → compress →
write → publish.

`Pipeline` holds one run's state and exposes each stage as a method, so the CLI (`run()`) and
the Prefect flow (one task per method) drive exactly the same code. Stages map plain functions
over chunks through an `Executor`: a dask.distributed cluster, or this process when serial.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compressor import __version__, schemes
from compressor.calibration.samples import Samples, load_samples
from compressor.config import RunConfig
from compressor.errors import ConfigError
from compressor.formats import dtypes, storage
from compressor.formats.layout import module_name
from compressor.formats.staging import Staging
from compressor.math.quant import QuantArgs
from compressor.math.stats import ErrorStats, RangeStats
from compressor.stages import assemble as assemble_stage
from compressor.stages import awq as awq_stage
from compressor.stages import calibrate as calibrate_stage
from compressor.stages import compress as compress_stage
from compressor.stages import digest as digest_stage
from compressor.stages import ingest as ingest_stage
from compressor.stages import publish as publish_stage
from compressor.stages import write as write_stage
from compressor.stages.awq import Scaling
from compressor.stages.budget import choose_schemes
from compressor.stages.calibrate import Calibration
from compressor.stages.coverage import coverage
from compressor.stages.executor import DaskExecutor, Executor, Progress, SerialExecutor
from compressor.stages.plan import (
    OutputShard,
    Plan,
    TensorPlan,
    is_default_linear,
    lay_out_shards,
    make_plan,
)
from compressor.stages.stats import (
    CandidateErrors,
    ChunkPrune,
    Codebook,
    ScopeThreshold,
    candidate_errors,
    kmeans_codebooks,
    prune_thresholds,
)
from compressor.stages.thresholds import TensorThresholds, check_finite, thresholds
from compressor.stages.write import ShardResult

__all__ = ["Pipeline", "RunReport", "compress_checkpoint", "open_executor"]


def _cluster_logs(config: RunConfig) -> int:
    """The level distributed's loggers are set to in an embedded cluster: its per-connection
    INFO lines only when asked (--verbose)."""
    return logging.INFO if config.verbose else logging.ERROR


@contextlib.contextmanager
def open_executor(config: RunConfig, threads: bool = False) -> Iterator[Executor]:
    """Serial (workers=0), an existing cluster (scheduler), or an embedded LocalCluster: of
    worker processes, or with `threads` one worker of this process with a thread per core
    (`Pipeline.threaded` chooses). An embedded cluster listens on `config.listen` only
    (127.0.0.1 unless opened on purpose), its dashboard off unless `config.dashboard`."""
    if config.scheduler is None and config.workers == 0:
        yield SerialExecutor()
        return
    import dask
    from distributed import Client, LocalCluster

    if config.scheduler is not None:
        with _connect(config.scheduler) as client:
            yield DaskExecutor(client)
        return
    if config.gpu:
        with _cuda_cluster(config) as cluster, Client(cluster) as client:
            yield DaskExecutor(client)
        return
    if config.slurm is not None:
        with _slurm_cluster(config) as cluster, Client(cluster) as client:
            workers = config.slurm.jobs * config.slurm.processes
            try:
                client.wait_for_workers(workers, timeout=config.slurm.start_timeout_s)
            except Exception as e:  # a timeout: the jobs did not start (queue, limits)
                raise ConfigError(
                    f"only {len(client.scheduler_info()['workers'])} of {workers} SLURM workers "
                    f"joined within {config.slurm.start_timeout_s} s ({type(e).__name__})",
                    hint="check `squeue` and the jobs' logs; raise slurm.start_timeout_s, or "
                    "fewer slurm.jobs",
                ) from None
            yield DaskExecutor(client)
        return
    n = config.workers or os.cpu_count() or 1
    if threads:
        # Nothing to spawn or import: workers start in milliseconds, and the fused kernels
        # release the GIL, so n threads scale like n processes (docs/benchmarks.md). Scheduler
        # and worker talk in-process (inproc://, no socket): only their HTTP endpoints listen,
        # on every interface unless given an address (which, for the worker, also serves its
        # dashboard pages where bokeh is installed).
        with (
            LocalCluster(
                n_workers=1,
                threads_per_worker=n,
                processes=False,
                dashboard_address=_http_address(config, 8787 if config.dashboard else 0),
                scheduler_kwargs={"dashboard": config.dashboard},
                worker_dashboard_address=_http_address(config, 0),
                silence_logs=_cluster_logs(config),
            ) as cluster,
            Client(cluster) as client,
        ):
            yield DaskExecutor(client)
        return
    # Processes with one thread each: the math holds the GIL in places, and a worker per core
    # is what scales. Scheduler, nannies and workers on `listen`, on free ports.
    # Dask sets MALLOC_TRIM_THRESHOLD_ in its workers, which turns off glibc's adaptive mmap
    # threshold: every temporary over 128 KiB becomes a fresh mmap with page faults, making the
    # compress math 2-3x slower. Keep glibc's default; worker memory stays well under 1 GiB.
    with (
        dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}),
        LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            host=config.listen,
            dashboard_address=_http_address(config, 8787 if config.dashboard else 0),
            scheduler_kwargs={"dashboard": config.dashboard},
            silence_logs=_cluster_logs(config),
        ) as cluster,
        Client(cluster) as client,
    ):
        yield DaskExecutor(client)


def _slurm_cluster(config: RunConfig) -> Any:
    """dask-jobqueue's SLURMCluster for this run, its jobs submitted; closing it cancels them."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ConfigError(
            "slurm needs dask-jobqueue", hint="pip install dask-jobqueue (or the slurm extra)"
        ) from None
    assert config.slurm is not None
    s = config.slurm
    cluster = SLURMCluster(
        cores=s.processes,  # one thread per worker process, as the local processes cluster
        processes=s.processes,
        memory=s.memory,
        walltime=s.walltime,
        queue=s.queue,
        account=s.account,
        python=s.python or sys.executable,
        job_extra_directives=list(s.job_extra_directives),
        scheduler_options={"host": config.listen, "dashboard": config.dashboard},
        # On loopback (the default) the workers listen there too: such a cluster only works
        # on this machine, and opens nothing to the network unless `listen` says so.
        worker_extra_args=["--host", config.listen] if config.listen == "127.0.0.1" else [],
        silence_logs=_cluster_logs(config),
    )
    cluster.scale(jobs=s.jobs)
    return cluster


def _http_address(config: RunConfig, port: int) -> str:
    """Where an HTTP endpoint of the embedded cluster listens: distributed always starts one in
    the scheduler (health; the dashboard when asked for and bokeh is installed) and in each
    worker, on every interface unless told. `port` 0 is a free one; 8787, the dashboard's
    usual port, falls back to a free one when taken."""
    host = f"[{config.listen}]" if ":" in config.listen else config.listen
    return f"{host}:{port}"


SCHEDULER_TIMEOUT_S = 10


def _connect(address: str) -> Any:
    """A client of the existing scheduler at `address`, or a ConfigError naming it, within
    SCHEDULER_TIMEOUT_S (distributed would retry a refused connection for its whole timeout)."""
    from distributed import Client
    from distributed.comm import parse_address, parse_host_port

    def unreachable(reason: str) -> ConfigError:
        return ConfigError(
            f"cannot reach the Dask scheduler at {address}: {reason}",
            hint="start it (`dask scheduler`) or correct the address given to --scheduler "
            "(config.scheduler); without --scheduler the run starts its own local cluster",
        )

    try:
        protocol, location = parse_address(address)
        if protocol in ("tcp", "tls"):  # a refused or silent port fails here, at once
            with socket.create_connection(parse_host_port(location), timeout=SCHEDULER_TIMEOUT_S):
                pass
    except ValueError as e:
        raise unreachable(f"not a scheduler address ({e})") from None
    except OSError as e:
        raise unreachable(e.strerror or str(e) or type(e).__name__) from None
    try:
        return Client(address, timeout=f"{SCHEDULER_TIMEOUT_S}s")
    except (OSError, TimeoutError) as e:
        raise unreachable(str(e) or type(e).__name__) from None


def _cuda_cluster(config: RunConfig) -> Any:
    """A LocalCUDACluster: one worker per visible GPU, each declaring the resource GPU=1, on
    `config.listen` like the other embedded clusters."""
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as e:
        raise ConfigError(
            "--gpu needs dask-cuda",
            hint="install the gpu extra (pip install 'checkpoint-compressor[gpu]') with a CUDA "
            "build of torch, or drop --gpu (workers use a GPU whenever torch sees one)",
        ) from e
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            "--gpu was given but torch sees no CUDA device",
            hint="install a CUDA build of torch, or drop --gpu to run on the CPU",
        )
    return LocalCUDACluster(
        n_workers=config.workers or None,
        threads_per_worker=1,
        host=config.listen,
        dashboard_address=_http_address(config, 8787 if config.dashboard else 0),
        scheduler_kwargs={"dashboard": config.dashboard},
        resources={"GPU": 1},
        silence_logs=_cluster_logs(config),
    )


@dataclass
class RunReport:
    """What a run did: written into compression.json and shown by the CLI and the flow."""

    destination: str
    input_bytes: int
    output_bytes: int
    tensors: list[dict[str, Any]]
    timings: dict[str, float]
    notes: list[str] = field(default_factory=list)
    run_key: str = ""
    # parameters quantized / in total per module family (stages/coverage.py)
    coverage: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.input_bytes / self.output_bytes if self.output_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (an exact tensor's infinite SQNR becomes None)."""
        return {
            "destination": self.destination,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "ratio": self.ratio,
            "timings_s": self.timings,
            "notes": self.notes,
            "coverage": self.coverage,
            "tensors": [_json_safe(t) for t in self.tensors],
        }

    def worst(self, n: int = 5) -> list[dict[str, Any]]:
        quantized = [t for t in self.tensors if t["scheme"] != "copy"]
        return sorted(quantized, key=lambda t: -t["relative_error"])[:n]


class Pipeline:
    """One run. Call the stage methods in order, or `run()`."""

    def __init__(self, config: RunConfig, progress: Progress | None = None) -> None:
        self.config = config
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.plan_: Plan | None = None
        self.ranges: dict[str, RangeStats] = {}
        self.fixed: dict[str, TensorThresholds] = {}
        self.errors: dict[str, ErrorStats] = {}
        self.shards: list[ShardResult] = []
        self.prune: dict[tuple[str, int], ChunkPrune] = {}
        self.scopes: list[ScopeThreshold] = []
        self.candidates: list[QuantArgs] = []
        self.candidate_errors: dict[str, CandidateErrors] = {}
        self.budget_summary: dict[str, Any] | None = None
        self.codebooks: dict[str, Codebook] = {}
        self.report: RunReport | None = None
        self.direct = False  # compress reads the source, not staged input
        self.in_place = False  # compress writes into the shard files (stages/assemble.py)
        self.layout: tuple[OutputShard, ...] | None = None  # final shards, set by write()
        self.source_digests: dict[str, str] = {}  # sha256 of every source file, by name
        self.calibration: Calibration | None = None  # input statistics (stages/calibrate.py)
        self.samples: Samples | None = None  # calibration windows, read by make_plan
        self.calibration_source = ""  # the checkpoint directory the model is built from
        self.scaling = Scaling()  # AWQ's equivalent scales (stages/awq.py), when asked for

    @contextlib.contextmanager
    def _timed(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = round(time.perf_counter() - start, 3)

    @property
    def plan(self) -> Plan:
        if self.plan_ is None:
            raise RuntimeError("make_plan() must run first")
        return self.plan_

    def threaded(self) -> bool:
        """Whether an embedded cluster runs threads (config.worker_kind; auto: when every chunk
        reads the source directly and takes the fused kernels, so nothing holds the GIL long)."""
        kind = self.config.worker_kind
        if kind != "auto":
            return kind == "threads"
        if self.config.calibration is not None:  # the model's forward: torch, processes
            return False
        return not ingest_stage.needs_ingest(self.plan) and all(
            compress_stage.takes_fused_kernels(t) for t in self.plan.staged
        )

    def start_workers(self, executor: Executor) -> None:
        """Start-up work in every worker before the first stage: imports and, when chunks take
        the fused kernels, loading them (compiling them, the first time on a machine)."""
        staged = self.plan.staged
        if any(compress_stage.takes_fused_kernels(t) for t in staged):
            # the searches' kernels (the larger compile) only where a tensor searches its scales
            searches = any(compress_stage.takes_search_kernels(t) for t in staged)
            executor.run_everywhere(functools.partial(compress_stage.warm_up, searches=searches))

    # -- stages -------------------------------------------------------------------------------
    def make_plan(self) -> Plan:
        with self._timed("plan"):
            self.plan_ = make_plan(self.config)
            if any(t.scaling == "awq" for t in self.plan_.tensors):
                awq_stage.check(self.plan_)  # by names, before the model runs
            cal = self.config.calibration
            if cal is not None:  # read and tokenized now: bad data fails before any work
                self.calibration_source = calibrate_stage.check(self.config)
                self.samples = load_samples(
                    cal.path, self.calibration_source, cal.samples, cal.seq_len
                )
        return self.plan_

    def ingest(self, executor: Executor) -> None:
        with self._timed("ingest"):
            self.direct = not ingest_stage.needs_ingest(self.plan)
            if self.direct:  # compress reads the source itself (see stages/ingest.py)
                self.staging = Staging(self.plan.staging_root)
                self.staging.root.mkdir(parents=True, exist_ok=True)
                self.ranges = {}
                return
            self.staging = ingest_stage.prepare_staging(self.plan)
            self.ranges = ingest_stage.ingest(self.plan, self.staging, executor, self.progress)
            self.plan_ = check_finite(self.plan, self.ranges)

    def calibrate(self, executor: Executor) -> None:
        """Run the model on the calibration samples; keep every linear input's XᵀX (nothing to
        do without calibration)."""
        with self._timed("calibrate"):
            if self.samples is None:
                self.calibration = None
                return
            self.calibration = calibrate_stage.calibrate(
                self.plan,
                self.staging,
                self.samples,
                self.calibration_source,
                executor,
                self.progress,
                self._gptq_dampening(),
                hessians=self._reads_hessians(),
                act_order=self._gptq_act_order(),
            )
            self.plan_, self.calibration = calibrate_stage.with_input_norms(
                self.plan, self.calibration
            )

    def _reads_hessians(self) -> bool:
        """Whether a stage reads XᵀX: a search or GPTQ rounding, AWQ, a budget, or Wanda
        pruning without an activations file (its norms are XᵀX's diagonal); not W4A4's input
        scales, which need max |x| alone."""
        recipe = self.config.recipe
        return (
            recipe.budget is not None
            or (recipe.pruning is not None and recipe.pruning.reads_calibration)
            or any(r.rounding != "rtn" or r.scaling != "none" for r in recipe.quantization)
        )

    def _gptq_dampening(self) -> float | None:
        """λ for GPTQ's factors, staged by the calibration stage when a rule uses gptq."""
        cal = self.config.calibration
        uses = any(r.rounding == "gptq" for r in self.config.recipe.quantization)
        return cal.dampening if cal is not None and uses else None

    def _gptq_act_order(self) -> bool:
        """Whether GPTQ's staged factors are of H in static act-order."""
        cal = self.config.calibration
        return cal is not None and cal.act_order and self._gptq_dampening() is not None

    def stats(self, executor: Executor) -> None:
        """Second-look statistics: exact pruning thresholds, each candidate's error under an
        automatic budget, and k-means codebooks (nothing to do otherwise)."""
        with self._timed("stats"):
            if self.config.recipe.pruning is not None:
                self.prune, self.scopes = prune_thresholds(
                    self.plan, self.staging, executor, self.progress
                )
            budget = self.config.recipe.budget
            if budget is not None:
                self.candidates = [c.args() for c in budget.candidates]
                self.candidate_errors = candidate_errors(
                    self.plan,
                    self.staging,
                    self.candidates,
                    executor,
                    self.progress,
                    self.calibration,
                )
            self.codebooks = kmeans_codebooks(
                self.plan, self.staging, self.ranges, executor, self.progress
            )
            if self.calibration is not None and any(t.scaling == "awq" for t in self.plan.staged):
                self.scaling = awq_stage.scale(
                    self.plan,
                    str(self.staging.root),
                    self.calibration,
                    self.calibration_source,
                    executor,
                    self.progress,
                )

    def thresholds(self) -> None:
        with self._timed("thresholds"):
            budget = self.config.recipe.budget
            if budget is not None:
                choice = choose_schemes(self.plan, budget, self.candidates, self.candidate_errors)
                self.plan_ = self.plan.with_args(choice.args)
                self.budget_summary = choice.summary
            self.fixed = thresholds(self.plan, self.ranges)

    def compress(self, executor: Executor) -> None:
        with self._timed("compress"):
            self.in_place = not self.scaling.norms and assemble_stage.assembles_in_place(
                self.plan, self.staging, self.config.scheduler
            )
            targets = None
            if self.in_place:
                targets = assemble_stage.prepare_shard_files(self.plan, self.staging)
            self.errors = compress_stage.compress(
                self.plan,
                self.staging,
                self.fixed,
                executor,
                self.progress,
                self.prune,
                direct=self.direct,
                codebooks={name: c.stored for name, c in self.codebooks.items()},
                targets=targets,
                calibration=self.calibration,
                scaling=self.scaling,
            )
        with self._timed("digest"):  # after the chunks, so it reads what they left in the cache
            self.source_digests = digest_stage.digest_sources(
                self.plan.sources, self.staging, executor, self.progress
            )

    def write(self, executor: Executor) -> None:
        with self._timed("write"):
            self.partial = publish_stage.partial_dir(self.plan)
            storage.remove(self.partial)  # a crashed run's leftovers
            self.partial.mkdir(parents=True)
            try:
                self._write_shards(executor)
            except BaseException:
                with contextlib.suppress(OSError):
                    storage.remove(self.partial)  # nothing half-written remains
                raise

    def _write_shards(self, executor: Executor) -> None:
        # Some schemes' sizes are known only now (bitmask: values kept): lay the shards out again.
        kept = {
            t.name: self.errors[t.name].count - self.errors[t.name].zeros
            for t in self.plan.staged
            if t.scheme is not None and t.scheme.sized_after_compress
        }
        self.layout = (
            lay_out_shards(self.plan.tensors, self.config.max_shard_mb * 2**20, kept)
            if kept
            else self.plan.shards
        )
        self.shards = write_stage.write(
            self.plan,
            self.staging,
            self._small_outputs(),
            self.partial,
            executor,
            self.progress,
            self.layout,
            in_place=self.in_place,
        )

    def publish(self) -> RunReport:
        with self._timed("publish"):
            self.report = self._report()
            publish_stage.publish(
                self.plan,
                self.partial,
                self.shards,
                self._quantization_config(),
                self._report_json(self.report),
                self.source_digests,
            )
            if not self.config.keep_staging:
                with contextlib.suppress(OSError):
                    storage.remove(self.staging.root)
                if isinstance(self.staging.root, Path):  # object stores have no empty dirs
                    with contextlib.suppress(OSError):
                        self.staging.root.parent.rmdir()  # only if no other run's staging
        self.report.timings = dict(self.timings)
        return self.report

    def run(self) -> RunReport:
        """All stages, in order, on the executor the config asks for."""
        start = time.perf_counter()
        self.make_plan()
        if self.plan.up_to_date and not self.config.overwrite:
            return self.published_report()
        with publish_stage.run_lock(self.plan):
            cluster_start = time.perf_counter()
            with open_executor(self.config, self.threaded()) as executor:
                self.start_workers(executor)
                self.timings["cluster_start"] = round(time.perf_counter() - cluster_start, 3)
                self.ingest(executor)
                self.calibrate(executor)
                self.stats(executor)
                self.thresholds()
                self.compress(executor)
                self.write(executor)
            report = self.publish()
        report.timings["total"] = round(time.perf_counter() - start, 3)
        return report

    def published_report(self) -> RunReport:
        """The report of the identical run already at the destination (idempotent reruns)."""
        dest = self.config.destination
        data = storage.read_json(storage.join(dest, publish_stage.REPORT_NAME))
        tensors = [
            {**t, "sqnr_db": float("inf") if t.get("sqnr_db") is None else t["sqnr_db"]}
            for t in data["tensors"]
        ]
        self.report = RunReport(
            destination=storage.shown(dest),
            input_bytes=data["totals"]["input_bytes"],
            output_bytes=data["totals"]["output_bytes"],
            tensors=tensors,
            timings={**self.timings, "total": self.timings.get("plan", 0.0)},
            notes=[*data.get("notes", []), "up to date: the destination already holds this output"],
            run_key=data["run_key"],
        )
        return self.report

    # -- helpers ------------------------------------------------------------------------------
    def _small_outputs(self) -> dict[str, np.ndarray]:
        """Tiny tensors written straight from the client: shapes, and what each scheme writes
        whole (per-tensor scales, k-means codebooks)."""
        small: dict[str, np.ndarray] = {}
        cal = self.calibration
        by_name = self.plan.by_name
        for norm, values in self.scaling.norms.items():  # AWQ's folded norm weights
            dtype = dtypes.torch_dtype(by_name[norm].info.dtype)
            small[norm] = dtypes.to_raw(torch.from_numpy(values).to(dtype))
        for t in self.plan.staged:
            m = module_name(t.name)
            scheme, stored = t.scheme, t.stored
            if scheme is None or stored is None or "weight_shape" in scheme.parts:
                small[f"{m}.weight_shape"] = np.asarray(t.info.shape, dtype="<i8")
            if scheme is None or stored is None:
                continue
            fixed = self.fixed.get(t.name)
            book = self.codebooks.get(t.name)
            small.update(
                scheme.small_outputs(
                    m,
                    stored,
                    fixed.scale if fixed else None,
                    fixed.zero if fixed else None,
                    book.stored if book else None,
                    cal.input_absmax(t.name) if cal is not None else None,
                )
            )
        return small

    def _quantization_config(self) -> dict[str, Any] | None:
        """The config.json block, or None when the output is an ordinary dense model."""
        compressed = [
            (t.stored, t.dtype, module_name(t.name))
            for t in self.plan.staged
            if t.stored is not None
        ]
        dense_linear = [
            module_name(t.name)
            for t in self.plan.tensors
            if t.args is None and (is_default_linear(t.name, t.info) or t.name == "lm_head.weight")
        ]
        return schemes.quantization_config(compressed, dense_linear)

    def _report(self) -> RunReport:
        plan = self.plan
        out_bytes_by_source: dict[str, int] = {}
        for shard in self.layout or plan.shards:
            for e in shard.entries:
                out_bytes_by_source[e.source] = out_bytes_by_source.get(e.source, 0) + e.nbytes
        rows = []
        for t in plan.tensors:
            err = self.errors.get(t.name)
            rows.append(
                {
                    "name": t.name,
                    "dtype": t.info.dtype,
                    "shape": list(t.info.shape),
                    "scheme": _scheme(t),
                    "sparsity": err.sparsity if err else 0.0,
                    "input_bytes": t.info.nbytes,
                    "output_bytes": out_bytes_by_source.get(t.name, 0),
                    "relative_error": err.relative_error if err else 0.0,
                    "sqnr_db": err.sqnr_db if err else float("inf"),
                    "max_abs_error": err.max_abs_error if err else 0.0,
                    **({"note": t.note} if t.note else {}),
                }
            )
        return RunReport(
            destination=storage.shown(self.config.destination),
            input_bytes=plan.checkpoint.total_bytes,
            output_bytes=sum(s.nbytes for s in self.shards),
            tensors=rows,
            timings=dict(self.timings),
            notes=list(plan.notes)
            + list(self.calibration.notes if self.calibration else ())
            + list(self.scaling.notes),
            run_key=plan.run_key,
            coverage=coverage(plan.tensors),
        )

    def _format(self) -> str:
        """The output's layout family, as compression.json names it."""
        ours = {t.scheme.format for t in self.plan.quantized if t.scheme and t.scheme.ours}
        return next(iter(ours), "compressed-tensors")

    def _kmeans_summary(self) -> dict[str, Any]:
        """Per k-means tensor: iterations run, whether it reached a fixed point, the last
        iteration's squared error (approximate) and the stored codebook."""
        return {
            name: {
                "iterations": c.iterations,
                "converged": c.converged,
                "sse": c.sse,
                "codebook": list(c.stored),
            }
            for name, c in self.codebooks.items()
        }

    def _report_json(self, report: RunReport) -> dict[str, Any]:
        return {
            "tool": "checkpoint-compressor",
            "version": __version__,
            "format": self._format(),
            "input_fingerprint": self.plan.checkpoint.fingerprint(),
            "run_key": report.run_key,
            "config": self.config.model_dump(mode="json"),
            "totals": {
                "input_bytes": report.input_bytes,
                "output_bytes": report.output_bytes,
                "ratio": round(report.ratio, 4),
            },
            "notes": report.notes,
            "coverage": report.coverage,
            **({"budget": self.budget_summary} if self.budget_summary else {}),
            **({"kmeans": self._kmeans_summary()} if self.codebooks else {}),
            "pruning_scopes": [
                {
                    "scope": p.scope,
                    "elements": p.elements,
                    "pruned": p.pruned,
                    "threshold": p.threshold,
                }
                for p in self.scopes
            ],
            "timings_s": report.timings,
            "tensors": [_json_safe(t) for t in report.tensors],
        }


def _scheme(t: TensorPlan) -> str:
    """E.g. "int4 sym g128", "int4 sym g128 + prune 50% global", "prune 2:4", "copy"."""
    parts = []
    if t.args is not None:
        parts.append(t.args.describe() + (f" {t.rounding}" if t.rounding != "rtn" else ""))
    if t.prune is not None:
        p = t.prune
        if p.nm is not None:
            parts.append(f"prune {p.nm[0]}:{p.nm[1]}")
        else:
            where = (
                "row" if p.structure == "row" else ("global" if p.scope == "global" else "tensor")
            )
            parts.append(
                f"prune {p.sparsity:.0%} {where}"
                + (" bitmask" if p.bitmask and t.args is None else "")
            )
    return " + ".join(parts) or "copy"


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no inf: write it as null (an exact reconstruction has infinite SQNR)."""
    return {
        k: (None if isinstance(v, float) and v in (float("inf"), float("-inf")) else v)
        for k, v in row.items()
    }


def compress_checkpoint(config: RunConfig, progress: Progress | None = None) -> RunReport:
    """Run the whole job; the library entry point behind `compressor compress`."""
    return Pipeline(config, progress).run()
