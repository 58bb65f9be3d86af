"""``profile_model``: measure a user's model on this process and return its cost file.

>>> target = ProfileTarget.from_layers(layers, inputs=x, loss=lambda y: y.pow(2).mean())
>>> costs = profile_model(target, transport=transport)  # per-layer F, I, W, B, bytes; runtime overhead on the group
>>> costs = costs.with_link(measure_link(transport))    # under torch.distributed: one hop of the group
>>> costs.save("costs.json")                            # then: dualpipe-plugin advise --profile costs.json

A :class:`ProfileTarget` says what to run: the model as a row of layers (a list, an ``nn.Sequential``, a
DeepSpeed ``PipelineModule`` built on one stage, or a Megatron model from its provider, see
:mod:`~dualpipe_plugin.planner.sources`), one micro-batch of inputs, and how the last layer's output
becomes the loss. ``dualpipe-plugin profile --model MODULE:CALLABLE`` calls a function returning one.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from dualpipe_plugin.planner.layers import OptimizerFactory, default_optimizer, profile_layer_row
from dualpipe_plugin.planner.meter import tensors_in
from dualpipe_plugin.planner.link import measure_link_locally
from dualpipe_plugin.planner.overhead import (
    measure_action_overhead, measure_action_overhead_locally, measure_action_overhead_on_group,
)
from dualpipe_plugin.runtime.weight_grad import WeightSplitter
from dualpipe_plugin.schedules.cost_file import SOURCES, CostProfile, LayerCost, LinkCost, Runtime

__all__ = ["ProfileTarget", "profile_model", "profile_locally"]


@dataclass(frozen=True, kw_only=True)
class ProfileTarget:
    """A model as the profiler runs it: layers in order, one micro-batch, the loss."""

    layers: Sequence[Any]
    """Callables ``output = layer(input)`` in model order (modules, or functions bound to modules)."""
    inputs: Any
    """The first layer's input for one micro-batch (a tensor or a tuple of tensors)."""
    loss: Callable[[Any], torch.Tensor] | None = None
    """The last layer's output -> the scalar loss (None: the output's gradient is random)."""
    names: Sequence[str] | None = None
    attach: Sequence[str | None] | None = None
    """Per layer None, "next" or "previous" (see :mod:`~dualpipe_plugin.schedules.cost_file`)."""
    source: str = "layers"
    model: str = ""
    """A description written into the cost file."""
    weight_splitters: Sequence[WeightSplitter] = field(default=())
    """Binders of the framework's own linear layers to the B/W split (Megatron's), as its adapter uses."""

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("ProfileTarget has no layers; give the model's layers in order")
        if self.source not in SOURCES:
            raise ValueError(f"ProfileTarget source={self.source!r}; use one of {', '.join(SOURCES)}")
        for what, values in (("names", self.names), ("attach", self.attach)):
            if values is not None and len(values) != len(self.layers):
                raise ValueError(f"ProfileTarget has {len(self.layers)} layers but {len(values)} {what}; give one each")

    @classmethod
    def from_layers(cls, layers: Sequence[Any], inputs: Any, *, loss: Callable[[Any], torch.Tensor] | None = None,
                    model: str = "") -> "ProfileTarget":
        """A plain row of layers (a list or an ``nn.Sequential``), cut by layer index."""
        return cls(layers=list(layers), inputs=inputs, loss=loss, model=model or f"{len(layers)} layers")

    @classmethod
    def from_pipeline_module(cls, module: Any, inputs: Any, labels: Any = None, *, model: str = "") -> "ProfileTarget":
        """A DeepSpeed ``PipelineModule`` (see :func:`~dualpipe_plugin.planner.sources.pipeline_module_layers`)."""
        from dualpipe_plugin.planner.sources import pipeline_module_layers

        return pipeline_module_layers(cls, module, inputs, labels, model=model)

    @classmethod
    def from_megatron(cls, model_provider: Callable[..., Any], config: Any, batch: dict, *,
                      model: str = "") -> "ProfileTarget":
        """A Megatron-Core GPT from ``model_provider`` (see :func:`~dualpipe_plugin.planner.sources.megatron_layers`)."""
        from dualpipe_plugin.planner.sources import megatron_layers

        return megatron_layers(cls, model_provider, config, batch, model=model)


def _machine() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "cpus": torch.get_num_threads()}


def profile_model(
    target: ProfileTarget,
    *,
    repeats: int = 5,
    warmup: int = 2,
    optimizer: OptimizerFactory = default_optimizer,
    split_weights: bool = True,
    overhead_microbatches: int = 8,
    link: LinkCost | None = None,
    transport: Any = None,
) -> CostProfile:
    """Profile ``target`` on this process (see the module docstring): every layer's times and bytes, and the
    runtime's overhead per action of each kind (``overhead_microbatches=0`` skips it): measured on the pipeline
    group of ``transport`` when given (every rank of the group calls ``profile_model``, see
    :func:`~dualpipe_plugin.planner.overhead.measure_action_overhead_on_group`), else by one-rank runs on
    this process. ``link`` goes into the file as given (default: not measured, zero, with a note saying how to
    measure it)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"profile needs repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    costs: list[LayerCost] = profile_layer_row(
        target.layers, target.inputs, names=target.names, loss=target.loss, repeats=repeats, warmup=warmup,
        split_weights=split_weights, weight_splitters=target.weight_splitters, optimizer=optimizer,
    )
    if target.attach is not None:
        costs = [LayerCost(**{**_fields(cost), "attach": attach}) for cost, attach in zip(costs, target.attach)]
    runtime = Runtime()
    if overhead_microbatches and transport is not None:
        runtime = measure_action_overhead_on_group(target, costs, transport)
    elif overhead_microbatches:
        runtime = measure_action_overhead(target.layers, target.inputs, costs, loss=target.loss,
                                          microbatches=overhead_microbatches)
    shapes = [list(t.shape) for t in tensors_in(target.inputs)]
    dtypes = [str(t.dtype).replace("torch.", "") for t in tensors_in(target.inputs)]
    return CostProfile(
        layers=tuple(costs), source=target.source, model=target.model,
        microbatch={"inputs": shapes, "dtype": dtypes},
        runtime=runtime,
        link=link or LinkCost(note="not measured (not run under torch.distributed): edit latency_ms and "
                                   "bandwidth_bytes_per_s, or run dualpipe-plugin profile with --ranks / torchrun"),
        extra={"machine": _machine(), "repeats": repeats},
    )


def profile_locally(make_target: Callable[[], ProfileTarget], ranks: int, *, repeats: int = 5, warmup: int = 2,
                    overhead: bool = True) -> CostProfile:
    """What ``dualpipe-plugin profile --ranks N`` measures outside torchrun: the layers of ``make_target()`` on
    this process, then the hop and (with ``overhead``) the runtime's per-action overhead on ``ranks`` local
    gloo processes, each building the model with ``make_target`` (so it must be picklable: a module-level
    function, or a ``functools.partial`` of one)."""
    costs = profile_model(make_target(), repeats=repeats, warmup=warmup, overhead_microbatches=0)
    costs = costs.with_link(measure_link_locally(ranks))
    if overhead:
        costs = costs.with_runtime(measure_action_overhead_locally(make_target, costs.layers, ranks))
    return costs


def _fields(cost: LayerCost) -> dict:
    return {name: getattr(cost, name) for name in cost.__dataclass_fields__}

