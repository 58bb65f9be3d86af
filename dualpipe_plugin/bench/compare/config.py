"""``bench compare``'s settings (:class:`CompareConfig`) and the workloads they describe: the dense model
(``compute``) and the MoE model (``moe``) on the emulated device."""

from __future__ import annotations

from dataclasses import dataclass, replace

from dualpipe_plugin.bench.compare.entries import COMPUTE, MOE

__all__ = ["CompareConfig", "workloads_for"]


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    quick: bool = False
    rounds: int = 3
    steps: int = 4
    """Measured steps per job (after ``warmup``)."""
    moe_steps: int = 3
    warmup: int = 2
    ranks: int = 4
    microbatches: int = 16
    forward_ms: float = 10.0
    backward_ms: float = 20.0
    weight_ms: float = 10.0
    results_dir: str = "benchmarks/results"
    readme: str | None = "README.md"
    """Regenerate this README's table (None: leave it)."""
    only: tuple[str, ...] = ()
    """Run only these entries (keys; tests, investigations), plus their cost models' baselines."""


def workloads_for(config: CompareConfig, padding: int) -> dict:
    """The workload of each cost model: the dense one and the MoE one with ``padding`` wire columns."""
    from dualpipe_plugin.bench.workload import MoEWorkload, Workload

    dense = Workload(ranks=config.ranks, microbatches=config.microbatches, forward_ms=config.forward_ms,
                     backward_ms=config.backward_ms, weight_ms=config.weight_ms, warmup=config.warmup,
                     steps=config.steps)
    moe = MoEWorkload()
    moe = replace(moe, model=replace(moe.model, wire_padding=padding))
    return {COMPUTE: dense, MOE: replace(dense, moe=moe, steps=config.moe_steps)}
