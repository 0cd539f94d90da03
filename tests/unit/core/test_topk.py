"""The batched Misra-Gries summary: exact while distinct keys fit, and the error bound always holds."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctguard.core.topk import Frequent


def feed(summary: Frequent, stream: list, batch: int) -> None:
    for i in range(0, len(stream), batch):
        summary.update(Counter(stream[i : i + batch]))


def test_exact_while_distinct_keys_fit() -> None:
    f: Frequent[str] = Frequent(2, slack=2)  # holds 4 keys before it prunes
    stream = ["a"] * 5 + ["b"] * 3 + ["c"] * 7 + ["d"]
    random.Random(1).shuffle(stream)
    feed(f, stream, 3)
    assert f.exact and f.max_error == 0
    assert [(h.key, h.count, h.error) for h in f.top(3)] == [("c", 7, 0), ("a", 5, 0), ("b", 3, 0)]
    assert f.total == len(stream) and f.tracked == 4


@settings(max_examples=300, deadline=None)
@given(
    capacity=st.integers(min_value=1, max_value=16),
    slack=st.integers(min_value=1, max_value=4),
    batch=st.integers(min_value=1, max_value=50),
    stream=st.lists(st.integers(min_value=0, max_value=60), max_size=500),
)
def test_error_bound_holds(capacity: int, slack: int, batch: int, stream: list[int]) -> None:
    f: Frequent[int] = Frequent(capacity, slack=slack)
    feed(f, stream, batch)
    truth = Counter(stream)
    assert f.total == len(stream)
    assert len(f) <= max(slack * capacity, capacity)
    # Misra-Gries: what was subtracted is at most total / (capacity + 1).
    assert f.max_error * (capacity + 1) <= len(stream)
    reported = {h.key: h for h in f.top(len(f))}
    for h in reported.values():
        assert h.count - h.error <= truth[h.key] <= h.count
    # Anything above total / capacity is in the summary.
    for key, n in truth.items():
        if n > len(stream) / capacity:
            assert key in reported
    # tracked: the distinct keys while exact, at least capacity + 1 of them once pruned.
    if f.exact:
        assert f.tracked == len(truth)
    else:
        assert capacity < f.tracked <= len(truth)
    if len(truth) <= slack * capacity:
        assert f.exact
        assert {k: h.count for k, h in reported.items()} == dict(truth)


def test_heavy_hitter_found_among_many_distinct_in_bounded_memory() -> None:
    f: Frequent[int] = Frequent(256)
    rng = random.Random(7)
    stream = [-1 if i % 10 == 0 else rng.randrange(1 << 40) for i in range(200_000)]
    feed(f, stream, 200)
    assert len(f) <= 4 * 256
    top = f.top(1)[0]
    assert top.key == -1
    assert top.count - top.error <= 20_000 <= top.count
    assert top.error <= 200_000 // 257
    assert 4 * 256 < f.tracked <= 200_000 and not f.exact


def test_weighted_updates_one_key_at_a_time() -> None:
    f: Frequent[str] = Frequent(1, slack=2)
    f.update({"a": 10})
    f.update({"b": 1})
    f.update({"c": 2})  # three keys held > 2: every counter loses the 2nd largest (2); a keeps 8
    assert [(h.key, h.count, h.error) for h in f.top(3)] == [("a", 10, 2)]
    assert f.max_error == 2 and f.total == 13


def test_keys_already_held_add_up_across_batches() -> None:
    f: Frequent[str] = Frequent(8)
    f.update({"a": 2, "b": 1})
    f.update({"a": 3, "c": 4})
    assert {h.key: h.count for h in f.top(3)} == {"a": 5, "c": 4, "b": 1}


@pytest.mark.parametrize("capacity, slack", [(0, 4), (4, 0)])
def test_bad_sizes_are_refused(capacity: int, slack: int) -> None:
    with pytest.raises(ValueError):
        Frequent(capacity, slack=slack)


def test_distinct_keys_still_show_their_top_rows_with_their_bound() -> None:
    # Every key seen once: Misra-Gries subtracts everything, yet `capacity` rows stay, each
    # saying "at most `error`" (lower bound 0), as a table of spoofed sources should read.
    f: Frequent[int] = Frequent(3, slack=2)
    feed(f, list(range(1000)), 10)
    rows = f.top(5)
    assert len(rows) >= 3 and all(h.lower >= 0 and h.count == h.error == f.max_error for h in rows)
    assert 0 < f.max_error <= 1000 // 4
