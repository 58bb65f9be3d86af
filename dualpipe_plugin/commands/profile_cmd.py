"""``dualpipe-plugin profile --model MODULE:CALLABLE --out costs.json [--ranks N] [--repeats R] [--warmup W]``.

``CALLABLE()`` returns a :class:`~dualpipe_plugin.planner.profile.ProfileTarget` (the model's layers, one
micro-batch, the loss). The layers are profiled on this process; the pipeline group's hop and the
runtime's overhead per action (the model cut into one stage per rank, short 1F1B and ZB1P steps) are
measured:

* under ``torchrun`` (its environment, or a process group already started, of more than one rank): on
  the real group, the world in rank order (every rank runs the command and profiles; rank 0 writes the
  file);
* with ``--ranks N`` outside torchrun: on N local gloo processes (this machine's loopback), each building
  the model with ``CALLABLE()``;
* otherwise the hop not at all (the file says so, with zero latency for the user to edit) and the
  overhead by one-rank runs on this process, a rougher figure.
"""

from __future__ import annotations

import argparse
import importlib
import os
from functools import partial

from dualpipe_plugin.cli import UsageError
from dualpipe_plugin.commands.paths import check_output_file

__all__ = ["add_arguments", "run", "load_target"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODULE:CALLABLE",
                        help="a function returning a dualpipe_plugin.planner.ProfileTarget, e.g. "
                             "dualpipe_plugin.planner.targets:heavy_ends")
    parser.add_argument("--out", default="costs.json", help="the cost file to write (default costs.json)")
    parser.add_argument("--ranks", type=int, default=0,
                        help="outside torchrun: measure the P2P hop and the runtime's per-action overhead on this many "
                             "local gloo processes (>= 2), each building the model")
    parser.add_argument("--repeats", type=int, default=5, help="measured runs per layer (the median is kept)")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured runs per layer first")
    parser.add_argument("--no-overhead", action="store_true",
                        help="skip measuring the runtime's per-action overhead (short pipeline steps on the group)")


def load_target(spec: str):
    """``MODULE:CALLABLE`` -> the ProfileTarget it returns; one clear error for every way it can be wrong."""
    from dualpipe_plugin.planner.profile import ProfileTarget

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--model {spec!r}: write MODULE:CALLABLE, e.g. dualpipe_plugin.planner.targets:"
                         f"heavy_ends")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(f"--model {spec}: cannot import {module_name!r} ({error}); check the module path and "
                         f"PYTHONPATH") from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise UsageError(f"--model {spec}: {module_name} has no callable {attr!r}")
    target = function()
    if not isinstance(target, ProfileTarget):
        raise UsageError(f"--model {spec} returned {type(target).__name__}, not a ProfileTarget; build one with "
                         f"ProfileTarget.from_layers / from_pipeline_module / from_megatron")
    return target


def run(args: argparse.Namespace) -> int:
    if args.repeats < 1 or args.warmup < 0:
        raise UsageError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    world = _launched_world()
    if args.ranks and (args.ranks < 2 or world > 1):
        raise UsageError("--ranks N (N >= 2) measures the hop and the overhead on local processes; under torchrun the "
                         "real group is measured, leave --ranks out")
    out = check_output_file(args.out, suffixes=(".json",))
    from dualpipe_plugin.planner.link import measure_link
    from dualpipe_plugin.planner.profile import profile_locally, profile_model

    transport = None
    if world > 1:
        import torch.distributed as dist

        from dualpipe_plugin.runtime.transport import TorchTransport

        if not dist.is_initialized():
            dist.init_process_group("nccl" if _cuda() else "gloo")
        transport = TorchTransport(list(range(dist.get_world_size())))
    if args.ranks:
        costs = profile_locally(partial(load_target, args.model), args.ranks, repeats=args.repeats,
                                warmup=args.warmup, overhead=not args.no_overhead)
    else:
        costs = profile_model(load_target(args.model), repeats=args.repeats, warmup=args.warmup, transport=transport,
                              overhead_microbatches=0 if args.no_overhead else 8)
    if transport is not None:
        costs = costs.with_link(measure_link(transport))
        if transport.rank != 0:
            return 0
    costs.save(out)
    link = costs.link
    hop = (f"hop {link.latency_ms:.3f} ms" + (f", {link.bandwidth_bytes_per_s / 1e9:.2f} GB/s"
                                               if link.bandwidth_bytes_per_s else "")) if link.measured else link.note
    overhead = ", ".join(f"{kind} {value:.3f}" for kind, value in zip("FIWB", costs.runtime.overhead))
    print(f"wrote {out}: {len(costs.layers)} layers; runtime overhead per action (ms): {overhead}; {hop}")
    return 0


def _launched_world() -> int:
    """The world size of a distributed launch this process belongs to (1 if none): an initialised process
    group, or torchrun's environment (a stray WORLD_SIZE alone is not a launch)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    if all(key in os.environ for key in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")):
        return int(os.environ["WORLD_SIZE"])
    return 1


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
