"""What every entry of ``dualpipe-plugin bench compare`` runs, and the rank-side pieces they share.

Fairness lives here: one :class:`Workload` (model size, micro-batches, emulated costs, data, warm-up and
measured steps) is handed to every entry, ours and the peers alike, and every entry builds its model from
the same :class:`~dualpipe_plugin.runtime.emulate.EmulatedLayer` (or, for the MoE cost model, the same
reference MoE blocks with emulated compute). Each entry's rank function returns a :class:`RankReport`:

* ``spans``: (start, end) of each measured step on this rank (``time.perf_counter``, one monotonic clock
  for every process of the machine); the step time is ``max(end) - min(start)`` over the ranks;
* ``peak_layers``: the most emulated layers whose forward ran and whose backward had not yet started, at
  any moment of a measured step (an :class:`ActivationProbe` on the layers, the same for every framework);
* ``cpu_s``: CPU seconds this process used (all its threads, gloo's included) during the measured steps:
  the emulated compute sleeps, so this is the runtime's own work plus real math and transfer copies.

This module also holds our own standalone entries (:func:`run_ours_rank`, :func:`run_ours_moe_rank`);
the peers' live in ``peers_torch.py``, ``peers_deepspeed.py`` and ``peers_megatron.py``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from dualpipe_plugin.moe import MoEConfig
from dualpipe_plugin.runtime.emulate import EmulatedCosts, EmulatedLayer

__all__ = [
    "Job",
    "MoEWorkload",
    "RankReport",
    "Timing",
    "Workload",
    "ActivationProbe",
    "emulated_layers",
    "moe_setup",
    "run_ours_moe_rank",
    "run_ours_rank",
    "timed_steps",
]


@dataclass(frozen=True, kw_only=True)
class MoEWorkload:
    """The MoE cost model: reference MoE blocks whose two compute sub-stages carry the emulated costs and
    whose dispatch/combine are real gloo all-to-alls over an expert-parallel group of ``ep`` processes."""

    ep: int = 2
    """Expert-parallel replicas: P × ep processes; the EP group joins the ranks at one pipeline stage."""
    model: MoEConfig = MoEConfig(dim=32, heads=4, num_experts=8, top_k=2, ffn_dim=64, vocab_size=64)
    """``wire_padding`` sizes the all-to-all (set by the calibration in ``compare.py``)."""
    batch: int = 4
    seq: int = 32
    comm_share: float = 0.4
    """Target share of the all-to-all in a block's forward (and in its input-gradient part)."""


@dataclass(frozen=True, kw_only=True)
class Workload:
    ranks: int = 4
    microbatches: int = 16
    layers: int = 8
    """Emulated layers (or MoE blocks) in the whole model."""
    dim: int = 64
    rows: int = 8
    """Rows (tokens) per micro-batch of the dense model."""
    forward_ms: float = 10.0
    """Per layer (per block for MoE): forward."""
    backward_ms: float = 20.0
    """Per layer: full backward (input part = backward - weight)."""
    weight_ms: float = 10.0
    warmup: int = 2
    steps: int = 5
    moe: MoEWorkload | None = None
    timeout_s: float = 120.0
    """Every pipeline communication wait (ours) / process-group timeout."""

    @property
    def processes(self) -> int:
        return self.ranks * (self.moe.ep if self.moe else 1)

    def layer_costs(self) -> EmulatedCosts:
        """Seconds per emulated layer; an MoE block has two emulated layers (after attn, after experts)."""
        parts = 2 if self.moe else 1
        return EmulatedCosts.per_layer(self.forward_ms, self.backward_ms, self.weight_ms, parts)

    def emulated_layers_total(self) -> int:
        return self.layers * (2 if self.moe else 1)

    def batch(self, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's full batch (inputs, labels): floats for the dense model, token ids for MoE."""
        generator = torch.Generator().manual_seed(seed)
        if self.moe:
            shape = (self.microbatches * self.moe.batch, self.moe.seq)
            vocab = self.moe.model.vocab_size
            return (torch.randint(0, vocab, shape, generator=generator),
                    torch.randint(0, vocab, shape, generator=generator))
        shape = (self.microbatches * self.rows, self.dim)
        return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


@dataclass(frozen=True)
class Job:
    """What one spawned rank function receives: the workload and the entry's own options."""

    workload: Workload
    options: tuple[tuple[str, Any], ...] = ()

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)


@dataclass(frozen=True)
class Timing:
    spans: list[tuple[float, float]]
    cpu_s: float


@dataclass(frozen=True)
class RankReport:
    timing: Timing
    peak_layers: int
    extras: dict = field(default_factory=dict)

    @property
    def spans(self) -> list[tuple[float, float]]:
        return self.timing.spans


def emulated_layers(workload: Workload, count: int) -> list[EmulatedLayer]:
    """``count`` emulated layers (same seed on every rank: the layers of one model)."""
    costs = workload.layer_costs()
    return [EmulatedLayer(workload.dim, costs) for _ in range(count)]


class ActivationProbe:
    """Counts live activations per rank: +1 when an emulated layer's forward (with autograd) ends, -1 when
    its backward starts (a hook on its output), so the same rule measures every framework."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.live = 0
        self.peak = 0
        self._handles = [
            layer.register_forward_hook(self._forward_done)
            for module in modules for layer in module.modules() if isinstance(layer, EmulatedLayer)
        ]

    def _forward_done(self, module, inputs, output) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad):
            return
        self.live += 1
        self.peak = max(self.peak, self.live)
        output.register_hook(self._backward_started)

    def _backward_started(self, grad):
        self.live -= 1
        return None

    def reset(self) -> None:
        self.live = 0
        self.peak = 0

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


def timed_steps(step: Callable[[], Any], workload: Workload, probe: ActivationProbe | None) -> Timing:
    """Run ``warmup + steps`` steps, each started after a barrier of all processes (so every rank starts
    together); return the measured steps' (start, end) and the CPU time they used. The probe counts only
    the measured steps."""
    spans, cpu_s = [], 0.0
    for index in range(workload.warmup + workload.steps):
        if probe is not None and index == workload.warmup:
            probe.reset()
        dist.barrier()
        cpu = time.process_time()
        start = time.perf_counter()
        step()
        end = time.perf_counter()
        if index >= workload.warmup:
            spans.append((start, end))
            cpu_s += time.process_time() - cpu
    return Timing(spans, cpu_s)


def _mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).pow(2).mean()


# -- ours, standalone ------------------------------------------------------------------------------------
def run_ours_rank(rank: int, world_size: int, job: Job) -> RankReport:
    """Our runtime alone (``DualPipeline``) on the dense model; options: ``schedule``."""
    from dualpipe_plugin.runtime.pipeline import DualPipeline, stage_modules

    workload = job.workload
    schedule = job.option("schedule")
    torch.manual_seed(0)
    layers = emulated_layers(workload, workload.layers)
    chunks = stage_modules(layers, schedule, num_ranks=world_size, rank=rank)
    pipe = DualPipeline(chunks, schedule, loss_fn=_mse, timeout_s=workload.timeout_s)
    probe = ActivationProbe(chunks)
    x, y = workload.batch()
    peak = [0]

    def step():
        for chunk in chunks:
            chunk.zero_grad(set_to_none=True)
        result = pipe.step(x, y, num_microbatches=workload.microbatches, reduce_loss=False)
        peak[0] = max(peak[0], result.peak_activations)

    timing = timed_steps(step, workload, probe)
    pipe.close()
    return RankReport(timing, probe.peak, {"executor_peak_chunks": peak[0]})


# -- the MoE model -----------------------------------------------------------------------------------------
@dataclass
class MoESetup:
    """One process of the P × EP MoE layout: its pipeline (replica), stage rank and expert-parallel group."""

    replica: int
    stage_rank: int
    pipelines: list[list[int]]
    ep: Any


def moe_setup(workload: Workload, pipelines: list[list[int]] | None = None) -> MoESetup:
    """Every process calls this with the same arguments: EP groups join the same stage of every pipeline.

    ``pipelines`` (lists of global ranks in stage order) default to replica-major ``[[0..P-1], [P..2P-1]]``;
    DeepSpeed passes its own grid's pipelines.
    """
    from dualpipe_plugin.moe import new_expert_parallel

    ranks, replicas = workload.ranks, workload.moe.ep
    if pipelines is None:
        pipelines = [[e * ranks + p for p in range(ranks)] for e in range(replicas)]
    ep = new_expert_parallel([[pipeline[p] for pipeline in pipelines] for p in range(ranks)])
    me = dist.get_rank()
    replica = next(i for i, pipeline in enumerate(pipelines) if me in pipeline)
    return MoESetup(replica, pipelines[replica].index(me), pipelines, ep)


def moe_block_wrapper(workload: Workload) -> Callable[[nn.Module], nn.Module]:
    """Each reference MoE block with an emulated layer after its attn and after its experts sub-stage."""
    from dualpipe_plugin.bench.overlap import EmulatedMoEBlock

    costs = workload.layer_costs()
    return lambda block: EmulatedMoEBlock(block, costs)


def moe_model(workload: Workload, ep: Any):
    """The whole MoE model (embedding, ``layers`` blocks, head), identical on every rank (seed 0)."""
    from dualpipe_plugin.moe import moe_layers

    return moe_layers(workload.moe.model, workload.layers, ep=ep, seed=0)


def run_ours_moe_rank(rank: int, world_size: int, job: Job) -> RankReport:
    """Our runtime on the MoE model, P × EP processes; options: ``schedule``, ``overlap``."""
    from dualpipe_plugin.moe import lm_loss, moe_chunks
    from dualpipe_plugin.runtime.pipeline import DualPipeline
    from dualpipe_plugin.runtime.transport import TorchTransport, new_pipeline_groups

    workload = job.workload
    schedule, overlap = job.option("schedule"), job.option("overlap", True)
    setup = moe_setup(workload)
    groups = new_pipeline_groups(setup.pipelines)
    transport = TorchTransport(setup.pipelines[setup.replica], groups=groups[setup.replica])
    model = moe_model(workload, setup.ep)
    chunks = moe_chunks(model, schedule, workload.ranks, setup.stage_rank, wrap=moe_block_wrapper(workload))
    pipe = DualPipeline(chunks, schedule, loss_fn=lm_loss, transport=transport, overlap=overlap,
                        timeout_s=workload.timeout_s)
    probe = ActivationProbe(chunks)
    tokens, labels = workload.batch(seed=setup.replica)

    def step():
        for chunk in chunks:
            chunk.zero_grad(set_to_none=True)
        pipe.step(tokens if pipe.needs_inputs() else None, labels if pipe.needs_labels() else None,
                  num_microbatches=workload.microbatches, reduce_loss=False)

    timing = timed_steps(step, workload, probe)
    pipe.close()
    return RankReport(timing, probe.peak)
