"""Megatron's forward-backward function, running any schedule of this package on the shared runtime.

:class:`PipelineScheduleFunction` takes the keyword signature of Megatron-Core's schedule functions
(``forward_step_func, data_iterator, model, num_microbatches, seq_length, micro_batch_size,
decoder_seq_length, forward_only, collect_non_loss_data, first_val_step, adjust_tensor_shapes_fn,
p2p_communicator, pg_collection, force_all_reduce``) and returns what they return: ``forward_data_store``,
one entry per micro-batch in micro-batch order on the *last pipeline rank* (what Megatron-LM's
``train_step`` reads with ``is_pipeline_last_stage(ignore_virtual=True)``), ``[]`` elsewhere. For a V the
loss is computed on rank 0 and for DualPipe half of it on rank 0; those reports are sent to the last rank.

The runtime does the rest: :class:`~dualpipe_plugin.runtime.executor.PipelineExecutor` over a
:class:`~dualpipe_plugin.runtime.transport.TorchTransport` on Megatron's pipeline-parallel ranks (every
pipeline of the job listed identically on all processes; Megatron's P2PCommunicator has one ring
direction and cannot carry the V's way back), the B/W split (:mod:`dualpipe_plugin.megatron.weight_split`),
DualPipe's mirror sync, then :mod:`dualpipe_plugin.megatron.grads`.

Data iterators: :mod:`~dualpipe_plugin.megatron.feeds`; one forward and its loss:
:mod:`~dualpipe_plugin.megatron.stage_hooks`.

Not supported (clear error or documented no-op): ``adjust_tensor_shapes_fn`` and ``seq_length`` /
``micro_batch_size`` / ``decoder_seq_length`` are not needed (the runtime sends a shape header per link
and step) and are ignored; ``p2p_communicator`` is ignored (the runtime's transport replaces it; its
``pp_group`` is used when ``pg_collection`` is not given); ``deallocate_pipeline_outputs`` has no effect
(outputs are kept until their backward); ``overlap_p2p_comm``/``batch_p2p_comm`` do not apply.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from typing import Any, Callable, Sequence

from dualpipe_plugin.megatron.config_checks import check_model_config, options_for
from dualpipe_plugin.megatron.errors import MegatronScheduleError, MicrobatchCountError
from dualpipe_plugin.megatron.feeds import feeds
from dualpipe_plugin.megatron.grads import GradSync
from dualpipe_plugin.megatron.placement import placement_of, places_chunks
from dualpipe_plugin.megatron.stage_hooks import MegatronStageHooks, StepOptions
from dualpipe_plugin.megatron.weight_split import bind_megatron_linears
from dualpipe_plugin.runtime.executor import PipelineExecutor
from dualpipe_plugin.runtime.options import PipelineOptions
from dualpipe_plugin.runtime.transport import TorchTransport, new_pipeline_groups
from dualpipe_plugin.schedules import ScheduleConfigError, ScheduleSpec

__all__ = ["PipelineScheduleFunction"]


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
        options = StepOptions(forward_step_func, num_microbatches, forward_only, collect_non_loss_data,
                              first_val_step, cp_size)
        views, streams = feeds(data_iterator, len(self.chunks), num_microbatches)
        hooks = MegatronStageHooks(self, options, views)
        if config.timers is not None:
            config.timers("forward-backward", log_level=1).start(barrier=config.barrier_with_L1_time)
        if not forward_only:
            self.grads.param_sync()
        with self.grads.no_sync() if not forward_only else nullcontext():
            self.executor.run(num_microbatches, hooks, forward_only=forward_only)
        for stream in streams:
            stream.finish()
        if not forward_only:
            self.grads.tie_embeddings()
            num_tokens = None
            if config.calculate_per_token_loss:
                num_tokens = hooks.total_num_tokens
                # finalize broadcasts it from the last rank
                self.executor.all_reduce_sum(num_tokens, what="the step's token count")
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
