"""A kernel table-full line is this moment's only when a sampled namespace shows it (issue 24:
the lab's dead-upstream run had `status` say "table full 8 s ago", CRITICAL, with 0 drops in the
gateway). The line names a namespace on this kernel ("table full in netns N") or none on older
ones; the kernel counts `drop` in that namespace before printing it."""

from __future__ import annotations

import pytest

from ctguard.core.decide import advance, attribute_lines, decide
from ctguard.core.model import History, TableFull
from helpers.builders import at, kinds, pol, sample

HOST, NS1 = 4026531000, 4026531001
CALM = History(drops=((HOST, 0), (NS1, 5)))


def line(netns: int | None, backlog: bool = False) -> TableFull:
    return TableFull(at(1), netns, 0, backlog)


CASES = [
    # name, sample (max 8192; host, ns1 counts; drops), history, line, attributed
    ("names a sampled namespace whose drop counter moved", sample(1, 8192, 100, 200, drops=(0, 9)), CALM,
     line(NS1), True),
    ("names a sampled namespace at warn (entries reaped since)", sample(1, 8192, 100, 7900, drops=(0, 5)), CALM,
     line(NS1), True),
    ("names a sampled namespace, calm, no drop: a reused inode's old line", sample(1, 8192, 100, 200, drops=(0, 5)),
     CALM, line(NS1), False),
    ("names a namespace ctguard does not sample (another tenant's, a test's)", sample(1, 8192, 100, 200, drops=(0, 5)),
     CALM, line(4026539999), False),
    ("names another namespace while a sampled one drops", sample(1, 8192, 100, 200, drops=(0, 9)), CALM,
     line(4026539999), False),
    ("names none (older kernel), one sampled namespace dropped", sample(1, 8192, 100, 200, drops=(3, 5)), CALM,
     line(None), True),
    ("names none, all calm", sample(1, 8192, 100, 200, drops=(0, 5)), CALM, line(None), False),
    ("names none, one near its max", sample(1, 8192, 7800, 200, drops=(0, 5)), CALM, line(None), True),
    ("first sample after start: no counters to compare, calm", sample(1, 8192, 100, 200, drops=(0, 5)), History(),
     line(NS1), False),
]


@pytest.mark.parametrize("name, s, h, e, attributed", CASES, ids=[c[0] for c in CASES])
def test_a_line_is_attributed_only_where_a_namespace_shows_it(name, s, h, e, attributed):
    (out,) = attribute_lines(pol(), s, h, [e])
    assert out.live is attributed and out.unattributed is (not attributed), name


def test_a_backlog_line_stays_history():
    (out,) = attribute_lines(pol(), sample(1, 8192, 100, 200, drops=(0, 9)), CALM, [line(NS1, backlog=True)])
    assert out.backlog and not out.live and not out.unattributed


def test_an_unattributed_line_is_counted_and_nothing_else():
    p = pol()
    s = sample(1, 8192, 100, 200, drops=(0, 5))
    events = attribute_lines(p, s, CALM, [line(4026539999), line(NS1)])
    d = decide(p, s, CALM, s.at, events)
    assert "SetMax" not in kinds(d) and "Warn" not in kinds(d)
    h = advance(CALM, s, events, [], s.at, p)
    assert h.table_full_events == 2                 # the kernel wrote them (ctguard_table_full_events_total)
    assert h.last_drop is None                      # `status` says no "table full N s ago"
    assert h.incident is None


def test_an_attributed_line_is_acted_on_as_before():
    p = pol()
    s = sample(1, 8192, 100, 8100, drops=(0, 9))
    events = attribute_lines(p, s, CALM, [line(NS1)])
    d = decide(p, s, CALM, s.at, events)
    assert d.actions[0].trigger == "table-full"
    h = advance(CALM, s, events, [], s.at, p)
    assert h.last_drop == s.at and h.incident is not None and h.incident.table_full_lines == 1


# --- where status's "table full" comes from when no line came at all --------------------------
# The lab's daemon runs without journald (its `journal-unavailable` entry): no kernel line reaches
# it, so "table full 8 s ago" came from History.last_drop, which an eviction (early_drop at warn:
# the dead upstream's unanswered SYN_SENT entries) set as well as a dropped packet.

@pytest.mark.parametrize("name, s, loss, packet", [
    ("a packet dropped", sample(1, 8192, 100, 7900, drops=(0, 9)), True, True),
    ("entries evicted at warn, no packet dropped", sample(1, 8192, 100, 7900, drops=(0, 5), early=(0, 40)), True, False),
    ("entries evicted below warn: not a loss of this moment", sample(1, 8192, 100, 200, drops=(0, 5), early=(0, 40)),
     False, False),
    ("calm", sample(1, 8192, 100, 200, drops=(0, 5)), False, False),
])
def test_a_drop_is_told_from_an_eviction(name, s, loss, packet):
    h = advance(History(drops=((HOST, 0), (NS1, 5)), early=((HOST, 0), (NS1, 0))), s, (), [], s.at, pol())
    assert (h.last_drop == s.at) is loss and (h.last_packet_drop == s.at) is packet, name
