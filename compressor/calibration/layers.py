"""Run a transformers decoder one layer at a time, weights read from the shards as needed.

The model is built from config.json with its parameters on the meta device (no memory) and its
buffers real (rotary frequencies, embedding scales are computed at construction). Only the
input embedding is loaded to start. One forward pass with every decoder layer replaced by a
recorder captures what the model hands each layer besides the hidden states (attention mask,
position embeddings, per-layer-type variants such as Gemma 3's sliding layers) and stops before
the final norm. Then, layer by layer: materialise that layer's weights (float32) from the
checkpoint, run it with a pre-hook on every `nn.Linear` that sums XᵀX of its input, and drop
the weights again. Memory: the embedding, one layer, and the activations of the samples run.
Besides XᵀX each input's largest magnitude is kept (NVFP4 W4A4's input global scale); a caller
that needs only that skips the products (`hessians=False`).

Modules that receive the *same* input tensor (q/k/v after the attention norm; gate/up) share
one statistic, computed once. An `nn.Linear` that no token reaches (an MoE expert the router
never picked) has no statistic; the caller falls back to data-free rounding for it.
Expert weights stored as 3-D parameters (fused experts) are not `nn.Linear` modules and get no
statistics either (same fallback).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compressor.errors import ConfigError

__all__ = ["DecoderRunner", "InputStats"]


@dataclass
class InputStats:
    """XᵀX (float32; None when not asked for) and max |x| of one input shared by `members`
    (module names), over `tokens` rows."""

    members: list[str]
    hessian: torch.Tensor | None
    tokens: int
    absmax: float
    cols: int


class _Stop(Exception):
    """Raised by the last recorder: the layers' inputs are known, the rest is not needed."""


class _Recorder(nn.Module):
    def __init__(self, index: int, seen: dict[int, tuple[torch.Tensor, dict[str, Any]]]) -> None:
        super().__init__()
        self.index = index
        self.seen = seen
        self.last = False

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args:
            raise ConfigError(
                "this architecture passes decoder layers positional arguments; calibration "
                "supports the transformers layers that take keyword arguments",
                hint="compress without --calibration (data-free rounding)",
            )
        self.seen[self.index] = (hidden_states, kwargs)
        if self.last:
            raise _Stop
        return hidden_states


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Construct modules with parameters on the meta device but real buffers."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None:
            p = module._parameters[name]
            assert p is not None
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=False)

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _find_layers(model: nn.Module, count: int) -> tuple[str, nn.ModuleList]:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return name, module
    raise ConfigError(
        f"cannot find the {count} decoder layers in {type(model).__name__}",
        hint="compress without --calibration (data-free rounding)",
    )


class DecoderRunner:
    """The layer-by-layer model of one checkpoint; `read(name)` returns a stored tensor."""

    def __init__(self, source: str | Path, read: Callable[[str], torch.Tensor]) -> None:
        try:
            from transformers import AutoConfig, AutoModelForCausalLM
        except ImportError:
            raise ConfigError(
                "calibration needs transformers", hint="pip install 'checkpoint-compressor[eval]'"
            ) from None
        self.read = read
        config = AutoConfig.from_pretrained(str(source))
        with _parameters_on_meta():
            self.model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        self.model.eval()
        text_config = getattr(config, "text_config", None) or config
        count = int(text_config.num_hidden_layers)
        self.prefix, self.layers = _find_layers(self.model, count)
        self.base = self._base_model()
        self._materialise(self.model.get_input_embeddings())

    def _base_model(self) -> nn.Module:
        """The module whose forward embeds and runs the layers (no LM head)."""
        owner = self.prefix.rsplit(".", 1)[0] if "." in self.prefix else ""
        return self.model.get_submodule(owner) if owner else self.model

    def __len__(self) -> int:
        return len(self.layers)

    def layer_name(self, i: int) -> str:
        return f"{self.prefix}.{i}"

    def _materialise(self, module: nn.Module) -> None:
        where = {id(m): n for n, m in self.model.named_modules()}
        root = where[id(module)]
        for name, param in list(module.named_parameters()):
            full = f"{root}.{name}" if root else name
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            value = self.read(f"{full}")
            if tuple(value.shape) != tuple(param.shape):
                raise ConfigError(
                    f"{full}: the checkpoint holds shape {tuple(value.shape)}, the model built "
                    f"from config.json expects {tuple(param.shape)}",
                    hint="check config.json against the weights",
                )
            owner._parameters[attr] = nn.Parameter(value.to(torch.float32), requires_grad=False)

    def _release(self, module: nn.Module) -> None:
        for name, param in list(module.named_parameters()):
            owner_name, _, attr = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            owner._parameters[attr] = nn.Parameter(param.to("meta"), requires_grad=False)

    @torch.no_grad()
    def layer_inputs(self, tokens: torch.Tensor) -> list[tuple[torch.Tensor, dict[str, Any]]]:
        """Per layer, (hidden states, keyword arguments) as the model's forward passes them;
        only layer 0's hidden states are real inputs (the recorders pass them through)."""
        seen: dict[int, tuple[torch.Tensor, dict[str, Any]]] = {}
        real = list(self.layers)
        recorders = [_Recorder(i, seen) for i in range(len(real))]
        recorders[-1].last = True
        for i, r in enumerate(recorders):
            self.layers[i] = r
        try:
            with contextlib.suppress(_Stop):
                self.base(input_ids=tokens, use_cache=False)
        finally:
            for i, layer in enumerate(real):
                self.layers[i] = layer
        if len(seen) != len(real):
            raise ConfigError(
                f"the model's forward reached {len(seen)} of {len(real)} decoder layers",
                hint="compress without --calibration (data-free rounding)",
            )
        return [seen[i] for i in range(len(real))]

    @torch.no_grad()
    def run_layer(
        self, i: int, hidden: torch.Tensor, kwargs: Mapping[str, Any], hessians: bool = True
    ) -> tuple[torch.Tensor, list[InputStats]]:
        """Layer i's output for `hidden`, and the input statistics of its linear modules."""
        layer = self.layers[i]
        self._materialise(layer)
        names = {m: f"{self.layer_name(i)}.{n}" for n, m in layer.named_modules()}
        inputs: list[tuple[str, torch.Tensor]] = []
        hooks = [
            m.register_forward_pre_hook(
                lambda mod, args, name=names[m]: inputs.append((name, args[0]))
            )
            for m in layer.modules()
            if isinstance(m, nn.Linear)
        ]
        try:
            out = layer(hidden, **kwargs)
        finally:
            for h in hooks:
                h.remove()
            self._release(layer)
        if isinstance(out, tuple):
            out = out[0]
        return out, _statistics(inputs, hessians)


def _statistics(inputs: list[tuple[str, torch.Tensor]], hessians: bool = True) -> list[InputStats]:
    """One XᵀX (if `hessians`) and max |x| per distinct input tensor."""
    by_tensor: dict[int, InputStats] = {}
    order: list[int] = []
    for name, x in inputs:
        key = id(x)
        if key in by_tensor:
            by_tensor[key].members.append(name)
            continue
        # float32 products over one shard's tokens (thousands: ~1e-6 relative), summed across
        # shards in float64 by the stage; a float64 product here would be 4-8x slower.
        flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
        hessian = flat.T @ flat if hessians else None
        absmax = float(flat.abs().max()) if flat.numel() else 0.0
        by_tensor[key] = InputStats([name], hessian, flat.shape[0], absmax, flat.shape[1])
        order.append(key)
    # An expert called twice (two routed slices) would appear twice: merge by member set.
    merged: dict[str, InputStats] = {}
    for key in order:
        s = by_tensor[key]
        label = json.dumps(sorted(s.members))
        if label in merged:
            m = merged[label]
            if m.hessian is not None and s.hessian is not None:
                m.hessian += s.hessian
            m.tokens += s.tokens
            m.absmax = max(m.absmax, s.absmax)
        else:
            merged[label] = InputStats(sorted(s.members), s.hessian, s.tokens, s.absmax, s.cols)
    return [merged[k] for k in sorted(merged)]
