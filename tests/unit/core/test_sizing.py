"""Issue 11, the pure parts: sizing arithmetic, the kernel's defaults, what `status` and
`recommend` say about sizing, persistence and incidents. Tables, no fakes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctguard.cli import recommend
from ctguard.cli import status as status_cli
from ctguard.config import policy as policy_mod
from ctguard.control import status as status_mod
from ctguard.core import incident as incident_text
from ctguard.core.model import BumpRecord, History, Incident, KernelLimits, NamespaceReading, Sample
from ctguard.core.sizing import advice, bump_size, kernel_default_buckets, kernel_default_max, round_up
from helpers.builders import now

GiB = 1 << 30


@pytest.mark.parametrize("mem, buckets", [
    (64 << 20, 1024),           # 64 MiB: 512 by the formula, the kernel's floor is 1,024
    (1 * GiB, 8192),            # RAM / 16384 / 8
    (4 * GiB, 65536),           # issue 22: above 1 GiB the kernel (>= 5.15) gives 65,536, not RAM/16384/8
    (4 * GiB + 4096, 262144),   # above 4 GiB on 64-bit: 262,144 outright
    (24 * GiB, 262144),
])
def test_kernel_defaults(mem, buckets):
    assert kernel_default_buckets(mem) == buckets == kernel_default_max(mem)


@pytest.mark.parametrize("old, held, lost, rate, want, binding", [
    (4096, 4096, 0, 0.0, 8192, "x2"),                  # nothing more arrived: x factor
    (4096, 4096, 15904, 0.0, 23552, "need"),           # a burst that stopped: what arrived, below act
    (4096, 3000, 0, 5000.0, 10240, "need"),            # (3000 + 5000 x 1 s) / 0.85 = 9412
    (4096, 3000, 0, -100.0, 8192, "x2"),               # shrinking is no growth
])
def test_bump_size(old, held, lost, rate, want, binding):
    s = bump_size(old, held, lost, rate, 0.85, 2.0, 1.0)
    assert s.want == want and f"({binding})" in s.text()
    assert s.need == held + lost + max(0, int(rate))


@pytest.mark.parametrize("peak, drops, default, persisted, upper, manage, live_b, want_max, want_b, why", [
    (7000, False, 8192, None, 1 << 20, True, 2048, 14336, 8192, "buckets at the kernel's default"),
    (7000, True, 8192, None, 1 << 20, True, 2048, 21504, 8192, ""),
    (1000, False, 262144, None, 1 << 20, True, 262144, 262144, 262144, "boot default"),
    (1000, False, 8192, 40960, 1 << 20, True, 2048, 20480, 8192, "persisted"),  # issue 22: down by half at most
    (500000, False, 8192, None, 65536, True, 2048, 65536, 16384, "upper bound"),
    (7000, False, 8192, None, 1 << 20, True, 65536, 14336, 65536, "live"),
    (7000, False, 8192, None, 1 << 20, False, 65536, 14336, None, ""),
])
def test_advice(peak, drops, default, persisted, upper, manage, live_b, want_max, want_b, why):
    a = advice(peak, drops, default, persisted, upper, manage, 4, live_b, default)
    assert (a.max, a.buckets) == (want_max, want_b)
    assert why in " ".join(a.why)
    assert a.max <= upper and (a.buckets is None or a.buckets >= live_b)


def sample_of(max_: int, count: int, mem: int = 16 * GiB) -> Sample:
    return Sample(now(10), KernelLimits(max_, max_ // 4, 256, mem, mem // 2),
                  (NamespaceReading(4026532000, "web", count, (), unit="nginx.service"),))


def test_status_warns_after_an_emergency_bump_naming_it_and_shows_what_persists(tmp_path: Path):
    p = policy_mod.loads(f"[persist]\nmode = 'stable'\nstable_for = 600\nsysctl_file = '{tmp_path}/s.conf'\n"
                         f"modprobe_file = '{tmp_path}/m.conf'\n", "t.toml")
    (tmp_path / "s.conf").write_text("net.netfilter.nf_conntrack_max = 262144\nnet.netfilter.nf_conntrack_buckets = 65536\n")
    (tmp_path / "m.conf").write_text("options nf_conntrack hashsize=65536\n")
    h = History(bumps=(BumpRecord(now(0), 4096, 24576, "table-full"),), unpersisted_max=24576, sizing_peak=20000)
    view = status_mod.build(p, sample_of(24576, 100), h, now(600))
    assert view.code == status_mod.WARNING
    assert "emergency bump 4096 -> 24576 (table-full) 10 min ago" in view.headline
    d = view.data
    assert d["persisted_max"] == 262144 and d["persisted_buckets"] == 65536
    assert d["pending_persist"]["in_seconds"] == 0 or d["pending_persist"]["in_seconds"] == 0.0
    text = status_cli.render_text(view)
    assert "persisted: max 262144, buckets 65536" in text and "pending persist: max 262144" in text
    # An hour later: OK again.
    later = status_mod.build(p, sample_of(24576, 100), h, now(3700))
    assert later.code == status_mod.OK, later.headline
    # A manual bump is not an emergency.
    manual = History(bumps=(BumpRecord(now(0), 4096, 24576, "manual"),))
    assert status_mod.build(p, sample_of(24576, 100), manual, now(60)).code == status_mod.OK


def test_status_names_an_open_incident_and_the_last_one():
    p = policy_mod.loads("", "t.toml")
    inc = Incident(started=now(0), netns=4026532000, name="web", unit="nginx.service", max_at_start=4096,
                   peak_fill=1.0, peak_count=4096, drops=11921, early_drops=3302, bumps=1, max_now=24576,
                   bundles=("b1",), last_active=now(5))
    view = status_mod.build(p, sample_of(262144, 100), History(incident=inc), now(10))
    assert view.code == status_mod.WARNING and "incident incident-1800000000 in netns web" in view.headline
    assert "unit nginx.service" in view.headline
    ended = History(last_incident=Incident(**{**inc.__dict__, "ended": now(70)}))
    data = json.loads(status_cli.render_json(status_mod.build(p, sample_of(262144, 100), ended, now(80))))
    assert data["last_incident"]["drops"] == 11921 and data["last_incident"]["early_drops"] == 3302
    assert data["incident"] is None


def test_incident_end_message_tells_the_story():
    inc = Incident(started=now(0), netns=4026532000, name="web", unit="nginx.service", max_at_start=4096,
                   peak_fill=1.0, peak_count=4096, drops=11921, early_drops=3302, table_full_lines=14, bumps=2,
                   max_now=32768, rate=5000.0, bundles=("20261126-1", "20261126-2"), ended=now(75))
    msg = incident_text.end_message(inc)
    for part in ("incident-1800000000", "netns web (inode 4026532000, unit nginx.service)", "75 s",
                 "peak fill 100.0%", "11921 drops", "3302 early drops", "14 table-full lines",
                 "2 bump(s), max 4096 -> 32768", "5000/s", "20261126-1, 20261126-2"):
        assert part in msg, (part, msg)
    f = incident_text.end_fields(inc)
    assert f["CTGUARD_DROPS"] == 11921 and f["CTGUARD_EARLY_DROPS"] == 3302 and f["CTGUARD_BUMPS"] == 2
    assert f["CTGUARD_UNIT"] == "nginx.service" and f["CTGUARD_NETNS_NAME"] == "web"


def test_recommend_reads_the_daemons_history_and_agrees_with_what_it_persists():
    from ctguard.core.decide import persist_advice

    p = policy_mod.loads("[bump]\nceiling = 1048576", "t.toml")
    t = 1_800_000_000
    # Issue 11: right after 11,921 drops recommend said "drops seen: 0, recommended 1024".
    inc = Incident(started=now(0), netns=1, name="host", max_at_start=4096, peak_count=4096, drops=11921,
                   bumps=1, max_now=177152, ended=now(100))
    h = History(bumps=(BumpRecord(now(0), 4096, 177152, "growth"),), last_drop=now(5), last_incident=inc,
                persisted_max=177152, sizing_peak=20000, unpersisted_max=None)
    a = recommend.advise(p, [], 177152, 44288, 256, t + 200, h, GiB, now(200))
    assert a["drops_seen_by_daemon"] and a["factor"] == 3 and a["incident"]["drops"] == 11921
    # Issue 22: the persisted 177,152 comes down (3 x 20,000), by at most half at a time, saying
    # why; buckets never below the live ones.
    assert a["recommended_max"] == round_up(177152 / 2) and any("persisted" in w for w in a["why"])
    assert a["recommended_buckets"] >= 44288
    limits = KernelLimits(177152, 44288, 256, GiB, 0)
    assert persist_advice(p, limits, h.with_(recorded_p99=0), now(200)).max == a["recommended_max"]
    text = recommend.render(a)
    assert "drops seen: yes" in text and "11921 drops" in text
    assert "do not edit that file" in text and "drop-in" in text
    never = recommend.render(recommend.advise(policy_mod.loads("[persist]\nmode = 'never'", "t.toml"), [],
                                              4096, 1024, 256, t, History(), GiB))
    assert "persist.mode is \"never\"" in never and "95-conntrack-local.conf" in never


def test_round_up():
    assert round_up(20000 / 0.85) == 23552
