"""DeepSpeed's own MoE layer (``deepspeed.moe.layer.MoE``) on the overlap protocol, inside the user's block.

A DeepSpeed user writes a pipeline layer as a block module that holds an MoE layer and calls it
somewhere in its ``forward``::

    class Block(nn.Module):                      # a LayerSpec(Block, ...) of the PipelineModule
        def __init__(self, ...):
            self.attn, self.norm = ..., ...
            self.moe = deepspeed.moe.layer.MoE(hidden, expert, num_experts=8, ep_size=2, k=2)
        def forward(self, inputs):
            x, aux = inputs
            h = x + self.attn(x)
            y, l_aux, _ = self.moe(self.norm(h))
            return h + y, aux + l_aux

With ``"pipeline": {"overlap": true}`` the engine builds each chunk as a
:class:`~dualpipe_plugin.runtime.staged.StagedChunk` and :func:`staged_parts` turns every layer that holds
such MoE layers into a :class:`DeepSpeedMoEStages`: per MoE layer called by the block, five sub-stages
instead of one opaque forward (the block's code before, between and after them is the user's, run as is)::

    pre       COMPUTE  the block's code up to the MoE layer, then DeepSpeed's gate (TopKGate: the routing,
                       the aux loss) and its dispatch encoding (sharded_moe._route_slots / _sparse_encode)
    dispatch  COMM     all_to_all_single of the [E, C, M] buffer on the layer's expert-parallel group
                       (deepspeed.comm, async_op=True), as MOELayer's _AllToAll
    experts   COMPUTE  DeepSpeed's Experts module on the received tokens
    combine   COMM     all_to_all_single back on the same group
    post      COMPUTE  sharded_moe._sparse_decode (weighting by the gate), the rest of MoE.forward
                       (use_residual) and the block's code after the MoE layer, up to the next MoE layer

so the overlap engine hides one chunk's all-to-alls behind the other chunk's compute in each F&B pair.

How a user's ``forward`` is cut without rewriting it. The block runs in a worker thread used as a
coroutine (:class:`_Strand`): the driving thread resumes it for a compute sub-stage, and it hands control
back where the MoE layer would call its all-to-all (``MOELayer.forward`` is replaced on the instance by
:func:`_moe_layer_forward`, which calls DeepSpeed's gate, encode, experts and decode in DeepSpeed's order;
outside a staged forward it calls DeepSpeed's own ``MOELayer.forward``). Only one thread runs at a time,
so the work happens in the same order as in one call. Each compute sub-stage gets its own autograd
graph: the received tokens are fresh leaves, and a tensor of an earlier sub-stage that later code uses
(the residual ``h``, the gate weights, the aux loss) is replaced by a detached alias at its first use
there (a ``TorchFunctionMode`` for torch functions and tensor methods, a forward pre-hook for the
block's submodules). A sub-stage's backward is one ``torch.autograd.backward`` over its own graph; the
aliases' gradients are handed to the backward of the sub-stage that made the tensor, as extra roots.
Every kernel is the same as in DeepSpeed's forward and backward, so losses and gradients are bit-exact
with overlap off and with DeepSpeed's TrainSchedule (``tests/deepspeed/test_moe_overlap.py``).

What the block may not do after an MoE layer (refused with :class:`DeepSpeedMoEOverlapError`, which names
the fix): modify a tensor computed before it in place (``h += y``: write ``h = h + y``), or pass such a
tensor directly to a custom ``torch.autograd.Function``; a tensor that requires a gradient must come into
the block through its input (parameters aside). Refused when the engine is built: Tutel, tensor
parallelism (MOELayer's drop/gather of duplicate tokens), an MoE layer the block does not call exactly
once per forward. DeepSpeed's own MoE wall-clock timers are not updated on this path.
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from dualpipe_plugin.runtime.staged import Ready, StageKind, StageState, Tensors

__all__ = ["DeepSpeedMoEStages", "DeepSpeedMoEOverlapError", "holds_deepspeed_moe", "staged_parts"]


class DeepSpeedMoEOverlapError(ValueError):
    """A DeepSpeed MoE block cannot be cut into overlap sub-stages; the message names the fix."""


def _moe_layers(module: nn.Module) -> list:
    from deepspeed.moe.sharded_moe import MOELayer

    return [m for m in module.modules() if isinstance(m, MOELayer)]


def holds_deepspeed_moe(module: Any) -> bool:
    """``module`` is an ``nn.Module`` with a DeepSpeed ``MOELayer`` inside (``deepspeed.moe.layer.MoE``)."""
    return isinstance(module, nn.Module) and bool(_moe_layers(module))


# ----------------------------------------------------------------------------- the coroutine thread


class _Abort(BaseException):
    """Raised inside an abandoned strand to unwind the user's code (never reaches the user)."""


class _ThreadState:
    """The driving thread's per-thread torch state, re-applied in the strand for each piece it runs."""

    def __init__(self) -> None:
        self.grad = torch.is_grad_enabled()
        self.autocast = [(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
                         for kind in ("cpu", "cuda") if kind == "cpu" or torch.cuda.is_available()]
        self.cuda = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.cuda = (torch.cuda.current_device(), torch.cuda.current_stream())

    def apply(self) -> None:
        torch.set_grad_enabled(self.grad)
        for kind, enabled, dtype in self.autocast:
            torch.set_autocast_enabled(kind, enabled)
            torch.set_autocast_dtype(kind, dtype)
        if self.cuda is not None:
            torch.cuda.set_device(self.cuda[0])
            torch.cuda.set_stream(self.cuda[1])


class _Strand:
    """One worker thread that runs a function as a coroutine with the driving thread.

    ``start(fn)`` and ``resume(value)`` run it until it calls :meth:`pause` (returns ``("pause", what)``)
    or returns (``("done", result)``); its exceptions are raised in the driver. Exactly one of the two
    threads runs at any time.
    """

    def __init__(self, name: str):
        self._name = name
        self._cv = threading.Condition()
        self._worker_turn = False
        self._mail: Any = None
        self._thread: threading.Thread | None = None
        self._busy = False

    @property
    def in_worker(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def _hand(self, to_worker: bool, mail: Any) -> Any:
        """Give the turn (and ``mail``) to the other thread; wait for it to come back; return its mail."""
        with self._cv:
            self._mail, self._worker_turn = mail, to_worker
            del mail
            self._cv.notify_all()
            while self._worker_turn is to_worker:
                self._cv.wait()
            received, self._mail = self._mail, None  # hold no tensors between turns
            return received

    def _loop(self) -> None:
        with self._cv:
            while not self._worker_turn:
                self._cv.wait()
            mail, self._mail = self._mail, None
        while True:
            kind, payload = mail
            mail = None
            if kind == "start":
                fn, state = payload
                payload = None
                try:
                    state.apply()
                    reply = ("done", fn())
                except _Abort:
                    reply = ("aborted", None)
                except BaseException as error:  # noqa: BLE001 - handed to the driver
                    reply = ("error", error)
                fn = state = None
            else:  # a resume or an abort that found nothing running
                reply = ("aborted", None)
            with self._cv:  # hand the reply over, keeping no reference to it while idle
                self._mail, self._worker_turn = reply, False
                reply = None
                self._cv.notify_all()
                while not self._worker_turn:
                    self._cv.wait()
                mail, self._mail = self._mail, None

    def _drive(self, mail) -> tuple[str, Any]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
            self._thread.start()
        kind, payload = self._hand(True, mail)
        if kind in ("done", "error", "aborted"):
            self._busy = False
        if kind == "error":
            raise payload
        return kind, payload

    def start(self, fn: Callable[[], Any]) -> tuple[str, Any]:
        # Forwards of one block never overlap: a run still open was abandoned by an error in its step.
        self.abort()
        self._busy = True
        return self._drive(("start", (fn, _ThreadState())))

    def resume(self, value: Any) -> tuple[str, Any]:
        return self._drive(("resume", (value, _ThreadState())))

    def abort(self) -> None:
        """Unwind a paused run (its frames and tensors are released)."""
        if self._busy:
            self._drive(("abort", None))

    def pause(self, what: Any) -> Any:
        """In the worker: hand ``what`` to the driver and wait to be resumed; returns the resumed value."""
        kind, payload = self._hand(False, ("pause", what))
        if kind == "abort":
            raise _Abort()
        value, state = payload
        state.apply()
        return value


# ------------------------------------------------------------------------ one staged forward (a run)


class _Cut(TorchFunctionMode):
    """Aliases tensors of earlier sub-stages at their first use in the current one (see the module doc)."""

    def __init__(self, run: "_Run"):
        super().__init__()
        self._run = run

    def __torch_function__(self, func, types, args=(), kwargs=None):
        run = self._run
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if args and isinstance(args[0], torch.Tensor) and run.crosses(args[0]) and (
            (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") or name == "__setitem__"
        ):
            raise DeepSpeedMoEOverlapError(
                f"{run.block_name}: the in-place operation {name} modifies a tensor computed before the MoE "
                f"layer, which the overlap sub-stages cannot split; write it out of place (e.g. h = h + y "
                f'instead of h += y) or set "overlap": false'
            )
        return func(*run.alias_all(args), **{k: run.alias_all(v) if isinstance(v, (list, tuple)) else run.alias(v)
                                             for k, v in kwargs.items()})


class _Run:
    """One forward of a :class:`DeepSpeedMoEStages` (one micro-batch): its sub-stages' graphs until backward.

    Segment ``j`` is the code between two all-to-alls: segment 0 starts at the block's inputs, segment
    ``j > 0`` at the tokens received by transfer ``j``. ``markers[j]`` is the autograd sequence number at
    its start (nodes made by this strand are numbered in order), so a node's segment is known.
    """

    def __init__(self, block: "DeepSpeedMoEStages", inputs: Tensors):
        self.block = block
        self.block_name = block.label
        self.inputs = tuple(inputs)
        self.leaves = tuple(t.detach().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
                            for t in self.inputs)
        self.markers: list[int] = []
        self.starts: list[tuple] = [self.leaves]  # per segment: the leaves it starts from
        self.cuts: list[torch.Tensor] = []  # per segment but the last: the tensor it hands to a transfer
        self.aliases: list[list] = []  # per segment: (original, alias, segment of the original)
        self.pending: dict[int, list] = {}  # segment -> (original, gradient) from later segments' aliases
        self.leaf_segment = {id(t): 0 for t in self.leaves if isinstance(t, torch.Tensor)}
        self.keep: list[torch.Tensor] = []  # originals referenced by id
        self._alias_of: dict[int, torch.Tensor] = {}
        self._mode: _Cut | None = None
        self.grad = torch.is_grad_enabled()
        self.outputs: Tensors | None = None
        self.layer_calls = 0

    # -- segments (in the strand) ----------------------------------------------------------------
    def begin_segment(self) -> None:
        self.markers.append(_sequence_mark())
        self.aliases.append([])
        self._alias_of = {}
        segment = len(self.markers) - 1
        # Segments 2, 4, ... run the block's own code after an MoE layer; the experts' segments see only
        # the received tokens (a tensor from outside would still be caught by _check_cut).
        if segment > 0 and segment % 2 == 0 and self.grad:
            self._mode = _Cut(self)
            self._mode.__enter__()

    def end_segment(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    def segment_of(self, tensor: torch.Tensor) -> int | None:
        known = self.leaf_segment.get(id(tensor))
        if known is not None:
            return known
        node = tensor.grad_fn
        if node is None:
            return None
        number = node._sequence_nr()
        if number < self.markers[0]:
            return None  # made outside this forward: left alone
        segment = len(self.markers) - 1
        while segment > 0 and number < self.markers[segment]:
            segment -= 1
        return segment

    def crosses(self, tensor: torch.Tensor) -> bool:
        if not tensor.requires_grad or id(tensor) in self._alias_of:
            return False
        segment = self.segment_of(tensor)
        return segment is not None and segment < len(self.markers) - 1

    def alias(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or not value.requires_grad:
            return value
        alias = self._alias_of.get(id(value))
        if alias is not None:
            return alias
        segment = self.segment_of(value)
        if segment is None or segment == len(self.markers) - 1:
            return value
        alias = value.detach().requires_grad_()
        self._alias_of[id(value)] = alias
        self._alias_of[id(alias)] = alias
        self.keep.append(value)
        self.aliases[-1].append((value, alias, segment))
        return alias

    def alias_all(self, values):
        if isinstance(values, (list, tuple)):
            mapped = [self.alias_all(v) if isinstance(v, (list, tuple)) else self.alias(v) for v in values]
            return type(values)(mapped) if isinstance(values, list) else tuple(mapped)
        return self.alias(values)

    def exchange(self, tensor: torch.Tensor, group) -> torch.Tensor:
        """In the strand: end this segment handing ``tensor`` to a transfer; the received tokens start the next."""
        self.cuts.append(tensor)
        self.end_segment()
        received = self.block.strand.pause((tensor, group))
        received = received.requires_grad_(tensor.requires_grad and self.grad)
        self.leaf_segment[id(received)] = len(self.markers)
        self.starts.append((received,))
        self.begin_segment()
        return received

    # -- the whole forward (in the strand) -------------------------------------------------------
    def body(self) -> Tensors:
        self.begin_segment()
        block = self.block.block
        with self.block.binding(self):
            leaves = self.leaves
            outputs = block(leaves[0] if len(leaves) == 1 else leaves)
            outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
            outputs = tuple(self.alias(t) for t in outputs)
        self.end_segment()
        expected = 2 * len(self.block.layers)
        if len(self.cuts) != expected:
            raise DeepSpeedMoEOverlapError(
                f"{self.block_name}: its forward called its {len(self.block.layers)} MoE layer(s) "
                f"{len(self.cuts) // 2} time(s); the overlap sub-stages need every MoE layer of the block called "
                f'exactly once per forward; set "overlap": false for this model'
            )
        if self.grad:
            self._check_cut(outputs)
        self.outputs = outputs
        return outputs

    def _check_cut(self, outputs: Tensors) -> None:
        """Every segment's graph must end at its own leaves and aliases (no edge into an earlier segment)."""
        for segment in range(1, len(self.markers)):
            roots = outputs if segment == len(self.markers) - 1 else (self.cuts[segment],)
            start = self.markers[segment]
            stack = [t.grad_fn for t in roots if isinstance(t, torch.Tensor) and t.grad_fn is not None]
            seen = set()
            while stack:
                node = stack.pop()
                if node in seen or node._sequence_nr() < start:
                    continue
                seen.add(node)
                for child, _ in node.next_functions:
                    if child is None or not hasattr(child, "_sequence_nr") or type(child).__name__ == "AccumulateGrad":
                        continue
                    number = child._sequence_nr()
                    if self.markers[0] <= number < start:
                        raise DeepSpeedMoEOverlapError(
                            f"{self.block_name}: after its MoE layer the block passes a tensor computed before it "
                            f"to {type(node).__name__.removesuffix('Backward')} (a custom autograd Function?), "
                            f"which the overlap sub-stages cannot cut; compute it from a torch operation first "
                            f'(e.g. h = h + 0) or set "overlap": false'
                        )
                    stack.append(child)

    # -- backward of one segment (in the driver) --------------------------------------------------
    def backward_segment(self, segment: int, roots: Sequence, grads: Sequence) -> Tensors:
        """Back-propagate segment ``segment`` from ``roots`` (plus later segments' alias gradients); hand
        its aliases' gradients on; return the gradients of the leaves it started from."""
        pairs = [(r, g) for r, g in zip(roots, grads)
                 if g is not None and isinstance(r, torch.Tensor) and r.requires_grad]
        pairs += self.pending.pop(segment, [])
        if pairs:
            torch.autograd.backward([r for r, _ in pairs], [g for _, g in pairs])
        for original, alias, origin in self.aliases[segment]:
            if alias.grad is not None:
                self.pending.setdefault(origin, []).append((original, alias.grad))
        return tuple(t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None
                     for t in self.starts[segment])


def _sequence_mark() -> int:
    """The autograd sequence number the next node made by this thread will get (or just below it)."""
    with torch.enable_grad():
        return (torch.empty(0, requires_grad=True) * 1).grad_fn._sequence_nr()


# ------------------------------------------------------------------------------------ the sub-stages


class _Segment:
    """COMPUTE: run the block's strand up to its next all-to-all (or its end); backward of that piece."""

    kind = StageKind.COMPUTE

    def __init__(self, block: "DeepSpeedMoEStages", index: int, name: str):
        self.block, self.index, self.name = block, index, name
        self.last = index == 2 * len(block.layers)
        """Segment ``index`` of the block's forward: 0 before the first all-to-all, 2k after the last."""

    def forward(self, state: StageState, inputs: Tensors) -> Ready:
        strand = self.block.strand
        if self.index == 0:
            run = _Run(self.block, inputs)
            kind, value = strand.start(run.body)
        else:
            run, received = inputs
            kind, value = strand.resume(received)
        state.run = run
        if kind == "done":
            return Ready(value)
        if self.last:
            strand.abort()
            raise DeepSpeedMoEOverlapError(
                f"{run.block_name}: its forward called an MoE layer more than once; the overlap sub-stages need "
                f'every MoE layer of the block called exactly once per forward; set "overlap": false'
            )
        tensor, group = value
        return Ready((run, tensor, group))

    def backward(self, state: StageState, grads: Tensors) -> Ready:
        run: _Run = state.run
        state.clear()
        if self.last:
            roots = run.outputs
        else:
            roots, grads = (run.cuts[self.index],), (grads[1],)
        leaf_grads = run.backward_segment(self.index, roots, grads)
        if self.index == 0:
            return Ready(leaf_grads)
        return Ready((None, leaf_grads[0]))


class _Exchange:
    """COMM: DeepSpeed's all_to_all_single on the MoE layer's expert-parallel group, launched async;
    backward: the same all-to-all of the gradient (as ``sharded_moe._AllToAll``)."""

    kind = StageKind.COMM

    def __init__(self, name: str):
        self.name = name

    def forward(self, state: StageState, inputs: Tensors):
        run, tensor, group = inputs
        state.group, state.like = group, (tensor.shape, tensor.dtype, tensor.device)
        return _all_to_all(tensor.detach(), group, lambda received: (run, received))

    def backward(self, state: StageState, grads: Tensors):
        grad = grads[1]
        if grad is None:  # every rank of the group takes part, with zeros if nothing flows back
            shape, dtype, device = state.like
            grad = torch.zeros(shape, dtype=dtype, device=device)
        group = state.group
        state.clear()
        return _all_to_all(grad, group, lambda received: (None, received))


class _Transfer:
    __slots__ = ("_work", "_sent", "_received", "_then")

    def __init__(self, work, sent, received, then):
        self._work, self._sent, self._received, self._then = work, sent, received, then

    def wait(self) -> Tensors:
        if self._work is not None:
            self._work.wait()
            self._work = self._sent = None
        return self._then(self._received)


def _all_to_all(tensor: torch.Tensor, group, then: Callable[[torch.Tensor], Tensors]):
    """``deepspeed.comm.all_to_all_single`` of ``tensor`` on ``group`` (equal splits), launched async; a
    group of one (``ep_size`` 1: DeepSpeed makes the tensor contiguous) moves nothing."""
    from deepspeed import comm as dist

    tensor = tensor.contiguous()
    if group is None or dist.get_world_size(group=group) == 1:
        return Ready(then(tensor))
    received = torch.empty_like(tensor)
    work = dist.all_to_all_single(received, tensor, group=group, async_op=True)
    return _Transfer(work, tensor, received, then)


# ---------------------------------------------------------------------------- MOELayer.forward, cut


def _moe_layer_forward(layer, block: "DeepSpeedMoEStages", *input: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``MOELayer.forward`` with its two all-to-alls as the strand's pauses (DeepSpeed's own functions and
    modules, in its order); DeepSpeed's own ``forward`` when not inside a staged forward of ``block``."""
    from deepspeed.moe import sharded_moe

    run = block.current_run()
    if run is None:
        return type(layer).forward(layer, *input, **kwargs)
    run.layer_calls += 1
    d_model = input[0].shape[-1]
    reshaped_input = input[0].reshape(-1, d_model)
    layer.l_aux, capacity, num_experts, indices, locations, gates, layer.exp_counts = layer.gate(
        reshaped_input, input[1], True, layer.use_tutel)
    num_tokens = reshaped_input.size(0)
    capacity = int(capacity)
    slots = sharded_moe._route_slots(indices, locations, num_experts, capacity)
    dispatched = sharded_moe._sparse_encode(reshaped_input, slots, num_experts, capacity)
    dispatched = run.exchange(dispatched, layer.ep_group if layer.ep_size > 1 else None)
    dispatched = dispatched.reshape(layer.ep_size, layer.num_local_experts, -1, d_model)
    expert_output = layer.experts(dispatched)
    expert_output = expert_output.reshape(layer.ep_size * layer.num_local_experts, -1, d_model)
    expert_output = run.exchange(expert_output, layer.ep_group if layer.ep_size > 1 else None)
    combined = sharded_moe._sparse_decode(expert_output.view(num_experts * capacity, d_model), slots, gates,
                                          num_tokens)
    return combined.reshape(input[0].shape)


def _check_layer(layer, label: str) -> None:
    from deepspeed.utils import groups
    from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size

    if layer.use_tutel:
        raise DeepSpeedMoEOverlapError(f"{label}: use_tutel=True has no overlap sub-stages here; build the MoE "
                                       f'layer with use_tutel=False or set "overlap": false')
    if bwc_tensor_model_parallel_world_size(groups.mpu) > 1:
        raise DeepSpeedMoEOverlapError(f"{label}: MoE overlap with tensor parallelism (DeepSpeed drops and "
                                       f"gathers duplicate tokens around the all-to-all) is not supported; "
                                       f'set "overlap": false')


class DeepSpeedMoEStages(nn.Module):
    """A pipeline layer holding DeepSpeed MoE layers, as a part of a StagedChunk (see the module doc).

    Calling it runs the block as DeepSpeed would (``block(x)`` with one argument, a tensor or a tuple);
    ``sub_stages()`` gives 4 sub-stages per MoE layer plus one.
    """

    def __init__(self, block: nn.Module, label: str | None = None):
        super().__init__()
        self.block = block
        self.label = label or type(block).__name__
        self.layers = _moe_layers(block)
        for layer in self.layers:
            _check_layer(layer, self.label)
        self.strand = _Strand(f"dualpipe-moe-{self.label}")
        self._run: _Run | None = None
        for layer in self.layers:
            layer.__dict__["forward"] = _BoundForward(layer, self)
        # Tensors of an earlier sub-stage passed to a submodule (e.g. a split nn.Linear, whose autograd
        # Function the TorchFunctionMode does not see) are aliased on the way in; a no-op outside the strand.
        hook = _alias_inputs(weakref.ref(self))
        for module in block.modules():
            if module is not block:
                module.register_forward_pre_hook(hook)

    def forward(self, *inputs):
        return self.block(inputs[0] if len(inputs) == 1 else inputs)

    def sub_stages(self):
        stages = [_Segment(self, 0, f"{self.label}.pre")]
        for index, _ in enumerate(self.layers):
            stages += [_Exchange(f"{self.label}.moe{index}.dispatch"),
                       _Segment(self, 2 * index + 1, f"{self.label}.moe{index}.experts"),
                       _Exchange(f"{self.label}.moe{index}.combine"),
                       _Segment(self, 2 * index + 2, f"{self.label}.moe{index}.post")]
        return stages

    # -- the open run --------------------------------------------------------------------------------
    def current_run(self) -> _Run | None:
        """The staged forward this thread is running for this block, if any."""
        return self._run if self.strand.in_worker else None

    @contextmanager
    def binding(self, run: _Run) -> Iterator[None]:
        """While the block runs in the strand: its MoE layers cut, its submodules alias their inputs."""
        self._run = run
        try:
            yield
        finally:
            self._run = None


class _BoundForward:
    """``MOELayer.forward`` on the instance: cut inside a staged forward of its block, DeepSpeed's otherwise."""

    __slots__ = ("_layer", "_block")

    def __init__(self, layer, block: DeepSpeedMoEStages):
        self._layer, self._block = weakref.ref(layer), weakref.ref(block)

    def __call__(self, *input, **kwargs):
        return _moe_layer_forward(self._layer(), self._block(), *input, **kwargs)


def _alias_inputs(block_ref: "weakref.ref[DeepSpeedMoEStages]"):
    def hook(module, args):
        block = block_ref()
        run = None if block is None else block.current_run()
        if run is None or run._mode is None:
            return None
        mapped = run.alias_all(args)
        return mapped if any(a is not b for a, b in zip(mapped, args)) else None

    return hook


class _DeepSpeedCall(nn.Module):
    """A plain DeepSpeed layer as a StagedChunk part: called with one argument, as DeepSpeed calls it."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, *inputs):
        return self.layer(inputs[0] if len(inputs) == 1 else inputs)


def staged_parts(funcs: Sequence[Any]) -> list[nn.Module]:
    """The parts of a StagedChunk for a PipelineModule chunk: layers holding DeepSpeed MoE layers become
    :class:`DeepSpeedMoEStages` s, layers speaking the protocol (``sub_stages``) stay, every other layer is
    called as DeepSpeed calls it (one argument). Every func must be an ``nn.Module``."""
    parts: list[nn.Module] = []
    for index, func in enumerate(funcs):
        if hasattr(func, "sub_stages"):
            parts.append(func)
        elif holds_deepspeed_moe(func):
            parts.append(DeepSpeedMoEStages(func, f"{type(func).__name__}[{index}]"))
        else:
            parts.append(_DeepSpeedCall(func))
    return parts
