"""Megatron data iterators as one step of this package's schedules reads them.

[Note: data iterators] Megatron's ``forward_step_func`` pulls from the iterator it is given inside each
call. Each chunk's calls must see the right micro-batch, so the function wraps what it is given:

- one iterator (or a list of one): one stream for the step, shared by this rank's chunks; its k-th
  item is global micro-batch k. A forward of micro-batch m on any chunk gets item m (both chunks of a V
  read micro-batch m; DualPipe's chunk 0 reads 0..C/2-1 and chunk 1 reads C/2..C-1).
- a list with one iterator per chunk (Megatron's interleaved convention, what Megatron-LM builds when the
  virtual pipeline size is set): chunk c's forward of micro-batch m gets item m of iterator c.

Items are fetched on demand and kept until the end of the step (a chunk may ask for m after another
chunk asked for a later one). A stream that was read at all is advanced to exactly ``num_microbatches``
items at the end of the step, skipping unread ones, so every used iterator moves by one step's worth as
under Megatron's schedules. ``forward_step_func`` may call ``next`` at most once per forward; an
iterator that is ``None`` (e.g. tensor-parallel ranks > 0 in Megatron-LM) is passed through as ``None``.
"""

from __future__ import annotations

from typing import Any, Iterator

from dualpipe_plugin.megatron.errors import MegatronScheduleError

__all__ = ["Feed", "FeedView", "feeds"]


class Feed:
    """One data stream of one step: item k is global micro-batch k (see [Note: data iterators])."""

    def __init__(self, source: Iterator, num_microbatches: int):
        self._source = source
        self._count = num_microbatches
        self._items: dict[int, Any] = {}
        self._pulled = 0

    def get(self, microbatch: int) -> Any:
        while self._pulled <= microbatch:
            self._items[self._pulled] = next(self._source)
            self._pulled += 1
        if microbatch not in self._items:
            raise RuntimeError(f"micro-batch {microbatch} of this step was already released")
        return self._items[microbatch]

    def finish(self) -> None:
        """Advance a used stream to exactly one step's worth of items; drop the cache."""
        if self._pulled:
            while self._pulled < self._count:
                next(self._source)
                self._pulled += 1
        self._items.clear()


class FeedView:
    """What ``forward_step_func`` receives as its data iterator: ``next()`` yields the current micro-batch."""

    def __init__(self, feed: Feed):
        self._feed = feed
        self._microbatch: int | None = None
        self._served = False

    def at(self, microbatch: int) -> "FeedView":
        self._microbatch, self._served = microbatch, False
        return self

    def __iter__(self) -> "FeedView":
        return self

    def __next__(self) -> Any:
        if self._microbatch is None:
            raise RuntimeError("this data iterator is only readable inside a forward of dualpipe_plugin's schedule")
        if self._served:
            raise RuntimeError(
                f"forward_step_func called next() twice for micro-batch {self._microbatch}; Megatron's "
                f"convention (and this schedule's) is one item per micro-batch"
            )
        self._served = True
        return self._feed.get(self._microbatch)


def feeds(data_iterator: Any, num_chunks: int, num_microbatches: int) -> tuple[list[FeedView | None], list[Feed]]:
    sources = data_iterator if isinstance(data_iterator, (list, tuple)) else [data_iterator]
    if len(sources) == 1:
        sources = list(sources) * num_chunks  # one shared stream
    if len(sources) != num_chunks:
        raise MegatronScheduleError(
            f"data_iterator is a list of {len(sources)} iterators but this rank runs {num_chunks} model "
            f"chunk(s); pass one iterator, or one per chunk"
        )
    feeds: dict[int, Feed] = {}
    views: list[FeedView | None] = []
    for source in sources:
        if source is None:
            views.append(None)
            continue
        feed = feeds.get(id(source))
        if feed is None:
            feed = feeds[id(source)] = Feed(source, num_microbatches)
        views.append(FeedView(feed))
    return views, list(feeds.values())
