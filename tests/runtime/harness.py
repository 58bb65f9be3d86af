"""Shared pieces of the runtime tests: a tiny model, a single-process reference, spawned pipeline runs.

Spawning costs seconds per process on this machine, so one :func:`dualpipe_plugin.launch.run_local` call
runs many cases: :func:`run_cases` gives each case a pipeline of ``case.ranks`` consecutive processes
(a 4-process run holds one P=4 pipeline, two P=2 pipelines or four P=1 pipelines side by side, each on its
own process groups, as an adapter would build them) and returns one report per case.

Bit-exactness needs the same math order on both sides: the reference accumulates micro-batches in the
pipeline's order and runs with one intra-op thread like the ranks (LayerNorm's weight-gradient reduction
splits differently over more threads).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from dualpipe_plugin.runtime.pipeline import DualPipeline, split_stages, stage_modules
from dualpipe_plugin.runtime.rng import MicrobatchRNG, set_microbatch
from dualpipe_plugin.schedules import build_schedule


@dataclass(frozen=True)
class Case:
    schedule: str
    ranks: int
    microbatches: int
    layers_per_stage: int = 2
    dim: int = 16
    batch_per_microbatch: int = 3
    seed: int = 0
    steps: int = 1
    checkpoint: bool = False
    forward_only: bool = False
    vary_seq: bool = False
    optimizer: str | None = None
    """None, "sgd" or "adam": step it after every pipeline step (on the reference too)."""
    options: dict = field(default_factory=dict)
    """Extra keyword arguments of DualPipeline (split_weights, timeout_s, ...)."""
    dropout: float = 0.0
    """Dropout after every block's tanh, seeded per layer through a MicrobatchRNG (seed 1000 + layer)."""
    batchnorm: bool = False
    """BatchNorm instead of LayerNorm in every other block (running statistics: persistent buffers)."""

    @property
    def num_stages(self) -> int:
        return build_schedule(self.schedule, self.ranks, 2 * self.ranks).placement.num_stages

    @property
    def id(self) -> str:
        extras = [k for k, on in (("ckpt", self.checkpoint), ("eval", self.forward_only), ("vary", self.vary_seq),
                                  ("bn", self.batchnorm)) if on]
        extras += [f"dropout={self.dropout}"] if self.dropout else []
        extras += [self.optimizer] if self.optimizer else []
        extras += [f"{k}={v}" for k, v in self.options.items()]
        extras += [f"{self.steps}steps"] if self.steps > 1 else []
        return "-".join([self.schedule, f"P{self.ranks}", f"C{self.microbatches}", *extras])


class BatchNormLast(nn.BatchNorm1d):
    """BatchNorm over the last dimension of (batch, seq, dim) activations."""

    def forward(self, x):
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class Block(nn.Module):
    """Linear + tanh (+ LayerNorm or BatchNorm every other block, which do not split their weight gradients),
    with optional dropout drawn from a per-layer MicrobatchRNG."""

    def __init__(self, dim: int, norm: bool, checkpoint: bool, *, dropout: float = 0.0, seed: int = 0,
                 batchnorm: bool = False):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.norm = (BatchNormLast(dim) if batchnorm else nn.LayerNorm(dim)) if norm else nn.Identity()
        self.checkpoint = checkpoint
        self.dropout = dropout
        if dropout:
            self.rng = MicrobatchRNG(seed)

    def _body(self, x):
        x = torch.tanh(self.linear(x))
        if self.dropout:
            with self.rng.fork():
                x = nn.functional.dropout(x, self.dropout, self.training)
        return self.norm(x)

    def forward(self, x):
        if self.checkpoint and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(self._body, x, use_reentrant=True)
        return self._body(x)


class ReturnsDict(nn.Module):
    """A stage that returns its output as ``{"hidden": output}`` (a mapping, not a tuple)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *inputs):
        return {"hidden": self.inner(*inputs)}


def build_layers(case: Case) -> list[nn.Module]:
    torch.manual_seed(case.seed)
    count = case.num_stages * case.layers_per_stage
    return [Block(case.dim, norm=i % 2 == 1, checkpoint=case.checkpoint, dropout=case.dropout, seed=1000 + i,
                  batchnorm=case.batchnorm) for i in range(count)]


def batch(case: Case, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    seq = 4 + (step % 3 if case.vary_seq else 0)
    n = case.microbatches * case.batch_per_microbatch
    x = torch.randn(n, seq, case.dim, generator=generator)
    y = torch.randn(n, seq, case.dim, generator=generator)
    if case.checkpoint and not case.forward_only:
        # Reentrant checkpointing only back-propagates through a block whose input requires a gradient
        # (plain torch behaviour, the same in the reference): make the data a leaf that does.
        x.requires_grad_(True)
    return x, y


def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(output, target)


def make_optimizer(name: str | None, params) -> torch.optim.Optimizer | None:
    if name is None:
        return None
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(params, lr=0.01)
    raise ValueError(f"unknown optimizer {name!r}")


@contextmanager
def one_thread() -> Iterator[None]:
    """Run with one intra-op thread, like the spawned ranks (bit-exact reductions need the same split)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _flows(case: Case) -> list[range]:
    """Micro-batches accumulated separately: dualpipe's two directions land on different copies."""
    c = case.microbatches
    return [range(c // 2), range(c // 2, c)] if case.schedule == "dualpipe" else [range(c)]


def _stage_names(layers: list[nn.Module], num_stages: int) -> dict[int, str]:
    stages = split_stages(layers, num_stages)
    return {id(p): f"stage{s}.{i}" for s, part in enumerate(stages) for i, p in enumerate(nn.Sequential(*part).parameters())}


def _merge_copies(start: torch.Tensor, copies: list[torch.Tensor]) -> torch.Tensor:
    """DualPipe's buffer rule (runtime/mirror.py) for the two directions' copies of one buffer."""
    if len(copies) == 1:
        return copies[0]
    first, second = copies
    return (first + second) / 2 if first.is_floating_point() else first + second - start


def reference(case: Case) -> dict:
    """Losses, per-parameter gradients and buffers of one process running the whole model, micro-batch by
    micro-batch.

    The accumulation order matches the pipeline's (micro-batches in order per stage; dualpipe sums its
    two directions' gradients at the end), so fp32 results are comparable bit for bit. Dropout masks come
    from per-layer MicrobatchRNGs told each micro-batch's index. Under dualpipe each direction runs on its
    own copy of the buffers (from the step's start), merged by the runtime's rule at the end of the step.
    Returns per step ``losses`` (list by micro-batch), ``grads`` ({name: grad}), ``buffers`` ({name:
    value}) and ``mean_loss``; ``params`` at the end.
    """
    with one_thread():
        layers = build_layers(case)
        model = nn.Sequential(*layers)
        names = _stage_names(layers, case.num_stages)
        buffer_names = _stage_buffer_names(layers, case.num_stages)
        optimizer = make_optimizer(case.optimizer, model.parameters())
        losses, grads, buffers, means = [], [], [], []
        for step in range(case.steps):
            x, y = batch(case, step)
            xs, ys = x.chunk(case.microbatches), y.chunk(case.microbatches)
            flow_grads, flow_buffers = [], []
            start = {id(b): b.clone() for b in model.buffers()}
            step_losses = []
            for flow in _flows(case):
                model.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for b in model.buffers():
                        b.copy_(start[id(b)])
                for g in flow:
                    set_microbatch(model, g)
                    if case.forward_only:
                        with torch.no_grad():
                            loss = loss_fn(model(xs[g]), ys[g])
                    else:
                        loss = loss_fn(model(xs[g]), ys[g])
                        (loss / case.microbatches).backward()
                    step_losses.append(loss.detach())
                flow_grads.append({id(p): p.grad.clone() for p in model.parameters() if p.grad is not None})
                flow_buffers.append({id(b): b.clone() for b in model.buffers()})
            total = flow_grads[0]
            for extra in flow_grads[1:]:
                total = {k: total[k] + extra[k] for k in total}
            with torch.no_grad():
                for b in model.buffers():
                    b.copy_(_merge_copies(start[id(b)], [copies[id(b)] for copies in flow_buffers]))
            losses.append(step_losses)
            grads.append({names[k]: v for k, v in total.items()})
            buffers.append({buffer_names[id(b)]: b.clone() for b in model.buffers()})
            # Summed in float64 like StepResult.loss: exact for a dozen fp32 values of similar size.
            means.append((torch.stack(step_losses).double().sum() / case.microbatches).float())
            if optimizer is not None:
                for p in model.parameters():
                    p.grad = total[id(p)]
                optimizer.step()
        params = {names[id(p)]: p.detach().clone() for p in model.parameters()}
    return {"losses": losses, "grads": grads, "buffers": buffers, "mean_loss": means, "params": params}


def _stage_buffer_names(layers: list[nn.Module], num_stages: int) -> dict[int, str]:
    stages = split_stages(layers, num_stages)
    return {id(b): f"stage{s}.buffer{i}" for s, part in enumerate(stages)
            for i, b in enumerate(nn.Sequential(*part).buffers())}


def _named_by_stage(chunks, placement, rank: int, value) -> dict[str, torch.Tensor | None]:
    named = {}
    for c, chunk in enumerate(chunks):
        stage = placement.stage(rank, c)
        for i, p in enumerate(chunk.parameters()):
            named[f"stage{stage}.{i}"] = value(p)
    return named


def _grad_or_none(p: torch.Tensor) -> torch.Tensor | None:
    return None if p.grad is None else p.grad.clone()


# Plain Sequential chunks have no overlap protocol: say so instead of warning on every construction.
_DEFAULT_OPTIONS = {"timeout_s": 60.0, "overlap": False}


def run_pipeline(rank: int, world_size: int, case: Case, transport=None) -> dict:
    """Body of one spawned rank: build this rank's chunks, run the steps, report losses and gradients.

    ``rank``/``world_size`` are pipeline positions (``transport`` maps them to processes; default WORLD).
    """
    layers = build_layers(case)
    chunks = stage_modules(layers, case.schedule, world_size, rank)
    options = {**_DEFAULT_OPTIONS, **case.options}
    pipe = DualPipeline(chunks, case.schedule, loss_fn=loss_fn, transport=transport, **options)
    placement = pipe.placement
    optimizer = make_optimizer(case.optimizer, [p for chunk in chunks for p in chunk.parameters()])
    losses, grads, peaks, totals, buffers = [], [], [], [], []
    for step in range(case.steps):
        for chunk in chunks:
            chunk.zero_grad(set_to_none=True)
        x, y = batch(case, step)
        result = pipe.step(
            x if pipe.needs_inputs() else None, y if pipe.needs_labels() else None,
            num_microbatches=case.microbatches, forward_only=case.forward_only,
        )
        losses.append({g: v for g, v in result.losses.items()})
        peaks.append(result.peak_activations)
        totals.append(result.loss)
        grads.append(_named_by_stage(chunks, placement, rank, _grad_or_none))
        buffers.append({f"stage{placement.stage(rank, c)}.buffer{i}": b.clone()
                        for c, chunk in enumerate(chunks) for i, b in enumerate(chunk.buffers())})
        if optimizer is not None:
            optimizer.step()
    pipe.close()
    params = _named_by_stage(chunks, placement, rank, lambda p: p.detach().clone())
    return {"rank": rank, "losses": losses, "grads": grads, "peaks": peaks, "total_loss": result.loss,
            "total_losses": totals, "params": params, "buffers": buffers}


def run_with_hook_log(rank: int, world_size: int, case: Case, transport=None) -> dict:
    """Like :func:`run_pipeline` (one step), also logging every post-accumulate-grad hook.

    Each log entry is (parameter name, module kind, the action running such as ``I0:1`` or ``F1:2&B0:0``,
    grad is None). The action is read by wrapping the executor's per-action dispatch (test-only).
    """
    layers = build_layers(case)
    chunks = stage_modules(layers, case.schedule, world_size, rank)
    options = {**_DEFAULT_OPTIONS, **case.options}
    pipe = DualPipeline(chunks, case.schedule, loss_fn=loss_fn, transport=transport, **options)
    placement = pipe.placement
    current: list[str] = ["none"]
    log: list[tuple[str, str, str, bool]] = []
    executor = pipe.executor
    dispatch = executor._dispatch  # the executor calls self._dispatch(action) once per schedule action

    def traced(action):
        current[0] = str(action)
        try:
            dispatch(action)
        finally:
            current[0] = "none"

    executor._dispatch = traced
    for c, chunk in enumerate(chunks):
        stage = placement.stage(rank, c)
        for module_name, module in chunk.named_modules():
            kind = type(module).__name__
            if kind not in ("Linear", "LayerNorm"):
                continue
            for pname, p in module.named_parameters(recurse=False):
                name = f"stage{stage}.{module_name}.{pname}"
                p.register_post_accumulate_grad_hook(
                    lambda param, name=name, kind=kind: log.append((name, kind, current[0], param.grad is None))
                )
    x, y = batch(case, 0)
    result = pipe.step(
        x if pipe.needs_inputs() else None, y if pipe.needs_labels() else None,
        num_microbatches=case.microbatches,
    )
    grads = _named_by_stage(chunks, placement, rank, _grad_or_none)
    pipe.close()
    return {"rank": rank, "log": log, "grads": [grads], "losses": [dict(result.losses)],
            "peaks": [result.peak_activations], "total_loss": result.loss}


_JOBS = {"steps": run_pipeline, "hooks": run_with_hook_log}


def run_cases(rank: int, world_size: int, jobs: list[tuple[str, Case]]) -> list[dict]:
    """Spawned body running many jobs; ``jobs`` lists (kind, case) with kind in ``"steps"``, ``"hooks"``.

    A case of P ranks runs on ``world_size // P`` pipelines of P consecutive processes, all at once; each
    process reports its pipeline rank. Every process creates the same groups in the same order.
    """
    from dualpipe_plugin.runtime.transport import TorchTransport, new_pipeline_groups

    transports = {}
    for size in sorted({case.ranks for _, case in jobs}):
        if world_size % size:
            raise ValueError(f"a case of {size} ranks does not tile {world_size} processes")
        pipelines = [list(range(start, start + size)) for start in range(0, world_size, size)]
        (index, groups), = new_pipeline_groups(pipelines).items()
        transports[size] = TorchTransport(pipelines[index], groups)
    reports = []
    for kind, case in jobs:
        transport = transports[case.ranks]
        try:
            reports.append(_JOBS[kind](transport.rank, case.ranks, case, transport))
        except Exception as error:
            error.add_note(f"while running job {kind} {case.id} on process {rank}")
            raise
    return reports


def by_case(results: list[list[dict]], jobs: list[tuple[str, Case]]) -> list[list[dict]]:
    """Per job, the reports of every process (several copies of each pipeline rank for small P)."""
    return [[per_process[j] for per_process in results] for j in range(len(jobs))]


def compare_to_reference(case: Case, reports: list[dict], ref: dict, *, exact: bool = True) -> None:
    """Assert every rank's losses and gradients equal the reference (``torch.equal`` when ``exact``)."""
    for step in range(case.steps):
        seen_losses: dict[int, torch.Tensor] = {}
        seen_grads: dict[str, int] = {}
        for report in reports:
            for g, value in report["losses"][step].items():
                assert torch.equal(value, ref["losses"][step][g]), (
                    f"{case.id} step {step} micro-batch {g} on rank {report['rank']}: "
                    f"loss {value.item()!r} != reference {ref['losses'][step][g].item()!r}"
                )
                seen_losses[g] = value
            for name, grad in report["grads"][step].items():
                expected = ref["grads"][step].get(name)
                if case.forward_only:
                    assert grad is None, f"{case.id}: eval step created a gradient for {name} on rank {report['rank']}"
                    continue
                assert grad is not None and expected is not None, f"{case.id}: {name} has no gradient"
                same = torch.equal(grad, expected) if exact else torch.allclose(grad, expected, rtol=1e-5, atol=1e-7)
                assert same, (
                    f"{case.id} step {step}: gradient {name} on rank {report['rank']} differs from the reference "
                    f"by {(grad - expected).abs().max().item():.3e}"
                )
                seen_grads[name] = seen_grads.get(name, 0) + 1
        for report in reports:
            for name, value in report.get("buffers", [{}] * case.steps)[step].items():
                assert torch.equal(value, ref["buffers"][step][name]), (
                    f"{case.id} step {step}: buffer {name} on rank {report['rank']} differs from the reference"
                )
        assert sorted(seen_losses) == list(range(case.microbatches)), f"{case.id}: losses of {sorted(seen_losses)}"
        if not case.forward_only:
            assert set(seen_grads) == set(ref["grads"][step]), f"{case.id}: missing gradients"


def die_on_forward(rank: int, world_size: int, case: Case, victim: int, forward_index: int) -> dict:
    """Spawned body: ``victim`` kills its own process (``os._exit(1)``) at its ``forward_index``-th chunk call."""
    layers = build_layers(case)
    chunks = stage_modules(layers, case.schedule, world_size, rank)
    if rank == victim:
        calls = [0]

        def maybe_die(module, args):
            calls[0] += 1
            if calls[0] > forward_index:
                os._exit(1)

        for chunk in chunks:
            chunk.register_forward_pre_hook(maybe_die)
    pipe = DualPipeline(chunks, case.schedule, loss_fn=loss_fn, **{**_DEFAULT_OPTIONS, **case.options})
    x, y = batch(case, 0)
    pipe.step(x if pipe.needs_inputs() else None, y if pipe.needs_labels() else None,
              num_microbatches=case.microbatches)
    return {"rank": rank}


def run_bad_input(rank: int, world_size: int, scenario: str, timeout_s: float, linger_s: float = 0.0) -> dict:
    """Spawned body of the bad-input tests: one rank gets ``scenario``'s mistake, the others run normally.

    - ``labels_missing``: 1f1b, the last rank passes no labels;
    - ``indivisible``: 1f1b, the last rank's labels have one row too many for the micro-batch count;
    - ``wrong_chunks``: dualpipev, rank 1 passes one chunk instead of two;
    - ``shapes``: dualpipev, rank 1 builds its stages with dim 8 while rank 0 sends dim 16;
    - ``dict_between_stages``: dualpipev, rank 0's first stage returns ``{"hidden": tensor}``;
    - ``float_loss`` / ``vector_loss``: dualpipev, the loss function returns ``loss.item()`` / the unreduced
      squared error (rank 0 holds the last stage);
    - ``empty_batch``: dualpipev, the batch has 0 rows (rank 0 needs it; rank 1 needs no data and waits).

    With ``linger_s`` the failing rank stays alive (connections open) that long before raising, so its
    peers cannot notice a closed connection and must end with their own timeout.
    """
    try:
        return _bad_input_step(rank, world_size, scenario, timeout_s)
    except Exception:
        time.sleep(linger_s)
        raise


def _bad_input_step(rank: int, world_size: int, scenario: str, timeout_s: float) -> dict:
    schedule = "1f1b" if scenario in ("labels_missing", "indivisible") else "dualpipev"
    case = Case(schedule, world_size, 2 * world_size)
    mine = Case(schedule, world_size, 2 * world_size, dim=8) if scenario == "shapes" and rank == 1 else case
    chunks = stage_modules(build_layers(mine), schedule, world_size, rank)
    if scenario == "wrong_chunks" and rank == 1:
        chunks = chunks[:1]
    if scenario == "dict_between_stages" and rank == 0:
        chunks[0] = ReturnsDict(chunks[0])
    loss = {"float_loss": lambda out, target: loss_fn(out, target).item(),
            "vector_loss": lambda out, target: (out - target) ** 2}.get(scenario, loss_fn)
    pipe = DualPipeline(chunks, schedule, loss_fn=loss, timeout_s=timeout_s, overlap=False)
    x, y = batch(case, 0)
    if scenario == "empty_batch":
        x, y = x[:0], y[:0]
    last = rank == world_size - 1
    if scenario == "labels_missing" and last:
        y = None
    if scenario == "indivisible" and last:
        y = torch.cat([y, y[:1]])
    pipe.step(x if pipe.needs_inputs() else None, y if pipe.needs_labels() else None,
              num_microbatches=case.microbatches)
    return {"rank": rank}
