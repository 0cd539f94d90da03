"""Heavy hitters in bounded memory: the Space-Saving summary (Metwally, Agrawal, El Abbadi 2005).

A table of a million entries from a million distinct sources must not cost a million-key
dictionary. Space-Saving keeps at most `capacity` counters; a new key arriving when all are
taken replaces the smallest one and inherits its count (recorded as that key's `error`). So for
every key reported, true count is in `[count - error, count]`, and any key whose true count
exceeds `total / capacity` is guaranteed to be in the summary. While no more than `capacity`
distinct keys have been seen, every count is exact (error 0).
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class HeavyHitter(Generic[K]):
    key: K
    count: int  # an upper bound of the true count
    error: int  # true count >= count - error

    @property
    def lower(self) -> int:
        return self.count - self.error


class SpaceSaving(Generic[K]):
    """Space-Saving with a lazy min-heap.

    The heap holds exactly one (count, key) per monitored key, but the count in the heap may
    lag behind the real one: increments only touch the dict (the hot path, one dict lookup).
    When a key must be evicted, stale heap tops are refreshed and sifted down until the top is
    current; it is then the true minimum because every heap value is a lower bound of its key's
    count. Each increment causes at most one refresh, so updates stay O(log capacity) amortised.
    """

    __slots__ = ("capacity", "total", "_counts", "_errors", "_heap")

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.total = 0
        self._counts: dict[K, int] = {}
        self._errors: dict[K, int] = {}
        self._heap: list[tuple[int, int, K]] = []

    def add(self, key: K, weight: int = 1) -> None:
        self.total += weight
        counts = self._counts
        current = counts.get(key)
        if current is not None:
            counts[key] = current + weight
            return
        heap = self._heap
        if len(counts) < self.capacity:
            counts[key] = weight
            # id() breaks ties so keys of mixed types never get compared.
            heapq.heappush(heap, (weight, id(key), key))
            return
        while True:
            stored, _, victim = heap[0]
            actual = counts[victim]
            if stored == actual:
                break
            heapq.heapreplace(heap, (actual, id(victim), victim))
        del counts[victim]
        self._errors.pop(victim, None)
        counts[key] = actual + weight
        self._errors[key] = actual
        heapq.heapreplace(heap, (actual + weight, id(key), key))

    def __len__(self) -> int:
        return len(self._counts)

    @property
    def exact(self) -> bool:
        """True while no key was ever evicted: all counts are exact."""
        return not self._errors

    @property
    def max_error(self) -> int:
        """The largest possible overestimate of any reported count (0 when exact)."""
        return max(self._errors.values(), default=0)

    def top(self, n: int) -> list[HeavyHitter[K]]:
        """The `n` largest counters, largest first; ties broken by the tighter lower bound."""
        errors = self._errors
        items = heapq.nlargest(
            n,
            self._counts.items(),
            key=lambda kv: (kv[1], kv[1] - errors.get(kv[0], 0)),
        )
        return [HeavyHitter(k, c, errors.get(k, 0)) for k, c in items]
