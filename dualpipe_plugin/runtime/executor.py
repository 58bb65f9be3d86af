"""The executor: runs any schedule of the registry on one rank, one action after another.

The schedule decides *what* runs *when*; the executor only carries it out. Per action, in one loop::

    post receives of the next ``lookahead`` actions (as far as their shapes are known)
    wait for this action's inputs          (bounded: a timeout names rank, peer, op and micro-batch)
    run it: F, B, I, W, or an F&B pair     (dispatch table; a pair goes to the overlap engine, or runs its
                                            forward, launches the forward's sends, then runs its backward)
    queue its outputs to the next stage and launch the batch

With the B/W split on, a forward whose backward is a full B (not an I, not a pair the overlap engine
captures) runs its split Linears plain (:mod:`~dualpipe_plugin.runtime.weight_grad`): nothing to defer.

At the end of the step it waits for every send, syncs DualPipe's mirrored gradients and buffers
(:mod:`~dualpipe_plugin.runtime.mirror`) and reports the per-micro-batch losses, the peak of live
activations (equal to the simulator's figure) and, when asked, the measured timeline.

Once a step or a collective failed, the executor refuses to communicate again
(:mod:`~dualpipe_plugin.runtime.failure` says why); errors raised before anything is sent leave it usable.

What flows where is fixed by the framework adapters through a :class:`StageHooks` object: how a chunk is
called, where a first stage's inputs come from and how a last stage turns outputs into a loss. The
standalone :class:`~dualpipe_plugin.runtime.pipeline.DualPipeline` splits tensors; DeepSpeed and
Megatron pull from their data iterators.
"""

from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import nn
from torch.autograd.profiler import record_function

from dualpipe_plugin.runtime.comm import StepComm
from dualpipe_plugin.runtime.errors import PipelineConfigError
from dualpipe_plugin.runtime.failure import FailureLatch
from dualpipe_plugin.runtime.losses import collect_to, map_tensors, total_loss
from dualpipe_plugin.runtime.meta import TensorMeta
from dualpipe_plugin.runtime.mirror import MirroredBuffers, sync_mirrored_grads
from dualpipe_plugin.runtime.options import PipelineOptions
from dualpipe_plugin.runtime.overlap import OverlapFallbackWarning, overlap_engine_for
from dualpipe_plugin.runtime.rng import microbatch_rngs, warn_private_generators
from dualpipe_plugin.runtime.stage_io import check_loss, check_stage_outputs
from dualpipe_plugin.runtime.staged import StagedChunk
from dualpipe_plugin.runtime.transport import Transport
from dualpipe_plugin.runtime.weight_grad import WeightGradStore, WeightSplitter, bind_weight_split
from dualpipe_plugin.schedules import Action, Op, OpKind, Pair, Schedule, op_io, validate
from dualpipe_plugin.schedules.lowering import OpIO
from dualpipe_plugin.schedules.grid import format_grid

__all__ = ["ActionTiming", "StageHooks", "PipelineExecutor", "StepOutcome", "OverlapEngine"]


class StageHooks(Protocol):
    """How the executor talks to the model and the data for one step."""

    def inputs(self, microbatch: int) -> tuple[torch.Tensor, ...]:
        """Inputs of the first stage for global micro-batch ``microbatch``."""
        ...

    def forward(self, chunk: int, microbatch: int, inputs: tuple[torch.Tensor, ...]) -> Any:
        """Run this rank's ``chunk`` on ``inputs``; return a tensor or a tuple of tensors."""
        ...

    def loss(self, microbatch: int, outputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """On a last stage: the scalar loss of ``microbatch`` to back-propagate (already scaled)."""
        ...

    # Optional (looked up with getattr, so not a Protocol member):
    #
    #   def grad_scope(self, action: Action) -> ContextManager: ...
    #
    # A context manager entered around every action that accumulates parameter gradients (B, I, W and
    # F&B pairs; never in a forward-only step). Adapters whose optimizer keeps its own gradient
    # accumulation use it: DeepSpeed's bf16 optimizer clears the low-precision gradients on entry and
    # folds them into its fp32 copy on exit, and DeepSpeed's engine marks the backward as its own.
    #
    #   def staged_inputs(self, chunk: int, microbatch: int, inputs: tuple) -> tuple: ...
    #
    # What a StagedChunk takes for a forward whose received (or data) inputs are ``inputs``, when the
    # overlap engine runs the chunk itself. Default: ``inputs``. Megatron's adapter reads the batch through
    # the user's forward_step_func there (Megatron's schedule-plan convention).


class OverlapEngine(Protocol):
    """Runs one F&B pair with the forward and backward interleaved (see :mod:`dualpipe_plugin.runtime.overlap`)."""

    def supports(self, forward_chunk: int, backward_chunk: int) -> bool: ...

    def run_pair(self, executor: "PipelineExecutor", pair: Pair) -> None: ...


@dataclass
class _Stash:
    """What a forward leaves for its backward."""

    inputs: tuple[torch.Tensor, ...]
    roots: tuple[torch.Tensor, ...]
    """Outputs to back-propagate from: the loss, or the outputs sent on that need a gradient."""


@dataclass
class StepOutcome:
    """What one step produced on this rank."""

    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    """Global micro-batch -> detached loss, for the micro-batches whose last stage is on this rank."""
    outputs: dict[int, tuple[Any, ...]] = field(default_factory=dict)
    """Global micro-batch -> last-stage outputs, detached (only with ``return_outputs``): a tuple of tensors,
    or of whatever the last stage returned (a dict of tensors, say)."""
    peak_activations: int = 0
    timeline: list[tuple[Action, float, float]] = field(default_factory=list)
    """(action, start_ms, end_ms) relative to the step's start (only with ``record``); the time an action
    spent waiting for its inputs is left out of its span (it shows as idle)."""


@dataclass(frozen=True, slots=True)
class ActionTiming:
    """How long one action of a step took on this rank (``run(on_action=...)``); ``time.perf_counter`` seconds.

    ``busy_s`` is the action's own work: from the moment its inputs had arrived to its end (its receive
    waits left out, as in the ``record`` timeline). Host time: on an accelerator with asynchronous
    kernels it is the time to issue the work, not the device's.
    """

    action: Action
    started_s: float
    ended_s: float
    waited_activation_s: float
    """Blocked receiving activations (and shape headers) inside this action."""
    waited_gradient_s: float
    """Blocked receiving gradients inside this action."""

    @property
    def busy_s(self) -> float:
        return self.ended_s - self.started_s - self.waited_activation_s - self.waited_gradient_s


def _same_device(a: torch.device, b: torch.device) -> bool:
    """cuda == cuda:current, cpu == cpu; a different index or type is a mismatch."""
    if a.type != b.type:
        return False
    if a.type != "cuda":
        return True
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    return (a.index if a.index is not None else current) == (b.index if b.index is not None else current)


def _profiler_enabled() -> bool:
    return torch.autograd.profiler._is_profiler_enabled


def _as_tuple(value: Any) -> tuple[torch.Tensor, ...]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


class PipelineExecutor:
    """Runs ``options.schedule`` on this rank's chunks over a :class:`Transport`.

    ``chunks[c]`` is the module this rank runs as chunk ``c`` (see the schedule's placement: two chunks
    for dualpipe/dualpipev/zbv, one for 1f1b/zb1p). With ``options.split_weights`` the executor binds the
    B/W split to their layers: every ``nn.Linear`` (:func:`bind_weight_split`) plus whatever
    ``weight_splitters`` bind (an adapter's own linear layers). It keeps one schedule per micro-batch count.
    """

    def __init__(
        self,
        chunks: Sequence[nn.Module],
        transport: Transport,
        options: PipelineOptions,
        *,
        lookahead: int = 1,
        mirror_sync: Callable[["PipelineExecutor"], None] | None = None,
        weight_splitters: Sequence[WeightSplitter] = (),
        overlap_advice: str = "",
    ):
        self.options = options
        self.spec = options.schedule
        self.transport = transport
        self.rank = transport.rank
        self.chunks = list(chunks)
        self.lookahead = lookahead
        self._schedules: dict[int, Schedule] = {}
        self._io_tables: dict[int, dict[Op, OpIO]] = {}
        self._op_io: dict[Op, OpIO] = {}
        self._plain_tables: dict[int, frozenset[tuple[int, int]]] = {}
        self._plain_forwards: frozenset[tuple[int, int]] = frozenset()
        self.placement = self.spec.placement(transport.size)
        placement = self.placement
        if len(self.chunks) != placement.num_chunks:
            raise PipelineConfigError(
                f"schedule {self.spec.name!r} runs {placement.num_chunks} chunk(s) per rank, got {len(self.chunks)}; "
                + ("pass [stage r, stage 2P-1-r] for a V or [stage r, stage P-1-r] for dualpipe (stage_modules "
                   "gives them)" if placement.num_chunks == 2 else "pass the one stage this rank holds")
            )
        self._check_devices()
        self.store = WeightGradStore()
        self._split_bindings = (
            [bind(self.chunks, self.store) for bind in (bind_weight_split, *weight_splitters)]
            if options.split_weights else []
        )
        self.overlap: OverlapEngine | None = self._overlap_engine(overlap_advice)
        self.mirror_sync = mirror_sync if mirror_sync is not None else sync_mirrored_grads
        self._buffers = MirroredBuffers(self) if placement.mirrored else None
        self._rngs = [microbatch_rngs(chunk) for chunk in self.chunks]
        self._seeded = any(self._rngs)  # False: no per-action work for seeded randomness
        if placement.mirrored and self.rank == 0:
            warn_private_generators(self.chunks, self.spec.name)
        self._latch = FailureLatch(self.rank)  # a failed step or collective: refuse to communicate again
        # Per-step state, reset by run().
        self._hooks: StageHooks | None = None
        self._comm: StepComm | None = None
        self._schedule: Schedule | None = None
        self._stash: dict[tuple[int, int], _Stash] = {}
        self._sent_metas: dict[tuple[int, int], tuple[TensorMeta, ...]] = {}
        self._outcome = StepOutcome()
        self._live = 0
        self._forward_only = False
        self._return_outputs = False
        self._loss_divisor = 1.0
        self._pair_counted = False

    @property
    def timeout_s(self) -> float:
        return self.options.timeout_s

    @property
    def split_bindings(self) -> tuple:
        """The B/W split's bindings (one per splitter; empty without ``split_weights``): each has
        ``num_split_linears`` and ``unbind()``."""
        return tuple(self._split_bindings)

    # -- set-up ----------------------------------------------------------------------------------
    def _check_devices(self) -> None:
        device = self.transport.device
        for index, chunk in enumerate(self.chunks):
            for name, param in chunk.named_parameters():
                if not _same_device(param.device, device):
                    raise PipelineConfigError(
                        f"chunk {index} parameter {name!r} is on {param.device} but this pipeline "
                        f"communicates on {device}; move the chunk with .to({str(device)!r})"
                    )

    def _overlap_engine(self, advice: str) -> OverlapEngine | None:
        """The one place the overlap decision is made (see :attr:`PipelineOptions.overlap`)."""
        wanted = self.options.overlap
        if wanted is False or not self.spec.runs_pairs:
            return None
        engine = overlap_engine_for(self.chunks, warn=False)
        if engine is None and wanted is True and self.rank == 0:
            plain = [f"{index} ({type(chunk).__name__})" for index, chunk in enumerate(self.chunks)
                     if not isinstance(chunk, StagedChunk)]
            warnings.warn(
                f"overlap requested but chunk(s) {', '.join(plain)} are not StagedChunks (the overlap protocol, "
                f"see dualpipe_plugin.runtime.staged): F&B pairs will run sequentially. "
                + (advice or "Build the chunks with StagedChunk(parts) to overlap, or turn overlap off to "
                   "silence this."),
                OverlapFallbackWarning,
                stacklevel=4,
            )
        return engine

    def schedule_for(self, num_microbatches: int) -> Schedule:
        """The schedule of a step with ``num_microbatches`` micro-batches (built and validated once; a
        count the schedule cannot run raises :class:`~dualpipe_plugin.schedules.ScheduleConfigError`)."""
        schedule = self._schedules.get(num_microbatches)
        if schedule is None:
            schedule = self.spec.build(self.transport.size, num_microbatches)
            validate(schedule)
            self._schedules[num_microbatches] = schedule
            self._io_tables[num_microbatches] = {op: op_io(schedule, self.rank, op) for op in schedule.ops(self.rank)}
            self._plain_tables[num_microbatches] = self._full_backward_keys(schedule)
        return schedule

    def _full_backward_keys(self, schedule: Schedule) -> frozenset[tuple[int, int]]:
        """(chunk, micro-batch) of this rank's forwards whose backward is a full ``B`` run outside the overlap
        engine (which captures a pair's backward): their split Linears may run plain (see weight_grad)."""
        keys = set()
        for action in schedule.actions[self.rank]:
            if isinstance(action, Pair):
                overlapped = self.overlap is not None and self.overlap.supports(action.forward.chunk,
                                                                                 action.backward.chunk)
                if not overlapped:
                    keys.add(action.backward.key)
            elif action.kind is OpKind.B:
                keys.add(action.key)
        return frozenset(keys)

    # -- who holds the losses, and moving them ----------------------------------------------------
    @property
    def loss_ranks(self) -> tuple[int, ...]:
        """Pipeline ranks that compute losses (they hold a route's last stage)."""
        return self.placement.last_stage_ranks()

    def collect_to(self, values: Mapping[int, Any], *, to: int, what: str = "the losses of this step"):
        """Per-micro-batch ``values`` of every loss rank, merged on pipeline rank ``to`` (None elsewhere);
        see :func:`dualpipe_plugin.runtime.losses.collect_to`. Every pipeline rank calls it."""
        with self._latch.guard(what):
            return collect_to(self.transport, values, to=to, senders=self.loss_ranks, timeout_s=self.timeout_s,
                              what=what)

    def total_loss(self, losses: Mapping[int, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """(sum of all ranks' micro-batch losses, number of non-finite ones) on every rank."""
        with self._latch.guard("the step's loss total"):
            return total_loss(self.transport, losses, timeout_s=self.timeout_s)

    def all_reduce_sum(self, tensor: torch.Tensor, *, what: str) -> None:
        """In-place sum of ``tensor`` over the pipeline ranks under the pipeline's timeout (every pipeline rank
        calls it; ``what`` names it in errors). For adapters and checkpoints: a failure marks the pipeline
        failed like a failed step."""
        with self._latch.guard(what):
            self.transport.all_reduce_sum(tensor, what=what, timeout_s=self.timeout_s)

    @property
    def failure(self) -> str | None:
        """What failed on this pipeline (None while it is usable); once set, every step and collective is
        refused with :class:`~dualpipe_plugin.runtime.errors.PipelineBrokenError`."""
        return self._latch.failure

    def close(self) -> None:
        """Restore the chunks' layers (undo the B/W split bindings)."""
        for binding in reversed(self._split_bindings):
            binding.unbind()
        self._split_bindings = []

    # -- one step --------------------------------------------------------------------------------
    def run(
        self,
        num_microbatches: int,
        hooks: StageHooks,
        *,
        forward_only: bool = False,
        return_outputs: bool = False,
        record: bool = False,
        loss_divisor: float = 1.0,
        on_action: Callable[[ActionTiming], None] | None = None,
    ) -> StepOutcome:
        """Run one step of ``num_microbatches`` micro-batches; gradients accumulate into ``.grad``.

        Each micro-batch's loss is back-propagated as ``loss / loss_divisor`` (pass the micro-batch
        count for the gradient of the mean loss); the reported losses are not divided. ``on_action``, if
        given, is called after every action with its :class:`ActionTiming` (per-op timing without the
        ``record`` timeline; a few perf_counter reads per action). A step that raises marks the pipeline
        failed (see the module docstring).
        """
        self._latch.refuse_if_failed("a step")
        schedule = self.schedule_for(num_microbatches)
        with self._latch.guard(f"the step of {schedule.name} P={schedule.num_ranks} C={num_microbatches}"):
            return self._run(schedule, num_microbatches, hooks, forward_only=forward_only,
                             return_outputs=return_outputs, record=record, loss_divisor=loss_divisor,
                             on_action=on_action)

    def _run(self, schedule: Schedule, num_microbatches: int, hooks: StageHooks, *, forward_only: bool,
             return_outputs: bool, record: bool, loss_divisor: float,
             on_action: Callable[[ActionTiming], None] | None) -> StepOutcome:
        self._schedule, self._hooks = schedule, hooks
        self._op_io = self._io_tables[num_microbatches]
        self._plain_forwards = self._plain_tables[num_microbatches] if self._split_bindings else frozenset()
        self._forward_only, self._return_outputs = forward_only, return_outputs
        self._loss_divisor = loss_divisor
        self._stash.clear()
        self._sent_metas.clear()
        self.store.clear()
        self._outcome = StepOutcome()
        self._live = 0
        self._comm = StepComm(self.transport, self.timeout_s, self._gradient_metas, self.options.shapes_per_microbatch)
        if self._buffers is not None:
            self._buffers.begin()
        actions = [a for a in schedule.actions[self.rank] if not forward_only or self._has_forward(a)]
        plan = [self._io(action) for action in actions]
        t0 = time.perf_counter()
        grad_mode = torch.no_grad() if forward_only else nullcontext()
        with grad_mode:
            for index in range(min(self.lookahead, len(plan))):
                self._post(plan[index])
            comm = self._comm
            for index, action in enumerate(actions):
                start = time.perf_counter()
                activation_before, gradient_before = comm.waited_activation_s, comm.waited_gradient_s
                for ahead in range(index + 1, min(index + 1 + self.lookahead, len(plan))):
                    self._post(plan[ahead])
                try:
                    # record_function costs ~0.1 ms even with no profiler attached: only name ranges when one is.
                    with record_function(f"PP:{action}") if _profiler_enabled() else nullcontext():
                        self._dispatch(action)
                    self._comm.flush()  # launching this op's transfers can fail too (a peer already gone)
                except Exception as error:
                    error.add_note(
                        f"pipeline rank {self.rank}, step {index} ({action}) of {schedule.name} "
                        f"P={schedule.num_ranks} C={num_microbatches}:\n{format_grid(schedule, {self.rank: index})}"
                    )
                    raise
                if record or on_action is not None:
                    ended = time.perf_counter()
                    waited_activation = comm.waited_activation_s - activation_before
                    waited_gradient = comm.waited_gradient_s - gradient_before
                    if record:
                        # The span starts once the action stops waiting for its inputs: compute, not idle.
                        busy_from = start + waited_activation + waited_gradient
                        self._outcome.timeline.append((action, (busy_from - t0) * 1e3, (ended - t0) * 1e3))
                    if on_action is not None:
                        on_action(ActionTiming(action, start, ended, waited_activation, waited_gradient))
            try:
                self._comm.finish()
                if schedule.placement.mirrored and not forward_only:
                    self.mirror_sync(self)
                if self._buffers is not None:
                    self._buffers.finish()
            except Exception as error:
                error.add_note(
                    f"pipeline rank {self.rank}, end of the step of {schedule.name} P={schedule.num_ranks} "
                    f"C={num_microbatches} (waiting for its last sends or the mirrored-gradient/buffer exchange)"
                )
                raise
        self._hooks, self._comm = None, None
        return self._outcome

    @staticmethod
    def _has_forward(action: Action) -> bool:
        return isinstance(action, Pair) or action.kind is OpKind.F

    def _io(self, action: Action):
        ops = [action.forward] if self._forward_only and isinstance(action, Pair) else action.ops()
        return [self._op_io[op] for op in ops]

    def _post(self, ios) -> None:
        for io in ios:
            if io.recv is not None and not (self._forward_only and io.recv.payload.value == "gradient"):
                self._comm.post_recv(io.recv)

    def _dispatch(self, action: Action) -> None:
        if self._seeded:
            self._seat_rngs(action)
        if isinstance(action, Pair):
            if self._forward_only:
                self._run_forward(action.forward)
                return
            with self._grad_scope(action):
                if self.overlap is not None and self.overlap.supports(action.forward.chunk, action.backward.chunk):
                    # Count the forward's activations from the start of the pair, as the simulator does: in
                    # an interleaved pair they build up while the backward's are still held.
                    self._count(+1)
                    self._pair_counted = True
                    try:
                        self.overlap.run_pair(self, action)
                    finally:
                        self._pair_counted = False
                else:
                    self._run_forward(action.forward)
                    # Hand the forward's outputs on now, not after the backward half: the next stage can
                    # start (the simulator's StageCostModel counts on it, see forward_half).
                    self._comm.flush()
                    self._run_backward(action.backward)
        elif action.kind is OpKind.F:
            self._run_forward(action)
        else:
            # Called directly, not through a table of bound methods: such a table is a reference cycle
            # that keeps the executor and its process groups alive until the interpreter's final GC
            # (tests/runtime/test_lifetime.py says why that aborts gloo jobs at exit).
            with self._grad_scope(action):
                (self._run_weight if action.kind is OpKind.W else self._run_backward)(action)

    def _seat_rngs(self, action: Action) -> None:
        """Tell the chunk's MicrobatchRNGs which global micro-batch its forward or backward (which may recompute
        the forward) runs; a W runs no model code."""
        ops = (action.forward, action.backward) if isinstance(action, Pair) else (action,)
        assert len({op.chunk for op in ops}) == len(ops), f"{action}: a pair's two ops run on different chunks"
        for op in ops:
            if op.kind is not OpKind.W:
                microbatch = self._schedule.global_microbatch(op.chunk, op.microbatch)
                for rng in self._rngs[op.chunk]:
                    rng.microbatch = microbatch

    def _grad_scope(self, action: Action):
        """The hooks' optional ``grad_scope(action)`` (see :class:`StageHooks`), else a no-op."""
        scope = getattr(self._hooks, "grad_scope", None)
        return scope(action) if scope is not None else nullcontext()

    # -- the ops ---------------------------------------------------------------------------------
    def _count(self, delta: int) -> None:
        self._live += delta
        if self._live > self._outcome.peak_activations:
            self._outcome.peak_activations = self._live

    def forward_inputs(self, op: Op) -> tuple[torch.Tensor, ...]:
        """Receive (or fetch from the data) the inputs of forward ``op``, ready for autograd."""
        io = self._op_io[op]
        if io.recv is None:
            return _as_tuple(self._hooks.inputs(self._schedule.global_microbatch(op.chunk, op.microbatch)))
        tensors, metas = self._comm.recv(io.recv)
        if self._forward_only:
            return tensors
        return tuple(t.requires_grad_() if m.requires_grad else t for t, m in zip(tensors, metas))

    def staged_inputs(self, op: Op, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """The inputs a StagedChunk takes for forward ``op`` (the hooks' optional ``staged_inputs``, see
        :class:`StageHooks`; by default the received or data inputs themselves)."""
        make = getattr(self._hooks, "staged_inputs", None)
        if make is None:
            return inputs
        return _as_tuple(make(op.chunk, self._schedule.global_microbatch(op.chunk, op.microbatch), inputs))

    def forward_finish(self, op: Op, inputs: tuple[torch.Tensor, ...], outputs: Any) -> None:
        """Send a forward's outputs on (or compute the loss) and stash what its backward needs."""
        io = self._op_io[op]
        outputs = _as_tuple(outputs)
        microbatch = self._schedule.global_microbatch(op.chunk, op.microbatch)
        if io.send is None:
            if self._return_outputs:
                self._outcome.outputs[microbatch] = map_tensors(outputs, torch.Tensor.detach)
            loss = self._hooks.loss(microbatch, outputs)
            if loss is not None:
                loss = check_loss(loss, rank=self.rank, microbatch=microbatch)
                self._outcome.losses[microbatch] = loss.detach()
                if self._loss_divisor != 1.0:
                    loss = loss / self._loss_divisor
            roots = (loss,) if loss is not None and loss.requires_grad else ()
        else:
            check_stage_outputs(outputs, rank=self.rank, chunk=op.chunk, microbatch=microbatch)
            self._comm.send(io.send, outputs)
            roots = tuple(t for t in outputs if t.requires_grad)
            self._sent_metas[op.key] = tuple(TensorMeta.of(t) for t in roots)
        if self._forward_only:
            return
        self._stash[op.key] = _Stash(inputs, roots)
        if not self._pair_counted:
            self._count(+1)

    def launch_queued(self) -> None:
        """Launch the transfers queued so far now (the executor otherwise launches them after each action);
        the overlap engine sends a pair's first finished half while the other half still runs."""
        self._comm.flush()

    def _run_forward(self, op: Op) -> None:
        inputs = self.forward_inputs(op)
        microbatch = self._schedule.global_microbatch(op.chunk, op.microbatch)
        plain = op.key in self._plain_forwards
        self.store.split_forwards = not plain
        try:
            outputs = self._hooks.forward(op.chunk, microbatch, inputs)
        finally:
            self.store.split_forwards = True
        self.forward_finish(op, inputs, outputs)

    def backward_grads(self, op: Op) -> tuple[_Stash, tuple[torch.Tensor, ...] | None]:
        """The stash of backward ``op`` and its output gradients (None at a loss stage)."""
        stash = self._stash.pop(op.key, None)
        if stash is None:
            raise PipelineConfigError(f"backward {op} has no forward state on rank {self.rank}")
        io = self._op_io[op]
        if io.recv is None:
            return stash, None
        grads, _ = self._comm.recv(io.recv)
        return stash, grads

    def backward_finish(self, op: Op, stash: _Stash) -> None:
        """Send the input gradients of a finished backward upstream."""
        io = self._op_io[op]
        if io.send is not None:
            grads = tuple(
                t.grad if t.grad is not None else torch.zeros_like(t)
                for t in stash.inputs
                if torch.is_tensor(t) and t.requires_grad  # staged inputs may carry None (no mask)
            )
            self._comm.send(io.send, grads)
        if op.kind is OpKind.B or not self.store.has(op.key):
            self._count(-1)

    def _run_backward(self, op: Op) -> None:
        stash, grads = self.backward_grads(op)
        split = op.kind is OpKind.I and bool(self._split_bindings)
        # A full B recomputes (activation checkpointing) with plain Linears, as its forward ran.
        self.store.split_forwards = split
        try:
            with self.store.capture(op.key) if split else nullcontext():
                if stash.roots:
                    torch.autograd.backward(stash.roots, grads)
        finally:
            self.store.split_forwards = True
        self.backward_finish(op, stash)

    def _run_weight(self, op: Op) -> None:
        if self.store.has(op.key):
            self.store.flush(op.key)
            self._count(-1)

    def _gradient_metas(self, transfer) -> tuple[TensorMeta, ...] | None:
        """Shapes of the gradient for an activation this rank sent (None before its forward ran)."""
        chunk, microbatch = transfer.dst_chunk, transfer.microbatch
        return self._sent_metas.get((chunk, microbatch))
