"""What our simulator predicts for each ``bench compare`` entry: the schedule the entry runs, with the costs
it pays (``split``: I and W apart; ``no-split``: every backward a full B; ``torch-order``: torch's own action
order; ``overlap``: MoE pairs perfectly overlapped)."""

from __future__ import annotations

from dualpipe_plugin.bench.compare.entries import Entry

__all__ = ["simulated_ms", "layers_per_chunk", "torch_order_schedule"]


def torch_order_schedule(order: dict, ranks: int, microbatches: int):
    """torch's V order (``0F3``, ``7I0``, ``(0F7;7B3)OVERLAP_F_B``) as our IR (stage s < P: chunk 0)."""
    import re

    from dualpipe_plugin.schedules import Schedule, build_schedule, parse_ranks

    def op(text: str) -> str:
        match = re.fullmatch(r"(\d+)([FIWB])(\d+)", text)
        stage, kind, mb = int(match.group(1)), match.group(2), int(match.group(3))
        return f"{kind}{0 if stage < ranks else 1}:{mb}"

    lines = []
    for rank in range(ranks):
        tokens = []
        for action in order[rank] if rank in order else order[str(rank)]:
            pair = re.fullmatch(r"\((\w+);(\w+)\)OVERLAP_F_B", action)
            if pair:
                tokens.append(f"{op(pair.group(1))}&{op(pair.group(2))}")
            elif re.fullmatch(r"\d+[FIWB]\d+", action):
                tokens.append(op(action))
        lines.append(f"rank {rank}: " + " ".join(tokens))
    placement = build_schedule("dualpipev", ranks, microbatches).placement
    return Schedule("torch", placement, microbatches, tuple(tuple(row) for row in parse_ranks("\n".join(lines))))


def simulated_ms(entry: Entry, workload, chunk_layers: float, transfer_ms: float, order: dict | None) -> float | None:
    """Our simulator's step for what the entry runs and pays (None: no equivalent schedule)."""
    from dualpipe_plugin.schedules import CostModel, build_schedule, simulate

    if entry.simulate is None:
        return None
    name, how = entry.simulate
    F, B, W = (chunk_layers * c for c in (workload.forward_ms, workload.backward_ms, workload.weight_ms))
    comm = 2 * transfer_ms * chunk_layers if workload.moe else 0.0  # dispatch + combine per block, each way
    if how == "split":
        costs = CostModel(F=F + comm, B=B + comm, W=W)
    elif how == "overlap":  # ideal pair: the transfers of both sides hidden behind their compute
        costs = CostModel(F=F + comm, B=B + comm, W=W, FB=max(F + B, 2 * comm))
    else:  # no-split / torch-order: every backward is a full B; a W op costs nothing
        costs = CostModel(F=F + comm, B=B + comm, W=0.0)
    if how == "torch-order":
        if order is None:
            return None
        schedule = torch_order_schedule(order, workload.ranks, workload.microbatches)
    else:
        schedule = build_schedule(name, workload.ranks, workload.microbatches)
    return simulate(schedule, costs).makespan


def layers_per_chunk(entry: Entry, workload) -> float:
    """Emulated layers in one chunk of the schedule the entry is simulated as (0 without one)."""
    from dualpipe_plugin.schedules import build_schedule

    if entry.simulate is None:
        return 0.0
    stages = build_schedule(entry.simulate[0], workload.ranks, workload.microbatches).placement.num_stages
    return workload.layers / stages
