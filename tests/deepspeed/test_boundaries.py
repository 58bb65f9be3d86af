"""A plan's cut applied through DeepSpeed: ``"partition_method": "boundaries:..."`` in the config's pipeline
section, and a PipelineModule profiled spec by spec (profile layer i is spec i).

One spawn of 2 processes runs dualpipev (4 stages cut 1/2/2/1) and 1f1b (2 stages cut 2/4) on the same
6-layer model: every rank holds exactly the specs its stages name, and losses and parameters equal the
unpipelined reference bit for bit (fp32, SGD; the cut changes where layers run, not the math order).
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from dualpipe_plugin.launch import run_local
from tests.deepspeed.harness import Case, assert_bit_exact, reference_run, run_deepspeed_cases

BASE = Case(num_stages=2, num_layers=6, plugin=True, steps=2)
CUTS = {
    "dualpipev": ("boundaries:0,1,3,5,6", [{"0", "5"}, {"1", "2", "3", "4"}]),
    "1f1b": ("boundaries:0,2,6", [{"0", "1"}, {"2", "3", "4", "5"}]),
}


def _held_layers(result) -> set[str]:
    return {name.split(".")[0] for name in result.params}


@pytest.mark.slow
@pytest.mark.deepspeed
def test_explicit_boundaries_place_the_specs_and_train_bit_exact():
    cases = [replace(BASE, pipeline={"schedule": name, "partition_method": method})
             for name, (method, _) in CUTS.items()]
    per_rank = run_local(run_deepspeed_cases, BASE.world_size, args=(cases,), timeout_s=300)
    for index, (name, (_, held)) in enumerate(CUTS.items()):
        results = [rank_results[index] for rank_results in per_rank]
        assert [_held_layers(r) for r in results] == held, name
        assert_bit_exact(results, reference_run(cases[index]))


def _bad_boundaries_rank(rank: int, world_size: int) -> str:
    from tests.deepspeed.harness import _initialize_error, build_pipeline_module, ds_config, skip_shm_comm_build

    skip_shm_comm_build()
    import deepspeed

    import dualpipe_plugin.deepspeed  # noqa: F401

    deepspeed.init_distributed(dist_backend="gloo")
    case = replace(BASE, pipeline={"schedule": "dualpipev", "partition_method": "boundaries:0,3,6"})

    def build():
        model = build_pipeline_module(case)
        return deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=ds_config(case))

    return _initialize_error(build)


@pytest.mark.slow
@pytest.mark.deepspeed
def test_boundaries_that_do_not_fit_the_schedule_fail_at_initialize_on_every_rank():
    for kind, message, _ in run_local(_bad_boundaries_rank, 2, timeout_s=240):
        assert kind == "DeepSpeedPipelineConfigError"
        assert ("does not cut the 6 layer specs into the schedule's 4 stages; give 5 increasing layer-spec indices "
                "from 0 to 6") in message


def _profile_rank(rank: int, world_size: int) -> dict:
    import torch

    from tests.deepspeed.harness import build_pipeline_module, skip_shm_comm_build

    skip_shm_comm_build()
    import deepspeed

    from dualpipe_plugin.planner.profile import ProfileTarget, profile_model

    deepspeed.init_distributed(dist_backend="gloo")
    case = replace(BASE, num_stages=1, tied=True)
    module = build_pipeline_module(case)
    x, y = torch.randn(3, case.width), torch.randn(3, case.width)
    target = ProfileTarget.from_pipeline_module(module, x, y)
    return profile_model(target, repeats=1, warmup=0, overhead_microbatches=0).to_dict()


@pytest.mark.slow
@pytest.mark.deepspeed
def test_a_pipeline_module_is_profiled_spec_by_spec():
    (data,) = run_local(_profile_rank, 1, timeout_s=240)
    names = [layer["name"] for layer in data["layers"]]
    assert data["source"] == "deepspeed" and len(names) == BASE.num_layers + 2
    assert names[0].startswith("0: TiedProjection") and names[-1].startswith("7: TiedProjection (tied")
    assert all(name.startswith(f"{i}: DenseTanh") for i, name in enumerate(names[1:-1], start=1))
    width = BASE.width
    assert data["layers"][1]["param_bytes"] == (width * width + width) * 4
    assert data["layers"][-1]["param_bytes"] == data["layers"][0]["param_bytes"]  # the tied copy is held again
