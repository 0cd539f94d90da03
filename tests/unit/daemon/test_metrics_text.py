"""The metrics text: series, labels (escaped), units and containers."""

from __future__ import annotations

from ctguard.core.model import BumpRecord, History, KernelLimits, NamespaceReading, Sample
from ctguard.daemon import metrics
from helpers.builders import now, status_sample


def test_metrics_render() -> None:
    h = History(bumps=(BumpRecord(now(), 4096, 8192, "fill"),), bumps_total=4, table_full_events=9)
    text = metrics.render(status_sample(8192, 100, 4096), h, 65536)
    assert 'ctguard_conntrack_entries{netns="4026531001",name="n\\"1"} 4096' in text
    assert 'ctguard_conntrack_fill_ratio{netns="4026531001",name="n\\"1"} 0.500000' in text
    assert 'ctguard_conntrack_drops_total{netns="4026531001",name="n\\"1"} 1' in text
    for line in ("ctguard_conntrack_max 8192", "ctguard_conntrack_buckets 2048", "ctguard_ceiling 65536",
                 "ctguard_bumps_total 4", "ctguard_table_full_events_total 9",
                 f"ctguard_last_bump_timestamp_seconds {now().wall:.3f}"):
        assert line + "\n" in text
    assert "# TYPE ctguard_bumps_total counter" in text


def test_metrics_label_units_and_containers() -> None:
    ns = NamespaceReading(7, "pid:42 (nginx)", 10, (("drop", 0),), "docker-3f2a.scope", "docker:3f2a1b2c3d4e")
    s = Sample(now(), KernelLimits(1024, 256, 256, 1 << 30, 1 << 29), (ns,))
    text = metrics.render(s, History(), 65536)
    assert ('ctguard_conntrack_entries{netns="7",name="pid:42 (nginx)",unit="docker-3f2a.scope",'
            'container="docker:3f2a1b2c3d4e"} 10') in text
