"""Where a ``train_batch`` under a dualpipe_plugin schedule spends its time, in DeepSpeed's own terms.

DeepSpeed's ``PipelineEngine`` times each instruction of TrainSchedule with its ``SynchronizedWallClockTimer``
(``"wall_clock_breakdown": true``) and writes a few monitor events (TensorBoard / CSV / W&B / Comet through
the ``monitor`` config). Our engine runs the step as one executor call, so this module measures it from
the executor's per-action timings (:class:`~dualpipe_plugin.runtime.executor.ActionTiming`) and hands the
figures to the same timers and the same monitor:

=============================  ==============================================================================
DeepSpeed timer                what it holds here (host time, summed over the step's actions)
=============================  ==============================================================================
``batch_input``                pulling the step's micro-batches from the data iterator
``fwd_microstep``              forward work: F ops and the forward half of sequential F&B pairs (loss included)
``bwd_inner_microstep``        backward work: B, I and W ops and the backward half of sequential pairs
``bwd_allreduce_microstep``    gradient reduction: DualPipe's mirror sum, tied weights, data parallel
``bwd_microstep``              ``bwd_inner`` + ``bwd_allreduce`` (as DeepSpeed's backward includes its reduce)
``step_microstep``             the optimizer step (DeepSpeed's own ``_exec_optimizer_step`` times it)
``pipe_recv_input``            blocked receiving activations from the neighbouring stage
``pipe_recv_grad``             blocked receiving gradients from the neighbouring stage
``bwd_weight_microstep``       new: the W ops alone (already inside ``bwd_inner``)
``fwd_bwd_overlap_microstep``  new: F&B pairs run by the overlap engine (forward and backward interleaved, so
                               one figure; in neither ``fwd`` nor ``bwd``)
=============================  ==============================================================================

The ``*_global`` twins (``fwd``, ``bwd``, ...) get the same figures, as in DeepSpeed. Waiting is never
counted as work: an action's receive waits go to ``pipe_recv_*`` only. DeepSpeed prints them at its own
log points (every ``steps_per_print`` steps); the two new timers and the **bubble fraction** (the idle
share of the pipeline's rank-time between the step's first action and each rank's last, measured from
the same timings and summed over the pipeline with one all-reduce) are printed right after.

Monitor events (global rank 0, as DeepSpeed): ``Train/Samples/samples_per_sec`` every step whenever the
monitor is on (DeepSpeed's ``train_loss`` and ``lr`` come from its own code as before); under
``wall_clock_breakdown`` also, per step, DeepSpeed's ``elapsed_time_ms_{forward, backward,
backward_inner, backward_allreduce, step}`` and ours ``elapsed_time_ms_{backward_weight, fwd_bwd_overlap,
pipe_recv_input, pipe_recv_grad, batch_input}`` and ``Train/Samples/pipeline_bubble_fraction``.

Cost: nothing without ``wall_clock_breakdown`` or a monitor; with them, a few ``perf_counter`` reads per
action and one small all-reduce per step. Host time: with an accelerator whose kernels run
asynchronously the figures are the time to issue the work (use a profiler for device time).
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from dualpipe_plugin.runtime.executor import ActionTiming
from dualpipe_plugin.schedules import OpKind, Pair

__all__ = [
    "BWD_WEIGHT_TIMER", "FWD_BWD_OVERLAP_TIMER", "MONITOR_PREFIX", "StepClock", "TimedHooks", "TimedMirrorSync",
    "feed_deepspeed_timers", "report_step", "start_clock", "take_over_forward_timers", "timed",
]

BWD_WEIGHT_TIMER = "bwd_weight_microstep"
FWD_BWD_OVERLAP_TIMER = "fwd_bwd_overlap_microstep"
MONITOR_PREFIX = "Train/Samples/"


class StepClock:
    """The time accounts of one training step on this rank (see the module docstring).

    ``detailed``: per-action accounts (``wall_clock_breakdown``); otherwise only the step's length.
    ``overlapped(pair)`` tells whether the executor runs a pair through the overlap engine.
    """

    def __init__(self, *, detailed: bool, overlapped: Callable[[Pair], bool]):
        self.detailed = detailed
        self._overlapped = overlapped
        self.started_s = time.perf_counter()
        self.ended_s = self.started_s
        self.run_started_s = self.started_s
        self.last_action_s: float | None = None
        self.batch_input_s = 0.0
        self.forward_s = 0.0
        self.backward_s = 0.0
        self.weight_s = 0.0
        self.overlap_s = 0.0
        self.reduce_s = 0.0
        self.recv_input_s = 0.0
        self.recv_grad_s = 0.0
        self.busy_s = 0.0
        self.optimizer_s = 0.0
        self._pending_forward_s = 0.0

    # -- fed by the engine and its step hooks ------------------------------------------------------
    def data_loaded(self) -> None:
        """The step's micro-batches are in; the executor starts now."""
        self.run_started_s = time.perf_counter()
        self.batch_input_s = self.run_started_s - self.started_s

    @property
    def action_hook(self) -> Callable[[ActionTiming], None] | None:
        """What to pass as the executor's ``on_action`` (None without ``wall_clock_breakdown``)."""
        return self.on_action if self.detailed else None

    def add_forward(self, seconds: float) -> None:
        """Forward work measured inside the current action (chunk forward and loss)."""
        self._pending_forward_s += seconds

    def on_action(self, timing: ActionTiming) -> None:
        """The executor's ``on_action`` hook: split the action's time into the accounts."""
        busy = timing.busy_s
        forward, self._pending_forward_s = self._pending_forward_s, 0.0
        action = timing.action
        if isinstance(action, Pair):
            if self._overlapped(action):
                self.overlap_s += busy
            else:
                self.forward_s += forward
                self.backward_s += busy - forward
        elif action.kind is OpKind.F:
            self.forward_s += busy
        else:
            self.backward_s += busy
            if action.kind is OpKind.W:
                self.weight_s += busy
        self.recv_input_s += timing.waited_activation_s
        self.recv_grad_s += timing.waited_gradient_s
        self.busy_s += busy
        self.last_action_s = timing.ended_s

    @property
    def span_s(self) -> float:
        """From the executor's start to this rank's last action (0 before any action)."""
        return 0.0 if self.last_action_s is None else self.last_action_s - self.run_started_s


def start_clock(engine, executor) -> StepClock | None:
    """A clock for this training step, or None when neither ``wall_clock_breakdown`` nor a monitor is on."""
    detailed = bool(engine.wall_clock_breakdown())
    if not detailed and not engine.monitor.enabled:
        return None

    def overlapped(pair: Pair) -> bool:
        engine_ = executor.overlap
        return engine_ is not None and engine_.supports(pair.forward.chunk, pair.backward.chunk)

    return StepClock(detailed=detailed, overlapped=overlapped)


def timed(clock: StepClock | None, account: str):
    """``with timed(clock, "reduce_s"): ...`` adds the block's time to that account (a no-op without a clock)."""
    return nullcontext() if clock is None else _timed(clock, account)


@contextmanager
def _timed(clock: StepClock, account: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        setattr(clock, account, getattr(clock, account) + time.perf_counter() - started)


class TimedHooks:
    """The engine's step hooks with their forward work (chunk forward and loss) counted on ``clock``."""

    def __init__(self, hooks, clock: StepClock):
        self._hooks, self._clock = hooks, clock
        self.inputs = hooks.inputs
        scope = getattr(hooks, "grad_scope", None)
        if scope is not None:
            self.grad_scope = scope

    def forward(self, chunk: int, microbatch: int, inputs: tuple) -> Any:
        started = time.perf_counter()
        try:
            return self._hooks.forward(chunk, microbatch, inputs)
        finally:
            self._clock.add_forward(time.perf_counter() - started)

    def loss(self, microbatch: int, outputs: tuple):
        started = time.perf_counter()
        try:
            return self._hooks.loss(microbatch, outputs)
        finally:
            self._clock.add_forward(time.perf_counter() - started)

    @staticmethod
    def wrap(hooks, clock: StepClock | None):
        """``hooks`` timed when the clock keeps per-action accounts, else ``hooks`` themselves."""
        return TimedHooks(hooks, clock) if clock is not None and clock.detailed else hooks


def take_over_forward_timers(engine) -> None:
    """DeepSpeed's module forward hooks start and stop the forward timers around every call of the
    PipelineModule; under a schedule the forward work is counted per action here instead (the overlap
    engine's staged chunks never call the module), so those hooks must not count it twice."""
    engine.engine_timers.forward_timers = []


class TimedMirrorSync:
    """The executor's ``mirror_sync``, counting its time as gradient reduction of the current step."""

    def __init__(self, sync: Callable, clock_of: Callable[[], StepClock | None]):
        self._sync, self._clock_of = sync, clock_of

    def __call__(self, executor) -> None:
        clock = self._clock_of()
        if clock is None or not clock.detailed:
            self._sync(executor)
            return
        started = time.perf_counter()
        self._sync(executor)
        clock.reduce_s += time.perf_counter() - started


@dataclass(frozen=True)
class _HostSpan:
    """One measured span as an entry of a DeepSpeed event timer (``Timer.event_timers`` holds objects with
    ``get_elapsed_msec`` when the accelerator does not use host timers)."""

    seconds: float

    def get_elapsed_msec(self) -> float:
        return self.seconds * 1e3


def _add(timer, seconds: float) -> None:
    """Add a measured span to a DeepSpeed ``SynchronizedWallClockTimer.Timer`` as if started and stopped."""
    timer.event_timers.append(seconds if timer.use_host_timer else _HostSpan(seconds))


def feed_deepspeed_timers(timers, clock: StepClock) -> None:
    """Add this step's accounts to DeepSpeed's timers (before its optimizer step logs them)."""
    from deepspeed.runtime.pipe.engine import BATCH_INPUT_TIMER, PIPE_RECV_GRAD_TIMER, PIPE_RECV_INPUT_TIMER
    from deepspeed.utils import timer as names

    backward = clock.backward_s + clock.reduce_s
    for micro, global_, seconds in (
        (names.FORWARD_MICRO_TIMER, names.FORWARD_GLOBAL_TIMER, clock.forward_s),
        (names.BACKWARD_MICRO_TIMER, names.BACKWARD_GLOBAL_TIMER, backward),
        (names.BACKWARD_INNER_MICRO_TIMER, names.BACKWARD_INNER_GLOBAL_TIMER, clock.backward_s),
        (names.BACKWARD_REDUCE_MICRO_TIMER, names.BACKWARD_REDUCE_GLOBAL_TIMER, clock.reduce_s),
    ):
        _add(timers(micro), seconds)
        _add(timers(global_), seconds)
    for name, seconds in (
        (BATCH_INPUT_TIMER, clock.batch_input_s),
        (PIPE_RECV_INPUT_TIMER, clock.recv_input_s),
        (PIPE_RECV_GRAD_TIMER, clock.recv_grad_s),
        (BWD_WEIGHT_TIMER, clock.weight_s),
        (FWD_BWD_OVERLAP_TIMER, clock.overlap_s),
    ):
        _add(timers(name), seconds)


def _pipeline_bubble(engine, clock: StepClock) -> float:
    """Idle share of the pipeline's rank-time (its ranks' busy and span summed with one all-reduce)."""
    totals = torch.tensor([clock.busy_s, clock.span_s], dtype=torch.float64, device=engine.device)
    if engine.is_pipe_parallel:  # through the executor: under the pipeline's timeout, naming a lost rank
        engine.pipeline_executor.all_reduce_sum(totals, what="the pipeline bubble fraction")
    busy, span = totals.tolist()
    return 0.0 if span <= 0 else max(0.0, 1.0 - busy / span)


def report_step(engine, clock: StepClock) -> None:
    """After the optimizer step: print the new timers and the bubble at DeepSpeed's log points, and write
    the monitor events (module docstring). Every rank of the pipeline calls it (the bubble's all-reduce)."""
    from deepspeed.utils.logging import print_dist

    clock.ended_s = time.perf_counter()
    print_now = engine.steps_per_print() is not None and engine.global_steps % engine.steps_per_print() == 0
    bubble = _pipeline_bubble(engine, clock) if clock.detailed else None
    if clock.detailed and print_now:
        engine.timers.log([BWD_WEIGHT_TIMER, FWD_BWD_OVERLAP_TIMER])
        print_dist(f"pipeline bubble fraction: {bubble:.3f} (step {engine.global_steps})", ranks=[0])
    if engine.global_rank != 0 or not engine.monitor.enabled:
        return
    samples = engine.global_samples
    step_s = clock.ended_s - clock.started_s
    events = [(MONITOR_PREFIX + "samples_per_sec", engine.train_batch_size() / step_s if step_s > 0 else 0.0,
               samples)]
    if clock.detailed:
        backward = clock.backward_s + clock.reduce_s
        for name, seconds in (
            ("forward", clock.forward_s), ("backward", backward), ("backward_inner", clock.backward_s),
            ("backward_allreduce", clock.reduce_s), ("step", clock.optimizer_s),
            ("backward_weight", clock.weight_s), ("fwd_bwd_overlap", clock.overlap_s),
            ("pipe_recv_input", clock.recv_input_s), ("pipe_recv_grad", clock.recv_grad_s),
            ("batch_input", clock.batch_input_s),
        ):
            events.append((f"{MONITOR_PREFIX}elapsed_time_ms_{name}", seconds * 1e3, samples))
        events.append((MONITOR_PREFIX + "pipeline_bubble_fraction", bubble, samples))
    engine.monitor.write_events(events)
