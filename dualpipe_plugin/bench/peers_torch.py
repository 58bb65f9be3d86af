"""Peer entries of ``bench compare``: ``torch.distributed.pipelining`` (Schedule1F1B, ScheduleDualPipeV,
ScheduleZBVZeroBubble) on the same emulated model, one spawned job per entry.

Stages are ``PipelineStage`` objects built from the same :class:`~dualpipe_plugin.runtime.emulate.EmulatedLayer`
stacks as ours: 4 stages of 2 layers for 1F1B, 8 stages of 1 layer (rank r holds stages r and 2P-1-r)
for the V schedules. MoE: the same ``moe_chunks`` (StagedChunks of emulated MoE blocks) per stage, for
ScheduleDualPipeV on P × EP processes, one pipeline group per replica; torch runs an OVERLAP_F_B action's
forward and backward one after the other.

[Note: what torch's I/W split pays on the emulated device]
torch splits a backward into ``stage_backward_input`` (``autograd.backward(..., inputs=stage inputs)``)
and ``stage_backward_weight`` (``autograd.grad`` from the saved intermediates to the parameters). Outside
our executor an EmulatedLayer has no W store, so its weight-gradient sleep runs inside its backward node,
which lies on the path to the stage input: torch's I ops pay I + W (20 ms per layer) and its W ops only
the real (tiny) weight-gradient math. So ScheduleDualPipeV and ScheduleZBVZeroBubble run here as if
I = B and W = 0: the split cannot move weight work into bubbles. The same holds for any model whose
weight-gradient cost is not on autograd's parameter edges (a fused op, a custom Function); for plain
``nn.Linear`` layers torch's split does move the weight GEMMs. ``compare.py`` reports each peer's
simulated figure under the costs it actually pays.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from dualpipe_plugin.bench.workload import (
    ActivationProbe,
    Job,
    RankReport,
    emulated_layers,
    moe_block_wrapper,
    moe_model,
    moe_setup,
    timed_steps,
)

__all__ = ["run_torch_rank", "torch_pipeline_order"]

_SCHEDULES = {"1f1b": "Schedule1F1B", "dualpipev": "ScheduleDualPipeV", "zbv": "ScheduleZBVZeroBubble"}


def _schedule_class(name: str):
    from torch.distributed import pipelining

    return getattr(pipelining, _SCHEDULES[name])


def _stage_indices(name: str, ranks: int, rank: int) -> list[int]:
    return [rank] if name == "1f1b" else [rank, 2 * ranks - 1 - rank]


class _OwnedOutput(nn.Module):
    """``module`` whose output is a fresh tensor: torch's ``stage_backward_input`` detaches stage outputs in
    place, which a StagedChunk's output (a view made by its stitching autograd node) refuses."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *inputs):
        return self.module(*inputs).clone()


def _mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).pow(2).mean()


def run_torch_rank(rank: int, world_size: int, job: Job) -> RankReport:
    """One rank of a torch.distributed.pipelining entry; options: ``schedule`` (1f1b, dualpipev, zbv)."""
    from torch.distributed.pipelining import PipelineStage

    workload = job.workload
    name = job.option("schedule")
    P = workload.ranks
    torch.manual_seed(0)
    if workload.moe:
        from dualpipe_plugin.moe import lm_loss, moe_chunks

        setup = moe_setup(workload)
        groups = [dist.new_group(pipeline) for pipeline in setup.pipelines]
        group, pipe_rank = groups[setup.replica], setup.stage_rank
        model = moe_model(workload, setup.ep)
        modules = [_OwnedOutput(chunk) for chunk in
                   moe_chunks(model, "dualpipev", P, pipe_rank, wrap=moe_block_wrapper(workload))]
        loss_fn = lm_loss
        x, y = workload.batch(seed=setup.replica)
    else:
        group, pipe_rank = None, rank
        num_stages = P * (1 if name == "1f1b" else 2)
        layers = emulated_layers(workload, workload.layers)
        per_stage = workload.layers // num_stages
        modules = [nn.Sequential(*layers[s * per_stage:(s + 1) * per_stage]) for s in _stage_indices(name, P, rank)]
        loss_fn = _mse
        x, y = workload.batch()
    indices = _stage_indices(name, P, pipe_rank)
    num_stages = P * len(indices)
    stages = [PipelineStage(module, index, num_stages, torch.device("cpu"), group=group)
              for module, index in zip(modules, indices)]
    schedule_class = _schedule_class(name)
    schedule = schedule_class(stages[0] if name == "1f1b" else stages, workload.microbatches, loss_fn=loss_fn)
    first = any(s.is_first for s in stages)
    last = any(s.is_last for s in stages)
    probe = ActivationProbe(modules)

    def step():
        for module in modules:
            module.zero_grad(set_to_none=True)
        args = (x,) if first else ()
        kwargs = {"target": y, "losses": []} if last else {}
        schedule.step(*args, **kwargs)

    timing = timed_steps(step, workload, probe)
    return RankReport(timing, probe.peak, {"pipeline_order": torch_pipeline_order(schedule)})


def torch_pipeline_order(schedule) -> dict[int, list[str]] | None:
    """The compute actions of torch's schedule per rank (``0F3``, ``1I2``, ...), or None when it has no
    precomputed order (Schedule1F1B builds its order on the fly)."""
    order = getattr(schedule, "pipeline_order", None)
    if not order:
        return None
    return {rank: [str(action) for action in actions if action is not None] for rank, actions in order.items()}
