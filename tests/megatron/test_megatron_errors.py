"""Bad input to the Megatron adapter fails before training with a ValueError naming the fix.

Single process, no torch.distributed: every check here runs before any collective.
"""

from __future__ import annotations

import pytest

megatron_core = pytest.importorskip("megatron.core")

from dualpipe_plugin.megatron import (  # noqa: E402
    MegatronScheduleError,
    ScheduleRegistry,
    UnknownScheduleError,
    configure_model_config,
    get_forward_backward_func,
    register_schedule,
)
from dualpipe_plugin.megatron.placement import ModelPlacement, remove_placement_hooks  # noqa: E402

pytestmark = pytest.mark.megatron


def _config(**overrides):
    import torch
    from megatron.core.transformer import TransformerConfig

    kwargs = dict(num_layers=8, hidden_size=32, num_attention_heads=4, pipeline_model_parallel_size=2,
                  pipeline_dtype=torch.float32, use_cpu_initialization=True)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


@pytest.fixture(autouse=True)
def _no_hooks_left():
    yield
    remove_placement_hooks()


def test_errors_are_value_errors():
    assert issubclass(MegatronScheduleError, ValueError)
    assert issubclass(UnknownScheduleError, MegatronScheduleError)


def test_unknown_schedule_lists_the_valid_ones():
    with pytest.raises(UnknownScheduleError, match=r"unknown pipeline schedule 'dualpipex'; valid schedules: "
                                                   r"1f1b, dualpipe, dualpipev, zb1p, zbv, megatron"):
        get_forward_backward_func(schedule="dualpipex")
    with pytest.raises(MegatronScheduleError, match="unknown pipeline schedule 'gpipe'"):
        configure_model_config(_config(), "gpipe")


@pytest.mark.parametrize(
    "schedule, layers, match",
    [
        ("dualpipev", 6, r"dualpipev cuts the model into 4 stages on 2 pipeline ranks, but num_layers=6 is not "
                         r"divisible by 4; use a multiple of 4 layers \(e.g. 8\)"),
        ("dualpipe", 5, r"dualpipe cuts the model into 2 stages .* num_layers=5 is not divisible by 2"),
    ],
)
def test_layers_not_divisible_into_the_stages(schedule, layers, match):
    with pytest.raises(MegatronScheduleError, match=match):
        configure_model_config(_config(num_layers=layers), schedule)


def test_dualpipe_needs_an_even_pipeline():
    with pytest.raises(MegatronScheduleError, match="dualpipe needs an even number of pipeline ranks"):
        ModelPlacement("dualpipe", 3, 6)


@pytest.mark.parametrize("schedule", ["dualpipev", "dualpipe"])
def test_virtual_pipeline_size_with_a_two_chunk_schedule(schedule):
    config = _config(virtual_pipeline_model_parallel_size=2)
    with pytest.raises(MegatronScheduleError, match=f"{schedule} places two chunks per rank itself; do not also "
                                                    f"set the virtual pipeline size"):
        configure_model_config(config, schedule)


def test_virtual_pipeline_size_with_a_one_chunk_schedule():
    with pytest.raises(MegatronScheduleError, match="zb1p runs one chunk per rank; unset virtual_pipeline"):
        configure_model_config(_config(virtual_pipeline_model_parallel_size=2), "zb1p")


def test_too_few_microbatches_fails_before_any_communication():
    from types import SimpleNamespace

    from dualpipe_plugin.megatron.schedule_fn import PipelineScheduleFunction

    config = configure_model_config(_config(), "dualpipev")
    chunk = SimpleNamespace(config=config)  # never reached beyond the check: no process group exists
    with pytest.raises(MegatronScheduleError, match=r"dualpipev needs at least 2 x ranks = 4 micro-batches .* "
                                                    r"raise --global-batch-size"):
        PipelineScheduleFunction("dualpipev")(forward_step_func=None, data_iterator=None, model=[chunk, chunk],
                                              num_microbatches=3, seq_length=16, micro_batch_size=1)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(fp8="hybrid"), "fp8='hybrid' needs Transformer Engine, which is not installed"),
        (dict(delay_wgrad_compute=True), "delay_wgrad_compute.*this plugin splits W itself, turn it off"),
        (dict(defer_embedding_wgrad_compute=True), "defer_embedding_wgrad_compute"),
        (dict(mtp_num_layers=1), "multi-token prediction"),
        (dict(num_layers_in_first_pipeline_stage=2), "uneven first-stage layer counts"),
    ],
)
def test_unsupported_or_transformer_engine_only_options(overrides, match):
    import dataclasses

    config = _config()
    for key, value in overrides.items():  # set after __post_init__: some need TE to construct at all
        object.__setattr__(config, key, value) if dataclasses.is_dataclass(config) else setattr(config, key, value)
    with pytest.raises(MegatronScheduleError, match=match):
        configure_model_config(config, "dualpipev")


def test_registry_register_and_reserved_names():
    registry = ScheduleRegistry()
    calls = []

    def mine(**kwargs):
        calls.append(kwargs)
        return []

    registry.register("MySchedule", mine)
    assert registry.get_forward_backward_func(schedule="myschedule") is mine
    assert "myschedule" in registry.names() and registry.names()[-1] == "megatron"
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        registry.register("myschedule", mine)
    registry.register("myschedule", mine, replace=True)
    with pytest.raises(UnknownScheduleError, match="reserved for Megatron-Core's own schedule"):
        registry.register("megatron", mine)
    with pytest.raises(TypeError, match="must be callable"):
        register_schedule("x", 3)


def test_megatron_name_gives_megatrons_own_function():
    from megatron.core.pipeline_parallel import schedules

    assert get_forward_backward_func(1, None, schedule="megatron") is schedules.forward_backward_no_pipelining
    assert (get_forward_backward_func(4, 2, schedule="megatron")
            is schedules.forward_backward_pipelining_with_interleaving)
    assert type(get_forward_backward_func(schedule="dualpipev")).__name__ == "PipelineScheduleFunction"


def test_placement_table():
    v = ModelPlacement("dualpipev", 4, 16)
    assert [(c.stage, c.layer_offset, c.num_layers, c.pre_process, c.post_process) for c in v.chunks(0)] == [
        (0, 0, 2, True, False), (7, 14, 2, False, True)]
    assert [c.stage for c in v.chunks(3)] == [3, 4]
    d = ModelPlacement("dualpipe", 4, 8)
    assert [(c.stage, c.layer_offset, c.pre_process, c.post_process) for c in d.chunks(0)] == [
        (0, 0, True, False), (3, 6, False, True)]
    assert [(c.stage, c.pre_process, c.post_process) for c in d.chunks(3)] == [(3, False, True), (0, True, False)]
    assert d.mirror_peer(1) == 2 and v.mirror_peer(1) is None


def test_configure_marks_the_config_and_hooks_give_v_layer_numbers():
    from megatron.core.transformer import transformer_block, transformer_layer

    config = configure_model_config(_config(num_layers=8), "dualpipev")
    assert config.pipeline_schedule == "dualpipev" and config.virtual_pipeline_model_parallel_size == 2
    assert configure_model_config(config, "dualpipev") is config  # idempotent
    assert transformer_layer.get_transformer_layer_offset(config, vp_stage=1, pp_rank=0) == 6
    assert transformer_block.get_transformer_layer_offset(config, 1, 1) == 4
    assert transformer_block.get_num_layers_to_build(config, 0, 1) == 2
    plain = _config(num_layers=8)  # an unmarked config keeps Megatron's answers
    assert transformer_layer.get_transformer_layer_offset(plain, None, 1) == 4
    remove_placement_hooks()
    assert not hasattr(transformer_layer.get_transformer_layer_offset, "__dualpipe_hook__")
