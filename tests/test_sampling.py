"""How often a table is sampled: [watch] guard_rate (issue 15), as rows of (policy, reading) -> interval."""

from __future__ import annotations

import pytest

from ctguard import policy as policy_mod
from ctguard.decide import MIN_GUARD_INTERVAL, decide, next_interval
from ctguard.model import History
from test_decide import at, sample


def pol(text: str = "") -> policy_mod.Policy:
    return policy_mod.loads(text, "t.toml")


@pytest.mark.parametrize("text, max_, count, points, expected", [
    # idle: the headroom to act lasts this long at guard_rate new flows/s
    ("", 8192, 100, (), (6963 - 100) / 100_000),
    ("[watch]\nguard_rate = 25000", 8192, 100, (), (6963 - 100) / 25_000),
    ("", 65536, 100, (), (55705 - 100) / 100_000),
    ("", 262144, 100, (), 1.0),                               # 2.2 s of headroom: watch.interval
    ("[watch]\nguard_rate = 0", 8192, 100, (), 1.0),          # the guard off: watch.interval
    ("", 2048, 1400, (), MIN_GUARD_INTERVAL),                 # never below MIN_GUARD_INTERVAL
    # above warn, not growing: fast_interval, not the guard (a table parked at 73% costs no more)
    ("", 12288, 9000, (), 0.1),
    # above warn and growing: the guard interval when it is shorter than fast_interval
    ("", 65536, 46000, ((1009.5, ((4026531000, 45500),)),), (55705 - 46000) / 100_000),
])
def test_guard_interval(text, max_, count, points, expected):
    p = pol(text)
    d = decide(p, sample(10, max_, count), History(points=points), at(10))
    assert next_interval(p, d) == pytest.approx(expected)


def test_guard_rate_is_validated():
    with pytest.raises(policy_mod.PolicyError) as err:
        pol("[watch]\nguard_rate = -1")
    assert "t.toml: [watch] guard_rate" in str(err.value)
