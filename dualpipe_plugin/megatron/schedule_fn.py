"""Megatron's forward-backward function, running any schedule of this package on the shared runtime.

:class:`PipelineScheduleFunction` takes the keyword signature of Megatron-Core's schedule functions
(``forward_step_func, data_iterator, model, num_microbatches, seq_length, micro_batch_size,
decoder_seq_length, forward_only, collect_non_loss_data, first_val_step, adjust_tensor_shapes_fn,
p2p_communicator, pg_collection, force_all_reduce``) and returns what they return: ``forward_data_store``,
one entry per micro-batch in micro-batch order on the *last pipeline rank* (what Megatron-LM's
``train_step`` reads with ``is_pipeline_last_stage(ignore_virtual=True)``), ``[]`` elsewhere. For a V the
loss is computed on rank 0 and for DualPipe half of it on rank 0; those reports are sent to the last rank.

One micro-batch forward on chunk c (:class:`_MegatronStageHooks`), as Megatron's ``forward_step``::

    set_input_tensor([received activation or None]); output, loss_func = forward_step_func(it_c, model[c])
    on the chunk that ends the route: loss_func(output) -> (loss, num_tokens, report) | (loss, report),
        loss / clamp(num_tokens, 1) / num_microbatches (unless calculate_per_token_loss) | loss * cp / M,
        config.grad_scale_func(loss) (the loss-scaling optimizers), report appended to forward_data_store
    MoEAuxLossAutoScaler / MTP loss scale set as Megatron sets them

The runtime does the rest: :class:`~dualpipe_plugin.runtime.executor.PipelineExecutor` over a
:class:`~dualpipe_plugin.runtime.transport.TorchTransport` on Megatron's pipeline-parallel ranks (every
pipeline of the job listed identically on all processes; Megatron's P2PCommunicator has one ring
direction and cannot carry the V's way back), the B/W split (:mod:`dualpipe_plugin.megatron.weight_split`),
DualPipe's mirror sync, then :mod:`dualpipe_plugin.megatron.grads`.

[Note: data iterators] Megatron's ``forward_step_func`` pulls from the iterator it is given inside each
call. Each chunk's calls must see the right micro-batch, so the function wraps what it is given:

- one iterator (or a list of one): one stream for the step, shared by this rank's chunks; its k-th
  item is global micro-batch k. A forward of micro-batch m on any chunk gets item m (both chunks of a V
  read micro-batch m; DualPipe's chunk 0 reads 0..C/2-1 and chunk 1 reads C/2..C-1).
- a list with one iterator per chunk (Megatron's interleaved convention, what Megatron-LM builds when the
  virtual pipeline size is set): chunk c's forward of micro-batch m gets item m of iterator c.

Items are fetched on demand and kept until the end of the step (a chunk may ask for m after another
chunk asked for a later one). A stream that was read at all is advanced to exactly ``num_microbatches``
items at the end of the step, skipping unread ones, so every used iterator moves by one step's worth as
under Megatron's schedules. ``forward_step_func`` may call ``next`` at most once per forward; an
iterator that is ``None`` (e.g. tensor-parallel ranks > 0 in Megatron-LM) is passed through as ``None``.

Not supported (clear error or documented no-op): ``adjust_tensor_shapes_fn`` and ``seq_length`` /
``micro_batch_size`` / ``decoder_seq_length`` are not needed (the runtime sends a shape header per link
and step) and are ignored; ``p2p_communicator`` is ignored (the runtime's transport replaces it; its
``pp_group`` is used when ``pg_collection`` is not given); ``deallocate_pipeline_outputs`` has no effect
(outputs are kept until their backward); ``overlap_p2p_comm``/``batch_p2p_comm`` do not apply.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from dualpipe_plugin.megatron.config_checks import check_model_config, options_for
from dualpipe_plugin.megatron.errors import MegatronScheduleError, MicrobatchCountError
from dualpipe_plugin.megatron.grads import GradSync
from dualpipe_plugin.megatron.placement import placement_of, places_chunks
from dualpipe_plugin.megatron.weight_split import bind_megatron_linears
from dualpipe_plugin.runtime.executor import PipelineExecutor
from dualpipe_plugin.runtime.options import PipelineOptions
from dualpipe_plugin.runtime.transport import TorchTransport, new_pipeline_groups
from dualpipe_plugin.schedules import ScheduleConfigError, ScheduleSpec

__all__ = ["PipelineScheduleFunction"]


# ----------------------------------------------------------------------------------------- data feeds


class _Feed:
    """One data stream of one step: item k is global micro-batch k (see [Note: data iterators])."""

    def __init__(self, source: Iterator, num_microbatches: int):
        self._source = source
        self._count = num_microbatches
        self._items: dict[int, Any] = {}
        self._pulled = 0

    def get(self, microbatch: int) -> Any:
        while self._pulled <= microbatch:
            self._items[self._pulled] = next(self._source)
            self._pulled += 1
        if microbatch not in self._items:
            raise RuntimeError(f"micro-batch {microbatch} of this step was already released")
        return self._items[microbatch]

    def finish(self) -> None:
        """Advance a used stream to exactly one step's worth of items; drop the cache."""
        if self._pulled:
            while self._pulled < self._count:
                next(self._source)
                self._pulled += 1
        self._items.clear()


class _FeedView:
    """What ``forward_step_func`` receives as its data iterator: ``next()`` yields the current micro-batch."""

    def __init__(self, feed: _Feed):
        self._feed = feed
        self._microbatch: int | None = None
        self._served = False

    def at(self, microbatch: int) -> "_FeedView":
        self._microbatch, self._served = microbatch, False
        return self

    def __iter__(self) -> "_FeedView":
        return self

    def __next__(self) -> Any:
        if self._microbatch is None:
            raise RuntimeError("this data iterator is only readable inside a forward of dualpipe_plugin's schedule")
        if self._served:
            raise RuntimeError(
                f"forward_step_func called next() twice for micro-batch {self._microbatch}; Megatron's "
                f"convention (and this schedule's) is one item per micro-batch"
            )
        self._served = True
        return self._feed.get(self._microbatch)


def _feeds(data_iterator: Any, num_chunks: int, num_microbatches: int) -> tuple[list[_FeedView | None], list[_Feed]]:
    sources = data_iterator if isinstance(data_iterator, (list, tuple)) else [data_iterator]
    if len(sources) == 1:
        sources = list(sources) * num_chunks  # one shared stream
    if len(sources) != num_chunks:
        raise MegatronScheduleError(
            f"data_iterator is a list of {len(sources)} iterators but this rank runs {num_chunks} model "
            f"chunk(s); pass one iterator, or one per chunk"
        )
    feeds: dict[int, _Feed] = {}
    views: list[_FeedView | None] = []
    for source in sources:
        if source is None:
            views.append(None)
            continue
        feed = feeds.get(id(source))
        if feed is None:
            feed = feeds[id(source)] = _Feed(source, num_microbatches)
        views.append(_FeedView(feed))
    return views, list(feeds.values())


# ------------------------------------------------------------------------------------------- hooks


@dataclass
class _StepOptions:
    forward_step_func: Callable
    num_microbatches: int
    forward_only: bool
    collect_non_loss_data: bool
    first_val_step: bool | None
    cp_size: int


class _MegatronStageHooks:
    """The executor's :class:`~dualpipe_plugin.runtime.executor.StageHooks` for Megatron model chunks."""

    def __init__(self, pipeline: "_MegatronPipeline", options: _StepOptions, views: list[_FeedView | None]):
        self._pipeline = pipeline
        self._options = options
        self._views = views
        self._loss_funcs: dict[int, Any] = {}
        self._raw_outputs: dict[int, Any] = {}
        self._first_forward_done: set[int] = set()
        self.reports: dict[int, Any] = {}
        self.total_num_tokens = torch.zeros([], dtype=torch.int, device=pipeline.transport.device)

    def inputs(self, microbatch: int) -> tuple:
        return ()  # a first stage's model reads its data through forward_step_func

    def _begin_forward(self, chunk: int, microbatch: int):
        """What every forward of a chunk starts with, as Megatron's ``forward_step``: the first-micro-batch
        mark, the current micro-batch; returns the data view for ``forward_step_func``."""
        from megatron.core.pipeline_parallel.schedules import set_current_microbatch

        options, model = self._options, self._pipeline.chunks[chunk]
        if chunk not in self._first_forward_done:
            self._first_forward_done.add(chunk)
            first = options.first_val_step if (options.forward_only and options.first_val_step is not None) else True
            if first and hasattr(model, "set_is_first_microbatch"):
                model.set_is_first_microbatch()
        set_current_microbatch(model, microbatch)
        view = self._views[chunk]
        return view.at(microbatch) if view is not None else None

    def forward(self, chunk: int, microbatch: int, inputs: tuple) -> Any:
        from megatron.core.utils import get_attr_wrapped_model

        pipeline, options = self._pipeline, self._options
        if pipeline.staged is not None:  # overlap: every forward through the staged chunk
            return pipeline.staged[chunk](*self.staged_inputs(chunk, microbatch, inputs))
        model = pipeline.chunks[chunk]
        config = pipeline.config
        data = self._begin_forward(chunk, microbatch)
        get_attr_wrapped_model(model, "set_input_tensor")(list(inputs) if inputs else [None])
        autocast = (
            torch.autocast(pipeline.transport.device.type, dtype=config.autocast_dtype)
            if getattr(config, "enable_autocast", False) else nullcontext()
        )
        with autocast:
            output, loss_func = options.forward_step_func(data, model)
        if pipeline.is_last(chunk):
            self._loss_funcs[microbatch] = loss_func
            self._raw_outputs[microbatch] = output
        elif torch.is_tensor(output) and output.is_floating_point() and config.pipeline_dtype is not None:
            # Activations travel in pipeline_dtype, as in Megatron's P2P buffers. Float16Module upcasts the
            # output of "vp-last on the last pp rank" to fp32; in a V that chunk is a middle stage.
            output = output.to(config.pipeline_dtype)
        self._set_aux_loss_scales(output if torch.is_tensor(output) else None)
        return output

    def staged_inputs(self, chunk: int, microbatch: int, inputs: tuple) -> tuple:
        """The overlap path reads the batch through the user's ``forward_step_func`` with Megatron's
        schedule-plan convention (what its combined 1F1B does): ``forward_step_func(data, model,
        return_schedule_plan=True)`` calls ``model.build_schedule_plan(tokens, position_ids, attention_mask,
        labels=..., ...)``, which here records its arguments; the staged chunk then runs them."""
        pipeline, options = self._pipeline, self._options
        model = _schedule_plan_owner(pipeline.chunks[chunk])
        data = self._begin_forward(chunk, microbatch)
        captured: dict[str, Any] = {}

        def build_schedule_plan(input_ids=None, position_ids=None, attention_mask=None, decoder_input=None,
                                labels=None, *args, **kwargs):
            captured.update(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                            labels=labels)
            return _CapturedPlan()

        model.__dict__["build_schedule_plan"] = build_schedule_plan
        try:
            plan, loss_func = options.forward_step_func(data, model, return_schedule_plan=True)
        except TypeError as error:
            if "return_schedule_plan" not in str(error):
                raise
            raise MegatronScheduleError(
                "pipeline overlap (--overlap-moe-expert-parallel-comm / overlap=True) reads each batch through "
                "Megatron's schedule-plan convention: forward_step_func(data_iterator, model, "
                "return_schedule_plan=False) must, when asked, return (model.build_schedule_plan(tokens, "
                "position_ids, attention_mask, labels=labels, loss_mask=loss_mask), loss_func), as Megatron-LM's "
                "pretrain_gpt.py does for its combined 1F1B"
            ) from None
        finally:
            model.__dict__.pop("build_schedule_plan", None)
        if not isinstance(plan, _CapturedPlan):
            raise MegatronScheduleError(
                "forward_step_func(..., return_schedule_plan=True) must return the model's build_schedule_plan(...) "
                f"as its first value, got {type(plan).__name__}"
            )
        if pipeline.is_last(chunk):
            self._loss_funcs[microbatch] = loss_func
        self._set_aux_loss_scales(inputs[0] if inputs and torch.is_tensor(inputs[0]) else None)
        if pipeline.placement_chunk(chunk).pre_process:
            return (captured["input_ids"], captured["position_ids"], captured["attention_mask"], captured["labels"])
        return (inputs[0], captured["attention_mask"], captured["labels"])

    def loss(self, microbatch: int, outputs: tuple) -> torch.Tensor | None:
        options, config = self._options, self._pipeline.config
        loss_func = self._loss_funcs.pop(microbatch)
        output = self._raw_outputs.pop(microbatch, outputs[0] if len(outputs) == 1 else outputs)
        if loss_func is None:
            self.reports[microbatch] = output
            return None
        if options.collect_non_loss_data:
            self.reports[microbatch] = loss_func(output, non_loss_data=True)
            return None
        result = loss_func(output)
        if len(result) == 3:
            loss, num_tokens, report = result
            if not config.calculate_per_token_loss:
                loss = loss / torch.clamp(torch.as_tensor(num_tokens), min=1)
                loss = loss / options.num_microbatches
            self.total_num_tokens += torch.as_tensor(num_tokens).to(self.total_num_tokens.device)
        elif len(result) == 2:
            loss, report = result
            loss = loss * options.cp_size
            loss = loss / options.num_microbatches
        else:
            raise MegatronScheduleError(
                f"loss_func returned {len(result)} values; Megatron's convention is (loss, num_tokens, report) "
                f"or (loss, report)"
            )
        self.reports[microbatch] = report
        if options.forward_only:
            return None  # the reports are the result; a plain number is a loss Megatron accepts here
        if not torch.is_tensor(loss):
            raise MegatronScheduleError(
                f"loss_func returned a {type(loss).__name__} loss for micro-batch {microbatch}; training needs a "
                f"scalar tensor to back-propagate (return the loss tensor itself, not .item())"
            )
        if config.grad_scale_func is not None:
            loss = config.grad_scale_func(loss)
        return loss

    def _set_aux_loss_scales(self, like: torch.Tensor | None) -> None:
        """As Megatron's ``forward_step_calc_loss``: the MoE aux-loss and MTP loss backward scales."""
        config, options = self._pipeline.config, self._options
        device = like.device if like is not None else self._pipeline.transport.device
        has_moe = getattr(config, "num_moe_experts", None) is not None
        has_mtp = getattr(config, "mtp_num_layers", None) is not None
        if not (has_moe or has_mtp):
            return
        scale = torch.ones(1, device=device)
        if config.grad_scale_func is not None:
            scale = config.grad_scale_func(scale)
        if has_moe:
            from megatron.core.transformer.moe.router import MoEAuxLossAutoScaler

            MoEAuxLossAutoScaler.set_loss_scale(
                scale if config.calculate_per_token_loss else scale * options.cp_size / options.num_microbatches
            )
        if has_mtp:
            from megatron.core.transformer.multi_token_prediction import MTPLossAutoScaler

            MTPLossAutoScaler.set_loss_scale(
                scale if config.calculate_per_token_loss else scale / options.num_microbatches
            )


class _CapturedPlan:
    """What ``build_schedule_plan`` returns while the overlap path reads a batch (its arguments are kept)."""


def _schedule_plan_owner(model: Any) -> Any:
    """The module inside DDP / Float16Module wrappers that has ``build_schedule_plan`` (GPTModel)."""
    while not hasattr(model, "build_schedule_plan") and hasattr(model, "module"):
        model = model.module
    return model


# ------------------------------------------------------------------------------ one model's pipeline


def _staged_chunks(chunks: list) -> list:
    from dualpipe_plugin.megatron.moe_overlap import megatron_staged_chunk

    try:
        return [megatron_staged_chunk(chunk) for chunk in chunks]
    except (TypeError, ValueError) as error:
        raise MegatronScheduleError(
            f"pipeline overlap (--overlap-moe-expert-parallel-comm / overlap=True) stages Megatron GPTModel chunks: "
            f"{error}; turn overlap off for this model"
        ) from None


def _all_pipelines(pp_group: Any) -> tuple[list[list[int]], int]:
    """Every pipeline's global ranks (the same list on every process) and the index of this one."""
    import torch.distributed as dist

    mine = [int(r) for r in dist.get_process_group_ranks(pp_group)]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    pipelines = sorted({tuple(ranks) for ranks in gathered})
    return [list(p) for p in pipelines], pipelines.index(tuple(mine))


class _MegatronPipeline:
    """The runtime objects serving one model (its chunks on this rank): transport, executor, W split."""

    def __init__(self, options: PipelineOptions, chunks: list, config: Any, pp_group: Any):
        self.chunks = chunks
        self.config = config
        self.placement = placement_of(config)
        pipelines, index = _all_pipelines(pp_group)
        groups = new_pipeline_groups(pipelines)[index]
        self.transport = TorchTransport(pipelines[index], groups)
        self.grads = GradSync(chunks, config, self.placement)
        variable = bool(getattr(config, "variable_seq_lengths", False))
        # With overlap the executor runs the chunks staged (Megatron's own TransformerLayer methods as the
        # overlap protocol's sub-stages, moe_overlap.py): F&B pairs hide the expert all-to-all.
        self.staged = _staged_chunks(chunks) if options.overlap else None
        self.executor = PipelineExecutor(
            self.staged or chunks, self.transport,
            options.replace(shapes_per_microbatch=options.shapes_per_microbatch or variable),
            mirror_sync=self.grads.mirror_sync, weight_splitters=(bind_megatron_linears,),
        )

    def is_last(self, chunk: int) -> bool:
        return self.executor.placement.is_last(self.transport.rank, chunk)

    def placement_chunk(self, chunk: int):
        """This rank's ``chunk`` in the schedule's placement (pre/post-process)."""
        from types import SimpleNamespace

        placement = self.executor.placement
        return SimpleNamespace(pre_process=placement.is_first(self.transport.rank, chunk),
                               post_process=placement.is_last(self.transport.rank, chunk))

    def close(self) -> None:
        self.executor.close()

    def gather_reports(self, reports: dict[int, Any]) -> list:
        """``forward_data_store`` on the last pipeline rank (micro-batch order), ``[]`` elsewhere."""
        gathered = self.executor.collect_to(reports, to=self.transport.size - 1, what="the loss reports of this step")
        return [] if gathered is None else list(gathered.values())

    # -- one step --------------------------------------------------------------------------------
    def step(self, *, forward_step_func, data_iterator, num_microbatches: int, forward_only: bool,
             collect_non_loss_data: bool, first_val_step: bool | None, pg_collection: Any,
             force_all_reduce: bool) -> list:
        config = self.config
        cp_size = pg_collection.cp.size() if pg_collection is not None else _cp_size()
        options = _StepOptions(forward_step_func, num_microbatches, forward_only, collect_non_loss_data,
                               first_val_step, cp_size)
        views, feeds = _feeds(data_iterator, len(self.chunks), num_microbatches)
        hooks = _MegatronStageHooks(self, options, views)
        if config.timers is not None:
            config.timers("forward-backward", log_level=1).start(barrier=config.barrier_with_L1_time)
        if not forward_only:
            self.grads.param_sync()
        with self.grads.no_sync() if not forward_only else nullcontext():
            self.executor.run(num_microbatches, hooks, forward_only=forward_only)
        for feed in feeds:
            feed.finish()
        if not forward_only:
            self.grads.tie_embeddings()
            num_tokens = None
            if config.calculate_per_token_loss:
                num_tokens = hooks.total_num_tokens
                self.transport.all_reduce_sum(num_tokens)  # finalize broadcasts it from the last rank
            self.grads.launch_grad_reduction()
            self.grads.finalize(num_tokens, pg_collection, force_all_reduce)
        store = self.gather_reports(hooks.reports)
        if config.timers is not None:
            config.timers("forward-backward").stop()
        return store


def _cp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_context_parallel_world_size()


# ------------------------------------------------------------------------------------ the function


class PipelineScheduleFunction:
    """A Megatron forward-backward function (keyword signature of Megatron's schedules) for one schedule.

    ``schedule`` is a name, a spec or ready :class:`~dualpipe_plugin.runtime.options.PipelineOptions`;
    ``option_values`` are further option fields. A model configured with
    :func:`~dualpipe_plugin.megatron.configure_model_config` for the same schedule brings its own options
    (``config.pipeline_options``), which then win. The runtime objects of a model (transport groups,
    executor, W-split binding) are made on its first call and kept for the model's lifetime, keyed by its
    first chunk. The first call is collective over the WORLD group (every process lists the pipelines), as
    Megatron's training loop calls its schedule on every rank.
    """

    def __init__(self, schedule: str | ScheduleSpec | PipelineOptions, **option_values: Any):
        if isinstance(schedule, PipelineOptions):
            self.options = schedule.replace(**option_values) if option_values else schedule
        else:
            self.options = options_for(schedule, **option_values)
        self._pipelines: "weakref.WeakKeyDictionary[Any, tuple[tuple[int, ...], _MegatronPipeline]]" = (
            weakref.WeakKeyDictionary()
        )

    @property
    def spec(self) -> ScheduleSpec:
        return self.options.schedule

    @property
    def schedule(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return f"PipelineScheduleFunction({self.schedule!r})"

    def __call__(
        self,
        *,
        forward_step_func: Callable,
        data_iterator: Any,
        model: Any,
        num_microbatches: int,
        seq_length: int | None = None,
        micro_batch_size: int | None = None,
        decoder_seq_length: int | None = None,
        forward_only: bool = False,
        collect_non_loss_data: bool = False,
        first_val_step: bool | None = None,
        adjust_tensor_shapes_fn: Callable | None = None,
        p2p_communicator: Any = None,
        pg_collection: Any = None,
        force_all_reduce: bool = False,
    ) -> list:
        from megatron.core.utils import get_model_config

        chunks = list(model) if isinstance(model, (list, tuple)) else [model]
        # Before any collective: a bad micro-batch count fails on every rank alike.
        self._check_microbatches(num_microbatches, get_model_config(chunks[0]).pipeline_model_parallel_size)
        pipeline = self.pipeline_for(chunks, pg_collection=pg_collection, p2p_communicator=p2p_communicator)
        return pipeline.step(
            forward_step_func=forward_step_func, data_iterator=data_iterator, num_microbatches=num_microbatches,
            forward_only=forward_only, collect_non_loss_data=collect_non_loss_data, first_val_step=first_val_step,
            pg_collection=pg_collection, force_all_reduce=force_all_reduce,
        )

    def _check_microbatches(self, num_microbatches: int, pp_size: int) -> None:
        try:
            self.spec.check(pp_size, num_microbatches)
        except ScheduleConfigError as error:
            raise MicrobatchCountError(
                f"{error}. With Megatron, micro-batches per step = global_batch_size / (micro_batch_size x "
                f"data_parallel_size): raise --global-batch-size or lower --micro-batch-size"
            ) from None

    def pipeline_for(self, chunks: Sequence[Any], *, pg_collection: Any = None, p2p_communicator: Any = None):
        """The runtime objects for these chunks on this pipeline group (made on first use, and again when a
        later call passes another group; collective then)."""
        import torch.distributed as dist
        from megatron.core import parallel_state
        from megatron.core.utils import get_model_config

        if pg_collection is not None:
            pp_group = pg_collection.pp
        elif p2p_communicator is not None and getattr(p2p_communicator, "pp_group", None) is not None:
            pp_group = p2p_communicator.pp_group
        else:
            pp_group = parallel_state.get_pipeline_model_parallel_group()
        key = (tuple(id(c) for c in chunks), tuple(dist.get_process_group_ranks(pp_group)))
        entry = self._pipelines.get(chunks[0])
        if entry is not None and entry[0] == key:
            return entry[1]
        config = get_model_config(chunks[0])
        check_model_config(config, self.spec)
        configured = getattr(config, "pipeline_options", None)
        if configured is not None and configured.schedule is not self.spec:
            configured = None
        if places_chunks(self.spec) and configured is None:
            raise MegatronScheduleError(
                f"the model was not built for {self.schedule}: call dualpipe_plugin.megatron.configure_model_config"
                f"(config, {self.schedule!r}) and build it with build_model_chunks (config.pipeline_schedule="
                f"{getattr(config, 'pipeline_schedule', None)!r})"
            )
        if entry is not None:
            entry[1].close()
        pipeline = _MegatronPipeline(configured or self.options, list(chunks), config, pp_group)
        self._pipelines[chunks[0]] = (key, pipeline)
        return pipeline
