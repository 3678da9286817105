"""Plan: decide what happens to every tensor and validate it all before any heavy work.

Only headers are read. The plan says, per tensor, whether it is quantized (and with which
effective scheme, after group-size fallback) or copied, how quantized tensors are cut into
row-block chunks, and which output shard each output tensor lands in. Any inconsistency is an
error here, in the first seconds, not at shard 91 of 94.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from compressor.config import LINEAR, QuantRule, RunConfig
from compressor.errors import ConfigError, InputError, OutputError
from compressor.formats import dtypes
from compressor.formats.checkpoint import Checkpoint, open_checkpoint
from compressor.formats.layout import OutputSpec, module_name, quantized_outputs
from compressor.formats.safetensors_io import TensorInfo
from compressor.math.quant import QuantArgs

__all__ = ["OutputShard", "Plan", "TensorPlan", "make_plan", "matches"]

# Chunks are whole rows, in multiples of 32: zero points are packed along rows, and 32 rows of
# any width 1..8 fill a whole number of int32 words, so no word straddles two chunks.
ROW_ALIGN = 32
# The default "Linear" target leaves these alone: transformers cannot load quantized embeddings,
# and lm_head is usually kept dense for accuracy (llm-compressor does the same).
_NOT_LINEAR = re.compile(r".*(embed|lm_head|wte|wpe|norm)")


@dataclass(frozen=True)
class TensorPlan:
    """One input tensor: where it is, and what happens to it."""

    index: int
    name: str
    source: str
    info: TensorInfo
    args: QuantArgs | None  # None: copied bit for bit
    chunks: tuple[tuple[int, int], ...] = ()
    note: str | None = None  # e.g. the group-size fallback, shown in the summary

    @property
    def key(self) -> str:
        """Staging name: an index, never the tensor name (names can hold '/' or '..')."""
        return f"t{self.index:05d}"

    @property
    def shape2d(self) -> tuple[int, int]:
        rows, cols = self.info.shape
        return rows, cols


@dataclass(frozen=True)
class OutputShard:
    file_name: str
    entries: tuple[OutputSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


@dataclass(frozen=True)
class Plan:
    config: RunConfig
    checkpoint: Checkpoint
    tensors: tuple[TensorPlan, ...]
    shards: tuple[OutputShard, ...]
    run_key: str
    notes: tuple[str, ...] = field(default=())
    # The destination already holds the output of this exact input and config: nothing to do.
    # This is what makes a scheduled deployment's rerun idempotent.
    up_to_date: bool = False

    @property
    def quantized(self) -> tuple[TensorPlan, ...]:
        return tuple(t for t in self.tensors if t.args is not None)

    @property
    def by_name(self) -> dict[str, TensorPlan]:
        return {t.name: t for t in self.tensors}

    @property
    def staging_root(self) -> Path:
        if self.config.staging_dir:
            return Path(self.config.staging_dir) / self.run_key
        dest = Path(self.config.destination)
        return dest.parent / f".{dest.name}.staging" / self.run_key

    @property
    def chunk_count(self) -> int:
        return sum(len(t.chunks) for t in self.tensors)


def matches(patterns: list[str], tensor_name: str) -> bool:
    """True if any pattern names the tensor or its module ("re:" patterns match from the start,
    as compressed-tensors matches them)."""
    candidates = (tensor_name, module_name(tensor_name))
    for pattern in patterns:
        if pattern.startswith("re:"):
            regex = re.compile(pattern[3:])
            if any(regex.match(c) for c in candidates):
                return True
        elif pattern in candidates:
            return True
    return False


def _is_default_linear(name: str, info: TensorInfo) -> bool:
    return (
        name.endswith(".weight")
        and len(info.shape) == 2
        and dtypes.is_float(info.dtype)
        and not _NOT_LINEAR.match(name)
    )


def _rule_for(
    rule_list: list[QuantRule], ignore: list[str], name: str, info: TensorInfo
) -> tuple[int, QuantRule] | None:
    if matches(ignore, name):
        return None
    for k, rule in enumerate(rule_list):
        explicit = [t for t in rule.targets if t != LINEAR]
        if (LINEAR in rule.targets and _is_default_linear(name, info)) or matches(explicit, name):
            return k, rule
    return None


def _effective_args(
    rule: QuantRule, name: str, source: str, cols: int, strict: bool
) -> tuple[QuantArgs, str | None]:
    """The scheme actually used for a tensor with `cols` inputs, after group-size fallback.

    compressed-tensors (and so transformers and vLLM) refuses a group size that does not divide
    the input dimension. The minmax layout is ours and allows a partial last group.
    """
    args = rule.args()
    if args.strategy != "group" or args.method == "minmax" or cols % args.group_size == 0:
        return args, None
    if strict:
        raise ConfigError(
            f"group size {args.group_size} does not divide the input dimension {cols}",
            path=source,
            tensor=name,
            hint="drop --strict-groups to fall back to a dividing group size, or pick a group "
            f"size that divides {cols}",
        )
    g = args.group_size // 2
    while g >= 32:
        if cols % g == 0:
            fallback = rule.args(group_size=g)
            return fallback, f"{name}: group {args.group_size} → {g} ({cols} inputs)"
        g //= 2
    channel = QuantArgs(
        bits=args.bits, method=args.method, symmetric=args.symmetric, strategy="channel"
    )
    return channel, f"{name}: group {args.group_size} → per-channel ({cols} inputs)"


def _row_chunks(rows: int, row_bytes: int, chunk_bytes: int) -> tuple[tuple[int, int], ...]:
    per_chunk = max(ROW_ALIGN, (chunk_bytes // max(row_bytes, 1)) // ROW_ALIGN * ROW_ALIGN)
    return tuple((r, min(r + per_chunk, rows)) for r in range(0, rows, per_chunk))


def make_plan(config: RunConfig) -> Plan:
    """Read headers, match rules, validate, and lay out chunks and output shards."""
    _check_destination(config)
    checkpoint = open_checkpoint(config.source)
    rules = config.recipe.quantization
    ignore = list(config.recipe.ignore)
    used_rules: set[int] = set()
    tensors: list[TensorPlan] = []
    notes: list[str] = []
    chunk_bytes = config.chunk_mb * 2**20
    for index, (name, (source, info)) in enumerate(checkpoint.tensors.items()):
        found = _rule_for(rules, ignore, name, info)
        if found is None:
            tensors.append(TensorPlan(index, name, source, info, None))
            continue
        k, rule = found
        used_rules.add(k)
        if len(info.shape) != 2 or not dtypes.is_float(info.dtype):
            raise ConfigError(
                f"matches quantization rule {k} but is a {len(info.shape)}-D {info.dtype} "
                "tensor; only 2-D float weights can be quantized",
                path=source,
                tensor=name,
                hint="narrow the rule's targets or add the tensor to ignore",
            )
        rows, cols = info.shape
        if rows == 0 or cols == 0:
            raise InputError(
                "is empty (a zero dimension)", path=source, tensor=name, hint="add it to ignore"
            )
        args, note = _effective_args(rule, name, source, cols, config.strict_groups)
        if note:
            notes.append(note)
        chunks = _row_chunks(rows, cols * dtypes.itemsize(info.dtype), chunk_bytes)
        tensors.append(TensorPlan(index, name, source, info, args, chunks, note))
    for k, rule in enumerate(rules):
        if k not in used_rules:
            raise ConfigError(
                f"quantization rule {k} (targets {rule.targets}) matches no tensor",
                path=str(checkpoint.root),
                hint="check the names with `compressor inspect SRC`; patterns need the "
                "'re:' prefix to be regular expressions",
            )
    shards = _lay_out_shards(tensors, config.max_shard_mb * 2**20)
    run_key = _run_key(checkpoint, config)
    up_to_date = _already_published(config, run_key)
    return Plan(config, checkpoint, tuple(tensors), shards, run_key, tuple(notes), up_to_date)


def output_specs(t: TensorPlan) -> list[OutputSpec]:
    if t.args is None:
        return [OutputSpec(t.name, t.info.dtype, t.info.shape, "copy", t.name)]
    return quantized_outputs(t.name, t.shape2d, t.info.dtype, t.args)


def _lay_out_shards(tensors: list[TensorPlan], limit: int) -> tuple[OutputShard, ...]:
    """Greedy size-based shards in input order; a tensor's outputs stay in one shard."""
    groups: list[list[OutputSpec]] = [[]]
    size = 0
    for t in tensors:
        specs = output_specs(t)
        nbytes = sum(s.nbytes for s in specs)
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].extend(specs)
        size += nbytes
    n = len(groups)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
    )
    return tuple(OutputShard(name, tuple(g)) for name, g in zip(names, groups, strict=True))


def _run_key(checkpoint: Checkpoint, config: RunConfig) -> str:
    payload = json.dumps(
        {"input": checkpoint.fingerprint(), "config": config.output_affecting()}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _check_destination(config: RunConfig) -> None:
    source = Path(config.source).resolve()
    dest = Path(config.destination).resolve()
    source_dir = source if source.is_dir() else source.parent
    if source.is_dir() and dest.is_relative_to(source):
        raise OutputError(
            "the destination lies inside the source checkpoint",
            path=str(dest),
            hint="choose a destination outside the input directory; the input is never modified",
        )
    if source_dir.is_relative_to(dest):
        raise OutputError(
            "the source checkpoint lies inside the destination",
            path=str(dest),
            hint="choose another destination",
        )


def _already_published(config: RunConfig, run_key: str) -> bool:
    """True if the destination holds this run's output; an error if it holds something else."""
    dest = Path(config.destination)
    if not dest.exists():
        return False
    try:
        published = json.loads((dest / "compression.json").read_text()).get("run_key")
    except (OSError, ValueError, AttributeError):
        published = None
    if published == run_key and (dest / "manifest.json").is_file():
        return True
    if config.overwrite:
        return False
    raise OutputError(
        "the destination already exists (and holds another input's or config's output)",
        path=str(dest),
        hint="pass --overwrite to replace it, or choose another destination",
    )
