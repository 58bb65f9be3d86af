"""Peak memory per rank in bytes: the walk over each rank's ops, optimizer sharding, receive buffers."""

from __future__ import annotations

import pytest

from dualpipe_plugin.schedules import CostModelError, build_schedule, schedule_names, simulate
from dualpipe_plugin.schedules.memory import OptimizerSharding, StageMemory, estimate_memory

SIZES = {"dualpipe": (4, 12), "dualpipev": (4, 9), "1f1b": (4, 9), "zb1p": (3, 7), "zbv": (2, 6)}


@pytest.mark.parametrize("name", schedule_names())
def test_bytes_are_the_chunk_count_times_the_bytes_when_w_holds_everything(name):
    # The chunk counter treats a (chunk, micro-batch) as live until its B, or its W when split: with
    # w_store == activation the byte walk must give exactly count x bytes.
    schedule = build_schedule(name, *SIZES[name])
    stages = [StageMemory(activation=1000, w_store=1000)] * schedule.placement.num_stages
    memory = estimate_memory(schedule, stages)
    counts = simulate(schedule).peak_activations_per_rank
    assert [m.activations for m in memory] == [1000 * c for c in counts]


def test_an_input_gradient_op_releases_what_its_weight_pass_does_not_need():
    # zb1p, P=1: F I W F I W ...: at most one micro-batch live, then only its W store.
    schedule = build_schedule("zb1p", 1, 3)
    (rank,) = estimate_memory(schedule, [StageMemory(activation=100, w_store=30)])
    assert rank.activations == 100
    schedule = build_schedule("zb1p", 2, 6)
    memory = estimate_memory(schedule, [StageMemory(activation=100, w_store=30)] * 2)
    # rank 0: F F I W F ... -> two live (200), never a W store beside two; rank 1: F I F -> 30 + 100.
    assert [m.activations for m in memory] == [200, 130]


def test_static_memory_per_stage_held_and_optimizer_sharded():
    schedule = build_schedule("dualpipe", 2, 4)  # each rank holds both stages
    stages = [StageMemory(params=10, grads=10, optimizer=40), StageMemory(params=20, grads=20, optimizer=80)]
    plain = estimate_memory(schedule, stages)
    assert [(m.params, m.grads, m.optimizer) for m in plain] == [(30, 30, 120)] * 2
    for sharding in (OptimizerSharding(data_parallel=4, zero_stage=1),
                     OptimizerSharding(data_parallel=4, distributed_optimizer=True)):
        assert [m.optimizer for m in estimate_memory(schedule, stages, sharding=sharding)] == [30, 30]
    assert estimate_memory(schedule, stages, sharding=OptimizerSharding(data_parallel=4))[0].optimizer == 120


def test_the_v_bottom_counts_its_shared_tensor_once():
    # dualpipev P=2: rank 1 holds stages 1 and 2 and hands stage 1's output to stage 2 on itself.
    schedule = build_schedule("dualpipev", 2, 4)
    shared = StageMemory(activation=100, saves_input=40, saves_output=40)
    without = estimate_memory(schedule, [StageMemory(activation=100)] * 4)
    shared_run = estimate_memory(schedule, [shared] * 4)
    assert shared_run[0].activations == without[0].activations
    assert shared_run[1].activations < without[1].activations


def test_receive_buffers_are_the_largest_action_receive():
    schedule = build_schedule("1f1b", 2, 4)
    memory = estimate_memory(schedule, [StageMemory()] * 2, boundary_bytes=(512,))
    assert [m.comm_buffers for m in memory] == [512, 512]
    pairs = build_schedule("dualpipev", 2, 8)  # pairs receive an activation and a gradient at once
    memory = estimate_memory(pairs, [StageMemory()] * 4, boundary_bytes=(100, 1000, 10))
    assert memory[0].comm_buffers == 100 + 10


@pytest.mark.parametrize("call, match", [
    (lambda s: estimate_memory(s, [StageMemory()] * 3), "has 4 stages, got memory for 3"),
    (lambda s: estimate_memory(s, [StageMemory()] * 4, boundary_bytes=(1,)), "4 stages have 3 boundaries"),
    (lambda s: StageMemory(params=-1), "params=-1 must be a finite number of bytes"),
    (lambda s: OptimizerSharding(zero_stage=2), "ZeRO stage 0 or 1"),
    (lambda s: OptimizerSharding(data_parallel=0), "data_parallel must be a whole number >= 1"),
])
def test_bad_memory_input_names_the_fix(call, match):
    with pytest.raises(CostModelError, match=match):
        call(build_schedule("dualpipev", 2, 4))
