"""DeepSpeed entries of ``bench compare``: DeepSpeed's TrainSchedule, DeepSpeed's DualPipeVEngine, and our
dualpipev through DeepSpeed (``import dualpipe_plugin.deepspeed``, ``"pipeline": {"schedule": ...}``).

Every engine is built by ``deepspeed.initialize`` from a ``PipelineModule`` of ``LayerSpec``s of the same
emulated layers (DeepSpeed partitions them: 4 stages of 2 layers for TrainSchedule, 8 stages of 1 for the
V engines; ``DualPipeVModule`` selects DeepSpeed's DualPipeVEngine), SGD, fp32, ZeRO off. A step is one
``train_batch`` (forward, backward, DeepSpeed's gradient reductions and the optimizer step).

MoE: ``LayerSpec(Embedding)``, one ``LayerSpec`` per emulated MoE block (a one-part StagedChunk: outside
our executor it is an ordinary module, sub-stages in order) and ``LayerSpec(Head)``, partitioned by
block (``type:StagedChunk``) on a pipe × data topology of P × EP processes whose data-parallel groups
(the ranks at one stage) are the expert-parallel groups. DeepSpeed's data-parallel gradient all-reduce
runs at the end of each step (a few KB; ours has no data-parallel reduction in the standalone runtime).
DeepSpeed never splits W (its backward is one ``torch.autograd.backward``): every backward pays B.
Ours through DeepSpeed takes ``"overlap"`` from the entry's options: our engine then builds each chunk as
one StagedChunk of the stage's layers (the blocks' sub-stages flattened into it) and runs F&B pairs
through the overlap engine, exactly as a user's config would.
"""

from __future__ import annotations

from dualpipe_plugin.bench.overlap import EmulatedMoEBlock
from dualpipe_plugin.bench.workload import ActivationProbe, Job, RankReport, moe_setup, timed_steps
from dualpipe_plugin.moe import MoEBlock
from dualpipe_plugin.runtime.staged import StagedChunk

__all__ = ["DeepSpeedMoEBlock", "run_deepspeed_rank"]

ENGINES = ("train_schedule", "dualpipev_engine", "ours")


def _ds_pipelines(workload) -> list[list[int]]:
    """The pipelines of DeepSpeed's pipe × data topology (axes ['pipe', 'data']: rank = stage·dp + replica)."""
    dp = workload.moe.ep
    return [[stage * dp + replica for stage in range(workload.ranks)] for replica in range(dp)]


class DeepSpeedMoEBlock(StagedChunk):
    """A DeepSpeed layer: one emulated MoE block as a one-part StagedChunk (a plain module outside our
    executor: its sub-stages run in order)."""

    def __init__(self, config, ep, costs):
        super().__init__([EmulatedMoEBlock(MoEBlock(config, ep), costs)])


def run_deepspeed_rank(rank: int, world_size: int, job: Job) -> RankReport:
    """One rank; options: ``engine`` (train_schedule, dualpipev_engine, ours) and ``schedule`` (ours)."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # no 20 s JIT build of an unused op
    import deepspeed
    import torch
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.runtime.pipe.dualpipev import DualPipeVModule
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    from dualpipe_plugin.runtime.emulate import EmulatedLayer

    workload = job.workload
    engine_kind = job.option("engine")
    if engine_kind not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine_kind!r}")
    if engine_kind == "ours":
        import dualpipe_plugin.deepspeed  # noqa: F401  (registers our engine with deepspeed.initialize)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    dp = workload.moe.ep if workload.moe else 1
    topology = PipeDataParallelTopology(num_pp=workload.ranks, num_dp=dp)
    if workload.moe:
        from dualpipe_plugin.moe import Embedding, Head, lm_loss

        setup = moe_setup(workload, _ds_pipelines(workload))
        config, costs = workload.moe.model, workload.layer_costs()
        specs = ([LayerSpec(Embedding, config)]
                 + [LayerSpec(DeepSpeedMoEBlock, config, setup.ep, costs) for _ in range(workload.layers)]
                 + [LayerSpec(Head, config)])
        loss_fn, method = lm_loss, "type:DeepSpeedMoEBlock"
        micro_batch = workload.moe.batch
        x, y = workload.batch(seed=setup.replica)
    else:
        costs = workload.layer_costs()
        specs = [LayerSpec(EmulatedLayer, workload.dim, costs) for _ in range(workload.layers)]

        def loss_fn(output, target):
            return (output - target).pow(2).mean()

        method, micro_batch = "uniform", workload.rows
        x, y = workload.batch()
    module_class = DualPipeVModule if engine_kind == "dualpipev_engine" else PipelineModule
    model = module_class(layers=specs, topology=topology, loss_fn=loss_fn, partition_method=method)
    ds_config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": workload.microbatches,
        "train_batch_size": micro_batch * workload.microbatches * dp,
        "optimizer": {"type": "SGD", "params": {"lr": 1e-3}},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if engine_kind == "ours":
        ds_config["pipeline"] = {"schedule": job.option("schedule", "dualpipev"),
                                 "overlap": job.option("overlap", False), "timeout_s": workload.timeout_s}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    probe = ActivationProbe([engine.module])
    micro_batches = list(zip(x.split(micro_batch), y.split(micro_batch)))

    def step():
        engine.train_batch(iter(micro_batches))

    timing = timed_steps(step, workload, probe)
    name = type(engine).__name__ + (f":{engine.pipeline_schedule}" if hasattr(engine, "pipeline_schedule") else "")
    executor = getattr(engine, "pipeline_executor", None)
    if executor is not None and executor.overlap is not None:
        name += "+overlap"  # the config asked for it and the layers allowed it
    return RankReport(timing, probe.peak, {"engine": name})
