"""What a re-partition carries over from DeepSpeed's build of each layer besides its values, and what it refuses.

:func:`~dualpipe_plugin.deepspeed.layout.place_layers` rebuilds every layer from its ``LayerSpec`` and copies
the values DeepSpeed's own build gave it. Between ``PipelineModule(...)`` and ``deepspeed.initialize`` a
script may also have changed the built layers:

* frozen parameters (``requires_grad=False``) and cast dtypes: carried over to the rebuilt layer, by name;
* replaced, added or removed submodules or tensors (an adapter injection such as LoRA, a resized
  embedding): a layer rebuilt from its spec would silently drop the change,
  so it is refused, on every rank, naming the layer and the first difference.

:func:`describe_layers` runs before the rebuild on every rank (its own layers), :func:`exchange_records`
shares them in the pipeline (one ``all_gather_object``), :func:`carry_over` runs after the rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dualpipe_plugin.deepspeed.agreement import first_problem_in_pipeline
from dualpipe_plugin.deepspeed.config import DeepSpeedPipelineConfigError

__all__ = ["LayerRecord", "describe_layers", "exchange_records", "carry_over"]


@dataclass(frozen=True)
class LayerRecord:
    """One built layer as the rebuild must reproduce it."""

    kind: str
    """The layer's class (qualified name)."""
    modules: tuple[tuple[str, str], ...]
    """(path, class) of every submodule."""
    tensors: tuple[tuple[str, tuple[int, ...], str], ...]
    """(name, shape, dtype) of every state_dict entry."""
    frozen: frozenset[str]
    """Parameters with ``requires_grad=False``."""


def _class_name(obj) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _record(layer: nn.Module) -> LayerRecord:
    return LayerRecord(
        kind=_class_name(layer),
        modules=tuple((path, _class_name(sub)) for path, sub in layer.named_modules() if path),
        tensors=tuple((name, tuple(t.shape), str(t.dtype)) for name, t in layer.state_dict().items()),
        frozen=frozenset(name for name, p in layer.named_parameters() if not p.requires_grad),
    )


def _layers(module) -> dict[str, nn.Module]:
    """This rank's built layers by global key: ``"5"`` (spec index) or ``"tied_modules.<key>"``."""
    layers = {name: layer for name, layer in module._modules.items() if name.isdigit()}
    layers.update({f"tied_modules.{key}": layer for key, layer in module.tied_modules.items()})
    return layers


def describe_layers(module) -> dict[str, LayerRecord]:
    return {key: _record(layer) for key, layer in _layers(module).items()}


def exchange_records(module, mine: dict[str, LayerRecord]) -> dict[str, LayerRecord]:
    """Every pipeline rank's records; a tied module's from its lowest holder (whose values are copied)."""
    grid = module._grid
    gathered: list = [None] * grid.get_pipe_parallel_world_size()
    torch.distributed.all_gather_object(gathered, mine, group=grid.get_pipe_parallel_group())
    merged: dict[str, LayerRecord] = {}
    for records in gathered:
        for key, record in records.items():
            merged.setdefault(key, record)
    return merged


def _difference(built: LayerRecord, rebuilt: LayerRecord) -> str | None:
    if built.kind != rebuilt.kind:
        return f"it is a {built.kind}, its spec builds a {rebuilt.kind}"
    modules = dict(built.modules)
    for path, kind in rebuilt.modules:
        if modules.get(path) != kind:
            found = modules.get(path, "nothing")
            return f"it has {found} at {path!r} where its spec builds {kind}"
    extra = sorted(set(modules) - {path for path, _ in rebuilt.modules})
    if extra:
        return f"it has submodule(s) {extra} its spec does not build"
    tensors = {name: (shape, dtype) for name, shape, dtype in built.tensors}
    rebuilt_tensors = {name: shape for name, shape, _ in rebuilt.tensors}
    if tensors.keys() != rebuilt_tensors.keys():
        added = sorted(tensors.keys() - rebuilt_tensors.keys())
        missing = sorted(rebuilt_tensors.keys() - tensors.keys())
        return f"its tensors differ from its spec's (only in the built layer: {added}, only in the spec's: {missing})"
    for name, shape in rebuilt_tensors.items():
        if tensors[name][0] != shape:
            return f"{name!r} has shape {list(tensors[name][0])}, its spec builds {list(shape)}"
    return None


def carry_over(module, built: dict[str, LayerRecord], schedule: str) -> None:
    """After the rebuild: refuse layers that differ from their spec's build (on every rank), then give the
    rebuilt layers the built ones' frozen flags and dtypes. Runs before the values are copied."""
    problems = []
    layers = _layers(module)
    for key, layer in layers.items():
        record = built.get(key)
        if record is None:
            continue
        difference = _difference(record, _record(layer))
        if difference is not None:
            problems.append(f"layer {key} ({type(layer).__name__}) was changed after the PipelineModule was "
                            f"built: {difference}")
    found = first_problem_in_pipeline(problems[0] if problems else None, module._grid.get_pipe_parallel_group())
    if found is not None:
        raise DeepSpeedPipelineConfigError(
            f"pipeline.schedule={schedule!r} rebuilds this pipeline's layers from their LayerSpecs inside "
            f"deepspeed.initialize, which would drop that change ({found}; e.g. an "
            f"adapter injection): make the change inside the "
            f"layer's class (or after deepspeed.initialize), or leave out \"schedule\""
        )
    for key, layer in layers.items():
        record = built.get(key)
        if record is None:
            continue
        dtypes = {name: dtype for name, _, dtype in record.tensors}
        with torch.no_grad():
            for name, param in layer.named_parameters():
                param.requires_grad_(name not in record.frozen)
                if str(param.dtype) != dtypes.get(name, str(param.dtype)):
                    param.data = param.data.to(getattr(torch, dtypes[name].removeprefix("torch.")))
            for name, buffer in layer.named_buffers():
                if str(buffer.dtype) != dtypes.get(name, str(buffer.dtype)):
                    owner, _, attribute = name.rpartition(".")
                    target = layer.get_submodule(owner) if owner else layer
                    setattr(target, attribute, buffer.to(getattr(torch, dtypes[name].removeprefix("torch."))))
