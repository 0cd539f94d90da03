"""The daemon's state: history round trips, a damaged file set aside, peaks per minute."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from ctguard.core.model import BumpRecord, History, Instant, KernelLimits, NamespaceReading, Sample
from ctguard.store.state import Peak, PeakRecorder, StateStore
from helpers.builders import now


def test_history_round_trips(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s")
    h = History(bumps=(BumpRecord(now(), 8192, 16384, "fill"), BumpRecord(now(5), 16384, 32768, "manual", False)),
                last_drop=now(3), persisted_max=16384, persisted_buckets=4096, table_full_events=7, bumps_total=3)
    store.save_history(h)
    assert stat.S_IMODE((tmp_path / "s/state.json").stat().st_mode) == 0o600
    back = store.load_history()
    assert back.bumps == h.bumps and back.last_drop == h.last_drop and back.persisted_max == 16384
    assert back.table_full_events == 7 and back.bumps_total == 3


@pytest.mark.parametrize("content", ['{"format": 1, "bumps": [{"at": null}]}', "{not json", "", '[1,2]',
                                     '{"format": 1, "persisted_max": -5}', '{"format": 99}'])
def test_corrupt_state_is_set_aside(tmp_path: Path, content: str) -> None:
    (tmp_path / "state.json").write_text(content)
    warnings: list[str] = []
    h = StateStore(tmp_path, warn=warnings.append).load_history()
    assert h == History()
    assert warnings and "set aside" in warnings[0]
    assert any(p.name.startswith("state.json.corrupt-") for p in tmp_path.iterdir())


def test_peaks_per_minute(tmp_path: Path) -> None:
    rec = PeakRecorder([])

    def s(t: float, count: int, drops: int = 0) -> Sample:
        return Sample(Instant(t, t, "b"), KernelLimits(8192, 2048, 320, 1 << 30, 1 << 29),
                      (NamespaceReading(1, "host", count, (("drop", drops),)),))

    assert not rec.observe(s(60, 10))
    assert not rec.observe(s(90, 50, drops=2))
    assert not rec.observe(s(100, 20, drops=5))
    assert rec.observe(s(125, 5, drops=5))
    assert rec.peaks == [Peak(60, 50, 8192, 5)]
    store = StateStore(tmp_path)
    store.save_peaks(rec.current())
    assert store.load_peaks() == [Peak(60, 50, 8192, 5), Peak(120, 5, 8192, 0)]


@pytest.mark.parametrize("name, saved, packet_drop", [
    ("both kept", History(last_drop=now(3), last_packet_drop=now(1)), now(1)),
    ("an eviction only", History(last_drop=now(3)), None),
])
def test_the_last_packet_drop_round_trips(name, saved, packet_drop) -> None:
    from ctguard.store.state import history_from_json, history_to_json
    assert history_from_json(history_to_json(saved)).last_packet_drop == packet_drop, name


def test_a_state_file_before_drops_and_evictions_were_told_apart_keeps_its_last_drop() -> None:
    from ctguard.store.state import history_from_json, history_to_json
    d = history_to_json(History(last_drop=now(3)))
    del d["last_packet_drop"]
    assert history_from_json(d).last_packet_drop == now(3)
