"""Relief past the ceiling keeps users served (issue 23 item 3): the level the arrival rate
needs, taken at once and before the table is full, (the trim that ages the entries already there:
tests/unit/host/test_trim.py).

Rows of the pure arithmetic (arrival_fill, rate_level) and of decide() on a namespace filling
with DNS-shaped entries (answered once, held by udp_timeout) at the lab's 500/s and
bench_users' 3,000/s.
"""

from __future__ import annotations

import pytest

from ctguard.config import policy as policy_mod
from ctguard.core import relief
from ctguard.core.decide import decide
from ctguard.core.model import (
    History, Instant, KernelLimits, NamespaceReading, Refuse, Sample, ShortenTimeout, TableShape, TrimEntries,
)

NS, HOST = 4026532001, 4026531840
T0 = 1_800_000_000.0


def pol(ceiling: int, extra: str = "") -> policy_mod.Policy:
    return policy_mod.loads(f"[bump]\nceiling = {ceiling}\n[guard]\nceiling = {ceiling}\n"
                            f"[relief]\nmode = \"enforce\"\n{extra}", "t.toml")


# --- the arithmetic ------------------------------------------------------------------------------

# (what, count, max, arrivals/s, current udp timeout, start level, level wanted). Steps 4, udp
# emergency 5 s: levels 1..4 are 22, 15, 8, 5 s; the low watermark 70%.
@pytest.mark.parametrize("what, count, max_, arrivals, timeout, start, level", [
    ("steady at 30 s, what the table holds says 233/s: 22 s holds 5,152 (63%)", 7000, 8192, 0, 30, 1, 1),
    ("the lab's storm filling at 505/s: 15 s holds 7,575 (92%), 8 s 4,040 (49%)", 7000, 8192, 505, 30, 1, 3),
    ("bench_users past the ceiling, 3,000/s into 32,768: 8 s holds 73%, 5 s 46%", 27800, 32768, 3000, 30, 1, 4),
    ("more than 5 s can hold: the last level", 8000, 8192, 5000, 30, 1, 4),
    ("a slow trickle: the first level is enough", 7000, 8192, 100, 30, 1, 1),
    ("never below the level the fill already asks for", 7000, 8192, 100, 30, 3, 3),
])
def test_the_level_the_arrivals_need(what, count, max_, arrivals, timeout, start, level):
    p = pol(max_, "[relief.timeouts]\nudp = 5\n")
    got = relief.rate_level(p, count, max_, (("udp", 990), ("tcp_established", 10)), 1000, {"udp": timeout},
                            {}, ["udp"], arrivals, 0.70, start)
    assert got == level, what


def test_arrival_fill_keeps_the_classes_it_does_not_shorten():
    p = pol(8192)
    # 4,000 established (not relieved) + 4,000 UDP at 30 s arriving 500/s: at 5 s, 4,000 + 2,500.
    fill = relief.arrival_fill(p, 8000, 8192, (("udp", 50), ("tcp_established", 50)), 100, {"udp": 30}, {},
                               ["udp"], 500, 4)
    assert fill == pytest.approx((4000 + 2500) / 8192)
    # Today's timeouts (level 0, no originals): what the arrivals fill at 30 s.
    assert relief.arrival_fill(p, 8000, 8192, (("udp", 50), ("tcp_established", 50)), 100, {"udp": 30}, {},
                               ["udp"], 500, 0) == pytest.approx((4000 + 15000) / 8192)


# --- through decide(): a DNS storm at the ceiling ------------------------------------------------

def at(t: float) -> Instant:
    return Instant(T0 + t, 1000.0 + t, "b1")


def storm(max_: int, rate: float, t: float, drops: int = 0, udp: int = 30) -> Sample:
    """A namespace filling from empty with answered-once UDP at `rate`/s, nothing expired yet."""
    n = int(rate * t)
    return Sample(at(t), KernelLimits(max_, max_, 320, 16 << 30, 8 << 30),
                  (NamespaceReading(HOST, "host", 10, (("drop", 0),)),
                   NamespaceReading(NS, "gw", n, (("drop", drops),))),
                  shape=TableShape(NS, n, n, 200, states=(("udp", n),)),
                  timeouts=((NS, (("udp", udp), ("udp_stream", 120))),))


def history_before(max_: int, rate: float, t: float) -> History:
    """What decide remembers from the sample 0.1 s earlier (the fast interval): the count then."""
    return History(drops=((HOST, 0), (NS, 0)), points=((1000.0 + t - 0.1, ((HOST, 10), (NS, int(rate * (t - 0.1))))),))


# (what, ceiling, rate, seconds into the storm, drops, (step, level, new udp_timeout) or None)
@pytest.mark.parametrize("what, ceiling, rate, t, drops, want", [
    ("the lab's storm at 60%: fits below act at 30 s? no -- 505/s x 30 s is 15,150: not yet past low", 8192, 505,
     9.7, 0, None),
    ("at 74% (past low), 505/s would hold 185% at 30 s: enters now, at the level 505/s needs (15 s: 92%, 8 s: 49%)",
     8192, 505, 12, 0, ("enter", 3, 8)),
    ("at 86% (past high): the same level, not level 1", 8192, 505, 14, 0, ("enter", 3, 8)),
    ("dropping: the last level at once", 8192, 505, 14, 40, ("enter", 4, 5)),
    ("3,000/s into 32,768: 8 s would hold 73% -- the last level (5 s, the emergency value: 46%)", 32768, 3000, 8,
     0, ("enter", 4, 5)),
    ("a slow climb past low that fits at today's timeouts: relief waits", 8192, 150, 40, 0, None),
])
def test_a_dns_storm_at_the_ceiling_enters_at_the_level_its_rate_needs(what, ceiling, rate, t, drops, want):
    p = pol(ceiling)
    s = storm(ceiling, rate, t, drops)
    d = decide(p, s, history_before(ceiling, rate, t), at(t))
    assert any(isinstance(a, Refuse) and a.kind == "ceiling" for a in d.actions) or s.fill(s.namespaces[1]) < 0.85
    got = [(a.step, a.level, a.new) for a in d.actions if isinstance(a, ShortenTimeout) and a.key == "udp"]
    assert got == ([want] if want else []), what
    assert not [a for a in d.actions if isinstance(a, ShortenTimeout) and a.key == "udp_stream"], what
    if want:
        trims = [a for a in d.actions if isinstance(a, TrimEntries)]
        # The entries already there are aged from the value in force before the step.
        assert trims and dict(trims[0].timeouts)["udp"] == want[2] and dict(trims[0].previous) == {"udp": 30}, what
