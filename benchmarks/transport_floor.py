"""What this machine charges any pipeline runtime, measured apart from ours: the floor under measured/simulated.

``dualpipe-plugin bench`` divides a measured step by the simulator's figure, which assumes free transfers
and ops that last exactly their emulated cost. Two costs of this machine break both assumptions for every
runtime, ours or a peer's, and this script measures them on their own::

    .venv/bin/python benchmarks/transport_floor.py                         # P=4, C=16, 6 rounds
    .venv/bin/python benchmarks/transport_floor.py --rounds 2 --out /tmp/floor.json

1. **Hop latency.** A gloo point-to-point message to a rank that is already blocked in ``wait()``: the
   time from the sender's ``isend`` to the receiver's return from ``wait()``. The receive is posted long
   before (as our executor's lookahead does), and the ranks pass the message down a chain after 10 ms of
   emulated compute, as a pipeline does. Both ends' threads sleep between messages, so each message pays
   the wake-ups of gloo's I/O thread and of the waiting thread.
2. **Cold code after a sleep.** The emulated device sleeps; the first Python/torch code after a sleep runs
   far slower than the same code hot (caches of a 2-vCPU VM whose cores idled). Measured as one small
   ``clone`` right after a 10 ms sleep vs in a hot loop, in one process.
3. **A hand-written 1F1B** on raw ``torch.distributed`` (``isend``/``irecv``, the next op's receive
   posted one op ahead, the same emulated chunk as ``dualpipe-plugin bench``), against our executor
   running 1F1B on the same processes, steps alternating: the least any runtime could add, next to ours.

The simulator is also run with ``comm`` = the measured median hop latency: the gap left between it and
the measured step is the runtime's (and the cold-code) share. Results go to
``benchmarks/results/transport_floor.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENS, DIM = 8, 64


def _emulated(settings: dict):
    from dualpipe_plugin.runtime.emulate import emulated_chunk

    return emulated_chunk(DIM, settings["layers"], settings["F"], settings["B"], settings["W"])


# -- 1. hop latency ----------------------------------------------------------------------------------------
def _hop_latency(rank: int, world: int, messages: int, compute_s: float) -> list[float]:
    """One-way latencies (ms) of the messages this rank received, each sent after ``compute_s`` of work."""
    import torch
    import torch.distributed as dist

    from dualpipe_plugin.runtime.emulate import _wait_until

    buffer = torch.zeros(TOKENS, DIM, dtype=torch.float64)
    latencies = []
    dist.barrier()
    for _ in range(messages):
        if rank > 0:
            work = dist.irecv(buffer, rank - 1)  # posted before this rank "computes", as a lookahead does
            work.wait()
            latencies.append((time.perf_counter() - buffer[0, 0].item()) * 1e3)
        _wait_until(time.perf_counter() + compute_s)
        if rank < world - 1:
            buffer[0, 0] = time.perf_counter()
            dist.isend(buffer, rank + 1).wait()
    return latencies


# -- 3. the hand-written 1F1B -------------------------------------------------------------------------------
def one_f_one_b_order(rank: int, world: int, microbatches: int) -> list[tuple[str, int]]:
    """This rank's ("F" | "B", micro-batch) sequence: the registry's 1F1B (only the runtime is hand-written)."""
    from dualpipe_plugin.schedules import OpKind, build_schedule

    actions = build_schedule("1f1b", world, microbatches).actions[rank]
    return [("F" if action.kind is OpKind.F else "B", action.microbatch) for action in actions]


class _RawOneFOneB:
    """The smallest 1F1B on torch.distributed: no headers, no checks, fixed shapes, one receive ahead."""

    def __init__(self, rank: int, world: int, chunk, microbatches: int):
        self.rank, self.world, self.chunk = rank, world, chunk
        self.order = one_f_one_b_order(rank, world, microbatches)

    def _post(self, op, posted: dict) -> None:
        import torch
        import torch.distributed as dist

        kind, _ = op
        if op in posted:
            return
        if kind == "F" and self.rank > 0:
            buffer = torch.empty(TOKENS, DIM)
            posted[op] = (buffer, dist.irecv(buffer, self.rank - 1, tag=0))
        elif kind == "B" and self.rank < self.world - 1:
            buffer = torch.empty(TOKENS, DIM)
            posted[op] = (buffer, dist.irecv(buffer, self.rank + 1, tag=1))

    def step(self, inputs, labels) -> None:
        import torch.distributed as dist

        stash, sends, posted = {}, [], {}
        last = self.rank == self.world - 1
        for index, op in enumerate(self.order):
            self._post(op, posted)
            if index + 1 < len(self.order):
                self._post(self.order[index + 1], posted)
            kind, microbatch = op
            if kind == "F":
                if self.rank == 0:
                    x = inputs[microbatch].clone().requires_grad_()
                else:
                    x, work = posted.pop(op)
                    work.wait()
                    x.requires_grad_()
                y = self.chunk(x)
                if last:
                    y = (y - labels[microbatch]).pow(2).mean()
                else:
                    sends.append(dist.isend(y.detach(), self.rank + 1, tag=0))
                stash[microbatch] = (x, y)
            else:
                x, y = stash.pop(microbatch)
                if last:
                    y.backward()
                else:
                    grad, work = posted.pop(op)
                    work.wait()
                    y.backward(grad)
                if self.rank > 0:
                    sends.append(dist.isend(x.grad, self.rank - 1, tag=1))
        for work in sends:
            work.wait()


def _rank(rank: int, world: int, settings: dict) -> dict:
    import torch
    import torch.distributed as dist

    from dualpipe_plugin.runtime.pipeline import DualPipeline

    hops = _hop_latency(rank, world, settings["messages"], settings["F"] / 1e3)
    torch.manual_seed(0)
    microbatches = settings["microbatches"]
    x = torch.randn(microbatches, TOKENS, DIM)
    y = torch.randn(microbatches, TOKENS, DIM)
    raw = _RawOneFOneB(rank, world, _emulated(settings), microbatches)
    ours = DualPipeline([_emulated(settings)], "1f1b", loss_fn=lambda out, target: (out - target).pow(2).mean())
    runs = {
        "raw_1f1b": lambda: raw.step(x, y),
        "ours_1f1b": lambda: ours.step(x.reshape(-1, DIM), y.reshape(-1, DIM), num_microbatches=microbatches,
                                       reduce_loss=False),
    }
    spans: dict[str, list] = {name: [] for name in runs}
    for round_index in range(settings["warmup"] + settings["rounds"]):
        for name, run in runs.items():
            dist.barrier()
            start = time.perf_counter()
            run()
            end = time.perf_counter()
            if round_index >= settings["warmup"]:
                spans[name].append((start, end))
    ours.close()
    return {"hops_ms": hops, "spans": spans}


# -- 2. cold code after a sleep -----------------------------------------------------------------------------
def cold_code_cost(repeats: int = 40) -> dict:
    """Median ms of one small clone right after a 10 ms sleep, and hot."""
    import torch

    tensor = torch.randn(TOKENS, DIM)
    after_sleep, hot = [], []
    for _ in range(repeats):
        time.sleep(0.01)
        start = time.perf_counter()
        tensor.clone()
        after_sleep.append((time.perf_counter() - start) * 1e3)
    for _ in range(repeats):
        start = time.perf_counter()
        tensor.clone()
        hot.append((time.perf_counter() - start) * 1e3)
    return {"clone_after_sleep_ms": round(statistics.median(after_sleep), 4),
            "clone_hot_ms": round(statistics.median(hot), 4)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--microbatches", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--messages", type=int, default=40)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "transport_floor.json"))
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    import torch

    from dualpipe_plugin.bench.machine import machine_facts
    from dualpipe_plugin.bench.spans import step_times_ms
    from dualpipe_plugin.launch import run_local
    from dualpipe_plugin.schedules import CostModel, build_schedule, simulate

    torch.set_num_threads(1)
    settings = {"F": 10.0, "B": 20.0, "W": 10.0, "layers": 2, "microbatches": args.microbatches,
                "rounds": args.rounds, "warmup": 2, "messages": args.messages}
    facts = machine_facts()
    cold = cold_code_cost()
    reports = run_local(_rank, args.ranks, (settings,), timeout_s=600)
    hops = sorted(h for report in reports for h in report["hops_ms"])
    hop_median = statistics.median(hops)
    schedule = build_schedule("1f1b", args.ranks, args.microbatches)
    costs = CostModel(F=settings["F"], B=settings["B"], W=settings["W"])
    simulated = simulate(schedule, costs).makespan
    simulated_with_hops = simulate(schedule, dataclasses.replace(costs, comm=hop_median)).makespan

    raw, ours = (step_times_ms([r["spans"][name] for r in reports]) for name in ("raw_1f1b", "ours_1f1b"))
    result = {
        "benchmark": "transport_floor",
        "machine": facts,
        "config": {"ranks": args.ranks, "microbatches": args.microbatches, "rounds": args.rounds,
                   "per_chunk_ms": {k: settings[k] for k in ("F", "B", "W")}, "layers_per_chunk": settings["layers"]},
        "hop_latency_ms": {"median": round(hop_median, 3), "p90": round(hops[int(0.9 * (len(hops) - 1))], 3),
                           "messages": len(hops)},
        "cold_code": cold,
        "simulated_ms": simulated,
        "simulated_with_hop_latency_ms": round(simulated_with_hops, 1),
        "raw_1f1b": {"steps_ms": [round(t, 1) for t in raw], "median_ms": round(statistics.median(raw), 1),
                     "over_simulated": round(statistics.median(raw) / simulated, 4)},
        "ours_1f1b": {"steps_ms": [round(t, 1) for t in ours], "median_ms": round(statistics.median(ours), 1),
                      "over_simulated": round(statistics.median(ours) / simulated, 4),
                      "over_simulated_with_hop_latency": round(statistics.median(ours) / simulated_with_hops, 4)},
        "ours_over_raw_paired": round(statistics.median(o / r for o, r in zip(ours, raw)), 4),
        "load_average_1m_end": round(os.getloadavg()[0], 2),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
