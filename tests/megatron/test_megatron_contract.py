"""The contract Megatron-Core's own unit tests hold its schedules to (tests/unit_tests/pipeline_parallel/
test_schedules.py), held to this package's schedules: a model chunk that is any module with
``set_input_tensor`` and a ``ModelParallelConfig`` (no ``pre_process``, no layers), a ``forward_step_func``
whose ``loss_func`` returns a plain number with ``forward_only``, every report back on the last pipeline
rank in micro-batch order, a ``RuntimeError`` for a micro-batch count the schedule cannot run, and a
later call with another pipeline group honoured. Written here from that contract (not copied), on
CPU/gloo with 2 and 4 processes.
"""

from __future__ import annotations

import pytest

from dualpipe_plugin.launch import run_local
from tests.megatron.marks import megatron_test

SCHEDULES = ("1f1b", "zb1p", "dualpipev", "zbv", "dualpipe")


def _contract_rank(rank: int, world_size: int, schedules: tuple[str, ...]) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import ModelParallelConfig, parallel_state

    from dualpipe_plugin.megatron import configure_model_config, enable_cpu_mode, get_forward_backward_func

    results = {}
    with enable_cpu_mode():
        parallel_state.initialize_model_parallel(pipeline_model_parallel_size=world_size)
        try:
            for name in schedules:
                config = ModelParallelConfig(pipeline_model_parallel_size=world_size, pipeline_dtype=torch.float)
                config.hidden_size = 8
                configure_model_config(config, name)
                models = []
                for _ in range(config.virtual_pipeline_model_parallel_size or 1):
                    model = torch.nn.Linear(4, 1)
                    model.config = config
                    model.set_input_tensor = lambda tensor: None
                    models.append(model)

                def forward_step_func(data_iterator, model):
                    def loss_func(output_tensor):
                        return rank, {"loss_reduced": rank}

                    return torch.rand(16, 2, 8), loss_func

                forward_backward = get_forward_backward_func()
                common = dict(forward_step_func=forward_step_func, data_iterator=None, model=models,
                              seq_length=16, micro_batch_size=2, forward_only=True)
                reports = forward_backward(num_microbatches=8, **common)
                try:
                    forward_backward(num_microbatches=1 if name == "dualpipev" else 3 if name == "dualpipe" else 0,
                                     **common)
                    refused = None
                except RuntimeError as error:
                    refused = type(error).__name__
                # Another pipeline group on a later call (the same ranks, a new group): honoured.
                other = dist.new_group(list(range(world_size)))
                collection = type("PGs", (), {"pp": other, "cp": parallel_state.get_context_parallel_group()})()
                again = forward_backward(num_microbatches=8, pg_collection=collection, **common)
                results[name] = {"reports": [r["loss_reduced"] for r in reports], "refused": refused,
                                 "again": [r["loss_reduced"] for r in again]}
        finally:
            parallel_state.destroy_model_parallel()
    return results


@megatron_test
@pytest.mark.parametrize("world_size", [2, 4])
def test_megatron_schedule_contract_through_the_plugin(world_size):
    per_rank = run_local(_contract_rank, world_size, args=(SCHEDULES,), timeout_s=400)
    last = world_size - 1
    for name in SCHEDULES:
        for rank, results in enumerate(per_rank):
            got = results[name]
            # forward_data_store on the last pipeline rank: one report per micro-batch, the loss rank's number.
            loss_rank = 0 if name in ("dualpipev", "zbv") else last
            if rank == last:
                assert len(got["reports"]) == 8 and len(got["again"]) == 8, name
                if name != "dualpipe":  # DualPipe: direction 0 (micro-batches 0-3) ends on rank P-1, direction 1 on 0
                    assert set(got["reports"]) == {loss_rank}, (name, got)
                else:
                    assert got["reports"] == [last] * 4 + [0] * 4, got
            else:
                assert got["reports"] == [] and got["again"] == [], (name, rank)
            assert got["refused"] is not None, f"{name}: a bad micro-batch count must raise a RuntimeError"
