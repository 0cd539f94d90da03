"""Space-Saving: exact while distinct keys fit, and the error bound always holds."""

from __future__ import annotations

import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from ctguard.core.topk import SpaceSaving


def test_exact_when_distinct_fits() -> None:
    ss: SpaceSaving[str] = SpaceSaving(8)
    stream = ["a"] * 5 + ["b"] * 3 + ["c"] * 7 + ["d"]
    random.Random(1).shuffle(stream)
    for key in stream:
        ss.add(key)
    assert ss.exact
    assert [(h.key, h.count, h.error) for h in ss.top(3)] == [("c", 7, 0), ("a", 5, 0), ("b", 3, 0)]
    assert ss.total == len(stream)


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(min_value=1, max_value=16),
    stream=st.lists(st.integers(min_value=0, max_value=40), max_size=400),
)
def test_error_bound_holds(capacity: int, stream: list[int]) -> None:
    ss: SpaceSaving[int] = SpaceSaving(capacity)
    for key in stream:
        ss.add(key)
    truth = Counter(stream)
    assert len(ss) <= capacity
    assert ss.total == len(stream)
    for h in ss.top(capacity):
        assert h.count - h.error <= truth[h.key] <= h.count
    # The Space-Saving guarantee: anything above total/capacity is monitored.
    monitored = {h.key for h in ss.top(capacity)}
    for key, n in truth.items():
        if n > len(stream) / capacity:
            assert key in monitored
    if len(truth) <= capacity:
        assert ss.exact
        assert {h.key: h.count for h in ss.top(capacity)} == dict(truth)


def test_heavy_hitter_found_among_a_million_distinct_in_bounded_memory() -> None:
    ss: SpaceSaving[int] = SpaceSaving(256)
    rng = random.Random(7)
    for i in range(200_000):
        ss.add(-1 if i % 10 == 0 else rng.randrange(1 << 40))
    assert len(ss) == 256
    top = ss.top(1)[0]
    assert top.key == -1
    assert top.count - top.error <= 20_000 <= top.count
    assert top.error <= 200_000 // 256


def test_weighted_updates() -> None:
    ss: SpaceSaving[str] = SpaceSaving(2)
    ss.add("a", 10)
    ss.add("b", 1)
    ss.add("c", 2)  # evicts b (count 1): c gets 1 + 2, error 1
    top = {h.key: (h.count, h.error) for h in ss.top(2)}
    assert top == {"a": (10, 0), "c": (3, 1)}
