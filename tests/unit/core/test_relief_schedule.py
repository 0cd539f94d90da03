"""Relief's classes and its graduated schedule (ctguard.core.timeouts, ctguard.core.relief).

Each kernel rule of which timeout holds an entry is a row; the schedule's levels, values,
prediction and hysteresis are rows through decide() itself; and a 30-minute 15k SYN/s flood
held at the guard ceiling is driven through the pure functions (bench/bench_relief_flood.py):
at most one entry into relief, fewer flows lost than relief that returns on calm alone.
"""

from __future__ import annotations

import random
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from ctguard.config import policy as policy_mod
from ctguard.core import relief
from ctguard.core.decide import advance, decide
from ctguard.core.model import (
    History, Instant, KernelLimits, NamespaceReading, Outcome, RestoreTimeout, Sample, ShortenTimeout, TableShape,
)
from ctguard.core.timeouts import ASSURED, CLASSES, RELIEF_TIMEOUTS, SEEN_REPLY, classes, classify

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))
import bench_relief_flood  # noqa: E402

UDP, TCP, ICMP, ICMPV6, GRE, SCTP = 17, 6, 1, 58, 47, 132
NONE, SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE, SYN_SENT2 = range(10)


# --- which timeout holds an entry: one row per kernel rule ------------------------------------

@pytest.mark.parametrize("proto, state, status, key, rule", [
    (UDP, None, 0, "udp", "never answered: UDP_CT_UNREPLIED = udp_timeout"),
    (UDP, None, SEEN_REPLY, "udp", "answered once (DNS): SEEN_REPLY set after the handler refreshed with udp_timeout"),
    (UDP, None, SEEN_REPLY | ASSURED, "udp_stream", "a packet after 2 s: UDP_CT_REPLIED = udp_timeout_stream, ASSURED"),
    (136, None, SEEN_REPLY, "udp", "UDP-Lite shares UDP's timeouts"),
    (TCP, SYN_SENT, 0, "tcp_syn_sent", "timeouts[SYN_SENT]"),
    (TCP, SYN_RECV, SEEN_REPLY, "tcp_syn_recv", "timeouts[SYN_RECV]"),
    (TCP, ESTABLISHED, SEEN_REPLY | ASSURED, "tcp_established", "timeouts[ESTABLISHED]"),
    (TCP, ESTABLISHED, 0, "tcp_unacknowledged", "ESTABLISHED without SEEN_REPLY (loose pickup): TCP_CONNTRACK_UNACK"),
    (TCP, FIN_WAIT, SEEN_REPLY | ASSURED, "tcp_fin_wait", "timeouts[FIN_WAIT]"),
    (TCP, CLOSE_WAIT, SEEN_REPLY | ASSURED, "tcp_close_wait", "timeouts[CLOSE_WAIT]"),
    (TCP, LAST_ACK, SEEN_REPLY | ASSURED, "tcp_last_ack", "timeouts[LAST_ACK]"),
    (TCP, TIME_WAIT, SEEN_REPLY | ASSURED, "tcp_time_wait", "timeouts[TIME_WAIT]"),
    (TCP, CLOSE, SEEN_REPLY, "tcp_close", "timeouts[CLOSE]"),
    (TCP, SYN_SENT2, 0, None, "simultaneous open: no sysctl of its own"),
    (TCP, NONE, 0, None, "no state"),
    (ICMP, None, SEEN_REPLY, "icmp", "nf_conntrack_icmp_timeout"),
    (ICMPV6, None, 0, "icmpv6", "nf_conntrack_icmpv6_timeout"),
    (GRE, None, 0, "generic", "no tracker of its own here: generic_timeout"),
])
def test_the_timeout_the_kernel_applies(proto, state, status, key, rule):
    assert classify(proto, state, status) == key, rule


def test_classes_from_aggregates_agree_with_classify_entry_by_entry():
    rng = random.Random(7)
    names = {UDP: "udp", TCP: "tcp", ICMP: "icmp", ICMPV6: "icmpv6", SCTP: "sctp"}
    states = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT",
              "CLOSE", "SYN_SENT2")
    by_proto: dict[str, int] = {}
    by_state: dict[str, int] = {}
    udp_assured = loose = 0
    expect: dict[str, int] = {}
    for _ in range(5000):
        proto = rng.choice(list(names))
        state = rng.randrange(10) if proto == TCP else None
        status = rng.choice((0, SEEN_REPLY, SEEN_REPLY | ASSURED))
        if proto == UDP and status & ASSURED:
            udp_assured += 1
        if proto == TCP and state == ESTABLISHED and not status & SEEN_REPLY:
            loose += 1
        by_proto[names[proto]] = by_proto.get(names[proto], 0) + 1
        if proto == TCP:
            by_state[states[state]] = by_state.get(states[state], 0) + 1
        key = classify(proto, state, status)
        if key is not None:
            expect[key] = expect.get(key, 0) + 1
    assert classes(by_proto, by_state, udp_assured, loose) == expect
    assert set(expect) <= set(CLASSES)


def test_every_relief_key_is_a_class_a_dump_can_show():
    # [relief.timeouts] keys each name a state that fills a table and that a dump shows.
    assert set(RELIEF_TIMEOUTS) <= set(CLASSES)
    with pytest.raises(policy_mod.PolicyError) as exc:
        policy_mod.loads("[relief.timeouts]\ntcp_max_retrans = 30\n", "p.toml")
    assert "p.toml: [relief.timeouts] tcp_max_retrans: unknown timeout" in str(exc.value)


def test_a_dns_storm_is_held_by_udp_timeout_not_the_stream_timeout():
    # The issue's table: 900k UDP answered once, 18k never answered, a few streams.
    got = classes({"udp": 920_000, "tcp": 1000}, {"ESTABLISHED": 1000}, udp_assured=2000)
    assert got == {"udp": 918_000, "udp_stream": 2000, "tcp_established": 1000}


# --- the schedule's arithmetic ----------------------------------------------------------------

@pytest.mark.parametrize("fill, level", [
    (0.80, 0), (0.85, 1), (0.86, 1), (0.8875, 1), (0.89, 2), (0.925, 2), (0.93, 3), (0.96, 3), (0.97, 4), (1.0, 4),
])
def test_level_grows_with_how_far_the_fill_has_gone_towards_full(fill, level):
    assert relief.level_for(fill, 0.85, 4) == level


@pytest.mark.parametrize("original, emergency, level, value", [
    (60, 10, 0, 60), (60, 10, 1, 45), (60, 10, 2, 30), (60, 10, 3, 15), (60, 10, 4, 10),
    (30, 10, 1, 22), (30, 10, 3, 10),      # never below the emergency value
    (8, 10, 4, 8),                          # already below it: left alone
])
def test_value_is_the_original_scaled_within_the_floor(original, emergency, level, value):
    assert relief.value_at(original, emergency, level, 4) == value


def test_predicted_fill_scales_each_class_by_its_timeouts():
    # 150k half-open held 10 s: at 15 s they would be 225k; the 5k established do not move.
    states = (("tcp_syn_recv", 150), ("tcp_established", 5))
    p = relief.predicted_fill(155_000, 262_144, states, 155, {"tcp_syn_recv": 10}, {"tcp_syn_recv": 15})
    assert p == pytest.approx(230_000 / 262_144)
    assert relief.predicted_fill(155_000, 262_144, states, 155, {"tcp_syn_recv": 10}, {"tcp_syn_recv": 10}) \
        == pytest.approx(155_000 / 262_144)


# --- the schedule through decide(): entering, each step, hysteresis, leaving -------------------

NS, HOST = 4026532001, 4026531840
T0 = 1_800_000_000.0
MAX = 8192


def at(t: float) -> Instant:
    return Instant(T0 + t, 1000.0 + t, "b1")


def pol(extra: str = "") -> policy_mod.Policy:
    return policy_mod.loads(f"[bump]\nceiling = {MAX}\n[guard]\nceiling = {MAX}\n"
                            f"[relief]\nmode = \"enforce\"\ncalm_for = 40\n{extra}", "t.toml")


class Table:
    """A namespace whose half-open entries the test sets, with the timeouts ctguard writes."""

    def __init__(self) -> None:
        self.syn = 0
        self.drops = 0
        self.sysctl = {"tcp_syn_recv": 60, "udp": 30}

    def sample(self, t: float) -> Sample:
        n = self.syn + 100
        return Sample(at(t), KernelLimits(MAX, MAX // 4, 320, 16 << 30, 8 << 30),
                      (NamespaceReading(HOST, "host", 10, (("drop", 0),)),
                       NamespaceReading(NS, "tenant", n, (("drop", self.drops),))),
                      shape=TableShape(NS, n, self.syn, 5000, states=(("tcp_syn_recv", self.syn), ("udp", 100))),
                      timeouts=((NS, tuple(sorted(self.sysctl.items()))),))


def turn(p, table: Table, h: History, t: float) -> tuple[History, list]:
    s = table.sample(t)
    d = decide(p, s, h, at(t))
    outs = []
    for a in d.actions:
        if isinstance(a, ShortenTimeout) and not a.advise:
            table.sysctl[a.key] = a.new
            outs.append(Outcome(a, True, "", read_back=a.new))
        elif isinstance(a, RestoreTimeout) and not a.advise:
            table.sysctl[a.key] = a.original
            outs.append(Outcome(a, True, "", read_back=a.original))
        else:
            outs.append(Outcome(a, not getattr(a, "advise", False), ""))
    return advance(h, s, [], outs, at(t), p), list(d.actions)


def steps_of(actions) -> list[tuple[str, int, int]]:
    return [(a.step, a.level, a.new) for a in actions if isinstance(a, ShortenTimeout)] + \
        [("leave", 0, a.original) for a in actions if isinstance(a, RestoreTimeout)]


def test_steps_down_as_the_fill_climbs_and_never_flaps_between_the_watermarks():
    p, table, h = pol(), Table(), History(drops=((HOST, 0), (NS, 0)))
    seen = []
    # 86% -> enter at level 1; 90% -> level 2; back to 80% (between the watermarks): nothing;
    # 95% -> level 3; 75% (still above low): nothing. Looks 30 s apart: the table barely grows
    # between them, so the fill decides (a fast growth takes the level the arrivals need:
    # test_relief_rate.py).
    for t, syn in ((1, 6950), (31, 7300), (61, 6450), (91, 7700), (121, 6050), (151, 6050)):
        table.syn = syn
        h, acts = turn(p, table, h, t)
        seen.append(steps_of(acts))
    assert seen == [[("enter", 1, 45)], [("down", 2, 30)], [], [("down", 3, 15)], [], []]
    assert dict(h.relief.levels) == {NS: 3}
    entry = [a for a in turn(p, table, h, 181)[1] if isinstance(a, ShortenTimeout)]
    assert entry == []


def test_a_drop_takes_the_last_level_at_once():
    p, table, h = pol(), Table(), History(drops=((HOST, 0), (NS, 0)))
    table.syn, table.drops = 6950, 50
    h, acts = turn(p, table, h, 1)
    assert steps_of(acts) == [("enter", 4, 10)]


def test_steps_back_up_one_level_per_calm_step_only_when_the_prediction_allows():
    p, table, h = pol(), Table(), History(drops=((HOST, 0), (NS, 0)))
    table.syn, table.drops = 8000, 10
    h, acts = turn(p, table, h, 0)
    assert steps_of(acts) == [("enter", 4, 10)]
    # The flood goes on: 5,000 held 10 s (62%, below low 70%) would be 7,500 at 15 s: held.
    table.syn = 5000
    for t in range(1, 60):
        h, acts = turn(p, table, h, t)
        assert steps_of(acts) == [], t
    # The flood stops: 600 left. One level per calm_for / steps = 10 s, then the original.
    table.syn = 600
    got = []
    for t in range(60, 120):
        h, acts = turn(p, table, h, t)
        got += [(t, *x) for x in steps_of(acts)]
    assert [x[1:] for x in got] == [("up", 3, 15), ("up", 2, 30), ("up", 1, 45), ("leave", 0, 60)]
    times = [x[0] for x in got]
    assert all(b - a >= 10 for a, b in zip(times, times[1:]))
    assert h.relief.active == () and h.relief.levels == ()
    # Entering again within the hour backs the calm off: twice as long per step.
    table.syn, table.drops = 8000, 20
    h, first = turn(p, table, h, 130)          # a jump over a stale interval: decide samples again first
    h, acts = turn(p, table, h, 131)
    assert steps_of(first + acts) == [("enter", 4, 10)] and dict(h.relief.reentries) == {NS: 1}
    assert relief.step_wait(p, 1) == 20


def test_restore_on_calm_alone_when_asked():
    p, table, h = pol('restore = "calm"\nsteps = 1\n'), Table(), History(drops=((HOST, 0), (NS, 0)))
    table.syn, table.drops = 8000, 10
    h, _ = turn(p, table, h, 0)
    table.syn = 5000
    left = []
    for t in range(1, 60):
        h, acts = turn(p, table, h, t)
        left += [t for a in acts if isinstance(a, RestoreTimeout)]
    assert left == [41]         # calm_for 40 s after the first calm sample at 1


def test_advise_journals_the_same_steps_and_changes_nothing():
    p = policy_mod.loads(f"[bump]\nceiling = {MAX}\n[guard]\nceiling = {MAX}\n[relief]\nmode = \"advise\"\n"
                         "calm_for = 40\n", "t.toml")
    table, h = Table(), History(drops=((HOST, 0), (NS, 0)))
    table.syn = 6950
    h, acts = turn(p, table, h, 1)
    assert [(a.step, a.level, a.new, a.advise) for a in acts if isinstance(a, ShortenTimeout)] == [
        ("enter", 1, 45, True)]
    assert table.sysctl["tcp_syn_recv"] == 60
    table.syn = 100
    got = []
    for t in range(2, 80):
        h, acts = turn(p, table, h, t)
        got += [(type(a).__name__, getattr(a, "step", "leave")) for a in acts
                if isinstance(a, (ShortenTimeout, RestoreTimeout))]
    assert got == [("RestoreTimeout", "leave")] and h.relief.advised == ()


def test_the_policy_keys_are_checked_naming_file_and_key():
    for text, problem in (
        ("[relief]\nhigh = 1.5\n", "p.toml: [relief] high: must be a fill ratio between 0"),
        ("[relief]\nsteps = 0\n", "p.toml: [relief] steps: must be an integer between 1 and 20"),
        ('[relief]\nrestore = "never"\n', 'p.toml: [relief] restore: must be one of "predicted", "calm"'),
        ("[relief]\nlow = 0.9\n", "p.toml: [relief] low: the low watermark 0.9 must be below the high watermark 0.85"),
    ):
        with pytest.raises(policy_mod.PolicyError) as exc:
            policy_mod.loads(text, "p.toml")
        assert any(problem in x for x in exc.value.problems), exc.value.problems
    p = policy_mod.loads("[thresholds]\nact = 0.9\nwarn = 0.6\n", "p.toml")
    assert (p.relief.high_mark(p.thresholds), p.relief.low_mark(p.thresholds)) == (0.9, 0.6)


# --- the flood that goes on --------------------------------------------------------------------

def test_a_15k_syn_flood_held_at_the_guard_ceiling_for_30_minutes_enters_relief_once():
    graduated = bench_relief_flood.simulate(15000, 1800)
    on_calm = bench_relief_flood.simulate(15000, 1800, policy_text=bench_relief_flood.POLICY
                                          + 'restore = "calm"\nsteps = 1\n')
    assert graduated["entries"] == 1 and graduated["restores"] == 0
    assert graduated["timeout_at_end"] == 10
    assert on_calm["entries"] >= 3             # returns on calm while the flood goes on: off and on
    assert graduated["lost"] < on_calm["lost"]


def test_relief_leaves_in_steps_once_the_flood_stops():
    r = bench_relief_flood.simulate(15000, 1800, stop_at=600)
    assert r["entries"] == 1 and r["restores"] == 1
    values = [v for _, v in r["all_changes"]]
    assert values == [10, 15, 30, 45, 60]


def test_the_issue_dns_table_lowers_udp_timeout_and_recommend_advises_only_it():
    # 900k answered once + 18k never answered (the issue's table, scaled to the sample): relief
    # shortens nf_conntrack_udp_timeout and leaves the stream timeout alone; recommend follows.
    from ctguard.host.hostrole import DEFAULT_TIMEOUTS

    states = tuple(sorted(classes({"udp": 9180}, {}, udp_assured=0).items()))
    table = Table()
    p = pol()
    s = replace(table.sample(1), shape=TableShape(NS, 9180, 180, 5000, states=states),
                timeouts=((NS, (("udp", 30), ("udp_stream", 120))),),
                namespaces=(NamespaceReading(HOST, "host", 10, (("drop", 0),)),
                            NamespaceReading(NS, "tenant", 8150, (("drop", 40),))))
    d = decide(p, s, History(drops=((HOST, 0), (NS, 0))), at(1))
    assert [(a.key, a.old, a.new) for a in d.actions if isinstance(a, ShortenTimeout)] == [("udp", 30, 5)]
    seen = {"udp": {"times": 1, "original": 30, "value": 10, "held": 1.0}}
    advice = relief.timeout_advice(seen, dict(DEFAULT_TIMEOUTS))
    assert [a["sysctl"] for a in advice] == ["nf_conntrack_udp_timeout"]


def test_an_empty_table_is_a_prediction_not_a_failed_look():
    p, table, h = pol(), Table(), History(drops=((HOST, 0), (NS, 0)))
    table.syn, table.drops = 8000, 10
    h, _ = turn(p, table, h, 0)
    got = []
    for t in range(1, 80):
        s = table.sample(t)
        s = replace(s, namespaces=(s.namespaces[0], replace(s.namespaces[1], count=0)),
                    shape=TableShape(NS, 0, 0, 0, states=()))
        d = decide(p, s, h, at(t))
        outs = [Outcome(a, True, "", read_back=getattr(a, "new", None)) for a in d.actions]
        h = advance(h, s, [], outs, at(t), p)
        got += [getattr(a, "step", "leave") for a in d.actions if isinstance(a, (ShortenTimeout, RestoreTimeout))]
    assert got == ["up", "up", "up", "leave"]
