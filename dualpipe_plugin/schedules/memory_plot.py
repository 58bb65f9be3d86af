"""A per-rank memory picture: the planner's estimate beside what was measured, stacked by kind.

>>> write_memory_png([m.to_dict() for m in estimate], measured, "memory.png", title="dualpipev P=4")

``estimated`` and ``measured`` hold one dict per rank with the byte counts of :class:`RankMemory`
(``params``, ``grads``, ``optimizer``, ``activations``, ``comm_buffers``; a missing kind counts 0).
matplotlib is imported only here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

__all__ = ["KINDS", "write_memory_png"]

KINDS = (("params", "#8da0cb"), ("grads", "#66c2a5"), ("optimizer", "#fc8d62"), ("activations", "#e78ac3"),
         ("comm_buffers", "#a6d854"))


def write_memory_png(
    estimated: Sequence[Mapping[str, float]], measured: Sequence[Mapping[str, float]] | None, path: str | Path,
    title: str = "",
) -> Path:
    """Two bars per rank (estimated, measured), each stacked by kind, in MiB; the ratio over each pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ranks = len(estimated)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * ranks, 4.2))
    width = 0.38
    series = [("estimated", estimated, 0.0, None)] + ([("measured", measured, width, "//")] if measured else [])
    for label, values, shift, hatch in series:
        bottoms = [0.0] * ranks
        for kind, colour in KINDS:
            heights = [values[r].get(kind, 0.0) / 2**20 for r in range(ranks)]
            ax.bar([r + shift for r in range(ranks)], heights, width, bottom=bottoms, color=colour, hatch=hatch,
                   edgecolor="black", linewidth=0.4, label=kind if label == "estimated" else None)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
        for r in range(ranks):
            ax.text(r + shift, bottoms[r], label[:4] + ".", ha="center", va="bottom", fontsize=7)
    if measured:
        for r in range(ranks):
            kinds = [kind for kind, _ in KINDS if kind in measured[r]]  # what was measured is what is compared
            est = sum(estimated[r].get(kind, 0.0) for kind in kinds)
            got = sum(measured[r].get(kind, 0.0) for kind in kinds)
            top = max(est, got) / 2**20
            ax.text(r + width / 2, top * 1.08, f"{est / got:.3f}" if got else "-", ha="center", fontsize=8)
    ax.set_xticks([r + (width / 2 if measured else 0) for r in range(ranks)], [f"rank {r}" for r in range(ranks)])
    ax.set_ylabel("MiB")
    ax.margins(y=0.18)
    ax.legend(fontsize=7, ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.1), frameon=False)
    if title:
        ax.set_title(title + ("\n(number: estimated / measured, over the kinds measured)" if measured else ""),
                     fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=140)
    plt.close(fig)
    return path
