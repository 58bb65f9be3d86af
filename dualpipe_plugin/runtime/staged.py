"""The overlap protocol: a pipeline chunk cut into sub-stages that the overlap engine can interleave.

A model becomes overlappable by building each pipeline chunk as a :class:`StagedChunk` from *parts*.
A part is either a plain ``nn.Module`` (it becomes one compute sub-stage) or a module with a
``sub_stages()`` method returning its :class:`SubStage` objects in forward order::

    chunk = StagedChunk([embedding, block0, block1, head])   # block.sub_stages(): attn, dispatch, experts, combine
    out = chunk(tokens)                                       # a normal module: autograd, no_grad, anything

A sub-stage is this small protocol::

    class SubStage(Protocol):
        name: str                                     # for traces and errors
        kind: StageKind                               # COMPUTE (math) or COMM (a collective, e.g. an all-to-all)
        def forward(self, state, inputs) -> Handle    # inputs: the previous sub-stage's outputs (a tuple)
        def backward(self, state, grads) -> Handle    # grads: one per forward output (None = no gradient)

and a :class:`Handle` has ``wait() -> tuple``: the outputs (forward) or the input gradients (backward,
one per forward input, None where there is none). The contract:

- **COMPUTE** sub-stages do their work before returning (:class:`Ready`). :class:`ComputeStage` turns any
  ``fn(*tensors) -> tensors`` into one: it runs ``fn`` on *detached* inputs, keeps the small autograd
  graph in ``state`` and back-propagates through it in ``backward`` — the detached boundaries that let
  the engine run one sub-stage's backward at a time.
- **COMM** sub-stages *launch* their transfer (``async_op=True``) and return; ``wait()`` finishes it
  and does any cheap local data movement around it (un-permuting tokens, a residual add). Their
  backward is the reverse transfer, written by hand (no autograd). Every rank of the collective's group
  must issue it, even with nothing to send (zero tokens): substitute zeros for a missing gradient.
- ``state`` is a fresh :class:`StageState` per sub-stage and per forward (several micro-batches are in
  flight at once): keep there what ``backward`` needs, never on ``self``. The engine releases it after
  the backward.
- **Weight gradients** need nothing in the protocol: layers bound to the executor's W store (every
  ``nn.Linear``, and modules with ``bind_weight_grad_store``, see ``weight_grad.py``) defer them when
  the engine runs a compute sub-stage's backward under ``store.capture`` — that is how the engine splits
  each backward sub-stage into an input-gradient part and a weight-gradient part.
- **Determinism**: the engine's interleaving order depends only on the sub-stages' kinds, never on
  timing, so every rank of a COMM sub-stage's group issues its collectives in the same order. Ranks of
  one group (e.g. one expert-parallel group) must hold chunks with the same sub-stage kinds.

Outside the overlap engine a :class:`StagedChunk` runs its sub-stages one after the other (waiting on
each transfer at once) and joins the inputs to the outputs with one autograd node whose backward runs
the sub-stages' backwards in reverse: the executor's F, B, I and W ops, the sequential F&B pair and
single-process references all work unchanged, with bit-identical results to the overlapped pair.
"""

from __future__ import annotations

from contextlib import contextmanager
from enum import Enum
from typing import Any, Callable, Iterator, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

__all__ = [
    "StageKind", "Handle", "Ready", "StageState", "SubStage", "ComputeStage", "StagedChunk", "StagedRun",
    "claim_backward",
]

Tensors = tuple[Any, ...]
"""Tensors flowing between sub-stages (None allowed in gradient tuples; integer tensors never get one)."""


class StageKind(str, Enum):
    """What a sub-stage spends its time on: the engine overlaps one side's COMM with the other's COMPUTE."""

    COMPUTE = "compute"
    COMM = "comm"


class Handle(Protocol):
    def wait(self) -> Tensors: ...


class Ready:
    """A :class:`Handle` whose result is already there (every COMPUTE sub-stage, a local transfer)."""

    __slots__ = ("_value",)

    def __init__(self, value: Tensors):
        self._value = value

    def wait(self) -> Tensors:
        return self._value


class StageState:
    """Per-(sub-stage, forward) scratch space: attributes set by ``forward`` and read by ``backward``."""

    def clear(self) -> None:
        self.__dict__.clear()


@runtime_checkable
class SubStage(Protocol):
    name: str
    kind: StageKind

    def forward(self, state: StageState, inputs: Tensors) -> Handle: ...

    def backward(self, state: StageState, grads: Tensors) -> Handle: ...


def _as_tuple(value: Any) -> Tensors:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _leaf(value: Any) -> Any:
    """A detached copy of a sub-stage input (a new autograd leaf that wants a gradient if the input did)."""
    if isinstance(value, torch.Tensor):
        return value.detach().requires_grad_(value.requires_grad)
    return value


class ComputeStage:
    """A COMPUTE sub-stage from ``fn(*inputs) -> tensor | tuple``, with autograd behind detached boundaries.

    ``fn`` may return some of its inputs unchanged (pass-through tensors such as a residual): their
    gradients flow straight through. Outputs that do not require a gradient (indices, counts) get None.
    """

    kind = StageKind.COMPUTE

    def __init__(self, name: str, fn: Callable[..., Any]):
        self.name = name
        self.fn = fn

    def forward(self, state: StageState, inputs: Tensors) -> Handle:
        if not torch.is_grad_enabled():
            return Ready(_as_tuple(self.fn(*inputs)))
        leaves = tuple(_leaf(t) for t in inputs)
        outputs = _as_tuple(self.fn(*leaves))
        state.inputs, state.outputs = leaves, outputs
        return Ready(outputs)

    def backward(self, state: StageState, grads: Tensors) -> Handle:
        roots, root_grads = [], []
        for output, grad in zip(state.outputs, grads):
            if grad is not None and isinstance(output, torch.Tensor) and output.requires_grad:
                roots.append(output)
                root_grads.append(grad)
        if roots:
            torch.autograd.backward(roots, root_grads)
        input_grads = tuple(
            t.grad if isinstance(t, torch.Tensor) and t.requires_grad else None for t in state.inputs
        )
        state.clear()
        return Ready(input_grads)

    def __repr__(self) -> str:
        return f"ComputeStage({self.name!r})"


class _Claim:
    """Filled by the stitch node when the overlap engine runs a chunk's backward itself."""

    def __init__(self) -> None:
        self.run: StagedRun | None = None
        self.grads: Tensors = ()


class StagedChunk(nn.Module):
    """A pipeline chunk made of parts whose sub-stages the overlap engine can interleave (see module doc).

    ``forward(*inputs)`` returns one tensor when the last sub-stage produces one, else a tuple.
    """

    def __init__(self, parts: Sequence[nn.Module]):
        super().__init__()
        if not parts:
            raise ValueError("a StagedChunk needs at least one part; pass e.g. [embedding, block, head]")
        self.parts = nn.ModuleList(parts)
        stages: list[SubStage] = []
        for index, part in enumerate(parts):
            if not isinstance(part, nn.Module):
                raise TypeError(f"part {index} of a StagedChunk is a {type(part).__name__}, not an nn.Module")
            if hasattr(part, "sub_stages"):
                for stage in part.sub_stages():
                    if not isinstance(stage, SubStage) or not isinstance(stage.kind, StageKind):
                        raise TypeError(
                            f"{type(part).__name__}.sub_stages() returned {stage!r}, which is not a SubStage: "
                            f"give it name, kind (a StageKind), forward(state, inputs) and backward(state, grads)"
                        )
                    stages.append(stage)
            else:
                stages.append(ComputeStage(f"{index}:{type(part).__name__}", part))
        if not stages:
            raise ValueError("the parts of this StagedChunk have no sub-stages; sub_stages() must return at least one")
        self.stages: tuple[SubStage, ...] = tuple(stages)
        self._claim: _Claim | None = None

    def sub_stages(self) -> tuple[SubStage, ...]:
        """Its sub-stages: a StagedChunk is itself a part, so chunks nest (a framework that builds the
        pipeline chunk from its own layers, like DeepSpeed's PipelineModule, can be handed staged layers)."""
        return self.stages

    @property
    def kinds(self) -> tuple[StageKind, ...]:
        return tuple(stage.kind for stage in self.stages)

    def begin(self, inputs: Tensors) -> "StagedRun":
        """Start one forward: the engine drives it sub-stage by sub-stage, then calls :meth:`StagedRun.stitch`."""
        return StagedRun(self, inputs)

    def forward(self, *inputs: Any) -> Any:
        run = self.begin(inputs)
        values: Tensors = inputs
        for index in range(len(self.stages)):
            values = run.forward(index, values).wait()
        outputs = run.stitch(values) if torch.is_grad_enabled() else values
        return outputs[0] if len(outputs) == 1 else outputs

    @contextmanager
    def claim(self) -> Iterator[_Claim]:
        """While open, a backward reaching this chunk's stitch hands its run and gradients to the claim
        instead of running the sub-stages (the engine then runs them itself, interleaved)."""
        if self._claim is not None:
            raise RuntimeError("this chunk's backward is already claimed")
        self._claim = _Claim()
        try:
            yield self._claim
        finally:
            self._claim = None


class StagedRun:
    """One forward of a :class:`StagedChunk` (one micro-batch): the sub-stages' states until the backward."""

    def __init__(self, chunk: StagedChunk, inputs: Tensors):
        self.chunk = chunk
        self.stages = chunk.stages
        self.inputs = tuple(inputs)
        self.states = [StageState() for _ in self.stages]

    def forward(self, index: int, inputs: Tensors) -> Handle:
        return self.stages[index].forward(self.states[index], inputs)

    def backward(self, index: int, grads: Tensors) -> Handle:
        return self.stages[index].backward(self.states[index], grads)

    def backward_all(self, grads: Tensors) -> Tensors:
        """The sub-stages' backwards in reverse order, each transfer waited at once; the input gradients."""
        for index in reversed(range(len(self.stages))):
            grads = self.backward(index, grads).wait()
        return grads

    def stitch(self, outputs: Tensors) -> Tensors:
        """The outputs, joined to the inputs by one autograd node whose backward is :meth:`backward_all`."""
        wanted = tuple(t for t in self.inputs if isinstance(t, torch.Tensor) and t.requires_grad)
        # An input-free graph (token ids in) still needs a node that autograd reaches.
        anchor = torch.zeros((), requires_grad=True)
        detached = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in outputs)
        return _Stitch.apply(self, len(wanted), anchor, *wanted, *detached)

    def deposit_input_grads(self, grads: Tensors) -> None:
        """Give the inputs the gradients the engine computed (as the stitch's backward would have)."""
        for tensor, grad in zip(self.inputs, grads):
            if grad is None or not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
                continue
            if tensor.grad_fn is None:
                tensor.grad = grad if tensor.grad is None else tensor.grad + grad
            else:
                torch.autograd.backward(tensor, grad)


class _Stitch(torch.autograd.Function):
    """Inputs -> outputs of a staged forward as one autograd node (see :meth:`StagedRun.stitch`)."""

    @staticmethod
    def forward(ctx, run: StagedRun, num_inputs: int, anchor, *tensors):
        ctx.run, ctx.num_inputs = run, num_inputs
        ctx.set_materialize_grads(False)
        outputs = tensors[num_inputs:]
        ctx.mark_non_differentiable(*(t for t in outputs if not t.is_floating_point()))
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        run: StagedRun = ctx.run
        ctx.run = None
        claim = run.chunk._claim
        if claim is not None:
            claim.run, claim.grads = run, grads
            input_grads: Tensors = (None,) * len(run.inputs)
        else:
            input_grads = run.backward_all(grads)
        wanted = tuple(
            g for t, g in zip(run.inputs, input_grads) if isinstance(t, torch.Tensor) and t.requires_grad
        )
        assert len(wanted) == ctx.num_inputs
        return (None, None, None, *wanted, *(None,) * len(grads))


def claim_backward(
    chunk: StagedChunk, roots: Sequence[torch.Tensor], grads: Sequence[torch.Tensor] | None
) -> tuple[StagedRun | None, Tensors]:
    """Back-propagate ``roots`` down to ``chunk``'s stitch and stop there: the run and its output gradients.

    Everything between the roots and the chunk's outputs (a loss function) runs now; the chunk's own
    sub-stages are left to the caller. Returns ``(None, ())`` if the roots do not reach the chunk.
    """
    if not roots:
        return None, ()
    with chunk.claim() as claim:
        torch.autograd.backward(list(roots), None if grads is None else list(grads))
    return claim.run, claim.grads
