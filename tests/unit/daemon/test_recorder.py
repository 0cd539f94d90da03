"""The flight recorder (bounded window, cadence, fills against the max of the moment, events)
and the pure incident tracker, table-tested."""

from __future__ import annotations

import json

from ctguard.core.diagnose import BundleData, diagnose, verdict
from ctguard.core.model import (
    Capture, Instant, KernelLimits, NamespaceReading, Outcome, Refuse, Sample, SetMax, ShortenTimeout, TableFull,
)
from ctguard.daemon.recorder import MAX_POINTS, FlightRecorder, metrics_text


def sample(t: float, counts: dict[int, int], kmax: int = 4096, drop: int = 0, invalid: int = 0) -> Sample:
    spaces = tuple(NamespaceReading(inode, f"ns{inode}", c, (("drop", drop), ("invalid", invalid)))
                   for inode, c in counts.items())
    return Sample(Instant(t, t), KernelLimits(kmax, kmax // 4, 320, 8 << 30, 4 << 30), spaces)


def test_calm_keeps_one_point_a_second_and_pressure_every_change() -> None:
    r = FlightRecorder()
    for i in range(100):                      # 10 s at 10 samples a second, calm
        r.record(sample(1000 + i / 10, {1: 100 + i}), pressure=False)
    assert 10 <= len(r.series[1].t) <= 11
    for i in range(100):                      # 10 s under pressure, changing every sample
        r.record(sample(1010 + i / 10, {1: 3000 + 10 * i, 2: 50 + i % 3}), pressure=True)
    assert len(r.series[1].t) >= 10 + 100
    assert len(r.series[2].t) <= 11, "a calm neighbour's jitter stays at one point a second"
    n = len(r.series[1].t)
    for i in range(50):                       # pressure but nothing changes: calm cadence
        r.record(sample(1020 + i / 10, {1: 3990}), pressure=True)
    assert len(r.series[1].t) <= n + 6


def test_window_is_bounded_to_fifteen_minutes() -> None:
    r = FlightRecorder()
    for i in range(1500):                     # 25 minutes at 1 s
        r.record(sample(1000 + i, {1: i, 2: 5}), pressure=False)
    w = r.window()
    assert w["to"] == 1000 + 1499
    assert w["from"] >= w["to"] - 900
    for ns in w["namespaces"]:
        assert len(ns["t"]) <= 901 and ns["t"][0] >= w["from"]
    assert len(r.series[1].t) <= 900 + 256 + 1
    # Flooded at 100 samples a second: the hard cap per namespace holds.
    for i in range(20000):
        r.record(sample(3000 + i / 100, {1: 10 * i}), pressure=True)
    assert len(r.series[1].t) <= MAX_POINTS + 2 * 256


def test_each_point_keeps_the_max_in_force() -> None:
    r = FlightRecorder()
    r.record(sample(1000, {1: 3900}, kmax=4096), pressure=True)
    r.record(sample(1001, {1: 3950}, kmax=65536), pressure=True)
    ns = r.window()["namespaces"][0]
    assert ns["max"] == [4096, 65536] and ns["entries"] == [3900, 3950]
    assert r.window()["limits"]["max"] == [4096, 65536]


def test_vanished_namespaces_leave_after_the_window() -> None:
    r = FlightRecorder()
    r.record(sample(1000, {1: 5, 2: 5}), pressure=False)
    r.record(sample(1500, {1: 5}), pressure=False)
    assert 2 in r.series
    r.record(sample(2000, {1: 5}), pressure=False)
    assert 2 not in r.series


def test_turn_notes_actions_and_kernel_lines() -> None:
    r = FlightRecorder()
    s = sample(1000, {7: 3900})
    outcomes = [
        Outcome(SetMax(4096, 8192, "fill", 7, 0.95, "fill"), True, read_back=8192),
        Outcome(Refuse(16384, 8192, "cooldown", "fill", 7, 0.9, "cooldown"), True),
        Outcome(Refuse(16384, 8192, "ceiling", "fill", 7, 0.9, "at the ceiling"), True),
        Outcome(Capture("bump", 7), True, "capture started (pid 1)"),
        Outcome(ShortenTimeout(7, "ns7", "udp", 300, 30, "udp timeout 300 -> 30"), True),
    ]
    captured = r.turn(s, True, outcomes, [TableFull(s.at, 7, 3), TableFull(s.at, 7, 0, backlog=True)],
                      incident="incident-1000")
    assert captured == 1 and r.incident == "incident-1000" and r.incident_captures == 1
    kinds = [e["kind"] for e in r.events]
    assert kinds == ["bump", "refusal", "capture", "relief", "kernel", "incident-start"]
    assert r.events[0]["old"] == 4096 and r.events[0]["new"] == 8192
    assert r.events[1]["reason"] == "ceiling"
    assert "+3 suppressed" in r.events[4]["text"]
    assert r.events[3]["text"] == "udp timeout 300 -> 30"
    r.turn(sample(1001, {7: 100}), False, [], [], incident=None)
    assert r.events[-1]["kind"] == "incident-end" and r.incident is None
    json.dumps(r.window())                            # JSON-able as it is


def test_one_capture_per_incident_beyond_the_first() -> None:
    r = FlightRecorder()
    assert r.capture_allowed("bump", 2)              # no incident yet: the first is always taken
    s = sample(1000, {7: 3900})
    r.turn(s, True, [Outcome(SetMax(4096, 8192, "fill", 7, 0.95, "x"), True, read_back=8192),
                     Outcome(Capture("bump", 7), True, "capture queued")], [], incident="incident-1000")
    assert not r.capture_allowed("refused-ceiling", 2)
    assert not r.capture_allowed("pressure", 2)
    assert r.capture_allowed("incident-end", 2)
    # issue 24: a moment the incident got worse gets a slot of its own (once), another bump or
    # pressure only the slots left beyond those
    assert r.capture_allowed("drops-began", 3) and not r.capture_allowed("drops-began", 3)
    assert not r.capture_allowed("pressure", 3)
    assert r.capture_allowed("pressure", 7)          # the policy may allow more
    r.turn(sample(1100, {7: 100}), False, [], [], incident="incident-1100")
    assert r.capture_allowed("pressure", 2), "a new incident gets its first bundle"


def test_the_recorded_window_is_what_diagnosis_reads() -> None:
    r = FlightRecorder()
    for i in range(60):
        r.turn(sample(1000 + i, {7: 100}), False, [], [])
    outcomes = [Outcome(SetMax(4096, 8192, "fill", 7, 0.95, "x"), True, read_back=8192)]
    r.turn(sample(1060, {7: 3900}, drop=0), True, outcomes, [], incident="incident-1060")
    r.turn(sample(1060.5, {7: 8000}, kmax=8192, drop=250), True, [], [], incident="incident-1060")
    data = BundleData({"netns": {"inode": 7}}, {"table": {"entries": 8000, "by_proto": {"udp": 8000}}},
                      r.window(ceiling=65536, upper=65536, upper_by="ceiling"), {})
    ids = [f.id for f in diagnose(data)]
    assert "kernel-drops" in ids
    text = verdict(data)
    assert "4,096 -> 8,192" in text and "8,000 entries at its peak, 98% of the max of 8,192" in text


def test_metrics_text() -> None:
    text = metrics_text(1234.5, ["kernel-drops", "udp-timeout-raised"])
    assert "ctguard_last_incident_timestamp_seconds 1234.500\n" in text
    assert 'ctguard_findings{id="kernel-drops"} 1\n' in text
    assert "# TYPE ctguard_findings gauge" in text
    assert "ctguard_last_incident_timestamp_seconds 0.000" in metrics_text(None, [])
