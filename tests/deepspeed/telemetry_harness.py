"""Spawned-rank pieces for test_telemetry.py: a DeepSpeed run on the emulated device with its timer log,
its CSV monitor files and the executor's schedule, so the test can check real figures against known costs.

The model is ``num_layers`` ``LayerSpec(EmulatedLayer)`` (runtime/emulate.py: each layer's forward,
input-gradient and weight-gradient parts last at least their emulated time), so every timer has a
known floor: a sleep never ends early.
"""

from __future__ import annotations

import io
import logging
from contextlib import redirect_stdout
from dataclasses import dataclass, field

import torch

from dualpipe_plugin.runtime.emulate import EmulatedCosts, EmulatedLayer
from dualpipe_plugin.runtime.staged import StagedChunk
from tests.deepspeed.harness import skip_shm_comm_build

__all__ = ["TelemetryCase", "run_telemetry_rank"]


@dataclass(frozen=True)
class TelemetryCase:
    schedule: str = "dualpipev"
    num_stages: int = 2
    num_layers: int = 4
    micro_batches: int = 4
    steps: int = 2
    part_ms: float = 4.0
    """Forward, input-gradient and weight-gradient time of each emulated layer."""
    wall_clock_breakdown: bool = True
    monitor_dir: str | None = None
    """``csv_monitor`` output path (None: no monitor)."""
    staged: bool = False
    """Each layer a one-part StagedChunk and ``"overlap": true`` (pairs through the overlap engine)."""
    extra_pipeline: dict = field(default_factory=dict)


class StagedEmulatedLayer(StagedChunk):
    """An EmulatedLayer as the one part of a StagedChunk (so the engine builds staged chunks)."""

    def __init__(self, dim: int, costs):
        super().__init__([EmulatedLayer(dim, costs)])


def _config(case: TelemetryCase, job: str) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": case.micro_batches,
        "optimizer": {"type": "SGD", "params": {"lr": 0.01}},
        "steps_per_print": 1,
        "wall_clock_breakdown": case.wall_clock_breakdown,
        "pipeline": {"schedule": case.schedule, "overlap": case.staged, "timeout_s": 120, **case.extra_pipeline},
    }
    if case.monitor_dir is not None:
        config["csv_monitor"] = {"enabled": True, "output_path": case.monitor_dir, "job_name": job}
    return config


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def run_telemetry_rank(rank: int, world_size: int, cases: list[TelemetryCase]) -> list[dict]:
    """Each case in turn (one engine each): losses, the captured timer log and this rank's schedule."""
    skip_shm_comm_build()
    import deepspeed
    from deepspeed.pipe import LayerSpec, PipelineModule
    from deepspeed.utils import logger

    import dualpipe_plugin.deepspeed  # noqa: F401

    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    out = []
    for index, case in enumerate(cases):
        seconds = case.part_ms / 1e3
        costs = EmulatedCosts(seconds, seconds, seconds)
        layer = StagedEmulatedLayer if case.staged else EmulatedLayer
        torch.manual_seed(0)
        model = PipelineModule(layers=[LayerSpec(layer, 8, costs) for _ in range(case.num_layers)],
                               num_stages=case.num_stages, loss_fn=lambda o, y: (o - y).pow(2).mean(),
                               partition_method="uniform")
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               config=_config(case, f"job{index}"))
        generator = torch.Generator().manual_seed(1)
        batches = [(torch.randn(2, 8, generator=generator), torch.randn(2, 8, generator=generator))
                   for _ in range(case.micro_batches)]
        handler = _Lines()
        logger.addHandler(handler)
        printed = io.StringIO()
        losses = []
        try:
            with redirect_stdout(printed):
                for _ in range(case.steps):
                    losses.append(float(engine.train_batch(iter(batches)).item()))
        finally:
            logger.removeHandler(handler)
        executor = engine.pipeline_executor
        schedule = executor.schedule_for(case.micro_batches)
        actions = [str(action) for action in schedule.actions[executor.rank]]
        out.append({"rank": rank, "losses": losses, "log": printed.getvalue().splitlines() + handler.lines,
                    "actions": actions, "overlap": executor.overlap is not None,
                    "global_rank": engine.global_rank})
    return out
