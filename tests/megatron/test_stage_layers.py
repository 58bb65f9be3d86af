"""A plan's cut applied through Megatron-Core (CPU/gloo), and a Megatron model profiled from its provider.

* ``configure_model_config(config, "dualpipev", stage_layers=(1, 2, 2, 1))``: an untied 6-layer GPT on
  P=2 with uneven stages; losses and every gradient bit-identical to the unpipelined reference (the same
  exactness as the uniform V in ``test_schedule_fn.py``: the cut moves layers, not the math order).
* ``1f1b`` keeps Megatron's own placement: the plan prints Megatron's ``pipeline_model_parallel_layout``
  (here ``Et|tttttL``), which the plugin's 1f1b runs as it is; bit-identical too.
* :meth:`ProfileTarget.from_megatron` on the reference GPT: embedding + each layer + head, the two ends
  attached, and a plan that prints ``stage_layers``.
"""

from __future__ import annotations

import pytest

from dualpipe_plugin.launch import run_local
from dualpipe_plugin.reference.megatron_gpt import Parallel, TinyGPT
from tests.megatron.harness import RunSpec, compare_grads, merge_results, run_megatron_specs
from tests.megatron.marks import megatron_test

UNTIED6 = TinyGPT(num_layers=6, share_embeddings=False)
PP2 = Parallel(pp=2)
SPECS = {
    "dualpipev_uneven": RunSpec(model=UNTIED6, parallel=PP2, schedule="dualpipev", stage_layers=(1, 2, 2, 1)),
    "1f1b_layout": RunSpec(model=UNTIED6, parallel=PP2, schedule="1f1b",
                           config_overrides=(("pipeline_model_parallel_layout", "Et|tttttL"),)),
}
REFERENCE = RunSpec(model=UNTIED6)


def _reference_and_profile(rank: int, world_size: int) -> tuple:
    """The PP=1 reference, then a profile of the same (tied) GPT from its provider, in one process."""
    (reference,) = run_megatron_specs(rank, world_size, (REFERENCE,))
    from dualpipe_plugin.megatron import enable_cpu_mode
    from dualpipe_plugin.planner.profile import ProfileTarget, profile_model
    from dualpipe_plugin.reference.megatron_gpt import (
        destroy_parallel, init_parallel, learnable_batch, model_provider, transformer_config,
    )
    from dualpipe_plugin.schedules.plan import plan

    tiny = TinyGPT(num_layers=4)
    with enable_cpu_mode():
        init_parallel(Parallel(), tiny.seed)
        try:
            config = transformer_config(tiny, Parallel())
            target = ProfileTarget.from_megatron(model_provider(tiny, config), config, learnable_batch(tiny, 0, 0))
            profile = profile_model(target, repeats=1, warmup=0, overhead_microbatches=2)
        finally:
            destroy_parallel()
    result = plan(profile, 2, [4], schedules=["dualpipev"])
    return reference, profile.to_dict(), result.apply_lines(result.best)


@pytest.fixture(scope="module")
def runs(megatron_core):
    names = list(SPECS)
    per_rank = run_local(run_megatron_specs, 2, args=(tuple(SPECS[n] for n in names),), timeout_s=420)
    merged = {name: merge_results([results[i] for results in per_rank]) for i, name in enumerate(names)}
    (reference, profile, lines), = run_local(_reference_and_profile, 1, timeout_s=420)
    merged["reference"] = merge_results([reference])
    return merged, profile, lines


@megatron_test
@pytest.mark.parametrize("name", list(SPECS))
def test_an_uneven_cut_equals_the_unpipelined_reference(runs, name):
    merged, _, _ = runs
    got, want = merged[name], merged["reference"]
    assert got.microbatch_losses == want.microbatch_losses and got.losses == want.losses
    compare_grads(got.grads[0], want.grads[0], exact=True)


@megatron_test
def test_a_megatron_model_is_profiled_in_pieces_and_planned_in_transformer_layers(runs):
    _, profile, lines = runs
    names = [layer["name"] for layer in profile["layers"]]
    assert profile["source"] == "megatron"
    assert names == ["embedding", *(f"decoder.layers.{i}" for i in range(4)), "output (norm, output layer, loss)"]
    assert [layer["attach"] for layer in profile["layers"]] == ["next", None, None, None, None, "previous"]
    tied = profile["layers"][0]["param_bytes"] - 16 * 32 * 4  # the embedding less its position table
    assert profile["layers"][-1]["param_bytes"] >= tied  # the head holds its copy of the tied weight
    assert lines[0].startswith("Megatron:   configure_model_config(config, 'dualpipev', stage_layers=(")


def _config(**overrides):
    import torch
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(num_layers=6, hidden_size=32, num_attention_heads=4, pipeline_model_parallel_size=2,
                  pipeline_dtype=torch.float32, use_cpu_initialization=True)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


@pytest.mark.megatron
@pytest.mark.parametrize("schedule, counts, message", [
    ("dualpipev", (1, 2, 2), "stage_layers=(1, 2, 2) does not place num_layers=6 transformer layers on the 4 stages"),
    ("dualpipev", (0, 2, 2, 2), "give 4 whole numbers >= 1 adding up to 6"),
    ("1f1b", (3, 3), "runs one chunk per rank in Megatron's own placement, so stage_layers=(3, 3) does not apply; "
                     "set Megatron's pipeline_model_parallel_layout instead"),
    ("megatron", (3, 3), "keeps Megatron's own placement, so stage_layers=(3, 3) does not apply"),
])
def test_stage_layers_that_do_not_fit_are_refused(megatron_core, schedule, counts, message):
    from dualpipe_plugin.megatron import MegatronScheduleError, configure_model_config
    from dualpipe_plugin.megatron.placement import remove_placement_hooks

    config = _config()
    try:
        with pytest.raises(MegatronScheduleError) as error:
            configure_model_config(config, schedule, stage_layers=counts)
        assert message in str(error.value)
        assert getattr(config, "pipeline_stage_layers", None) is None  # nothing half-applied
    finally:
        remove_placement_hooks()


@pytest.mark.megatron
def test_megatrons_own_uneven_counts_point_to_stage_layers(megatron_core):
    from dualpipe_plugin.megatron import MegatronScheduleError, configure_model_config

    config = _config()
    object.__setattr__(config, "num_layers_in_first_pipeline_stage", 2)  # set after Megatron's own checks
    with pytest.raises(MegatronScheduleError, match=r"dualpipev does not support uneven first-stage layer counts "
                                                    r"\(num_layers_in_first_pipeline_stage\): give every stage's "
                                                    r"count as configure_model_config\(\.\.\., stage_layers=\.\.\.\)"):
        configure_model_config(config, "dualpipev")
