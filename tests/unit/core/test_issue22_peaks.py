"""Issue 22: peaks are peaks — the largest count seen, the same in the incident, the verdict,
the bundle and `status`. One row per case, naming its input."""

from __future__ import annotations

import pytest

from ctguard.config import policy as policy_mod
from ctguard.core import incident as incident_text
from ctguard.core.decide import advance
from ctguard.core.diagnose import BundleData, verdict
from ctguard.core.model import History, Instant, KernelLimits, NamespaceReading, Outcome, Sample, SetMax


def at(t: float) -> Instant:
    return Instant(1_800_000_000 + t, 1000 + t, "b")


def smp(t: float, max_: int, count: int) -> Sample:
    return Sample(at(t), KernelLimits(max_, max_, 256, 16 << 30, 8 << 30, "6.1.0"),
                  (NamespaceReading(1, "host", count, (("drop", 0),)),))


@pytest.mark.parametrize("name, turns, peak_count, peak_fill", [
    ("77% of 4,096 (3,159), then 20,000 under the raised max of 24,576: the peak is 20,000",
     [(0, 4096, 3159, None), (0.1, 4096, 3600, 24576), (0.2, 24576, 20000, None), (0.3, 24576, 12000, None)],
     20000, 3600 / 4096),
    ("the fullest fill and the largest count in different turns",
     [(0, 8192, 7000, 65536), (0.1, 65536, 30000, None)], 30000, 7000 / 8192),
])
def test_the_incident_peak_is_the_largest_count(name, turns, peak_count, peak_fill):
    p = policy_mod.loads("", "t.toml")
    h = History()
    for t, mx, count, bump_to in turns:
        outs = [Outcome(SetMax(mx, bump_to, "fill", 1, count / mx, "bump"), True, read_back=bump_to)] if bump_to else []
        h = advance(h, smp(t, mx, count), (), outs, at(t), p)
    inc = h.incident
    assert inc.peak_count == peak_count, name
    assert inc.peak_fill == pytest.approx(peak_fill), name
    assert incident_text.summary(inc)["peak_count"] == peak_count


def _bundle(dump: int, series_peak: int) -> BundleData:
    n = 4
    entries = [100, series_peak // 2, series_peak, series_peak]
    timeline = {"namespaces": [{"inode": 7, "name": "app", "unit": "", "container": "", "t": [1000.0 + i for i in range(n)],
                                "entries": entries, "max": [4096] * n, "drop": [0] * n, "early_drop": [0] * n,
                                "insert_failed": [0] * n, "invalid": [0] * n}],
                "events": [{"t": 1002.0, "kind": "bump", "old": 4096, "new": 8192, "netns": 7}]}
    evidence = {
        "table": {"entries": dump, "unreplied": 0, "assured": 0, "by_proto": {"udp": dump}, "by_tcp_state": {},
                  "top_sources": {"exact": True, "capacity": 4096, "tracked": 0, "rows": []},
                  "top_destinations": {"exact": True, "capacity": 4096, "tracked": 0, "rows": []},
                  "top_dports": {"exact": True, "capacity": 4096, "tracked": 0, "rows": []}},
        "sysctl": {"sysctl": {"nf_conntrack_count": str(dump), "nf_conntrack_max": "8192"}, "hashsize": 8192},
        "cpu_stats": {"totals": {}}, "host": {"role": "server", "roles": ["server"], "raised_timeouts": []},
        "rules": {"nat_verdict": "no NAT"}, "memory": {"bytes": {"MemTotal": 8 << 30}}, "slab": {"slab": {"objsize": 256}},
    }
    manifest = {"id": "x", "reason": "bump", "netns": {"path": "/run/netns/app", "inode": 7}}
    return BundleData(manifest, evidence, timeline, {})


@pytest.mark.parametrize("name, dump, series_peak, said", [
    ("a dump of 3,738 after a window that saw 538: the verdict says 3,738", 3738, 538, "3,738 entries at its peak"),
    ("a window that saw more than the dump: the window's peak", 1000, 3900, "3,900 entries at its peak"),
])
def test_the_verdict_peak_counts_the_dump(name, dump, series_peak, said):
    assert said in verdict(_bundle(dump, series_peak)), name


def test_the_incident_keeps_the_max_in_force_at_its_peak_and_the_verdict_and_status_say_it():
    # Issue 24: 3,600 of 4,096 (88%) is the fullest fill, 20,000 under the raised 24,576 the
    # largest count; the max at that peak is 24,576, not 20,000 / 88% (22,756).
    from ctguard.store.state import history_from_json, history_to_json

    p = policy_mod.loads("", "t.toml")
    h = History()
    for t, mx, count, bump_to in [(0, 4096, 3159, None), (0.1, 4096, 3600, 24576), (0.2, 24576, 20000, None),
                                  (0.3, 24576, 20000, None), (0.4, 24576, 12000, None)]:
        outs = [Outcome(SetMax(mx, bump_to, "fill", 1, count / mx, "bump"), True, read_back=bump_to)] if bump_to else []
        h = advance(h, smp(t, mx, count), (), outs, at(t), p)
    assert (h.incident.peak_count, h.incident.peak_max) == (20000, 24576)
    assert history_from_json(history_to_json(h)).incident.peak_max == 24576, "kept in the state file"
    summary = incident_text.summary(h.incident)
    assert summary["peak_max"] == 24576
    said = "peak 20000 entries (81.4% of max 24576 then)"
    assert said in incident_text.peak_text(summary["peak_fill"], summary["peak_count"], summary["peak_max"])
    # A bundle whose own window missed the peak states the incident's, against that max.
    data = _bundle(1000, 3900)
    data = BundleData({**data.manifest, "incident": summary}, data.evidence, data.timeline, {})
    assert "20,000 entries at its peak, 81% of the max of 24,576 in force then" in verdict(data)


def test_an_end_bundle_whose_entries_expired_is_not_called_healthy():
    # Seen in the kernel test: the incident's end bundle, its dump empty (the UDP entries had
    # expired), was "Healthy ... with no action by ctguard" beside a bump in its own timeline.
    data = _bundle(0, 6000)
    ev = {**data.evidence, "table": {**data.evidence["table"], "by_proto": {}},
          "sysctl": {"sysctl": {"nf_conntrack_count": "0", "nf_conntrack_max": "8192"}, "hashsize": 8192}}
    data = BundleData({**data.manifest, "incident": {"id": "incident-1000", "started": 1000.0, "ended": 1040.0}},
                      ev, data.timeline, {})
    said = verdict(data)
    assert not said.startswith("Healthy") and "no action by ctguard" not in said, said
    assert "6,000 entries at its peak" in said and "(1 bump)" in said, said
    assert "No finding names a cause" in said and "earlier bundles of incident-1000" in said, said
