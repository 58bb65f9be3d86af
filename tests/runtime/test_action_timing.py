"""The executor's per-action timing hook, ``run(on_action=...)`` (what adapters time steps with).

Two gloo processes run dualpipev P=2 with a slow pipeline rank 1 (each of its forwards sleeps, and so
does each of its backwards): pipeline rank 0 must see the waits for rank 1's activations and gradients
in ``waited_activation_s`` / ``waited_gradient_s``, left out of the actions' ``busy_s``; every action is
reported once, in schedule order, with the same spans as the ``record`` timeline.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from dualpipe_plugin.launch import run_local

pytestmark = pytest.mark.slow

SLOW_S = 0.1


class _SleepInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(SLOW_S)
        return grad


class _Layer(nn.Module):
    def __init__(self, slow: bool):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.slow = slow

    def forward(self, x):
        if self.slow:
            time.sleep(SLOW_S)
            x = _SleepInBackward.apply(x)
        return torch.tanh(self.linear(x))


class _Hooks:
    def __init__(self, chunks):
        self.chunks = chunks

    def inputs(self, microbatch):
        return torch.full((2, 4), float(microbatch))

    def forward(self, chunk, microbatch, inputs):
        return self.chunks[chunk](*inputs)

    def loss(self, microbatch, outputs):
        return outputs[0].pow(2).mean()


def _rank(rank: int, world_size: int) -> dict:
    import torch.distributed as dist

    from dualpipe_plugin.runtime.executor import PipelineExecutor
    from dualpipe_plugin.runtime.options import PipelineOptions
    from dualpipe_plugin.runtime.transport import TorchTransport
    from dualpipe_plugin.schedules import get_schedule

    torch.manual_seed(0)
    chunks = [_Layer(slow=rank == 1), _Layer(slow=rank == 1)]
    transport = TorchTransport(list(range(world_size)))
    executor = PipelineExecutor(chunks, transport, PipelineOptions(schedule=get_schedule("dualpipev"), timeout_s=60))
    timings = []
    dist.barrier()
    outcome = executor.run(4, _Hooks(chunks), record=True, on_action=timings.append)
    actions = [str(a) for a in executor.schedule_for(4).actions[executor.rank]]
    return {
        "actions": actions,
        "timed": [str(t.action) for t in timings],
        "timings": [(t.started_s, t.ended_s, t.waited_activation_s, t.waited_gradient_s, t.busy_s) for t in timings],
        "timeline": [(start, end) for _, start, end in outcome.timeline],
    }


def test_on_action_reports_every_action_with_its_waits_apart() -> None:
    fast, _slow = run_local(_rank, 2, timeout_s=120)
    assert fast["timed"] == fast["actions"], "every scheduled action, once, in order"
    assert len(fast["timeline"]) == len(fast["timings"])
    for (start, end, waited_a, waited_g, busy), (busy_from_ms, end_ms) in zip(fast["timings"], fast["timeline"]):
        assert waited_a >= 0 and waited_g >= 0 and busy >= 0
        assert busy == pytest.approx(end - start - waited_a - waited_g)
        assert busy * 1e3 == pytest.approx(end_ms - busy_from_ms, abs=1e-6), "the record timeline's span"
    # Rank 1 sleeps 0.1 s per forward and per backward: rank 0 waits for both kinds of transfer, and the
    # waits are reported apart from the work (busy = span - waits, the record timeline's span).
    waited_a = sum(t[2] for t in fast["timings"])
    waited_g = sum(t[3] for t in fast["timings"])
    assert waited_a > 0.5 * SLOW_S and waited_g > 0.5 * SLOW_S, (waited_a, waited_g)
    # F1:0 (stage 3) waits for rank 1's two slow forwards of micro-batch 0 (stages 1 and 2).
    first = fast["timed"].index("F1:0")
    assert fast["timings"][first][2] > 0.5 * SLOW_S and fast["timings"][first][3] == 0.0
