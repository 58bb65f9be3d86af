"""Re-partition a built ``PipelineModule`` in place into this rank's chunks of a schedule's placement.

DeepSpeed builds a ``PipelineModule`` for ``num_stages`` = P stages: rank r keeps the layer specs
``parts[r]:parts[r+1]``. A DualPipe schedule wants other slices: dualpipev cuts the same spec list into 2P
stages (rank r holds stages r and 2P-1-r), dualpipe into P stages held twice (rank r holds r and P-1-r).
:func:`place_layers` does it with DeepSpeed's own machinery, on the user's module object:

1. the partition: the module's own ``_partition_layers`` (uniform / parameters / type:REGEX through
   ``deepspeed.runtime.utils``), run with ``num_stages`` set to the placement's stage count; or explicit
   layer-spec boundaries, ``"partition_method": "boundaries:0,3,5,8"`` in the config's ``"pipeline"``
   section (what ``dualpipe-plugin advise --profile`` prints: stage s holds specs ``[b_s, b_s+1)``);
2. the layers: the module's own ``_build`` once per chunk with ``_set_bounds`` (as DeepSpeed's
   DualPipeVModule does per phase), so layers keep their GLOBAL index as their name (``"5.linear.weight"``)
   and their checkpoint file (``layer_05-model_states.pt``); a TiedLayerSpec key used by both chunks of
   a rank is one module;
3. the initial weights: every layer is copied from the rank that built it in DeepSpeed's own P-stage
   build (a tied module from its first holder, whose copy DeepSpeed already broadcast), so the model
   starts exactly where DeepSpeed's TrainSchedule would, whatever the layers' initialisation does
   with the random state (which is saved and restored around the rebuild); frozen flags and dtypes a
   script set on the built layers are carried too, and a layer changed beyond that (a replaced
   submodule) is refused (:mod:`~dualpipe_plugin.deepspeed.layer_record`);
4. tied weights: DeepSpeed's ``tied_comms`` recomputed for the new placement (one group per pipeline over
   the pipeline ranks that hold the key; ``ds_pipe_replicated`` on every copy but the first), so
   ``_exec_reduce_tied_grads`` and ``_synchronize_tied_weights`` work unchanged;
5. dualpipe: ``ds_pipe_replicated`` on the second (mirrored) copy of every stage, so ZeRO's and the bf16
   optimizer's gradient norms count each stage once.

1f1b and zb1p keep DeepSpeed's own slices: nothing is rebuilt.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from dualpipe_plugin.deepspeed.config import DeepSpeedPipelineConfigError
from dualpipe_plugin.deepspeed.layer_record import carry_over, describe_layers, exchange_records
from dualpipe_plugin.schedules import Placement

__all__ = ["ChunkLayout", "ModuleLayout", "place_layers", "partition_method_of"]

_METHOD_ATTR = "_dualpipe_partition_method"
"""Where the registration's observer of ``PipelineModule._partition_layers`` records the method."""


def partition_method_of(module) -> str | None:
    """The ``partition_method`` the module was built with, if it was built after the import."""
    return module.__dict__.get(_METHOD_ATTR)


@dataclass
class ChunkLayout:
    """One chunk of this rank: a contiguous slice ``[start, stop)`` of the module's layer specs."""

    index: int
    stage: int
    start: int
    stop: int
    funcs: list
    """The slice's ``forward_funcs`` as DeepSpeed's ``_build`` made them."""
    fwd_map: dict
    modules: list[nn.Module]
    """Distinct modules of the slice in spec order (a tied module once), for the executor."""
    checkpointable: dict = field(default_factory=dict)
    """(interval, checkpoint function) -> the module's ``is_checkpointable_results`` for this chunk."""


class ModuleLayout:
    """This rank's chunks of a PipelineModule, and which of them the module's ``forward`` runs."""

    def __init__(self, module, chunks: list[ChunkLayout], parts: list[int], tied_param_ids: frozenset[int]):
        self.module = module
        self.chunks = chunks
        self.parts = parts
        self.tied_param_ids = tied_param_ids
        """``id`` of every tied parameter on this rank (their gradients go through the tied groups)."""
        self.active: int | None = None
        self.activate(0)

    def activate(self, index: int) -> None:
        """Make chunk ``index`` what ``module.forward`` runs (its funcs, bounds and checkpoint blocks)."""
        chunk, module = self.chunks[index], self.module
        # Plain attributes of the module, set in its __dict__ (nn.Module.__setattr__ costs more; this
        # runs before every forward).
        attributes = module.__dict__
        attributes["forward_funcs"], attributes["fwd_map"] = chunk.funcs, chunk.fwd_map
        attributes["_local_start"], attributes["_local_stop"] = chunk.start, chunk.stop
        interval = module.activation_checkpoint_interval
        if interval > 0:
            key = (interval, module.activation_checkpoint_func)
            cached = chunk.checkpointable.get(key)
            if cached is None:
                # The module caches one interval's results; they belong to the previously active chunk.
                module.is_checkpointable_results_interval = None
                module._precompute_checkpointable_values()
                cached = chunk.checkpointable[key] = list(module.is_checkpointable_results)
            module.is_checkpointable_results = cached
            module.is_checkpointable_results_interval = interval
        self.active = index

    @contextmanager
    def activated(self, index: int) -> Iterator[None]:
        previous = self.active
        self.activate(index)
        try:
            yield
        finally:
            if previous is not None:
                self.activate(previous)


# --- the partition -----------------------------------------------------------------------------------


_BOUNDARIES = "boundaries:"


def _explicit_parts(method: str, num_parts: int, num_specs: int) -> list[int]:
    """``boundaries:b0,b1,...,bS`` -> the parts, checked against the schedule's stage count."""
    text = method[len(_BOUNDARIES):]
    try:
        parts = [int(item) for item in text.split(",")]
    except ValueError:
        parts = []
    if (len(parts) != num_parts + 1 or parts[0] != 0 or parts[-1] != num_specs
            or any(a >= b for a, b in zip(parts, parts[1:]))):
        raise DeepSpeedPipelineConfigError(
            f"pipeline.partition_method={method!r} does not cut the {num_specs} layer specs into the schedule's "
            f"{num_parts} stages; give {num_parts + 1} increasing layer-spec indices from 0 to {num_specs}, e.g. "
            f"\"boundaries:{','.join(str(num_specs * s // num_parts) for s in range(num_parts + 1))}\" (dualpipe-plugin "
            f"advise --profile prints the ones for this schedule)"
        )
    return parts


def _partition(module, method: str, num_parts: int) -> list[int]:
    """The module's own partition of its specs into ``num_parts`` (its state is left as it was), or the
    explicit ``boundaries:`` given."""
    if method.lower().startswith(_BOUNDARIES):
        return _explicit_parts(method, num_parts, len(module._layer_specs))
    saved = (module.num_stages, module.parts, module._local_start, module._local_stop)
    module.num_stages = num_parts
    try:
        module._partition_layers(method=method)
        parts = [int(bound) for bound in module.parts]
    finally:
        module.num_stages, module.parts, module._local_start, module._local_stop = saved
    return parts


def _stage_of(parts: list[int], layer: int) -> int:
    for stage in range(len(parts) - 1):
        if parts[stage] <= layer < parts[stage + 1]:
            return stage
    raise AssertionError(f"layer {layer} is in no stage of {parts}")


# --- the rebuild -------------------------------------------------------------------------------------


@contextmanager
def _preserved_random_state() -> Iterator[None]:
    """Layer constructors and ``seed_layers`` draw from or reseed every RNG; leave them as DeepSpeed did."""
    python_state = random.getstate()
    try:
        import numpy

        numpy_state = numpy.random.get_state()
    except ImportError:  # pragma: no cover - numpy is a dependency
        numpy, numpy_state = None, None
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            if numpy is not None:
                numpy.random.set_state(numpy_state)


def _chunk_modules(module, start: int, stop: int) -> list[nn.Module]:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    found: dict[int, nn.Module] = {}
    for index in range(start, stop):
        spec = module._layer_specs[index]
        if isinstance(spec, TiedLayerSpec):
            layer = module.tied_modules[spec.key]
        elif isinstance(spec, (nn.Module, LayerSpec)):
            layer = module._modules[str(index)]
        else:
            continue  # a plain function: no parameters
        found.setdefault(id(layer), layer)
    return list(found.values())


def _current_chunk(module) -> ChunkLayout:
    start, stop = module._local_start, module._local_stop
    return ChunkLayout(0, module.stage_id, start, stop, module.forward_funcs, dict(module.fwd_map),
                       _chunk_modules(module, start, stop))


def _rebuild(module, stages: list[int], parts: list[int]) -> tuple[list[ChunkLayout], dict, dict]:
    """Build this rank's chunks in place; returns them and the old (DeepSpeed-built) layers and tied modules."""
    old_layers = {name: layer for name, layer in module._modules.items() if name.isdigit()}
    old_tied = dict(module.tied_modules.items())
    for name in old_layers:
        del module._modules[name]
    module.tied_modules = nn.ModuleDict()
    module.tied_weight_attrs = {}
    chunks = []
    with _preserved_random_state():
        for index, stage in enumerate(stages):
            start, stop = parts[stage], parts[stage + 1]
            module._set_bounds(start=start, stop=stop)
            module.forward_funcs = []
            module.fwd_map = {}
            module._build()
            chunks.append(ChunkLayout(index, stage, start, stop, module.forward_funcs, module.fwd_map,
                                      []))
    for chunk in chunks:
        chunk.modules = _chunk_modules(module, chunk.start, chunk.stop)
    return chunks, old_layers, old_tied


def _copy_initial_weights(module, old_layers: dict, old_tied: dict, old_parts: list[int],
                          holders: dict[int, list[int]]) -> None:
    """Give every rebuilt layer the values DeepSpeed's own P-stage build gave it (see the module doc).

    Every process walks the same list of items in the same order; the stock builder of an item sends its
    tensors to each new holder (a local copy when that is itself). Sends and receives between one pair
    of ranks are posted in item order, so they match one to one.
    """
    from deepspeed import comm as dist
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    grid = module._grid
    me = module.stage_id
    specs = module._layer_specs
    items: list[tuple[Any, int, list[int]]] = []  # (what, stock builder stage, new holder ranks)
    for index, spec in enumerate(specs):
        if isinstance(spec, (nn.Module, LayerSpec)) and not isinstance(spec, TiedLayerSpec):
            items.append((index, _stage_of(old_parts, index), holders[index]))
    keys = sorted({spec.key for spec in specs if isinstance(spec, TiedLayerSpec)})
    for key in keys:
        uses = [i for i, spec in enumerate(specs) if isinstance(spec, TiedLayerSpec) and spec.key == key]
        new_holders = sorted({rank for i in uses for rank in holders[i]})
        items.append((key, min(_stage_of(old_parts, i) for i in uses), new_holders))

    works = []
    copies: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        for what, source, targets in items:
            if isinstance(what, int):
                old, new = old_layers.get(str(what)), module._modules.get(str(what))
            else:
                old, new = old_tied.get(what), module.tied_modules[what] if what in module.tied_modules else None
            if me == source:
                sent = list(old.state_dict().values())
                for target in targets:
                    if target == me:
                        if new is not old:
                            copies += list(zip(new.state_dict().values(), sent))
                    else:
                        peer = grid.stage_to_global(target)
                        works += [dist.isend(t.contiguous(), peer) for t in sent]
            elif me in targets:
                peer = grid.stage_to_global(source)
                for tensor in new.state_dict().values():
                    buffer = torch.empty_like(tensor, memory_format=torch.contiguous_format)
                    works.append(dist.irecv(buffer, peer))
                    copies.append((tensor, buffer))
        for work in works:
            work.wait()
        for target, value in copies:
            target.copy_(value)


def _tied_comms(module, holders_of_key: dict[str, list[int]]) -> dict:
    """DeepSpeed's ``tied_comms`` for the new placement: per key, one group over the holding pipeline ranks."""
    from deepspeed import comm as dist

    comms = {}
    me = module.global_rank
    for key in sorted(holders_of_key):
        holders = holders_of_key[key]
        if len(holders) < 2:
            continue  # one rank holds every use: one module, nothing to exchange
        for pipeline in module._grid.pipe_groups:  # every process creates every group, in the same order
            ranks = [pipeline[rank] for rank in holders]
            group = dist.new_group(ranks=ranks)
            if me in ranks:
                comms[key] = {
                    "ranks": ranks,
                    "group": group,
                    "weight_attr": module.tied_weight_attrs[key],
                    "module": module.tied_modules[key],
                }
    return comms


def place_layers(module, placement: Placement, method: str | None, *, schedule: str = "the schedule") -> ModuleLayout:
    """Re-partition ``module`` in place for ``placement`` (see the module docstring); returns its layout.

    A rebuilt layer keeps the built one's frozen flags and dtypes; one changed after the PipelineModule was
    built (replaced submodules) is refused (:mod:`~dualpipe_plugin.deepspeed.layer_record`)."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.pipe import TiedLayerSpec

    rank = module.stage_id
    num_parts = placement.num_stages
    num_chunks = placement.num_chunks
    stages = [placement.stage(rank, chunk) for chunk in range(num_chunks)]
    old_parts = [int(bound) for bound in module.parts]
    keeps_deepspeed_slices = num_parts == module.num_stages and stages == [rank]
    if keeps_deepspeed_slices and method is None:
        parts = old_parts
    else:
        if method is None:
            raise DeepSpeedPipelineConfigError(
                "cannot tell which partition_method built this PipelineModule (it was built before "
                "`import dualpipe_plugin.deepspeed`); import dualpipe_plugin.deepspeed before constructing "
                "the PipelineModule, or name the method in the config: \"pipeline\": {\"partition_method\": "
                "\"parameters\"} (DeepSpeed's default; or \"uniform\", \"type:REGEX\")"
            )
        parts = _partition(module, method, num_parts)
    empty = [stage for stage in range(num_parts) if parts[stage] >= parts[stage + 1]]
    if empty:
        raise DeepSpeedPipelineConfigError(
            f"the schedule cuts the model into {num_parts} pipeline stages but partition_method={method!r} "
            f"leaves stage(s) {empty} without layers (partition {parts} of {len(module._layer_specs)} layer "
            f"specs); give the PipelineModule at least {num_parts} layers or use another partition_method"
        )

    if keeps_deepspeed_slices and parts == old_parts:
        chunks = [_current_chunk(module)]
    else:
        built = exchange_records(module, describe_layers(module))
        chunks, old_layers, old_tied = _rebuild(module, stages, parts)
        module.to(get_accelerator().device_name(module.local_rank))
        carry_over(module, built, schedule)
        holders = {
            layer: sorted({r for r in range(placement.num_ranks) for c in range(num_chunks)
                           if parts[placement.stage(r, c)] <= layer < parts[placement.stage(r, c) + 1]})
            for layer in range(len(module._layer_specs))
        }
        _copy_initial_weights(module, old_layers, old_tied, old_parts, holders)
        del old_layers, old_tied
        module.parts = parts

    # Tied keys: which pipeline ranks hold a use of each key under the new placement.
    specs = module._layer_specs
    holders_of_key: dict[str, set[int]] = {}
    for r in range(placement.num_ranks):
        for c in range(num_chunks):
            stage = placement.stage(r, c)
            for index in range(parts[stage], parts[stage + 1]):
                if isinstance(specs[index], TiedLayerSpec):
                    holders_of_key.setdefault(specs[index].key, set()).add(r)
    holders_sorted = {key: sorted(ranks) for key, ranks in holders_of_key.items()}
    module.tied_comms = _tied_comms(module, holders_sorted) if placement.num_ranks > 1 else {}

    # ds_pipe_replicated: every tied copy but the first holder's, and dualpipe's mirrored copies.
    tied_param_ids = frozenset(id(p) for tied in module.tied_modules.values() for p in tied.parameters())
    for param in module.parameters():
        param.ds_pipe_replicated = False
    for key, tied in module.tied_modules.items():
        holders = holders_sorted.get(key, [rank])
        if rank != holders[0]:
            for param in tied.parameters():
                param.ds_pipe_replicated = True
    if placement.mirrored:
        for chunk in chunks:
            if chunk.index == 1:
                for layer in chunk.modules:
                    for param in layer.parameters():
                        if id(param) not in tied_param_ids:
                            param.ds_pipe_replicated = True
    return ModuleLayout(module, chunks, parts, tied_param_ids)
