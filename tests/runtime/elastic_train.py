"""A tiny standalone training job for the elastic-restart test, run under torchrun.

    torchrun --nproc-per-node 2 --max-restarts 1 tests/runtime/elastic_train.py --out DIR [--die-at STEP]

Checkpoints after every step; on start it resumes from the newest complete checkpoint in DIR. With
``--die-at``, rank 1 of the first attempt (TORCHELASTIC_RESTART_COUNT=0) kills itself with SIGKILL in the
middle of that step, as a crashed node would. Rank 0 appends "step loss" lines to DIR/losses.txt.
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from dualpipe_plugin.distributed import init_distributed
from dualpipe_plugin.runtime import DualPipeline, latest_checkpoint, load_checkpoint, save_checkpoint, stage_modules
from tests.runtime.harness import Case, batch, build_layers, loss_fn


class _DieMidStep:
    """Forward hook that SIGKILLs this process at one micro-batch of one step."""

    def __init__(self, step: int):
        self.step, self.calls, self.current = step, 0, -1

    def __call__(self, module, inputs, output):
        if self.current == self.step:
            self.calls += 1
            if self.calls == 3:
                os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--die-at", type=int, default=None)
    parser.add_argument("--schedule", default="dualpipev")
    args = parser.parse_args()
    torch.set_num_threads(1)
    init_distributed("gloo", timeout_s=60)  # a key space per restart attempt (see dualpipe_plugin.distributed)
    rank, world = dist.get_rank(), dist.get_world_size()
    case = Case(args.schedule, world, 2 * world)
    chunks = stage_modules(build_layers(case), case.schedule, world, rank)
    pipe = DualPipeline(chunks, case.schedule, loss_fn=loss_fn, timeout_s=30, overlap=False)
    optimizer = torch.optim.Adam([p for c in chunks for p in c.parameters()], lr=1e-2)
    out = Path(args.out)
    start = 0
    newest = latest_checkpoint(out)
    if newest is not None:
        start = load_checkpoint(pipe, newest, optimizer=optimizer)["step"] + 1
    killer = None
    if args.die_at is not None and rank == 1 and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        killer = _DieMidStep(args.die_at)
        chunks[0].register_forward_hook(killer)
    for step in range(start, args.steps):
        if killer is not None:
            killer.current = step
        optimizer.zero_grad(set_to_none=True)
        x, y = batch(case, step)
        result = pipe.step(x, y, num_microbatches=case.microbatches)
        optimizer.step()
        save_checkpoint(pipe, out / f"step_{step}", optimizer=optimizer, step=step)
        if rank == 0:
            with open(out / "losses.txt", "a") as log:
                log.write(f"{step} {float(result.loss)!r}\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
