"""Calibrate: the input Hessian XᵀX of every linear module, from sample text, on the cluster.

The samples (N windows of L tokens, `calibration.samples`) are split into shards of
`SHARD_SAMPLES` windows. A shard is one job: it runs the model over its windows one decoder
layer at a time (`calibration.layers.DecoderRunner`: memory is one layer's weights plus the
shard's activations) and stages, per layer, the partial XᵀX of each distinct linear input.
Shards run in parallel on the workers; XᵀX is a sum over tokens, so a second map adds the
shards' partial sums per layer, in shard order, in float64 (the same order and shard boundaries
whatever the number of workers, and one torch thread per job: identical bytes on 1 or N
workers). The result is one float32 (cols, cols) array per distinct input, staged, and a map from
weight name to it (`Calibration`), which compress reads per chunk. Each input's max |x| (the
maximum over shards) comes with it: NVFP4 W4A4 writes its input global scale from it. When no
rule reads XᵀX (W4A4 alone), the shards skip the products and stage nothing but markers. Beside
each XᵀX the sums stage its input norms ‖x_j‖ = sqrt((XᵀX)_jj), which Wanda pruning reads in
place of an activations file (`with_input_norms`).

Inputs are the *original* model's activations ("parallel" calibration, as GPTQ's paper and
llm-compressor's default `sequential` pipeline differ on: the latter feeds each layer the
outputs of the already-quantized layers before it). Parallel keeps the stage independent of
the scheme: one calibration serves every preset, and shards need no quantized weights from
one another. docs/accuracy.md measures what that choice costs.

Resume: a shard marks each finished layer and stages the hidden states it produced, so a killed
run restarts every shard at its next layer; sums are marked per layer too.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from compressor.calibration.samples import Samples
from compressor.config import RunConfig
from compressor.errors import ConfigError
from compressor.formats import dtypes, storage
from compressor.formats.safetensors_io import read_tensor
from compressor.formats.staging import Staging
from compressor.math.gptq import activation_order, inverse_hessian_factor
from compressor.stages.executor import Executor, Progress
from compressor.stages.plan import Plan, TensorPlan

__all__ = [
    "SHARD_SAMPLES",
    "Calibration",
    "CalibrationShard",
    "Statistic",
    "calibrate",
    "calibrate_shard",
    "check",
    "load_factor",
    "load_hessian",
    "read_weight",
    "with_input_norms",
]

STAGE = "calibrate"
SUM_STAGE = "calibrate-sum"
SHARD_SAMPLES = 8  # windows per job: fixed, so sums do not depend on the number of workers
TOKENS = "calib/tokens"


@dataclass(frozen=True)
class Statistic:
    """A staged XᵀX: its array (None when not computed), the tokens summed, the input width,
    the input's largest magnitude."""

    path: str | None
    tokens: int
    cols: int
    factor: str | None = None  # GPTQ's staged Cholesky factor U of (H + λI)⁻¹, when asked for
    absmax: float = 0.0
    norms: str | None = None  # the staged ‖x_j‖ = sqrt(diag XᵀX), (cols,) F32, with XᵀX
    ordered: bool = False  # the factor is of H in static act-order (`gptq.activation_order`)


@dataclass(frozen=True)
class Calibration:
    """The calibration stage's result: weight name → its input's statistic."""

    stats: dict[str, Statistic] = field(default_factory=dict)
    samples: int = 0
    seq_len: int = 0
    notes: tuple[str, ...] = ()

    def get(self, weight: str) -> Statistic | None:
        return self.stats.get(weight)

    def input_absmax(self, weight: str) -> float:
        """max |x| of the weight's input; for a weight no token reached (an expert never
        routed to), the largest of any input, so its input scale clips nothing seen."""
        stat = self.stats.get(weight)
        if stat is not None:
            return stat.absmax
        return max((s.absmax for s in self.stats.values()), default=0.0)


@dataclass(frozen=True)
class CalibrationShard:
    staging: Staging
    shard: int
    rows: tuple[int, int]  # windows [r0, r1) of the staged tokens
    source: str  # checkpoint directory (config.json)
    tensors: tuple[TensorPlan, ...]  # every input tensor, to read layers' weights by name
    hessians: bool = True  # compute and stage XᵀX (False: only max |x| is read)


@dataclass(frozen=True)
class LayerSum:
    staging: Staging
    layer: int
    shards: int
    dampening: float | None = None  # also stage GPTQ's factor, with this λ
    hessians: bool = True
    act_order: bool = False  # that factor of H with rows and columns in `gptq.activation_order`


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread: results that do not depend on the machine's core count (and a
    worker per core is how the cluster uses the cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def read_weight(t: TensorPlan) -> torch.Tensor:
    """A whole input tensor as the model uses it (an encoded weight decoded)."""
    if t.encoded is not None:
        return t.encoded.decode(0, t.info.shape[0])
    return dtypes.to_torch(read_tensor(t.source, t.info), t.info.dtype)


@functools.lru_cache(maxsize=2)
def _runner(source: str, tensors: tuple[TensorPlan, ...]):  # type: ignore[no-untyped-def]
    from compressor.calibration.layers import DecoderRunner

    by_name = {t.name: t for t in tensors}

    def read(name: str) -> torch.Tensor:
        t = by_name.get(name)
        if t is None:
            raise ConfigError(
                f"the model built from config.json needs {name}, which the checkpoint lacks",
                path=source,
                hint="calibration reads the transformers names; compress without --calibration",
            )
        return read_weight(t)

    return DecoderRunner(source, read)


def _part(shard: int, layer: int, group: int) -> str:
    return f"calib/part/s{shard:04d}/l{layer:04d}g{group:03d}"


def _hidden(shard: int, layer: int) -> str:
    return f"calib/hidden/s{shard:04d}/l{layer:04d}"


def _done_layers(staging: Staging, shard: int, layers: int) -> int:
    done = 0
    while done < layers and staging.done(STAGE, f"s{shard:04d}", done) is not None:
        done += 1
    return done


def calibrate_shard(job: CalibrationShard) -> int:
    """Run the shard's windows through every layer not yet done; returns the model's number of
    decoder layers."""
    staging = job.staging
    with one_thread(), torch.no_grad():
        runner = _runner(job.source, job.tensors)
        layers = len(runner)
        start = _done_layers(staging, job.shard, layers)
        if start == layers:
            return layers
        tokens = torch.from_numpy(staging.read_rows(TOKENS, *job.rows))
        inputs = runner.layer_inputs(tokens)
        hidden = inputs[0][0]
        if start > 0:
            flat = staging.read_rows(_hidden(job.shard, start - 1), 0, hidden.numel())
            hidden = torch.from_numpy(flat.reshape(hidden.shape))
        for i in range(start, layers):
            hidden, stats = runner.run_layer(i, hidden, inputs[i][1], job.hessians)
            groups = {}
            for j, s in enumerate(stats):
                cols = s.cols
                if s.hessian is not None:
                    staging.create(_part(job.shard, i, j), (cols, cols), "F32", cols)
                    staging.write_rows(_part(job.shard, i, j), 0, s.hessian.numpy())
                groups[f"{j}"] = {
                    "members": s.members,
                    "tokens": s.tokens,
                    "cols": cols,
                    "absmax": s.absmax,
                }
            if i + 1 < layers:
                flat = hidden.reshape(-1).contiguous().numpy()
                staging.create(_hidden(job.shard, i), flat.shape, "F32", flat.shape[0])
                staging.write_rows(_hidden(job.shard, i), 0, flat)
            staging.mark_done(STAGE, f"s{job.shard:04d}", i, {"groups": groups})
            if i > 0:
                storage.remove(staging.root / _hidden(job.shard, i - 1))
    return layers


def _final(layer: int, group: int) -> str:
    return f"calib/h/l{layer:04d}g{group:03d}"


def _factor(layer: int, group: int) -> str:
    return f"calib/u/l{layer:04d}g{group:03d}"


def _norms(layer: int, group: int) -> str:
    return f"calib/n/l{layer:04d}g{group:03d}"


_SUM_ROWS = 1024


def sum_layer(job: LayerSum) -> dict[str, dict]:
    """Add one layer's partial sums over the shards (in shard order, float64); stage each
    distinct input's XᵀX as float32. Returns member names → {path, tokens, cols}."""
    staging = job.staging
    recorded = staging.done(SUM_STAGE, f"l{job.layer:04d}", 0)
    if recorded is not None:
        return recorded
    parts: dict[tuple[str, ...], list[tuple[int, int, int, int]]] = {}
    absmax: dict[tuple[str, ...], float] = {}
    for s in range(job.shards):
        marker = staging.done(STAGE, f"s{s:04d}", job.layer)
        assert marker is not None, "every shard finished before the sums"
        for j, g in marker["groups"].items():
            members = tuple(g["members"])
            parts.setdefault(members, []).append((s, int(j), g["tokens"], g["cols"]))
            absmax[members] = max(absmax.get(members, 0.0), float(g["absmax"]))
    result: dict[str, dict] = {}
    for k, members in enumerate(sorted(parts)):
        cols = parts[members][0][3]
        entry: dict = {
            "path": None,  # XᵀX not computed (no rule reads it)
            "tokens": sum(n for _, _, n, _ in parts[members]),
            "cols": cols,
            "absmax": absmax[members],
        }
        for m in members:
            result[m] = entry
        if not job.hessians:
            continue
        total = np.zeros((cols, cols), dtype=np.float64)
        for s, j, _, _ in parts[members]:
            for r0 in range(0, cols, _SUM_ROWS):  # no float64 copy of a whole partial
                r1 = min(r0 + _SUM_ROWS, cols)
                total[r0:r1] += staging.read_rows(_part(s, job.layer, j), r0, r1)
        stored = total.astype(np.float32)
        # Wanda's input norms ‖x_j‖ over every calibration token: a few bytes beside XᵀX
        norms = np.sqrt(np.clip(np.diagonal(total), 0.0, None)).astype(np.float32)
        del total  # before the factor: memory is a few (cols, cols) float32 arrays at most
        staging.create(_final(job.layer, k), (cols, cols), "F32", cols)
        staging.write_rows(_final(job.layer, k), 0, stored)
        entry["path"] = _final(job.layer, k)
        staging.create(_norms(job.layer, k), (cols,), "F32", cols)
        staging.write_rows(_norms(job.layer, k), 0, norms)
        entry["norms"] = _norms(job.layer, k)
        if job.dampening is not None:  # once per input here, not once per worker in compress
            h = torch.from_numpy(stored)
            order = activation_order(h) if job.act_order else None
            with one_thread():  # the same bits whichever worker computes it
                u, _ = inverse_hessian_factor(h, job.dampening, order)
            staging.create(_factor(job.layer, k), (cols, cols), "F32", cols)
            staging.write_rows(_factor(job.layer, k), 0, u.numpy())
            entry["factor"] = _factor(job.layer, k)
            entry["ordered"] = job.act_order
    staging.mark_done(SUM_STAGE, f"l{job.layer:04d}", 0, result)
    return result


def calibrate(
    plan: Plan,
    staging: Staging,
    samples: Samples,
    source: str,
    executor: Executor,
    progress: Progress | None = None,
    dampening: float | None = None,
    hessians: bool = True,
    act_order: bool = False,
) -> Calibration:
    """Stage the samples, run the shards, add their sums; the statistic of every target (and,
    with `dampening`, GPTQ's factor of every input, of H in static act-order with `act_order`;
    without `hessians`, max |x| alone)."""
    n, seq_len = samples.tokens.shape
    staging.create(TOKENS, (n, seq_len), "I64", n)
    staging.write_rows(TOKENS, 0, samples.tokens)
    shards = [
        CalibrationShard(
            staging, k, (r0, min(r0 + SHARD_SAMPLES, n)), source, plan.tensors, hessians
        )
        for k, r0 in enumerate(range(0, n, SHARD_SAMPLES))
    ]
    layers = executor.map(calibrate_shard, shards, STAGE, progress)[0]
    sums = executor.map(
        sum_layer,
        [LayerSum(staging, i, len(shards), dampening, hessians, act_order) for i in range(layers)],
        SUM_STAGE,
        progress,
    )
    stats: dict[str, Statistic] = {}
    for per_layer in sums:
        for module, s in per_layer.items():
            stats[f"{module}.weight"] = Statistic(
                s["path"],
                s["tokens"],
                s["cols"],
                s.get("factor"),
                s["absmax"],
                s.get("norms"),
                bool(s.get("ordered", False)),
            )
    notes = [samples.note] if samples.note else []
    missing = [t.name for t in plan.staged if t.args is not None and t.name not in stats]
    if missing:
        notes.append(
            f"calibration: {len(missing)} quantized weight(s) saw no calibration token (e.g. "
            f"{missing[0]}: an expert never routed to, or not an nn.Linear of the model); "
            "they are rounded data-free (and an nvfp4 W4A4 input is given the largest input "
            "maximum measured, i.e. the smallest global scale)"
        )
    return Calibration(stats, n, seq_len, tuple(notes))


@functools.lru_cache(maxsize=8)
def _staged_hessian(root: str, path: str) -> torch.Tensor:
    staging = Staging(root)
    arr = staging.array(path)
    return torch.from_numpy(np.asarray(arr[:]))


def load_hessian(staging: Staging, stat: Statistic) -> torch.Tensor:
    """The staged XᵀX (float32, cols × cols), cached per process (chunks of one tensor share
    it)."""
    assert stat.path is not None, "XᵀX is staged whenever a rule reads it"
    return _staged_hessian(str(staging.root), stat.path)


def load_factor(staging: Staging, stat: Statistic) -> torch.Tensor | None:
    """GPTQ's staged factor U (float32), cached per process; None when not staged."""
    return None if stat.factor is None else _staged_hessian(str(staging.root), stat.factor)


def check(config: RunConfig) -> str:
    """Before any work: the checkpoint directory the model is built from (config.json beside
    the weights) and transformers importable. Returns the directory."""
    assert config.calibration is not None
    if storage.is_url(config.source):
        raise ConfigError(
            "calibration builds the model from a local checkpoint directory, not a URL",
            path=config.source,
            hint="copy the checkpoint to a local directory, or compress without --calibration",
        )
    path = Path(config.source)
    folder = path if path.is_dir() else path.parent
    if not (folder / "config.json").is_file():
        raise ConfigError(
            "calibration runs the model, which needs its config.json beside the weights",
            path=str(folder),
            hint="add the model's config.json, or compress without --calibration",
        )
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError(
            "calibration runs the model with transformers, which is not installed",
            hint="pip install 'checkpoint-compressor[eval]'",
        ) from None
    return str(folder)  # the file itself was read for the run key (plan): it is readable


def with_input_norms(plan: Plan, calibration: Calibration) -> tuple[Plan, Calibration]:
    """Wanda without an activations file: each weight pruned by importance "activation" reads
    its input's calibrated norms. A weight no calibration token reached (an expert never routed
    to) is pruned by magnitude instead, said in a note."""
    unreached: list[str] = []

    def resolved(t: TensorPlan) -> TensorPlan:
        p = t.prune
        if p is None or p.importance != "activation" or p.activation is not None:
            return t
        stat = calibration.get(t.name)
        if stat is None or stat.norms is None:
            unreached.append(t.name)
            return replace(t, prune=replace(p, importance="magnitude"))
        return replace(t, prune=replace(p, norms=stat.norms))

    tensors = tuple(resolved(t) for t in plan.tensors)
    if unreached:
        note = (
            f"pruning: {len(unreached)} weight(s) saw no calibration token (e.g. {unreached[0]}); "
            "they are pruned by magnitude |w| instead of |w|·‖x‖"
        )
        calibration = replace(calibration, notes=(*calibration.notes, note))
    return replace(plan, tensors=tensors), calibration
