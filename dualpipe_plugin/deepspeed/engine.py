"""``DualPipeEngine``: DeepSpeed's ``PipelineEngine`` running a dualpipe_plugin schedule.

``import dualpipe_plugin.deepspeed`` makes ``deepspeed.initialize`` build this engine for every
``PipelineModule`` (see ``__init__.py``). Without ``"pipeline": {"schedule": ...}`` in the config (or with
``"deepspeed"``) every method defers to ``PipelineEngine``: DeepSpeed runs as before, bit for bit.

With a schedule, the engine
  * re-partitions the module into this rank's chunks before DeepSpeed builds the optimizer
    (:mod:`dualpipe_plugin.deepspeed.layout`);
  * runs one ``train_batch`` as one :class:`~dualpipe_plugin.runtime.executor.PipelineExecutor` step over
    the chunks (transfers on DeepSpeed's pipeline ranks, DualPipe's mirror sum at its end), then
    DeepSpeed's own ``_exec_reduce_tied_grads``, ``_exec_reduce_grads`` and ``_exec_optimizer_step``;
  * keeps everything else DeepSpeed's: ZeRO-1, bf16, clipping, the loss it reports, eval_batch,
    checkpoints (layer files by global index, so they load into DeepSpeed's own schedule and back).

DeepSpeed's ``train_batch``/``eval_batch`` stay as they are: the engine hands them a step object from
``_train_schedule``/``_inference_schedule`` and runs it in ``_exec_schedule``. ``is_last_stage()`` names
the one rank per pipeline that reports the loss (dualpipev and dualpipe: rank 0; 1f1b/zb1p: rank P-1),
which is all ``_aggregate_total_loss`` and ``eval_batch`` need; dualpipe's losses, computed on two ranks,
are gathered there first and summed in micro-batch order, as DeepSpeed sums them.

The chunks run without DeepSpeed's output hooks (``DeepSpeedEngine.forward`` is not called), so each
micro-batch's loss is scaled here exactly as ``DeepSpeedEngine.backward`` does: divided by
gradient_accumulation_steps once, then the optimizer's loss scale (fp16). Around every backward, W and
F&B pair (the executor's ``grad_scope`` hook) the engine sets ``_running_engine_backward`` (ZeRO's hooks
leave the step to the engine) and, with DeepSpeed's BF16_Optimizer, clears the bf16 gradients before and
folds them into the fp32 accumulation after - per op, so a W that runs later than its I is folded too
(with neither optimizer there is nothing to do, and no scope is entered).

Next door: :mod:`~dualpipe_plugin.deepspeed.telemetry` (DeepSpeed's timers and monitor events per step),
:mod:`~dualpipe_plugin.deepspeed.moe_overlap` (DeepSpeed's MoE layer on the overlap protocol),
:mod:`~dualpipe_plugin.deepspeed.forward_path` (when the chunks leave out DeepSpeed's idle forward hooks).
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Iterator

import torch
from torch import nn

from deepspeed import comm as dist
from deepspeed.runtime.activation_checkpointing import checkpointing as ds_checkpointing
from deepspeed.runtime.base_optimizer import ZeROOptimizer
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.pipe.dualpipev import DualPipeVModule
from deepspeed.runtime.pipe.engine import PipelineEngine
from deepspeed.runtime.pipe.module import PipelineModule
from deepspeed.runtime.utils import is_model_parallel_parameter

from dualpipe_plugin.deepspeed.checkpoint import current_placement, load_checkpoint, save_placement
from dualpipe_plugin.deepspeed.config import (
    DeepSpeedPipelineConfigError,
    check_engine_setup,
    pipeline_section,
    read_partition_method,
    read_pipeline_options,
)
from dualpipe_plugin.deepspeed.forward import (
    check_forward_features,
    check_forward_hooks,
    forward_context,
    refuse_compile,
)
from dualpipe_plugin.deepspeed.layout import ModuleLayout, partition_method_of, place_layers
from dualpipe_plugin.deepspeed.moe_groups import create_expert_groups, replicas_agree_on_norm
from dualpipe_plugin.deepspeed.optimizer import check_group_counts, record_parameters
from dualpipe_plugin.deepspeed.forward_path import hooks_idle
from dualpipe_plugin.deepspeed.moe_overlap import holds_deepspeed_moe, staged_parts
from dualpipe_plugin.deepspeed.telemetry import (
    TimedHooks,
    TimedMirrorSync,
    feed_deepspeed_timers,
    report_step,
    start_clock,
    take_over_forward_timers,
    timed,
)
from dualpipe_plugin.runtime.executor import PipelineExecutor
from dualpipe_plugin.runtime.mirror import sync_mirrored_grads
from dualpipe_plugin.runtime.options import PipelineOptions
from dualpipe_plugin.runtime.staged import StagedChunk
from dualpipe_plugin.runtime.transport import TorchTransport, new_pipeline_groups
from dualpipe_plugin.schedules import Placement, ScheduleConfigError

__all__ = ["DualPipeEngine"]

_ENGINE_SIGNATURE = inspect.signature(DeepSpeedEngine.__init__)


@dataclass(frozen=True)
class _Step:
    """What ``_train_schedule``/``_inference_schedule`` return in place of DeepSpeed's instruction lists."""

    num_microbatches: int
    train: bool


class _Chunk(nn.Module):
    """One chunk for the executor: its layers (for the B/W split, devices and mirror pairing), run through
    the PipelineModule's own ``forward`` - DeepSpeed's activation checkpointing and layer seeding included.

    The PipelineModule owns the layers; the chunk only lists them and is not a submodule of anything.
    """

    def __init__(self, layout: ModuleLayout, index: int):
        super().__init__()
        self.layers = nn.ModuleList(layout.chunks[index].modules)
        self.__dict__["_layout"] = layout  # a plain attribute: not registered as a submodule
        self.index = index
        self.direct = False
        """Call ``module.forward`` without DeepSpeed's idle forward hooks (forward_path.py); set per step."""

    def forward(self, inputs):
        layout = self._layout
        layout.activate(self.index)
        module = layout.module
        outputs = module.forward(inputs) if self.direct else module(inputs)
        if layout.module.activation_checkpoint_interval > 0 and torch.is_grad_enabled():
            # The checkpointed blocks recompute through module.forward_funcs when the backward reaches
            # them, which may be after another chunk's forward: make this chunk active again first.
            for tensor in outputs if isinstance(outputs, (tuple, list)) else (outputs,):
                if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                    tensor.register_hook(partial(_reactivate, layout, self.index))
        return outputs


def _reactivate(layout: ModuleLayout, index: int, grad: torch.Tensor) -> torch.Tensor:
    layout.activate(index)
    return grad


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return [_detached(v) for v in value]
    return value


def _add_to_total(total: Any, value: Any) -> Any:
    """DeepSpeed's ``add_to_total_loss`` (engine._exec_forward_pass): zeros_like, then += per micro-batch."""
    if isinstance(value, torch.Tensor):
        if total is None:
            total = torch.zeros_like(value)
        total += value
        return total
    if total is None:
        total = [torch.zeros_like(v) for v in value]
    for index, v in enumerate(value):
        total[index] += v
    return total


@dataclass
class _Plan:
    """Everything the engine needs to run a schedule, fixed at initialisation."""

    options: PipelineOptions
    placement: Placement
    layout: ModuleLayout
    chunks: list[nn.Module]
    executor: PipelineExecutor
    rank: int
    loss_rank: int
    """The pipeline rank that reports the loss (``is_last_stage``)."""
    staged: bool

    @property
    def holds_first(self) -> bool:
        return self.placement.holds_first_stage(self.rank)

    @property
    def holds_last(self) -> bool:
        return self.placement.holds_last_stage(self.rank)

    @property
    def needs_data(self) -> bool:
        return self.holds_first or self.holds_last


class _StepHooks:
    """The executor's :class:`~dualpipe_plugin.runtime.executor.StageHooks` for one DeepSpeed step."""

    def __init__(self, engine: "DualPipeEngine", plan: _Plan, num_microbatches: int, train: bool):
        self.engine, self.plan, self.train = engine, plan, train
        self.module = engine.module
        self.num_microbatches = num_microbatches
        self.batches: list[Any] = []
        # DeepSpeed's contract: each pipeline pulls gradient_accumulation_steps entries per train_batch,
        # on the ranks that hold a first or a last stage.
        if plan.needs_data:
            if engine.data_iterator is None and engine.batch_fn is None:
                raise DeepSpeedPipelineConfigError(
                    f"pipeline rank {plan.rank} holds a first or last stage of {plan.options.schedule.name!r} and needs "
                    f"the data: pass data_iter to train_batch/eval_batch (or training_data to deepspeed.initialize)"
                )
            self.batches = [engine._next_batch() for _ in range(num_microbatches)]
        if not (engine.using_bf16_optimizer or isinstance(engine.optimizer, ZeROOptimizer)):
            self.grad_scope = None  # nothing to do around a backward: the executor skips it
        direct = hooks_idle(engine)
        for module in plan.chunks:
            if isinstance(module, _Chunk):
                module.direct = direct
        self._last_chunks = [plan.placement.is_last(plan.rank, c) for c in range(len(plan.chunks))]
        self.values: dict[int, Any] = {}
        self.additional: dict[int, OrderedDict] = {}
        self._raw_outputs: dict[int, Any] = {}

    # -- StageHooks ------------------------------------------------------------------------------
    def inputs(self, microbatch: int):
        """DeepSpeed's ``_exec_load_micro_batch`` for a first stage."""
        engine = self.engine
        first = self.batches[microbatch][0]
        reentrant = engine._reentrant_activation_checkpointing()

        def load(tensor: torch.Tensor) -> torch.Tensor:
            loaded = tensor.clone().detach().to(engine.device)
            if reentrant:
                loaded.requires_grad = loaded.is_floating_point()
            return loaded

        if torch.is_tensor(first):
            return load(first)
        return tuple(load(t) for t in first)

    def forward(self, chunk: int, microbatch: int, inputs: tuple):
        module = self.plan.chunks[chunk]
        with forward_context(self.engine):  # DeepSpeedEngine.forward's torch_autocast
            if self.plan.staged:
                outputs = module(*inputs)
            else:
                outputs = module(inputs[0] if len(inputs) == 1 else tuple(inputs))
        if not self.module.training:
            ds_checkpointing.reset()  # as DeepSpeed does between evaluation forwards
        if self._last_chunks[chunk]:
            self._raw_outputs[microbatch] = outputs
        return outputs

    def loss(self, microbatch: int, outputs: tuple):
        engine, module = self.engine, self.module
        raw = self._raw_outputs.pop(microbatch, None)
        if raw is None:  # the overlap engine ran the chunk itself
            raw = outputs[0] if len(outputs) == 1 else tuple(outputs)
        if engine._compute_loss and module.loss_fn is not None:
            labels = self.batches[microbatch][1]
            if torch.is_tensor(labels):
                labels = labels.to(engine.device)
            elif isinstance(labels, (tuple, list)):
                labels = tuple(t.to(engine.device).detach() for t in labels)
            loss = module.loss_fn(raw, labels)
        else:
            loss = raw  # the model computes its own loss
        if engine.eval_return_logits and microbatch == self.num_microbatches - 1:
            engine.outputs = raw
        self.values[microbatch] = _detached(loss)
        additional = module.get_additional_losses()
        if additional is not None:
            self.additional[microbatch] = OrderedDict((k, _detached(v)) for k, v in additional.items())
        if not self.train:
            return None
        if not isinstance(loss, torch.Tensor):
            raise TypeError(
                f"the pipeline's loss_fn (or, without one, the last layer) returned a {type(loss).__name__}; "
                f"training needs a scalar tensor to back-propagate"
            )
        return engine._loss_for_backward(loss)

    @contextmanager
    def grad_scope(self, action) -> Iterator[None]:
        """Around every backward, W and F&B pair: DeepSpeed's engine-backward flag and the bf16 protocol."""
        engine = self.engine
        if engine.using_bf16_optimizer:
            engine.optimizer.clear_lp_grads()
        previous = engine._running_engine_backward
        engine._running_engine_backward = True  # ZeRO's hooks then leave the backward to the engine
        try:
            yield
        finally:
            engine._running_engine_backward = previous
        if engine.using_bf16_optimizer:
            # Fold this op's low-precision gradients into the fp32 accumulation (a no-op with
            # immediate_grad_update, where the optimizer's own hooks already did).
            engine.optimizer.update_hp_grads(clear_lp_grads=False)


class DualPipeEngine(PipelineEngine):
    """DeepSpeed's ``PipelineEngine``, plus the schedule named by ``config["pipeline"]["schedule"]``.

    ``isinstance(engine, PipelineEngine)`` holds. Built by ``deepspeed.initialize`` once
    ``dualpipe_plugin.deepspeed`` is imported; takes exactly ``PipelineEngine``'s arguments.
    """

    def __init__(self, has_bool_tensors=False, *super_args, **super_kwargs):
        self._dualpipe: _Plan | None = None
        self._step_clock = None  # the current training step's telemetry (telemetry.py), if any
        bound = _ENGINE_SIGNATURE.bind(None, *super_args, **super_kwargs)
        arguments = dict(bound.arguments)
        arguments.pop("self")
        section = pipeline_section(arguments)
        options = read_pipeline_options(section)
        if options is None:
            super().__init__(has_bool_tensors, *super_args, **super_kwargs)
            return
        model = arguments.get("model")
        self._check_model(model, options)
        config = arguments["config_class"]
        placement = check_engine_setup(
            options,
            num_stages=model.num_stages,
            micro_batches=config.gradient_accumulation_steps,
            zero_stage=config.zero_optimization_stage,
            tensor_parallel=model._grid.get_slice_parallel_world_size(),
            pipe_partitioned=bool(config.pipeline.get("pipe_partitioned", True)),
            grad_partitioned=bool(config.pipeline.get("grad_partitioned", True)),
            dynamic_shape=bool(model.dynamic_shape),
            has_bool_tensors=bool(has_bool_tensors),
        )
        partition_method = read_partition_method(section)
        keeps_slices = (  # 1f1b/zb1p: DeepSpeed's own partition, nothing is rebuilt
            partition_method is None and placement.num_chunks == 1
            and placement.num_stages == model.num_stages and placement.stage(model.stage_id, 0) == model.stage_id
        )
        # A pre-built optimizer, parameter groups and scheduler follow the rebuilt layers by global name.
        followed = None if keeps_slices else record_parameters(model, arguments, options.schedule.name)
        method = None if keeps_slices else partition_method or partition_method_of(model)
        layout = place_layers(model, placement, method, schedule=options.schedule.name)
        if followed is not None:
            arguments.update(followed.after_rebuild(model))
        if not keeps_slices:  # a rank the placement leaves without MoE layers still joins their groups' creation
            create_expert_groups(model, use_data_before_expert_parallel=config.use_data_before_expert_parallel_)
        super().__init__(has_bool_tensors, **arguments)
        self._dualpipe = self._build_plan(options, placement, layout)
        check_forward_features(self, schedule=options.schedule.name, staged=self._dualpipe.staged)
        check_group_counts(self, options.schedule.name)
        take_over_forward_timers(self)

    # -- initialisation helpers ------------------------------------------------------------------
    @staticmethod
    def _check_model(model, options: PipelineOptions) -> None:
        if isinstance(model, DualPipeVModule):
            raise DeepSpeedPipelineConfigError(
                f"pipeline.schedule={options.schedule.name!r} re-partitions a plain PipelineModule itself; build "
                f"the model as deepspeed.pipe.PipelineModule, not DeepSpeed's DualPipeVModule"
            )
        if not isinstance(model, PipelineModule):
            raise DeepSpeedPipelineConfigError(
                f"pipeline.schedule={options.schedule.name!r} needs a deepspeed.pipe.PipelineModule, got "
                f"{type(model).__name__}"
            )

    def _build_plan(self, options: PipelineOptions, placement: Placement, layout: ModuleLayout) -> _Plan:
        rank = self.stage_id
        chunk_ids = range(placement.num_chunks)
        staged = bool(options.overlap) and self._can_stage(layout)
        chunks: list[nn.Module] = (
            [StagedChunk(staged_parts(layout.chunks[c].funcs)) for c in chunk_ids] if staged
            else [_Chunk(layout, c) for c in chunk_ids]
        )
        pipelines = [list(ranks) for ranks in self.grid.pipe_groups]
        groups = new_pipeline_groups(pipelines)  # every process, the same list: no second world
        mine = pipelines.index(list(self.grid.pp_group))
        transport = TorchTransport(self.grid.pp_group, groups=groups[mine], device=torch.device(self.device))
        mirror_sync = TimedMirrorSync(partial(
            sync_mirrored_grads,
            grad_of=self._bf16_grad_of() if self.using_bf16_optimizer else None,
            skip=layout.tied_param_ids,
        ), lambda: self._step_clock)
        executor = PipelineExecutor(
            chunks, transport, options, mirror_sync=mirror_sync,
            overlap_advice="pipeline.overlap needs every layer of a chunk to be an nn.Module, at least one of them "
            "holding a deepspeed.moe.layer.MoE or with sub_stages() (dualpipe_plugin.runtime.staged), no activation "
            "checkpointing and no seed_layers",
        )
        return _Plan(
            options=options,
            placement=placement,
            layout=layout,
            chunks=chunks,
            executor=executor,
            rank=rank,
            loss_rank=min(executor.loss_ranks),
            staged=staged,
        )

    def _can_stage(self, layout: ModuleLayout) -> bool:
        module = self.module
        if module.activation_checkpoint_interval > 0 or module.seed_layers:
            return False
        funcs = [f for chunk in layout.chunks for f in chunk.funcs]
        return all(isinstance(f, nn.Module) for f in funcs) and any(
            hasattr(f, "sub_stages") or holds_deepspeed_moe(f) for f in funcs)

    def _bf16_grad_of(self):
        """BF16_Optimizer accumulates in fp32 buffers: the mirror sum acts there (after update_hp_grads)."""
        optimizer = self.optimizer
        hp = {
            id(lp): optimizer.fp32_groups_gradients[i][j]
            for i, group in enumerate(optimizer.bf16_groups)
            for j, lp in enumerate(group)
        }
        return lambda param: hp[id(param)]

    # -- the schedule as DeepSpeed's train_batch/eval_batch see it --------------------------------
    def _train_schedule(self):
        if self._dualpipe is None:
            return super()._train_schedule()
        return self._step(self.micro_batches, train=True, what="train_batch")

    def _inference_schedule(self, micro_batches):
        if self._dualpipe is None:
            return super()._inference_schedule(micro_batches)
        return self._step(micro_batches, train=False, what="eval_batch")

    def _step(self, num_microbatches: int, *, train: bool, what: str) -> _Step:
        plan = self._dualpipe
        check_forward_hooks(self, staged=plan.staged)
        try:
            plan.executor.schedule_for(num_microbatches)
        except ScheduleConfigError as error:
            raise DeepSpeedPipelineConfigError(
                f"{what} with {num_microbatches} micro-batches on pipeline.schedule={plan.options.schedule.name!r}: "
                f"{error}"
            ) from None
        return _Step(num_microbatches, train)

    def eval_batch(self, data_iter, return_logits=False, compute_loss=True, reduce_output='avg', bcast_loss=True,
                   num_micro_batches=None):
        if self._dualpipe is not None:  # refuse a bad micro-batch count before the data iterator is swapped
            self._inference_schedule(self.micro_batches if num_micro_batches is None else num_micro_batches)
        return super().eval_batch(data_iter, return_logits, compute_loss, reduce_output, bcast_loss,
                                  num_micro_batches)

    def _exec_schedule(self, pipe_schedule):
        if not isinstance(pipe_schedule, _Step):
            return super()._exec_schedule(pipe_schedule)
        plan = self._dualpipe
        self.fwd_outputs = []
        train = pipe_schedule.train
        clock = None
        if train:
            self.tput_timer.start()
            clock = self._step_clock = start_clock(self, plan.executor)
        hooks = _StepHooks(self, plan, pipe_schedule.num_microbatches, train)
        if clock is not None:
            clock.data_loaded()
        # The hooks scale each loss as DeepSpeedEngine.backward does (loss_divisor stays 1).
        plan.executor.run(pipe_schedule.num_microbatches, TimedHooks.wrap(hooks, clock), forward_only=not train,
                          on_action=None if clock is None else clock.action_hook)
        values, additional = self._gather_losses(hooks)
        if plan.rank == plan.loss_rank:
            ordered = [values[m] for m in range(pipe_schedule.num_microbatches)]
            self.fwd_outputs = ordered
            if train:
                total = None
                for value in ordered:
                    total = _add_to_total(total, value)
                self.total_loss = total
                if additional:
                    totals = OrderedDict()
                    for m in range(pipe_schedule.num_microbatches):
                        for name, value in additional.get(m, {}).items():
                            totals[name] = _add_to_total(totals.get(name), value)
                    self.total_additional_losses = totals
        if train:
            # The executor already summed DualPipe's mirrored copies; then DeepSpeed's own tail of TrainSchedule.
            with timed(clock, "reduce_s"):
                self._exec_reduce_tied_grads()
                self._exec_reduce_grads()
            if clock is not None and clock.detailed:
                feed_deepspeed_timers(self.timers, clock)  # before the optimizer step logs them
            with timed(clock, "optimizer_s"):
                self._exec_optimizer_step()
            if clock is not None:
                self._step_clock = None
                report_step(self, clock)

    def _loss_for_backward(self, loss: torch.Tensor) -> torch.Tensor:
        """DeepSpeedEngine.backward's arithmetic: divide by gradient_accumulation_steps (once: the chunks run
        without DeepSpeed's output hooks), then the optimizer's loss scaling (fp16)."""
        loss = loss / self.gradient_accumulation_steps()
        if isinstance(self.optimizer, ZeROOptimizer):
            loss = self.optimizer.scale_if_loss(loss)
        elif self.torch_autocast_z0_gradscaler:
            loss = self.torch_autocast_z0_gradscaler.scale(loss)
        return loss

    def _gather_losses(self, hooks: _StepHooks) -> tuple[dict, dict]:
        """Per-micro-batch losses and additional losses on the loss rank (empty elsewhere); DualPipe
        computes them on two ranks, and the runtime brings them together."""
        plan = self._dualpipe
        mine = {m: (value, hooks.additional.get(m)) for m, value in hooks.values.items()}
        gathered = plan.executor.collect_to(mine, to=plan.loss_rank)
        if gathered is None:
            return {}, {}
        values = {m: value for m, (value, _) in gathered.items()}
        additional = {m: OrderedDict(extra) for m, (_, extra) in gathered.items() if extra is not None}
        return values, additional

    def compile(self, *args, **kwargs):
        if self._dualpipe is not None:
            refuse_compile(self._dualpipe.options.schedule.name)
        return super().compile(*args, **kwargs)

    # -- roles: which rank loads data and reports the loss ----------------------------------------
    def is_first_stage(self):
        if self._dualpipe is None:
            return super().is_first_stage()
        return self._dualpipe.holds_first

    def is_last_stage(self):
        """With a schedule: the one pipeline rank that reports the loss (it also holds a last stage)."""
        if self._dualpipe is None:
            return super().is_last_stage()
        return self._dualpipe.rank == self._dualpipe.loss_rank

    def _loss_stage_global_rank(self):
        if self._dualpipe is None:
            return super()._loss_stage_global_rank()
        return self.grid.stage_to_global(self._dualpipe.loss_rank)

    def set_dataloader(self, loader):
        if self._dualpipe is None:
            return super().set_dataloader(loader)
        if self._dualpipe.needs_data:
            self.training_dataloader = loader
            self.data_iterator = iter(self.training_dataloader)

    def set_dataiterator(self, iterator):
        if self._dualpipe is None:
            return super().set_dataiterator(iterator)
        if self._dualpipe.needs_data:
            self.training_dataloader = None
            self.data_iterator = iterator

    # -- clipping ------------------------------------------------------------------------------------
    def clip_fp32_gradients(self):
        """fp32 without ZeRO: the global norm, each parameter counted once.

        DeepSpeed's own rule (``clip_grad_norm_(mpu=grid)``) counts only the parameters of the rank at
        pipeline stage 0, which under a V or mirrored placement is another slice of the model; the global
        norm is what DeepSpeed's ZeRO-1 and bf16 paths already use.
        """
        if self._dualpipe is None:
            return super().clip_fp32_gradients()
        params = [p for p in self.module.parameters() if p.grad is not None]
        if not params:
            return
        tp_rank = self.grid.get_slice_parallel_rank()
        counted = [
            p.grad.detach().float().norm(2) for p in params
            if not getattr(p, "ds_pipe_replicated", False) and (tp_rank == 0 or is_model_parallel_parameter(p))
        ]
        total = torch.stack(counted).pow(2.0).sum().float() if counted else torch.zeros((), device=params[0].device)
        if self.grid.get_slice_parallel_world_size() == 1:  # the model-parallel group is the pipeline: timed
            self._dualpipe.executor.all_reduce_sum(total, what="the gradient norm for clipping")
        else:
            dist.all_reduce(total, group=self.grid.get_model_parallel_group())
        total = replicas_agree_on_norm(total.pow(0.5))
        coefficient = torch.clamp(self.gradient_clipping() / (total + 1e-6), max=1.0)
        for p in params:
            p.grad.mul_(coefficient.to(p.grad.dtype))

    # -- checkpoints ---------------------------------------------------------------------------------
    def _placement_now(self) -> dict:
        """The schedule, layer bounds and stages per rank this engine runs (TrainSchedule's without one)."""
        plan = self._dualpipe
        if plan is None:
            return dict(schedule="deepspeed", parts=[int(b) for b in self.module.parts],
                        stages=[[rank] for rank in range(self.num_stages)])
        placement = plan.placement
        return dict(schedule=plan.options.schedule.name, parts=list(plan.layout.parts),
                    stages=[[placement.stage(r, c) for c in range(placement.num_chunks)]
                            for r in range(placement.num_ranks)])

    def save_checkpoint(self, save_dir, tag=None, client_state={}, save_latest=True, exclude_frozen_parameters=False):
        """DeepSpeed's checkpoint, after the placement record (dualpipe_plugin.deepspeed.checkpoint)."""
        save_placement(self, save_dir, tag, **self._placement_now())
        return super().save_checkpoint(save_dir, tag, client_state, save_latest, exclude_frozen_parameters)

    def load_checkpoint(self, load_dir, tag=None, load_module_strict=True, load_optimizer_states=True,
                        load_lr_scheduler_states=True, load_module_only=False, custom_load_fn=None):
        """DeepSpeed's loader for a checkpoint of this placement; by global name (or one clear refusal on
        every rank) for another schedule, P or DP (dualpipe_plugin.deepspeed.checkpoint)."""
        return load_checkpoint(
            self, super().load_checkpoint, current_placement(self, **self._placement_now()), load_dir, tag,
            load_module_strict=load_module_strict, load_optimizer_states=load_optimizer_states,
            load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only,
            custom_load_fn=custom_load_fn,
        )

    def _saved_chunks(self) -> list[int]:
        """Chunks whose layers this rank writes: all, except dualpipe's mirrored copies (written by their owner)."""
        plan = self._dualpipe
        return [0] if plan.placement.mirrored else list(range(plan.placement.num_chunks))

    def module_state_dict(self, exclude_frozen_parameters=False):
        if self._dualpipe is None:
            return super().module_state_dict(exclude_frozen_parameters)
        layout = self._dualpipe.layout
        for index in self._saved_chunks():
            with layout.activated(index):
                super().module_state_dict(exclude_frozen_parameters)
        return None

    def load_module_state_dict(self, checkpoint, strict=True, custom_load_fn=None, fetch_z3_params=False,
                               z3_params_to_fetch=None, allowed_missing_keys=None):
        state_dict = checkpoint if self.has_moe_layers else checkpoint['module']
        if self._dualpipe is None or (state_dict is not None and not isinstance(state_dict, str)):
            return super().load_module_state_dict(checkpoint, strict, custom_load_fn, fetch_z3_params,
                                                  z3_params_to_fetch, allowed_missing_keys)
        layout = self._dualpipe.layout
        for index in range(len(layout.chunks)):  # both copies of a dualpipe stage read the same files
            with layout.activated(index):
                super().load_module_state_dict(checkpoint, strict, custom_load_fn, fetch_z3_params,
                                               z3_params_to_fetch, allowed_missing_keys)

    # -- introspection -------------------------------------------------------------------------------
    @property
    def pipeline_schedule(self) -> str:
        """The schedule this engine runs: a dualpipe_plugin name, or ``"deepspeed"`` (TrainSchedule)."""
        return "deepspeed" if self._dualpipe is None else self._dualpipe.options.schedule.name

    @property
    def pipeline_executor(self) -> PipelineExecutor | None:
        """The runtime executor (None on DeepSpeed's own schedule)."""
        return None if self._dualpipe is None else self._dualpipe.executor
