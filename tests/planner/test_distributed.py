"""The planner on real gloo processes: the link probe, ``profile`` under a distributed launch, and a
standalone pipeline cut at a plan's boundaries (losses and gradients bit-exact to the reference)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dualpipe_plugin.launch import run_local
from dualpipe_plugin.planner.link import measure_link_locally
from dualpipe_plugin.planner.overhead import measure_action_overhead_locally
from dualpipe_plugin.planner.profile import ProfileTarget, profile_model
from dualpipe_plugin.runtime.errors import PipelineConfigError
from dualpipe_plugin.runtime.pipeline import split_stages
from dualpipe_plugin.schedules.cost_file import load_costs


@pytest.mark.slow
def test_the_link_probe_measures_a_hop_on_local_processes():
    link = measure_link_locally(2, repeats=6, large_bytes=1 << 20, gap_ms=1.0)
    assert link.measured and link.latency_ms > 0
    assert link.bandwidth_bytes_per_s is None or link.bandwidth_bytes_per_s > 0
    assert "ping-pong between pipeline ranks 0 and 1" in link.note


def _four_blocks() -> ProfileTarget:
    torch.manual_seed(0)
    layers = [nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(4)]
    return ProfileTarget.from_layers(layers, torch.randn(4, 16), loss=_square_mean)


def _square_mean(output):
    return output.pow(2).mean()


@pytest.mark.slow
def test_the_runtime_overhead_is_measured_on_the_group():
    """Each of 2 processes holds half of the model and runs 1F1B and ZB1P steps: every kind gets a figure,
    and actions cost more in a pipeline (receives, sends, bookkeeping) than their layers alone."""
    costs = profile_model(_four_blocks(), repeats=5, warmup=1, overhead_microbatches=0).layers
    runtime = measure_action_overhead_locally(_four_blocks, costs, 2, steps=2, warmup=1)
    assert all(value >= 0 and value < 50 for value in runtime.overhead)
    assert sum(runtime.overhead) > 0 and "pipeline group of 2 ranks" in runtime.note


def _profile_command_rank(rank: int, world_size: int, out: str) -> int:
    from dualpipe_plugin.cli import main

    return main(["profile", "--model", "dualpipe_plugin.planner.targets:heavy_ends", "--out", out,
                 "--repeats", "1", "--warmup", "0", "--no-overhead"])


@pytest.mark.slow
def test_profile_under_a_distributed_launch_measures_the_real_group(tmp_path):
    out = tmp_path / "costs.json"
    assert run_local(_profile_command_rank, 2, (str(out),), timeout_s=240) == [0, 0]
    profile = load_costs(out)
    assert profile.link.measured and profile.link.latency_ms > 0
    assert len(profile.layers) == 8


# -- a standalone pipeline cut at boundaries ---------------------------------------------------------------

BOUNDS = (0, 1, 3, 5, 6)  # dualpipev on 2 ranks: rank 0 holds layers 0 and 5, rank 1 layers 1-4
MICROBATCHES = 4


def _layers() -> list[nn.Module]:
    torch.manual_seed(3)
    return [nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(6)]


def _data():
    generator = torch.Generator().manual_seed(4)
    return torch.randn(MICROBATCHES * 2, 8, generator=generator), torch.randn(MICROBATCHES * 2, 8, generator=generator)


def _loss(output, target):
    return (output - target).pow(2).mean()


def _pipeline_rank(rank: int, world_size: int) -> dict:
    from dualpipe_plugin.runtime.pipeline import DualPipeline, stage_modules

    layers = _layers()
    chunks = stage_modules(layers, "dualpipev", num_ranks=world_size, rank=rank, boundaries=BOUNDS)
    pipe = DualPipeline(chunks, "dualpipev", loss_fn=_loss, overlap=False, timeout_s=60)
    x, y = _data()
    result = pipe.step(x, y, num_microbatches=MICROBATCHES)
    position = {id(layer): i for i, layer in enumerate(layers)}
    grads = {f"{position[id(layer)]}.{n}": p.grad.clone()
             for chunk in chunks for layer in chunk for n, p in layer.named_parameters()}
    pipe.close()
    return {"loss": result.loss, "grads": grads}


@pytest.mark.slow
def test_a_standalone_pipeline_cut_at_boundaries_equals_the_reference():
    results = run_local(_pipeline_rank, 2, timeout_s=120)
    assert {k.split(".")[0] for k in results[0]["grads"]} == {"0", "5"}
    assert {k.split(".")[0] for k in results[1]["grads"]} == {"1", "2", "3", "4"}
    torch.set_num_threads(1)
    model = nn.Sequential(*_layers())
    x, y = _data()
    losses = []
    for xs, ys in zip(x.chunk(MICROBATCHES), y.chunk(MICROBATCHES)):
        loss = _loss(model(xs), ys)
        (loss / MICROBATCHES).backward()
        losses.append(loss.detach())
    expected = (torch.stack(losses).double().sum() / MICROBATCHES).float()
    assert all(torch.equal(r["loss"], expected) for r in results)
    for result in results:
        for name, grad in result["grads"].items():
            layer, rest = name.split(".", 1)
            assert torch.equal(grad, model[int(layer)].get_parameter(rest).grad), name


def test_boundaries_that_do_not_cut_the_layers_are_refused():
    layers = [nn.Identity()] * 4
    assert [len(part) for part in split_stages(layers, 2, (0, 1, 4))] == [1, 3]
    for bad in ((0, 2), (0, 3, 3, 4), (1, 2, 4), (0, 2, 5)):
        with pytest.raises(PipelineConfigError, match="do not cut 4 layers into"):
            split_stages(layers, len(bad) - 1 if len(bad) > 2 else 2, bad)
