"""What a schedule is besides its op order: its placement and the sizes it can run.

A :class:`ScheduleSpec` is the one object that stands for a schedule outside this package. The registry
holds one per name; the runtime and the framework adapters receive the spec, never a name to compare, and
ask it every question about the schedule: how many chunks a rank holds, whether a stage is held twice,
which pipeline and micro-batch counts it can run, where the stages sit. Each generator module defines its
spec next to its generator, so a new schedule is one generator file plus one registry line.

>>> from dualpipe_plugin.schedules import get_schedule
>>> spec = get_schedule("dualpipev")
>>> spec.chunks_per_rank, spec.min_microbatches(4)
(2, 8)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from dualpipe_plugin.schedules.errors import ScheduleConfigError
from dualpipe_plugin.schedules.ir import Pair, Placement, Schedule

__all__ = ["Constraints", "ScheduleSpec"]

Generator = Callable[[int, int], Schedule]
"""(num_ranks, num_microbatches) -> Schedule, for sizes the spec's constraints accept."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Constraints:
    """The pipeline and micro-batch counts a schedule can run (every check names the fix)."""

    microbatches_per_rank: int = 0
    """C must be at least this many times P to fill the pipeline (0: any C >= 1)."""
    even_ranks: str = ""
    """Why P must be even and what to do instead; empty when any P works."""
    even_microbatches: str = ""
    """Why C must be even; empty when any C works."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduleSpec:
    """A registered schedule: its name, generator, placement and constraints."""

    name: str
    """The registry key, lower case (``"dualpipev"``)."""
    summary: str
    """One line for help texts: what the schedule is."""
    generate: Generator = field(repr=False)
    """Builds the per-rank op lists; called only with sizes :meth:`check` accepts."""
    place: Callable[[int], Placement] = field(repr=False)
    """num_ranks -> where the stages sit (independent of the micro-batch count)."""
    constraints: Constraints = Constraints()

    # -- the sizes it can run -----------------------------------------------------------------------
    def min_microbatches(self, num_ranks: int) -> int:
        """The fewest micro-batches a step of this schedule can have on ``num_ranks`` ranks."""
        least = max(1, self.constraints.microbatches_per_rank * num_ranks)
        if self.constraints.even_microbatches and least % 2:
            least += 1
        return least

    def check(self, num_ranks: int, num_microbatches: int | None = None) -> None:
        """Raise :class:`ScheduleConfigError` naming the fix unless this schedule can run these sizes
        (``num_microbatches=None`` checks the pipeline size only)."""
        name = self.name
        if not _is_count(num_ranks) or (num_microbatches is not None and not _is_count(num_microbatches)):
            raise ScheduleConfigError(
                f"ranks and microbatches must be integers, got ranks={num_ranks!r}, microbatches={num_microbatches!r}"
            )
        if num_ranks < 1:
            raise ScheduleConfigError(f"{name} needs at least 1 pipeline rank, got ranks={num_ranks}")
        rules = self.constraints
        if rules.even_ranks and num_ranks % 2:
            raise ScheduleConfigError(
                f"{name} needs an even number of pipeline ranks, got ranks={num_ranks}: {rules.even_ranks}"
            )
        if num_microbatches is None:
            return
        if rules.even_microbatches and num_microbatches % 2:
            raise ScheduleConfigError(
                f"{name} {rules.even_microbatches}, so their number must be even, got "
                f"microbatches={num_microbatches}; use {num_microbatches + 1}"
            )
        if rules.microbatches_per_rank and num_microbatches < rules.microbatches_per_rank * num_ranks:
            factor = rules.microbatches_per_rank
            raise ScheduleConfigError(
                f"{name} needs at least {factor} x ranks = {factor * num_ranks} micro-batches to fill its "
                f"pipeline, got microbatches={num_microbatches}; raise the micro-batch count (gradient "
                f"accumulation steps)"
            )
        if num_microbatches < 1:
            raise ScheduleConfigError(f"{name} needs at least 1 micro-batch, got microbatches={num_microbatches}")

    # -- what it builds ------------------------------------------------------------------------------
    def build(self, num_ranks: int, num_microbatches: int) -> Schedule:
        """The schedule for ``num_ranks`` ranks and ``num_microbatches`` micro-batches (checked first)."""
        self.check(num_ranks, num_microbatches)
        return self.generate(num_ranks, num_microbatches)

    def placement(self, num_ranks: int) -> Placement:
        """Where the stages sit on ``num_ranks`` ranks (the same for every micro-batch count)."""
        self.check(num_ranks)
        return self.place(num_ranks)

    @property
    def chunks_per_rank(self) -> int:
        """Model chunks each rank holds (2 for the V and bidirectional schedules, else 1)."""
        return self.place(self._smallest_ranks()).num_chunks

    @property
    def mirrored(self) -> bool:
        """True when every stage is held by two ranks whose gradients are summed (DualPipe)."""
        return self.place(self._smallest_ranks()).mirrored

    @property
    def runs_pairs(self) -> bool:
        """True when the schedule runs overlapped F&B pairs (what the overlap engine serves)."""
        ranks = self._smallest_ranks()
        schedule = self.build(ranks, self.min_microbatches(ranks) + 2)
        return any(isinstance(action, Pair) for row in schedule.actions for action in row)

    def num_stages(self, num_ranks: int) -> int:
        """How many slices the model is cut into on ``num_ranks`` ranks."""
        return self.placement(num_ranks).num_stages

    def _smallest_ranks(self) -> int:
        return 2 if self.constraints.even_ranks else 1

    def __str__(self) -> str:
        return self.name


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
