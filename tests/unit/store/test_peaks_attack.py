"""Issue 22: per-minute peaks of an attack-shaped incident are marked (and stay marked on disk),
so sizing leaves them out."""

from __future__ import annotations

from pathlib import Path

from ctguard.core.model import Instant, KernelLimits, NamespaceReading, Sample
from ctguard.core.sizing import peaks_used
from ctguard.store.state import Peak, PeakRecorder, StateStore

T0 = 1_800_000_000 - (1_800_000_000 % 60)


def smp(t: float, count: int) -> Sample:
    return Sample(Instant(T0 + t, t, "b"), KernelLimits(262144, 262144, 256, 1 << 34, 1 << 33),
                  (NamespaceReading(1, "host", count, (("drop", 0),)),))


def test_an_attack_marks_its_minutes_including_those_before_the_judgement(tmp_path: Path):
    rec = PeakRecorder([])
    rec.observe(smp(0, 1000))                       # minute 0: calm
    rec.observe(smp(60, 5000))                      # minute 1: the flood starts (not judged yet)
    rec.observe(smp(120, 200000))                   # minute 2: still not judged
    assert rec.observe(smp(130, 250000), attack_since=T0 + 70)   # judged: minutes 1 and 2 marked
    rec.observe(smp(180, 1200))                     # minute 3: calm again
    rec.observe(smp(240, 1100))
    marks = [(p.minute - T0, p.count, p.attack) for p in rec.peaks]
    assert marks == [(0, 1000, False), (60, 5000, True), (120, 250000, True), (180, 1200, False)]
    used = peaks_used((p.count, p.attack) for p in rec.current())
    assert (used.attack_minutes, used.high) == (2, 1200)
    store = StateStore(tmp_path)
    store.save_peaks(rec.peaks)
    assert [p.attack for p in store.load_peaks()] == [False, True, True, False]


def test_old_rows_without_the_mark_read_as_legitimate(tmp_path: Path):
    (tmp_path / "peaks.json").write_text('{"format": 1, "minutes": [[60, 10, 100, 0]]}')
    assert StateStore(tmp_path).load_peaks() == [Peak(60, 10, 100, 0, False)]
