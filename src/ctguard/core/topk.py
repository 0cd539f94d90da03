"""Heavy hitters in bounded memory: a Misra-Gries summary fed a batch at a time.

A table of a million entries from a million distinct sources must not cost a million-key
dictionary. The summary counts exactly until it holds `slack x capacity` keys; then it subtracts
the (capacity+1)-th largest count from every counter and keeps the largest `capacity` counters
(those still positive, and enough at 0 to show `capacity` rows), adding what it subtracted to
`decrement` (Misra & Gries 1982, in the
batched form of Agarwal et al., "Mergeable summaries", 2012). So for every key reported, the
true count is in `[count - error, count]` with `error = decrement`, `decrement <= total /
(capacity + 1)`, and any key whose true count exceeds `total / capacity` is guaranteed to be in
the summary. While no more than `slack x capacity` distinct keys have been seen, every count is
exact (error 0).

Why batched Misra-Gries rather than per-key Space-Saving: a dump batch's keys are counted by
`collections.Counter` in C and merged once per batch, and the pruning runs once every
`(slack - 1) x capacity` new keys. On a 262,144-entry table of distinct sources Space-Saving's
per-key eviction cost ~1 us an entry in the interpreter; this costs ~0.2 us (bench/capture.md).
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from operator import itemgetter
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

SLACK = 4  # keys held before a prune, in multiples of capacity: memory against pruning work


@dataclass(frozen=True)
class HeavyHitter(Generic[K]):
    key: K
    count: int  # an upper bound of the true count
    error: int  # true count >= count - error

    @property
    def lower(self) -> int:
        return self.count - self.error


class Frequent(Generic[K]):
    """A batched Misra-Gries summary of at most `slack x capacity` counters."""

    __slots__ = ("capacity", "total", "_counts", "_decrement", "_limit", "_held_most")

    def __init__(self, capacity: int, slack: int = SLACK) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        if slack < 1:
            raise ValueError("slack must be at least 1")
        self.capacity = capacity
        self.total = 0
        self._counts: dict[K, int] = {}
        self._decrement = 0
        self._limit = slack * capacity
        self._held_most = 0

    def update(self, counts: Mapping[K, int]) -> None:
        """Add a batch of counts (e.g. a `collections.Counter` of the batch's keys)."""
        if not counts:
            return
        self.total += sum(counts.values())
        held = self._counts
        # Keys new to the summary go in with one C call; only keys already held are added up
        # in the interpreter (few when keys are many and distinct, as spoofed sources are).
        again = held.keys() & counts.keys() if held else ()
        sums = {key: held[key] + counts[key] for key in again}
        held.update(counts)
        held.update(sums)
        if len(held) > self._held_most:
            self._held_most = len(held)
        if len(held) > self._limit:
            self._prune()

    def _prune(self) -> None:
        # Every counter loses the (capacity+1)-th largest count; at least capacity+1 keys lose
        # all of it, so the total subtracted is at least (capacity+1) x cut: the error bound.
        # The largest `capacity` stay even when that leaves them at 0 (true count in [0, error]):
        # a table of distinct keys still shows its top rows, each with its bound, as before.
        held = self._counts
        cut = heapq.nlargest(self.capacity + 1, held.values())[-1]
        self._decrement += cut
        kept = {k: n - cut for k, n in held.items() if n > cut}
        for k, n in held.items():
            if len(kept) >= self.capacity:
                break
            if n == cut:
                kept[k] = 0
        self._counts = kept

    def __len__(self) -> int:
        return len(self._counts)

    @property
    def tracked(self) -> int:
        """Distinct keys seen: exact while `exact`, else a lower bound (the most held at once)."""
        return self._held_most

    @property
    def exact(self) -> bool:
        """True while nothing was ever pruned: all counts are exact."""
        return self._decrement == 0

    @property
    def max_error(self) -> int:
        """The largest possible overestimate of any reported count (0 when exact)."""
        return self._decrement

    def top(self, n: int) -> list[HeavyHitter[K]]:
        """The `n` largest counters, largest first (ties in the order the keys were first held)."""
        d = self._decrement
        items = heapq.nlargest(n, self._counts.items(), key=itemgetter(1))
        return [HeavyHitter(k, c + d, d) for k, c in items]
