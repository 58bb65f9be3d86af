"""Run a function on N local processes joined by a gloo process group: for tests, ``demo`` and ``bench``.

>>> results = run_local(my_fn, world_size=4, args=(cfg,))   # my_fn(rank, world_size, cfg) -> picklable

Each rank gets ``MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK`` set (so DeepSpeed and Megatron
initialise as under torchrun), one intra-op thread, and a gloo default group with ``timeout``. The
parent returns every rank's result in rank order, or raises :class:`LocalRunError` naming each failed
rank with its traceback. Nothing outlives the call: if any rank fails or the deadline passes, the
others are killed.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Sequence

__all__ = ["run_local", "free_port", "LocalRunError", "RankFailure"]


@dataclass(frozen=True, slots=True)
class RankFailure:
    rank: int
    error: str
    traceback: str


class LocalRunError(RuntimeError):
    """One or more local ranks failed, timed out or died."""

    def __init__(self, failures: Sequence[RankFailure], message: str):
        super().__init__(message)
        self.failures = tuple(failures)


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank, world_size, port, fn, args, env, init_process_group, pg_timeout_s, results):
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if init_process_group:
            dist.init_process_group(
                "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=pg_timeout_s)
            )
        value = fn(rank, world_size, *args)
        # Pickled by value here: tensors sent through the queue as shared memory vanish with the process.
        results.put((rank, True, pickle.dumps(value), ""))
    except BaseException as error:  # report everything, including SystemExit, to the parent
        results.put((rank, False, f"{type(error).__name__}: {error}", traceback.format_exc()))
    finally:
        if init_process_group and dist.is_initialized():
            dist.destroy_process_group()


def run_local(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    *,
    timeout_s: float = 300.0,
    env: dict[str, str] | None = None,
    init_process_group: bool = True,
    pg_timeout_s: float = 120.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned processes; return results by rank.

    ``fn`` and ``args`` must be picklable (a module-level function). ``timeout_s`` bounds the whole run.
    """
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_entry,
            args=(rank, world_size, port, fn, args, dict(env or {}), init_process_group, pg_timeout_s, results),
            daemon=False,
        )
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    outcomes: dict[int, tuple[bool, Any, str]] = {}
    failures: list[RankFailure] = []
    try:
        while len(outcomes) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                rank, ok, value, tb = results.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outcomes]
                if dead and not failures:
                    # Give the survivors a moment to report their own errors (e.g. a timeout naming the peer).
                    deadline = min(deadline, time.monotonic() + 5.0)
                for r in dead:
                    if r not in outcomes:
                        outcomes[r] = (False, f"process exited with code {procs[r].exitcode}", "")
                        failures.append(RankFailure(r, outcomes[r][1], ""))
                continue
            outcomes[rank] = (ok, pickle.loads(value) if ok else value, tb)
            if not ok:
                failures.append(RankFailure(rank, value, tb))
    finally:
        for proc in procs:
            proc.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())) if not failures else 0.5)
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    missing = [r for r in range(world_size) if r not in outcomes]
    for r in missing:
        failures.append(RankFailure(r, f"no result within {timeout_s:g} s (killed)", ""))
    if failures:
        failures.sort(key=lambda f: f.rank)
        detail = "\n".join(f"--- rank {f.rank}: {f.error}\n{f.traceback}" for f in failures)
        raise LocalRunError(failures, f"{len(failures)} of {world_size} local ranks failed:\n{detail}")
    return [outcomes[r][1] for r in range(world_size)]
