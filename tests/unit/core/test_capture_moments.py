"""Issue 24: besides the first bump and the end, the daemon asks for a bundle when an incident
gets worse (a bump refused at a bound, the kernel's first drops, relief's first shortening, the
table grown 4-fold since the first bundle), each once per incident, bounded by [evidence]
incident_captures (ctguard.daemon.recorder)."""

from __future__ import annotations

import pytest

from ctguard.config import policy as policy_mod
from ctguard.core.decide import GROWN_FACTOR, advance, decide
from ctguard.core.model import (
    Capture, History, Incident, Instant, KernelLimits, NamespaceReading, Outcome, Sample, SetMax,
)
from ctguard.daemon.recorder import FlightRecorder

GiB = 1 << 30
T0 = 1_800_000_000.0
NS = 4026531001


def at(t: float) -> Instant:
    return Instant(T0 + t, 1000.0 + t, "b1")


def sample(t: float, max_: int, count: int, drop: int = 0) -> Sample:
    ns = (NamespaceReading(4026531000, "host", 10, (("drop", 0),)), NamespaceReading(NS, "gw", count, (("drop", drop),)))
    return Sample(at(t), KernelLimits(max_, max_ // 4, 320, 16 * GiB, 8 * GiB), ns)


def history(*, drops: int = 0, refusals: int = 0, last_capture: float | None = 0.0, base_drop: int = 0,
            bundles: tuple[str, ...] = ("20260101T000000Z-bump",), first_bundle_count: int = 0) -> History:
    inc = Incident(at(0), NS, "gw", max_at_start=8192, bumps=1, refusals=refusals, drops=drops, max_now=8192,
                   bundles=bundles, last_active=at(9), first_bundle_count=first_bundle_count)
    return History(incident=inc, last_capture=at(last_capture) if last_capture is not None else None,
                   drops=((4026531000, 0), (NS, base_drop)))


def captures(decision) -> list[str]:
    return [a.reason for a in decision.actions if isinstance(a, Capture)]


POLICY = policy_mod.loads("[bump]\nceiling = 8192\ncooldown = 60\n", "t.toml")


def test_the_first_drops_of_an_incident_are_captured() -> None:
    d = decide(POLICY, sample(10, 8192, 8000, drop=500), history(), at(10))
    assert "drops-began" in captures(d) or any(r.startswith("refused-") for r in captures(d)), captures(d)


def test_drops_that_go_on_are_not_captured_twice() -> None:
    taken = ("20260101T000000Z-bump", "20260101T000009Z-drops-began")
    d = decide(POLICY, sample(10, 1 << 20, 3000, drop=900), history(drops=400, base_drop=400, bundles=taken), at(10))
    assert "drops-began" not in captures(d)


def test_drops_that_began_inside_the_gap_are_taken_at_the_next_turn_they_go_on() -> None:
    # The drops began 2 s after the refusal's bundle (inside the 5 s gap): 6 s later they still
    # rise and the incident has no drops bundle yet, so it is taken now.
    taken = ("20260101T000000Z-bump", "20260101T000004Z-refused-ceiling")
    d = decide(POLICY, sample(10, 1 << 20, 3000, drop=900), history(drops=400, base_drop=400, bundles=taken,
                                                                    last_capture=4.0), at(10))
    assert "drops-began" in captures(d)


def test_the_first_refusal_at_the_ceiling_is_captured_inside_the_cooldown() -> None:
    # The last capture was 9 s ago, under the 60 s cooldown: a refusal at the ceiling is a worse
    # moment than the first bump and gets its bundle all the same.
    d = decide(POLICY, sample(9, 8192, 8100), history(last_capture=0.0), at(9))
    assert "refused-ceiling" in captures(d), [type(a).__name__ for a in d.actions]
    taken = ("20260101T000000Z-bump", "20260101T000009Z-refused-ceiling")
    again = decide(POLICY, sample(15, 8192, 8100), history(last_capture=9.0, refusals=1, bundles=taken), at(15))
    assert "refused-ceiling" not in captures(again), "once"


def test_a_refusal_inside_the_gap_is_taken_at_the_next_refused_turn_the_gap_allows() -> None:
    # The DNS lab past the ceiling: a `grown` bundle 2 s before the first refusal at the ceiling
    # took the gap, and the refusal's moment was lost (it was taken only at the first refusal).
    taken = ("20260101T000000Z-bump", "20260101T000007Z-grown")
    inside = decide(POLICY, sample(9, 8192, 8100), history(last_capture=7.0, bundles=taken), at(9))
    assert "refused-ceiling" not in captures(inside), "within 5 s of the grown bundle"
    later = decide(POLICY, sample(13, 8192, 8100), history(last_capture=7.0, refusals=1, bundles=taken), at(13))
    assert "refused-ceiling" in captures(later), [type(a).__name__ for a in later.actions]


def test_no_capture_within_the_minimum_gap() -> None:
    d = decide(POLICY, sample(2, 8192, 8000, drop=500), history(last_capture=0.0), at(2))
    assert captures(d) == []


def test_the_recorder_bounds_them_per_incident() -> None:
    r = FlightRecorder()
    s = sample(1000, 8192, 3900)
    r.turn(s, True, [Outcome(SetMax(4096, 8192, "fill", NS, 0.95, "x"), True, read_back=8192),
                     Outcome(Capture("bump", NS), True, "capture queued")], [], incident="incident-1000")
    assert not r.capture_allowed("bump", 5), "another bump is not a new moment: the slots are kept for those"
    assert r.capture_allowed("drops-began", 5)
    assert not r.capture_allowed("drops-began", 5), "each moment once"
    assert r.capture_allowed("refused-ceiling", 5)
    assert not r.capture_allowed("refused-guard", 5), "one refusal moment, whichever bound"
    assert r.capture_allowed("incident-end", 5)
    assert not r.capture_allowed("drops-began", 1) and not r.capture_allowed("relief", 2)


def test_relief_shortening_a_timeout_is_captured_once() -> None:
    from dataclasses import replace as _replace

    from ctguard.core.model import TableShape

    policy = policy_mod.loads('[bump]\nceiling = 8192\ncooldown = 60\n[relief]\nmode = "enforce"\n', "t.toml")
    s = _replace(sample(9, 8192, 8100), timeouts=((NS, (("udp", 30), ("udp_stream", 120), ("tcp_syn_sent", 120),
                                                        ("tcp_syn_recv", 60), ("tcp_time_wait", 120))),),
                 shape=TableShape(NS, 1000, 900, 10, states=(("udp", 900),)))
    # A refusal at the ceiling was already captured in this incident: relief's first act is the next moment.
    h = history(refusals=1, last_capture=0.0, bundles=("20260101T000000Z-bump", "20260101T000001Z-refused-ceiling"))
    d = decide(policy, s, h, at(9))
    shortened = [a for a in d.actions if type(a).__name__ == "ShortenTimeout"]
    assert shortened, [type(a).__name__ for a in d.actions]
    assert "relief" in captures(d)
    taken = h.incident.bundles + ("20260101T000009Z-relief",)
    again = decide(policy, s, _replace(h, incident=_replace(h.incident, bundles=taken)), at(9))
    assert "relief" not in captures(again)


def test_relief_that_entered_beside_another_capture_gets_its_bundle_once_the_gap_allows() -> None:
    # Relief entered in the turn of the refusal's bundle (one capture a turn): its moment waits
    # for the gap, then is taken while the incident has no relief bundle; relief active from
    # before the incident began is not this incident's moment.
    from dataclasses import replace as _replace

    from ctguard.core.model import ReliefState, Relieved

    policy = policy_mod.loads('[bump]\nceiling = 1048576\ncooldown = 60\n[relief]\nmode = "enforce"\n', "t.toml")
    calm = sample(9, 1 << 20, 3000)        # no trigger, no drop: only relief's moment is in question
    taken = ("20260101T000000Z-bump", "20260101T000001Z-refused-ceiling")
    relieved = Relieved(NS, "gw", "udp", 30, 10, at(1))
    h = _replace(history(refusals=1, last_capture=1.0, bundles=taken), relief=ReliefState(active=(relieved,)))
    assert "relief" not in captures(decide(policy, calm, h, at(3))), "inside the gap"
    assert "relief" in captures(decide(policy, calm, h, at(9)))
    done = _replace(h, incident=_replace(h.incident, bundles=taken + ("20260101T000009Z-relief",)))
    assert "relief" not in captures(decide(policy, calm, done, at(15))), "once"
    before = _replace(h, relief=ReliefState(active=(_replace(relieved, since=at(-100)),)))
    assert "relief" not in captures(decide(policy, calm, before, at(9))), "relief of an earlier incident"


def test_the_first_bundle_of_an_incident_records_the_count_it_saw() -> None:
    # What a "grown" moment compares with: the worst count in the turn the first capture was asked
    # for (the bump's turn, which also opens the incident), kept by later captures.
    s = sample(10, 8192, 403)
    bump = Outcome(SetMax(8192, 16384, "growth", NS, 0.05, "x"), True, read_back=16384)
    h = advance(History(), s, [], [bump, Outcome(Capture("bump", NS), True, "capture queued")], at(10), POLICY)
    assert h.incident is not None and h.incident.first_bundle_count == 403
    later = advance(h, sample(20, 16384, 9000), [], [Outcome(Capture("drops-began", NS), True, "capture queued")],
                    at(20), POLICY)
    assert later.incident is not None and later.incident.first_bundle_count == 403
    none = advance(History(), s, [], [bump], at(10), POLICY)
    assert none.incident is not None and none.incident.first_bundle_count == 0, "no bundle asked for, nothing to compare"


GROWN = [
    # (what, worst count now, bundles taken, last capture (s ago), drops in this turn, expected captures)
    ("the table grew 4-fold since the first bundle (403 -> 1,612)", 4 * 403, ("T0-bump",), 9.0, 0, ["grown"]),
    ("3.99-fold: not yet", 4 * 403 - 1, ("T0-bump",), 9.0, 0, []),
    ("99,000 entries, grown bundle already taken: once", 99000, ("T0-bump", "T5-grown"), 9.0, 0, []),
    ("grown, but within the 5 s gap of the last capture: next turn", 99000, ("T0-bump",), 2.0, 0, []),
    ("grown in the turn the drops began: the drops' bundle first", 99000, ("T0-bump",), 9.0, 500, ["drops-began"]),
]


@pytest.mark.parametrize("what, count, bundles, ago, drop, expected", GROWN, ids=[g[0] for g in GROWN])
def test_a_table_grown_since_the_first_bundle_gets_one_of_its_own(what, count, bundles, ago, drop, expected) -> None:
    # The lab's CGNAT mix: the first bump came on predicted growth at 403 entries (the web clients'
    # TIME_WAIT); the unanswered UDP that filled the table later was in no bundle.
    policy = policy_mod.loads("[bump]\nceiling = 1048576\ncooldown = 60\n", "t.toml")
    h = history(bundles=bundles, last_capture=10.0 - ago, first_bundle_count=403)
    d = decide(policy, sample(10, 1 << 20, count, drop=drop), h, at(10))
    assert captures(d) == expected, (what, captures(d))
    assert GROWN_FACTOR == 4


def test_no_grown_moment_without_a_first_bundle_count() -> None:
    # A state file written before the count was kept (first_bundle_count 0): nothing to compare with.
    policy = policy_mod.loads("[bump]\nceiling = 1048576\ncooldown = 60\n", "t.toml")
    d = decide(policy, sample(10, 1 << 20, 99000), history(first_bundle_count=0), at(10))
    assert "grown" not in captures(d)


@pytest.mark.parametrize("per_incident", [1, 2, 3, 5, 6, 7])
def test_an_incident_of_many_bumps_takes_at_most_incident_captures_bundles(per_incident: int) -> None:
    # Issue 21 item 4: each bundle dumps the whole table once (bounded by [evidence] budget);
    # an incident of 30 bumps, each asking for a bundle, with every worse moment on the way,
    # takes at most [evidence] incident_captures bundles, its end included, never one a bump.
    r = FlightRecorder()
    taken = []
    moments = {3: "refused-ceiling", 6: "drops-began", 9: "relief", 12: "refused-guard", 15: "drops-began",
               18: "grown", 21: "grown"}
    for i in range(30):
        reason = moments.get(i, "bump")
        outs = [Outcome(SetMax(4096 << i, 8192 << i, "fill", NS, 0.9, "x"), True, read_back=8192 << i)]
        if r.capture_allowed(reason, per_incident):
            outs.append(Outcome(Capture(reason, NS), True, "capture queued"))
            taken.append(reason)
        r.turn(sample(1000 + i, 8192 << i, 3900), True, outs, [], incident="incident-1000")
    if r.capture_allowed("incident-end", per_incident):
        taken.append("incident-end")
    assert len(taken) <= per_incident, taken
    assert taken[0] == "bump", "the first bump's bundle is always taken"
    if per_incident >= 2:
        assert taken[-1] == "incident-end", taken
    if per_incident >= 5:
        assert {"refused-ceiling", "drops-began", "relief"} <= set(taken), "each worse moment once"
        assert taken.count("drops-began") == 1 and "refused-guard" not in taken, taken
    if per_incident >= 6:
        assert taken.count("grown") == 1, taken
