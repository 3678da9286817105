"""The one model that describes a run.

The CLI flags, a recipe YAML file and the Prefect flow's parameters are three views of
`RunConfig`; the resolved config is written into the output's `compression.json`. Models are
frozen, reject unknown keys, and carry a version so old outputs stay readable.

Recipe YAML (``--recipe``)::

    version: 1
    quantization:              # rules, first match wins
      - targets: ["re:.*mlp.*"]
        bits: 4
        strategy: group        # tensor | channel | group
        group_size: 64
        symmetric: true
      - targets: ["Linear"]    # "Linear": the 2-D weights of linear layers (the default)
        bits: 8
        strategy: channel
    ignore: ["lm_head", "re:.*layers\\.0\\..*"]

Codebook rules (our `codebook` layout, see `formats/layout.py`)::

    quantization:
      - method: nf4              # NormalFloat4, absmax per block of 64 along each row
      # or
      - method: kmeans           # a learned codebook of 2^bits centroids per tensor
        bits: 3
        kmeans_iterations: 10
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from compressor import defaults
from compressor.errors import ConfigError
from compressor.formats.layout import CodebookArgs, Float4Args, Float8Args
from compressor.math.quant import QuantArgs

__all__ = [
    "LINEAR",
    "PRESETS",
    "BudgetConfig",
    "CalibrationConfig",
    "CandidateScheme",
    "PruneConfig",
    "QuantRule",
    "Recipe",
    "RunConfig",
    "build_config",
    "load_recipe",
]

LINEAR = "Linear"
# An absolute POSIX path or a URL with a scheme (s3://, gs://, file://): what a run submitted
# through Prefect's form must give, since the worker resolves anything else against its own cwd.
ABSOLUTE_OR_URL = r"^(/|[A-Za-z][A-Za-z0-9+.-]*://)"
"""Target meaning "the 2-D weights of linear layers" (embeddings and lm_head excluded)."""

Preset = Literal[
    "w8a16",
    "w4a16",
    "w4a16-asym",
    "minmax",
    "nf4",
    "kmeans4",
    "fp8",
    "fp8a16",
    "fp8-block",
    "nvfp4a16",
    "nvfp4",
    "mxfp4a16",
    "dense",
    "recipe",
]
PRESET_NOTES: dict[str, str] = {
    "w8a16": "int8 per channel; serving: vLLM (GPU), transformers",
    "w4a16": "int4 group 128; serving: vLLM (GPU and CPU), transformers",
    "w4a16-asym": "int4 group 128 with zero points; serving: vLLM (GPU and CPU), transformers",
    "fp8": "FP8 weights + dynamic FP8 activations (W8A8); serving: vLLM on FP8 GPUs",
    "fp8a16": "FP8 weights only; serving: vLLM (FP8 Marlin on GPU), transformers",
    "fp8-block": "FP8 per 128x128 block, DeepSeek-V3's layout; serving: vLLM on FP8 GPUs",
    "nvfp4a16": "FP4 weights, FP8 scale per 16; serving: vLLM (Blackwell, Marlin elsewhere)",
    "nvfp4": "NVFP4 W4A4, needs calibration; serving: vLLM on Blackwell GPUs",
    "mxfp4a16": "FP4 weights, power-of-two scale per 32; serving: vLLM (Blackwell)",
    "minmax": "the seed article's float-offset formula; study only (this tool reads it)",
    "nf4": "NormalFloat4 codebook; study only (this tool reads it)",
    "kmeans4": "a learned 16-entry codebook per tensor; study only (this tool reads it)",
    "dense": "no quantization (pruning alone)",
    "recipe": "the rules of the recipe given instead of a preset",
}
"""One line per preset: what it stores and where it runs (the run form and CLI help show it)."""

CODEBOOK_METHODS = ("nf4", "kmeans")
FLOAT_METHODS = ("fp8", "nvfp4", "mxfp4")  # fixed float codes: each its own format


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _valid_patterns(patterns: list[str]) -> list[str]:
    """Compile every "re:" pattern now, so a bad one is refused when the recipe loads (naming
    the key and the pattern), not as a traceback when the plan first matches a tensor."""
    for k, pattern in enumerate(patterns):
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as e:
                raise ValueError(
                    f"entry {k}, {pattern!r}, is not a valid regular expression ({e}); escape "
                    "special characters such as ( [ . with a backslash, or drop the 're:' prefix "
                    "for an exact name"
                ) from None
    return patterns


class QuantRule(_Frozen):
    """How to quantize the tensors that match `targets` (and no `ignore` pattern)."""

    targets: list[str] = Field(
        default_factory=lambda: [LINEAR],
        description='Module or tensor names, "re:<regex>" patterns, or "Linear" for all linear layers.',
    )
    method: Literal["int", "minmax", "nf4", "kmeans", "fp8", "nvfp4", "mxfp4"] = Field(
        "int",
        description='"int": compressed-tensors integer codes; "minmax": the float-offset formula '
        'round((x-min)/(max-min)·(2^b-1)) in this tool\'s own layout; "nf4": NormalFloat4 '
        'codes with an absmax per block of 64 along each row; "kmeans": a learned codebook of '
        '2^bits centroids per tensor (the last two in this tool\'s codebook layout); "fp8": '
        "FP8 E4M3 weights with a scale per channel or tensor (compressed-tensors float-quantized; "
        'bits is 8); "nvfp4": FP4 E2M1 weights, an FP8 scale per 16 inputs and a global scale; '
        '"mxfp4": FP4 E2M1 weights, a power-of-two scale per 32 inputs (compressed-tensors '
        "nvfp4/mxfp4-pack-quantized, weight-only).",
    )
    activations: Literal["none", "fp8-dynamic", "nvfp4"] = Field(
        "none",
        description='method fp8: "fp8-dynamic" also asks the server to quantize activations to '
        'FP8 per token at run time (W8A8-FP8); method nvfp4: "nvfp4" asks it to quantize them to '
        "NVFP4 (W4A4; a global scale per module measured on calibration data, which it needs); "
        "none: weight-only.",
    )
    bits: int = Field(4, ge=2, le=8, description="Bits per weight, 2 to 8.")
    kmeans_iterations: int = Field(
        10,
        ge=1,
        le=1000,
        description="method kmeans: Lloyd iterations (each one pass over the tensor's chunks); "
        "it stops earlier at a fixed point.",
    )
    kmeans_init: Literal["uniform", "histogram"] = Field(
        "histogram",
        description="method kmeans: starting centroids at equal steps of [min, max] (uniform), "
        "or at quantiles of a histogram of the weights (one more pass; usually fewer iterations).",
    )
    symmetric: bool = Field(True, description="Symmetric (no zero point) or asymmetric.")
    strategy: Literal["tensor", "channel", "group", "block"] = Field(
        "group",
        description="One scale per tensor, per output channel, per group of inputs, or (method "
        "fp8) per 128×128 block.",
    )
    group_size: int = Field(128, ge=1, description="Inputs per group (strategy group only).")
    rounding: Literal["rtn", "mse", "hqq", "gptq"] = Field(
        "rtn",
        description="How scales and codes are chosen: round-to-nearest min-max; 'mse', a clipping "
        "search per group; 'hqq', half-quadratic optimisation (on minmax, the hqq library's fit of "
        "the float offset); 'gptq', GPTQ's error feedback "
        "through the input Hessian (needs calibration). Same output format. With calibration, "
        "mse and hqq weight each input by its activations' second moment.",
    )

    scaling: Literal["none", "awq"] = Field(
        "none",
        description="'awq': before rounding, scale each input channel by its activations' "
        "magnitude to a power searched per module (AWQ), folded into the preceding norm or "
        "linear so the output stays a standard checkpoint (needs calibration; rounding rtn).",
    )

    _targets_compile = field_validator("targets")(_valid_patterns)

    @model_validator(mode="after")
    def _consistent(self) -> QuantRule:
        if self.method in CODEBOOK_METHODS:
            self._check_codebook()
        if self.method == "fp8":
            self._check_fp8()
        elif self.method in ("nvfp4", "mxfp4"):
            self._check_fp4()
        elif self.strategy == "block":
            raise ValueError(
                "strategy block (a scale per 128×128 block) goes with method fp8; integer "
                "schemes take tensor, channel or group"
            )
        elif self.activations != "none":
            raise ValueError(
                f"activations {self.activations!r} goes with method fp8 (fp8-dynamic) or nvfp4 "
                "(nvfp4); integer and codebook schemes here are weight-only"
            )
        if self.method == "minmax" and self.symmetric:
            raise ValueError(
                "method minmax is asymmetric by definition: set symmetric: false "
                "(or use method: int for a symmetric scheme)"
            )
        if not self.targets:
            raise ValueError('targets is empty: list names, "re:" patterns or "Linear"')
        if self.scaling == "awq" and (
            self.method != "int" or self.rounding != "rtn" or self.strategy == "tensor"
        ):
            raise ValueError(
                "scaling awq goes with method int, rounding rtn and strategy channel or group "
                f"(here method {self.method}, rounding {self.rounding}, strategy "
                f"{self.strategy})"
            )
        if self.rounding == "gptq" and self.method != "int":
            raise ValueError(
                f"rounding gptq writes integer codes: use method int, not {self.method}"
            )
        if self.rounding != "rtn" and self.strategy == "tensor":
            raise ValueError(
                f"rounding {self.rounding!r} searches per channel or group: use strategy "
                "channel or group, or rounding rtn"
            )
        return self

    def _check_fp8(self) -> None:
        """FP8 E4M3 has its own codes: 8 bits, symmetric, a scale per output channel."""
        wrong = []
        if self.bits not in (4, 8):  # 4 is the field's default, i.e. not given
            wrong.append(f"bits {self.bits} (FP8 is 8-bit)")
        if self.strategy not in ("channel", "group", "block"):  # group is the field's default
            wrong.append(f"strategy {self.strategy} (FP8 has a scale per channel or block)")
        if not self.symmetric:
            wrong.append("symmetric: false (FP8 scales are symmetric)")
        if self.rounding != "rtn":
            wrong.append(f"rounding {self.rounding} (FP8 rounds to the nearest code)")
        if self.activations not in ("none", "fp8-dynamic"):
            wrong.append(f"activations {self.activations} (FP8 takes fp8-dynamic or none)")
        if wrong:
            raise ValueError(f"method fp8 does not take {', '.join(wrong)}")

    def _check_fp4(self) -> None:
        """FP4 formats fix everything but the targets: E2M1 codes, symmetric, a group of 16
        (nvfp4) or 32 (mxfp4); refuse fields that would otherwise be silently ignored."""
        defaults_ = {"strategy": "group", "group_size": 128, "symmetric": True, "rounding": "rtn"}
        given = [f"{k} {getattr(self, k)}" for k, v in defaults_.items() if getattr(self, k) != v]
        if self.bits != 4:
            given.insert(0, f"bits {self.bits}")
        if self.activations not in ("none", self.method):  # nvfp4 weights take nvfp4 inputs
            given.append(f"activations {self.activations}")
        if given:
            group = 16 if self.method == "nvfp4" else 32
            raise ValueError(
                f"method {self.method} has fixed 4-bit E2M1 codes with a scale per {group} "
                f"inputs: drop {', '.join(given)}"
            )

    def _check_codebook(self) -> None:
        """Integer-scheme fields mean nothing to a codebook: refuse them rather than ignore them
        (a value equal to the default cannot be told apart from an absent one, and is fine)."""
        defaults_ = {"strategy": "group", "group_size": 128, "symmetric": True, "rounding": "rtn"}
        given = [k for k, v in defaults_.items() if getattr(self, k) != v]
        if self.method == "nf4" and self.bits != 4:
            raise ValueError(
                f"method nf4 has a fixed 4-bit code: drop bits ({self.bits}), or use method "
                f"kmeans with bits {self.bits} for a learned {2**self.bits}-entry codebook"
            )
        if given:
            where = (
                "one absmax per block of 64 along each row"
                if self.method == "nf4"
                else "one learned codebook per tensor"
            )
            raise ValueError(
                f"method {self.method} has its own granularity ({where}): drop "
                f"{', '.join(given)} (they apply to methods int and minmax)"
            )

    def args(
        self, group_size: int | None = None
    ) -> QuantArgs | CodebookArgs | Float8Args | Float4Args:
        if self.method == "nvfp4" or self.method == "mxfp4":
            return Float4Args(method=self.method, activations=self.activations == "nvfp4")
        if self.method == "fp8":
            return Float8Args(
                strategy="block" if self.strategy == "block" else "channel",
                dynamic_activations=self.activations == "fp8-dynamic",
            )
        if self.method == "nf4" or self.method == "kmeans":
            return CodebookArgs(
                method=self.method,
                bits=self.bits,
                iterations=self.kmeans_iterations,
                init=self.kmeans_init,
            )
        assert self.strategy != "block"  # refused for integer methods by _consistent
        return QuantArgs(
            bits=self.bits,
            method=self.method,
            symmetric=self.symmetric,
            strategy=self.strategy,
            group_size=group_size or self.group_size,
        )

    def describe(self) -> str:
        return self.args().describe()


class PruneConfig(_Frozen):
    """Pruning: which weights to remove (see `compressor/math/prune.py` for the exact rules)."""

    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="Fraction of weights removed.")
    scope: Literal["tensor", "global"] = Field(
        "tensor", description="One threshold per tensor, or one across all pruning targets."
    )
    importance: Literal["magnitude", "gradient", "activation"] = Field(
        "magnitude",
        description="|w|; |w·g| from a gradients checkpoint; |w|·‖x‖ (Wanda): input norms from "
        "the run's calibration data, or from an activations file.",
    )
    normalize: bool = Field(
        False, description="Divide each tensor's importance by its mean (fairer global scope)."
    )
    structure: str = Field(
        "unstructured",
        description='"unstructured", "row" (same rate in every output row) or "N:M" such as "2:4".',
    )
    schedule: dict[str, float] = Field(
        default_factory=dict,
        description='Per-name sparsity, e.g. {"re:.*mlp.*": 0.6}; each matching tensor is its own scope.',
    )
    targets: list[str] = Field(default_factory=lambda: [LINEAR], description="What may be pruned.")
    gradients: str | None = Field(None, description="Gradients checkpoint (same tensor names).")
    activations: str | None = Field(
        None,
        description="Input norms from elsewhere: one F32 vector per module. Without it, "
        "importance 'activation' takes ‖x‖ from the run's calibration data.",
    )
    sparse_format: Literal["dense", "bitmask"] = Field(
        "dense", description="Store pruned dense tensors with zeros, or as values + bitmask."
    )

    _targets_compile = field_validator("targets")(_valid_patterns)

    @field_validator("schedule")
    @classmethod
    def _schedule_compiles(cls, schedule: dict[str, float]) -> dict[str, float]:
        _valid_patterns(list(schedule))
        return schedule

    @model_validator(mode="after")
    def _consistent(self) -> PruneConfig:
        self.nm()  # validates the structure string
        if self.importance == "gradient" and not self.gradients:
            raise ValueError("importance 'gradient' needs gradients: a gradients checkpoint path")
        for pattern, value in self.schedule.items():
            if not 0.0 <= value < 1.0:
                raise ValueError(f"schedule[{pattern!r}] = {value}: sparsity must be in [0, 1)")
        return self

    @property
    def reads_calibration(self) -> bool:
        """Wanda without an activations file: the input norms come from the calibration."""
        return self.importance == "activation" and not self.activations

    def nm(self) -> tuple[int, int] | None:
        """(N, M) for an N:M structure, None otherwise."""
        if self.structure in ("unstructured", "row"):
            return None
        try:
            n, m = (int(v) for v in self.structure.split(":"))
        except ValueError:
            raise ValueError(
                f"structure {self.structure!r}: use unstructured, row, or N:M such as 2:4"
            ) from None
        if not 0 < n < m:
            raise ValueError(f"structure {self.structure}: N:M needs 0 < N < M (e.g. 2:4)")
        return n, m


class CandidateScheme(_Frozen):
    """One integer scheme the automatic budget may pick for a tensor."""

    bits: int = Field(ge=2, le=8)
    strategy: Literal["channel", "group"] = "group"
    group_size: int = Field(128, ge=1)
    symmetric: bool = True

    def args(self) -> QuantArgs:
        return QuantArgs(
            bits=self.bits,
            symmetric=self.symmetric,
            strategy=self.strategy,
            group_size=self.group_size,
        )


DEFAULT_CANDIDATES = [
    CandidateScheme(bits=8, strategy="channel"),
    CandidateScheme(bits=4, group_size=128),
    CandidateScheme(bits=4, group_size=64),
    CandidateScheme(bits=4, group_size=32),
    CandidateScheme(bits=3, group_size=64),
    CandidateScheme(bits=3, group_size=32),
    CandidateScheme(bits=2, group_size=32),
]


class BudgetConfig(_Frozen):
    """Pick each target's scheme automatically: least total squared error under a size budget
    (`target_bits`: average stored bits per target weight, scales, zero points and shapes
    counted), or least size under an error budget (`max_error`: relative Frobenius error over
    all targets). Candidates a tensor's shape cannot take (a group size that does not divide its
    input dimension) are skipped for that tensor."""

    target_bits: float | None = Field(None, gt=0, description="Average stored bits per weight.")
    max_error: float | None = Field(None, gt=0, description="Relative error over all targets.")
    candidates: list[CandidateScheme] = Field(default_factory=lambda: list(DEFAULT_CANDIDATES))

    @model_validator(mode="after")
    def _one_budget(self) -> BudgetConfig:
        if (self.target_bits is None) == (self.max_error is None):
            raise ValueError("give exactly one of target_bits and max_error")
        if not self.candidates:
            raise ValueError("candidates is empty")
        return self


class Recipe(_Frozen):
    """What to do to the weights, as written in a recipe file."""

    # Kept out of the JSON schema: the Prefect run form showed it as a constant to fill in.
    version: SkipJsonSchema[Literal[1]] = 1
    quantization: list[QuantRule] = Field(default_factory=lambda: [QuantRule()])
    pruning: PruneConfig | None = Field(None, description="Prune before quantizing.")
    budget: BudgetConfig | None = Field(
        None, description="Choose each target's scheme automatically under a size/error budget."
    )
    ignore: list[str] = Field(
        default_factory=list, description="Names or re: patterns never compressed."
    )
    fused: list[list[str] | Literal["experts"]] | None = Field(
        None,
        description="Modules that inference servers load as one and that must share a scheme: "
        "lists of sibling module names (e.g. [q_proj, k_proj, v_proj]) or 'experts' (all expert "
        "linears of one MoE block). Default: from config.json's model_type (stages/fused.py); "
        "[] turns the check off.",
    )

    _ignore_compiles = field_validator("ignore")(_valid_patterns)

    @model_validator(mode="before")
    @classmethod
    def _single_rule(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("quantization"), dict):
            data = {**data, "quantization": [data["quantization"]]}
        return data

    @model_validator(mode="after")
    def _float_alone(self) -> Recipe:
        """FP8 writes compressed-tensors `float-quantized`, NVFP4 and MXFP4 their own
        `*-pack-quantized`; one output holds one format here, and the budget's candidates are
        integer."""
        methods = {r.method for r in self.quantization}
        floats = sorted(methods & set(FLOAT_METHODS))
        if not floats:
            return self
        if methods != {floats[0]}:
            other = sorted(methods - {floats[0]})[0]
            raise ValueError(
                f"rules with method {floats[0]} cannot be mixed with method {other} rules in "
                f"one run (one output, one format): use {floats[0]} for every rule (ignore what "
                f"stays dense), or no {floats[0]} rule"
            )
        if self.budget is not None:
            raise ValueError(
                "an automatic budget chooses among integer schemes and cannot be combined with "
                f"method {floats[0]}: drop the budget, or the {floats[0]} rules"
            )
        return self

    @model_validator(mode="after")
    def _codebooks_alone(self) -> Recipe:
        """Codebook methods write their own layout and config block: they are not mixed with
        integer rules (one config.json cannot be both compressed-tensors and ours), pruning, or
        a budget (whose candidates are integer schemes)."""
        codebook = [r.method for r in self.quantization if r.method in CODEBOOK_METHODS]
        if not codebook:
            return self
        integer = sorted({r.method for r in self.quantization} - set(CODEBOOK_METHODS))
        if integer:
            raise ValueError(
                f"rules with method {codebook[0]} cannot be mixed with method "
                f"{integer[0]} rules in one run: the output's config.json describes one layout. "
                "Use codebook methods (nf4, kmeans) for every rule, or integer methods only"
            )
        if self.budget is not None:
            raise ValueError(
                f"an automatic budget chooses among integer schemes and cannot be combined with "
                f"method {codebook[0]}: drop the budget, or the codebook rules"
            )
        if self.pruning is not None:
            raise ValueError(
                f"pruning is not supported with method {codebook[0]} yet (a k-means codebook "
                "need not contain 0): prune with an integer scheme such as w4a16-asym"
            )
        return self


PRESETS: dict[str, Recipe] = {
    "dense": Recipe(quantization=[]),  # no quantization: pruning alone
    "w8a16": Recipe(quantization=[QuantRule(bits=8, symmetric=True, strategy="channel")]),
    "w4a16": Recipe(quantization=[QuantRule(bits=4, symmetric=True, strategy="group")]),
    "w4a16-asym": Recipe(quantization=[QuantRule(bits=4, symmetric=False, strategy="group")]),
    "minmax": Recipe(
        quantization=[QuantRule(method="minmax", bits=4, symmetric=False, strategy="group")]
    ),
    "nf4": Recipe(quantization=[QuantRule(method="nf4")]),
    "kmeans4": Recipe(quantization=[QuantRule(method="kmeans", bits=4)]),
    "fp8": Recipe(
        quantization=[
            QuantRule(method="fp8", bits=8, strategy="channel", activations="fp8-dynamic")
        ]
    ),
    "fp8a16": Recipe(quantization=[QuantRule(method="fp8", bits=8, strategy="channel")]),
    "fp8-block": Recipe(
        quantization=[QuantRule(method="fp8", bits=8, strategy="block", activations="fp8-dynamic")]
    ),
    "nvfp4a16": Recipe(quantization=[QuantRule(method="nvfp4")]),
    "nvfp4": Recipe(quantization=[QuantRule(method="nvfp4", activations="nvfp4")]),
    "mxfp4a16": Recipe(quantization=[QuantRule(method="mxfp4")]),
}


class SlurmCluster(_Frozen):
    """A per-run Dask cluster of SLURM jobs (dask-jobqueue's SLURMCluster): each job runs
    `processes` single-threaded workers; the run waits for all of them, then starts."""

    jobs: int = Field(1, ge=1, description="SLURM jobs to submit.")
    processes: int = Field(1, ge=1, description="Worker processes per job.")
    memory: str = Field("16GB", description="Memory per job, e.g. 16GB.")
    walltime: str = Field("04:00:00", description="Job time limit.")
    queue: str | None = Field(None, description="Partition (sbatch -p).")
    account: str | None = Field(None, description="Account (sbatch -A).")
    python: str | None = Field(
        None, description="Python the jobs run workers with (default: this one)."
    )
    job_extra_directives: list[str] = Field(
        default_factory=list, description='Extra #SBATCH lines, e.g. ["--gres=gpu:1"].'
    )
    start_timeout_s: int = Field(
        1800, ge=1, description="How long to wait for every worker to join before giving up."
    )


class CalibrationConfig(_Frozen):
    """Sample data the model is run on, for GPTQ, activation-weighted rounding and the
    output-error budget (stages/calibrate.py)."""

    path: str = Field(
        description="A UTF-8 text file (tokenized with the source's tokenizer) or a .npy file "
        "of token ids (1-D stream or 2-D rows)."
    )
    samples: int = Field(64, ge=1, description="Windows of seq_len tokens to run.")
    seq_len: int = Field(512, ge=8, description="Tokens per window.")
    dampening: float = Field(
        0.01, gt=0, le=1, description="GPTQ: λ added to diag(XᵀX), as a fraction of its mean."
    )
    act_order: bool = Field(
        True,
        description="GPTQ: quantize the columns by decreasing diag(XᵀX), every group's "
        "parameters chosen first from the original weights (static act-order: the output "
        "format is unchanged, no g_idx).",
    )


class RunConfig(_Frozen):
    """Everything that decides a run's output, plus where and how it runs."""

    version: SkipJsonSchema[Literal[1]] = 1  # not in the run form (see Recipe.version)
    # The run form's JSON schema asks for absolute paths or URLs, so the Prefect server refuses
    # a relative one when the run is submitted: it would resolve on the worker, not where the
    # form was filled. The CLI resolves relative paths itself, so the model does not enforce it.
    source: str = Field(
        description="Input checkpoint directory or .safetensors file: an absolute path or a "
        "URL (s3://…).",
        json_schema_extra={"pattern": ABSOLUTE_OR_URL, "minLength": 2},
    )
    destination: str = Field(
        description="Output directory (must not exist unless overwrite): an absolute path or "
        "a URL.",
        json_schema_extra={"pattern": ABSOLUTE_OR_URL, "minLength": 2},
    )
    preset: Preset = Field(
        "w4a16",
        description="Named scheme. "
        + " · ".join(f"{name}: {note}" for name, note in PRESET_NOTES.items()),
    )
    recipe: Recipe = Field(default_factory=lambda: PRESETS["w4a16"])
    recipe_yaml: str | None = Field(
        None,
        description="A recipe written as in a recipe file (YAML), or the path of a recipe file, "
        "in place of the recipe fields above. Its quantization rules need preset 'recipe'; "
        "without rules it adds pruning, budget or ignore to the preset's.",
    )
    strict_groups: bool = Field(
        False,
        description="Refuse tensors whose input size the group size does not divide, instead of "
        "falling back to the largest dividing group size or per-channel.",
    )
    chunk_mb: int = Field(defaults.CHUNK_MB, ge=1, description="Target input MB per chunk.")
    max_shard_mb: int = Field(defaults.MAX_SHARD_MB, ge=1, description="Output shard size in MB.")
    workers: int | None = Field(
        None, ge=0, description="Local Dask workers (None: one per core; 0: serial)."
    )
    worker_kind: Literal["auto", "threads", "processes"] = Field(
        "auto",
        description="What the local workers are: threads of this process or worker processes. "
        "auto: threads when every chunk takes the fused CPU kernels (they release the GIL, and "
        "threads start in milliseconds), processes otherwise (torch paths scale better).",
    )
    scheduler: str | None = Field(
        None, description="Address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786."
    )
    listen: str = Field(
        "127.0.0.1",
        description="Interface an embedded local cluster listens on (scheduler, workers, nannies, "
        "HTTP endpoints): 127.0.0.1, this machine only, by default; 0.0.0.0 (or a host's "
        "address) opens it to other hosts, without authentication.",
    )
    dashboard: bool = Field(
        False,
        description="Serve an embedded cluster's Dask dashboard on <listen>:8787 (a free port "
        "when 8787 is taken; the pages need bokeh).",
    )
    verbose: bool = Field(
        False,
        description="Also log an embedded cluster's own INFO lines (scheduler, workers, "
        "connections); by default only its errors, and in a flow run its warnings.",
    )
    gpu: bool = Field(
        False,
        description="Start a local dask-cuda cluster (one worker per GPU; needs the gpu extra).",
    )
    slurm: SlurmCluster | None = Field(
        None,
        description="Start this run's own Dask cluster as SLURM jobs (dask-jobqueue), stopped "
        "when the run ends; its scheduler listens on `listen` (set it to an address the "
        "compute nodes reach).",
    )
    staging_dir: str | None = Field(
        None, description="Where Zarr staging lives (default: beside the destination)."
    )
    evaluate: bool = Field(
        False,
        description="After compressing, measure perplexity of the original and the output "
        "(needs the eval extra; the input must be a transformers model with a tokenizer).",
    )
    eval_tokens: int = Field(512, ge=16, description="Tokens of text scored by the evaluation.")
    overwrite: bool = Field(False, description="Replace an existing destination.")
    keep_staging: bool = Field(False, description="Keep the staging store after success.")
    skip_nonfinite: bool = Field(
        False,
        description="Leave target weights that hold NaN or infinite values unquantized (copied "
        "bit for bit, listed under the report's notes) instead of refusing the run.",
    )
    calibration: CalibrationConfig | None = Field(
        None,
        description="Run the model on sample text first (needs the eval extra and a transformers "
        "checkpoint): rounding gptq needs it; mse and hqq then weight inputs by activation.",
    )

    @model_validator(mode="before")
    @classmethod
    def _recipe_from_preset(cls, data: Any) -> Any:
        """The preset decides the quantization rules unless the recipe brings its own.

        No recipe: the preset's. A recipe given as a mapping (flow parameters, the run form,
        JSON) without quantization rules: the preset's rules with the recipe's other fields
        (pruning, budget, ignore). A mapping with rules beside a preset whose rules differ is a
        conflict, refused: the form sends a recipe object with every run, and the preset it
        shows must not silently lose to it (or win over rules the user typed)."""
        if not isinstance(data, dict):
            return data
        if data.get("recipe_yaml"):
            data = _with_recipe_text(data)
        preset = data.get("preset", "w4a16")
        recipe = data.get("recipe")
        if recipe is None:
            if preset == "recipe":
                raise ValueError("preset 'recipe' needs a recipe")
            if preset in PRESETS:
                data = {**data, "recipe": PRESETS[preset]}
            return data
        if not isinstance(recipe, dict) or preset == "recipe" or preset not in PRESETS:
            return data
        rules = recipe.get("quantization")
        if not rules:
            quantization = PRESETS[preset].model_dump()["quantization"]
            return {**data, "recipe": {**recipe, "quantization": quantization}}
        given = Recipe.model_validate({"quantization": rules}).quantization
        if given != PRESETS[preset].quantization:
            raise ValueError(
                f"preset {preset!r} and the recipe's quantization rules disagree: choose preset "
                "'recipe' to use the rules as written, or remove the rules to use the preset's"
            )
        return data

    @model_validator(mode="after")
    def _calibrated_rules(self) -> RunConfig:
        roundings = {r.rounding for r in self.recipe.quantization}
        if self.calibration is None and "gptq" in roundings:
            raise ValueError(
                "rounding gptq needs calibration data: add --calibration FILE (a text file or "
                "a .npy of token ids), or choose rounding rtn, mse or hqq"
            )
        w4a4 = any(r.activations == "nvfp4" for r in self.recipe.quantization)
        awq = any(r.scaling == "awq" for r in self.recipe.quantization)
        if awq and self.calibration is None:
            raise ValueError(
                "awq scales inputs by their activations: add --calibration FILE (a text file or "
                "a .npy of token ids), or drop --method awq"
            )
        if awq and (self.recipe.budget is not None or self.recipe.pruning is not None):
            raise ValueError(
                "awq changes the weights before rounding; it does not combine with a budget "
                "(--target-bits/--max-error) or pruning here: drop one of them"
            )
        if self.calibration is None and w4a4:
            raise ValueError(
                "nvfp4 activations (W4A4) need calibration data for each module's input global "
                "scale: add --calibration FILE (a text file or a .npy of token ids), or use "
                "preset nvfp4a16 (weight-only)"
            )
        pruning = self.recipe.pruning
        wanda = pruning is not None and pruning.reads_calibration
        if wanda and self.calibration is None:
            raise ValueError(
                "pruning importance 'activation' (Wanda) weighs each input by its norm ‖x‖: add "
                "--calibration FILE (a text file or a .npy of token ids), or --activations FILE "
                "(one F32 vector of input norms per module)"
            )
        # Only the non-default is refused: the run form sends every field, at its default.
        natural = self.calibration is not None and not self.calibration.act_order
        if natural and "gptq" not in roundings:
            raise ValueError(
                "calibration act_order false (--no-act-order) sets the order GPTQ walks the "
                "columns in, and no rule uses rounding gptq: add --method gptq, or drop it"
            )
        if (
            self.calibration is not None
            and self.recipe.budget is None
            and roundings <= {"rtn"}
            and not w4a4
            and not awq
            and not wanda
        ):
            raise ValueError(
                "calibration is read by rounding gptq, mse or hqq, by nvfp4 activations, by "
                "pruning importance activation and by a budget (--target-bits/--max-error); "
                "with rounding rtn it would run the model "
                "for nothing: add --method gptq (or --rounding hqq), or drop --calibration"
            )
        return self

    @field_validator("listen")
    @classmethod
    def _an_interface(cls, listen: str) -> str:
        """`listen` is an interface, not an address: no scheme, no port (Dask picks free ports)."""
        try:
            ipaddress.ip_address(listen)
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", listen):
                raise ValueError(
                    f"{listen!r} is not an interface: give an IP address such as 127.0.0.1 "
                    "(this machine only) or 0.0.0.0 (every interface), or a host name, without "
                    "scheme or port"
                ) from None
        return listen

    def output_affecting(self) -> dict[str, Any]:
        """The fields that change the output bytes (hashed into the staging key): the recipe,
        how shards are laid out, chunking (error figures and k-means sums follow the chunks)."""
        fields = self.model_dump(
            include={
                "version",
                "recipe",
                "strict_groups",
                "chunk_mb",
                "max_shard_mb",
                "skip_nonfinite",
            }
        )
        if self.calibration is not None:  # the file counts by its bytes (plan's run key)
            fields["calibration"] = self.calibration.model_dump(exclude={"path"})
        return fields


def _with_recipe_text(data: dict[str, Any]) -> dict[str, Any]:
    """`recipe_yaml` (YAML text, or a recipe file's path) parsed into `recipe`. The run form
    also sends the recipe fields, at their defaults; anything set there as well is a conflict."""
    text = str(data["recipe_yaml"])
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"recipe_yaml is not valid YAML: {e}") from None
    if isinstance(parsed, str) and "\n" not in text.strip():  # one line, not a mapping: a path
        path = Path(parsed).expanduser()
        try:
            parsed = yaml.safe_load(path.read_text())
        except OSError as e:
            raise ValueError(f"recipe_yaml: cannot read recipe file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"recipe_yaml: {path} is not valid YAML: {e}") from None
    if not isinstance(parsed, dict):
        raise ValueError(
            "recipe_yaml must be a YAML mapping (quantization:, pruning:, budget:, ignore:) or "
            "the path of a recipe file"
        )
    given = data.get("recipe")
    if isinstance(given, dict):
        set_too = [k for k, v in given.items() if k != "version" and v not in (None, [], {})]
        if set_too:
            raise ValueError(
                f"recipe_yaml and the recipe fields ({', '.join(sorted(set_too))}) are both "
                "given: write the whole recipe in recipe_yaml, or leave it empty"
            )
    elif isinstance(given, Recipe):
        raise ValueError("recipe_yaml and recipe are both given: keep one")
    return {**data, "recipe": parsed, "recipe_yaml": None}


def load_recipe(path: str | Path) -> Recipe:
    """Parse and validate a recipe YAML file; errors name the file and the offending key."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read recipe: {e.strerror}", path=str(path)) from e
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe is not valid YAML: {e}", path=str(path)) from e
    if not isinstance(data, dict):
        raise ConfigError(
            "recipe must be a YAML mapping with a 'quantization' key",
            path=str(path),
            hint="see the recipe format in README.md",
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        raise ConfigError(
            "invalid recipe:\n" + _validation_summary(e),
            path=str(path),
            hint="see the recipe format in README.md",
        ) from e


def build_config(
    source: str,
    destination: str,
    *,
    preset: str = "w4a16",
    recipe_path: str | Path | None = None,
    bits: int | None = None,
    strategy: str | None = None,
    group_size: int | None = None,
    rounding: str | None = None,
    pruning: dict[str, Any] | None = None,
    budget: dict[str, Any] | None = None,
    **run_options: Any,
) -> RunConfig:
    """Resolve CLI-style options into a `RunConfig`: preset or recipe, then overrides.

    `pruning` holds pruning fields (sparsity, scope, importance, …) given on the command line;
    they override the recipe's pruning block, field by field.
    """
    if recipe_path is not None:
        recipe = load_recipe(recipe_path)
        preset = "recipe"
    elif preset in PRESETS:
        recipe = PRESETS[preset]
    else:
        raise ConfigError(
            f"unknown preset {preset!r}",
            hint=f"use one of {', '.join(PRESETS)} or --recipe FILE",
        )
    awq = rounding == "awq"  # --method awq: equivalent scaling, then round to nearest
    overrides = {
        k: v
        for k, v in {
            "bits": bits,
            "strategy": strategy,
            "group_size": group_size,
            "rounding": None if awq else rounding,
            "scaling": "awq" if awq else None,
        }.items()
        if v is not None
    }
    try:
        if overrides:
            rules = [
                QuantRule.model_validate({**r.model_dump(), **overrides})
                for r in recipe.quantization
            ]
            recipe = recipe.model_copy(update={"quantization": rules})
        if budget:
            base_budget = recipe.budget.model_dump() if recipe.budget else {}
            if "target_bits" in budget or "max_error" in budget:  # the CLI picks one kind
                base_budget = {k: v for k, v in base_budget.items() if k == "candidates"}
            recipe = recipe.model_copy(
                update={"budget": BudgetConfig.model_validate({**base_budget, **budget})}
            )
        if pruning:
            base = recipe.pruning.model_dump() if recipe.pruning else {}
            prune = PruneConfig.model_validate({**base, **pruning})
            recipe = recipe.model_copy(update={"pruning": prune})
        return RunConfig(
            source=str(source),
            destination=str(destination),
            preset=preset,  # type: ignore[arg-type]
            recipe=recipe,
            **run_options,
        )
    except ValidationError as e:
        if len(e.errors()) == 1:  # one message on one line, as every CLI error
            item = e.errors()[0]
            where = ".".join(str(p) for p in item["loc"])
            message = item["msg"].removeprefix("Value error, ")
            raise ConfigError(f"invalid options: {where + ': ' if where else ''}{message}") from e
        raise ConfigError("invalid options:\n" + _validation_summary(e)) from e


def _validation_summary(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"  - {where}: {item['msg']}")
    return "\n".join(lines)
