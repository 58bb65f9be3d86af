"""TorchTransport's collectives keep their timeout on gloo: a rank that never joins fails the others in
about ``timeout_s`` seconds (not the process group's 30 minutes), with the op, the missing rank and the
timeout named. A dead peer (PipelinePeerError) is covered through checkpoints in
``test_checkpoint_faults.py`` and through the step's loss total in ``tests/test_dead_peer.py``."""

from __future__ import annotations

import time

import pytest
import torch

from dualpipe_plugin.launch import run_local
from dualpipe_plugin.runtime.errors import PipelineTimeoutError
from dualpipe_plugin.runtime.transport import TorchTransport

pytestmark = pytest.mark.slow


def _stalled_barrier(rank: int, world: int, stalled: int, timeout_s: float) -> dict:
    transport = TorchTransport(list(range(world)))
    total = torch.tensor([float(rank)])
    transport.all_reduce_sum(total)  # the positional form the runtime has always used
    if rank == stalled:
        time.sleep(timeout_s + 3)
        return {"sum": total.item()}
    started = time.monotonic()
    try:
        transport.barrier(what="the test's barrier", timeout_s=timeout_s)
    except PipelineTimeoutError as error:
        return {"sum": total.item(), "error": str(error), "seconds": time.monotonic() - started}
    return {"sum": total.item(), "error": None}


def test_a_stalled_rank_fails_the_barrier_of_the_others_after_the_timeout():
    # pg_timeout_s: the group's own limit, far above timeout_s, so only the wait's timeout can end it in time.
    results = run_local(_stalled_barrier, 3, (2, 3.0), timeout_s=60, pg_timeout_s=120)
    assert [r["sum"] for r in results] == [3.0, 3.0, 3.0]
    for rank, result in enumerate(results[:2]):
        assert result["error"] is not None
        assert result["error"].startswith(f"pipeline rank {rank}: timed out after 3 s in the test's barrier: "
                                          f"pipeline rank 2 (global rank 2) did not join it"), result["error"]
        assert 2.5 < result["seconds"] < 15, result["seconds"]
