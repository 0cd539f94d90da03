"""Issue 22: bumps count flows, not dropped packets; growth is measured across the kernel's GC
passes, so steady churn is not growth. One row per case, each naming its input.

Kernel facts: nf_conntrack_core.c counts `drop` once per packet refused an entry (a stream at
200 pps that finds the table full adds 200 a second); gc_worker reaps expired entries in passes
GC_SCAN_INTERVAL_MIN (1 s) to GC_SCAN_INTERVAL_MAX (60 s) apart.
"""

from __future__ import annotations

import pytest

from ctguard.config import policy as policy_mod
from ctguard.core.decide import advance, current_rate, decide
from ctguard.core.model import History, Instant, KernelLimits, NamespaceReading, Sample, SetMax

GiB = 1 << 30
INODE = 4026531000


def at(t: float) -> Instant:
    return Instant(1_800_000_000 + t, 1000 + t, "b")


def smp(t: float, max_: int, count: int, drop: int = 0, early: int = 0, failed: int = 0) -> Sample:
    stats = (("drop", drop), ("early_drop", early), ("insert_failed", failed))
    return Sample(at(t), KernelLimits(max_, max_, 256, 16 * GiB, 8 * GiB, "6.1.0"),
                  (NamespaceReading(INODE, "host", count, stats),))


def run(samples: list[Sample], policy: str = "") -> tuple[History, list]:
    p = policy_mod.loads(policy, "t.toml")
    h = History()
    decisions = []
    for s in samples:
        d = decide(p, s, h, s.at)
        decisions.append(d)
        h = advance(h, s, (), (), s.at, p)
    return h, decisions


@pytest.mark.parametrize("name, samples, new", [
    ("2,000 untracked UDP streams at 200 pps for 1 s into a full 262,144 (400k packet drops): x2, not 1M",
     [smp(0, 262144, 262144, drop=0), smp(1, 262144, 262144, drop=400000)], 524288),
    ("a full 4,096 that evicted 15,904 flows (early_drop): sized on what arrived",
     [smp(0, 4096, 4096), smp(0.1, 4096, 4096, early=15904)], None),
    ("entries the kernel could not insert count as flows too",
     [smp(0, 8192, 8192), smp(0.1, 8192, 8192, failed=2000)], None),
])
def test_bumps_count_flows_not_packets(name, samples, new):
    h, ds = run(samples)
    bumps = [a for a in ds[-1].actions if isinstance(a, SetMax)]
    assert bumps, (name, ds[-1])
    if new is not None:
        assert bumps[0].new == new, (name, bumps[0].reason)
    else:
        lost = samples[-1].namespaces[0].stat("early_drop") + samples[-1].namespaces[0].stat("insert_failed")
        arrived = samples[-1].namespaces[0].count + lost
        assert bumps[0].need >= arrived, (name, bumps[0].reason)
        assert bumps[0].new <= 4 * arrived, (name, bumps[0].reason)   # a burst seen while it arrives: <= 4x


def churn(until: float, high: int = 160000, low: int = 148000, rate: float = 12000.0, gc_every: float = 1.0,
          step: float = 0.25):
    """A 262,144 table at ~60% with 12k/s steady churn: climbs at `rate` between GC passes, falls back at each."""
    out = []
    t = 0.0
    while t <= until + 1e-9:
        phase = t % gc_every
        out.append(smp(t, 262144, int(low + rate * phase)))
        t = round(t + step, 6)
    return out


@pytest.mark.parametrize("name, samples, growing", [
    ("steady churn at 60% of 262,144, 12k/s between GC passes 1 s apart", churn(20.0), False),
    ("steady churn, GC passes 10 s apart (climbs 148k -> 268k? no: 148k + 12k x phase, capped by the pass)",
     churn(40.0, low=100000, rate=6000, gc_every=10.0, step=0.5), False),
    ("a flood above everything seen in the window is growth",
     churn(10.0) + [smp(10.5, 262144, 180000), smp(10.6, 262144, 186000)], True),
])
def test_growth_spans_the_gc_passes(name, samples, growing):
    h, ds = run(samples)
    last = ds[-1]
    bumped = any(isinstance(a, SetMax) for d in ds[len(samples) // 2:] for a in d.actions)
    if growing:
        assert last.rate > 20000 and bumped, (name, last.summary)
    else:
        # After the first GC window the churn reads no growth and nothing is bumped.
        assert not bumped, (name, [d.summary for d in ds if any(isinstance(a, SetMax) for a in d.actions)])
        assert all(d.rate == 0 for d in ds[-8:]), (name, [round(d.rate) for d in ds[-8:]])


def test_the_rate_is_the_rise_above_the_windows_high():
    # High 160,000 three seconds ago, 150,000 now and 0.25 s ago 147,000: refilling, not growing.
    h = History(points=((997.0, ((INODE, 160000),)), (999.75, ((INODE, 147000),))))
    assert current_rate(h, smp(0, 262144, 150000), INODE)[0] <= 0
    # 170,000 now: 10,000 above the high in 0.25 s.
    assert current_rate(h, smp(0, 262144, 170000), INODE)[0] == pytest.approx(40000)


# -- the first GC window: no history yet (the daemon just started, or the namespace just appeared) --

def churn_from_start(until: float, low: int = 140000, rate: float = 12000.0, gc_every: float = 3.0,
                     offset: float = 2.0, step: float = 1.0, flood: float = 0.0, flood_at: float = 1e9):
    """A 262,144 table at 60% (140k-176k: below [thresholds] warn and within 7x of any start, beyond
    which the high-water rule judges alone) with 12k/s arrivals and as many expiring, GC passes `gc_every` s apart, first
    sampled `offset` s into a climb. From `flood_at`, `flood` more new flows/s, never reaped."""
    out = []
    t = 0.0
    while t <= until + 1e-9:
        extra = int(flood * max(0.0, t - flood_at))
        out.append(smp(t, 262144, min(262144, int(low + rate * ((t + offset) % gc_every)) + extra)))
        t = round(t + step, 6)
    return out


def bumps(ds) -> list[tuple[float, int, int, str]]:
    return [(round(d_t, 2), a.old, a.new, a.trigger) for d_t, d in ds for a in d.actions if isinstance(a, SetMax)]


def timed(samples, policy: str = ""):
    h, ds = run(samples, policy)
    return [(s.at.boot - 1000, d) for s, d in zip(samples, ds)]


FIRST_WINDOW_QUIET = [
    # (Sampled at least every 0.2 s: a slope over an older sample waits for a fresh one, so rows
    # sampled each second would never bump and say nothing. Before this change the first two
    # were bumped 262,144 -> 524,288 within 3 s of the start.)
    ("60% of 262,144, 12k/s churn, GC every 3 s, first sampled 2 s into a climb, each 0.1 s",
     churn_from_start(90.0, step=0.1)),
    ("the same first sampled right after a GC pass, each 0.2 s", churn_from_start(90.0, offset=0.0, step=0.2)),
    ("first sampled during a GC pass (160k, 150k, 140k, then the climb to 176k): the fall alone sets no high",
     [smp(0.0, 262144, 160000), smp(0.1, 262144, 150000)] + [smp(round(0.2 + x.at.boot - 1000, 6), 262144,
                                                                 x.namespaces[0].count)
                                                             for x in churn_from_start(60.0, offset=0.0, step=0.1)]),
    ("GC every 10 s, 6k/s (100k -> 160k), first sampled 8 s into a climb, each 0.2 s",
     churn_from_start(90.0, low=100000, rate=6000, gc_every=10.0, offset=8.0, step=0.2)),
    # The CI run of test_issue22_kernel's churn: 1,000/s held 10 s climbed from 10k to 34k between
    # passes 27 s apart and was bumped when the span was 3x; passes may be up to 60 s apart (7x).
    ("1k/s held 10 s (10k live), GC every 55 s, first sampled right after a pass: climbs 6.5x, each 0.2 s",
     churn_from_start(90.0, low=10000, rate=1000, gc_every=55.0, offset=0.0, step=0.2)),
]


@pytest.mark.parametrize("name, samples", FIRST_WINDOW_QUIET, ids=[r[0] for r in FIRST_WINDOW_QUIET])
@pytest.mark.parametrize("policy", ["", "[thresholds]\nhorizon = 300\n"], ids=["default", "horizon 300"])
def test_churn_is_not_growth_in_the_first_minute(name, samples, policy):
    # horizon = 300: any climb read as growth is "full within the horizon", as in the kernel test.
    ds = timed(samples, policy)
    assert not bumps(ds), (name, bumps(ds), [d.summary for _, d in ds if d.of(SetMax)][:3])


def smp8(t: float, count: int) -> Sample:
    return smp(t, 8192, min(8192, count))


FIRST_WINDOW_FLOODS = [
    # name, samples, the flood's start, bumped within (s)
    ("churning table, +30k/s new flows from 10 s (past its first GC passes): bumped within 1 s",
     churn_from_start(20.0, step=0.1, flood=30000, flood_at=10.0), 10.0, 1.0),
    ("idle 8,192 (500 entries), 20k/s from 1.5 s after the start (bench_ramp): bumped at once",
     [smp8(t / 20, 500 + max(0, int(20000 * (t / 20 - 1.5)))) for t in range(0, 50)], 1.5, 0.1),
    ("the same flood from 0.1 s, one quiet interval after the start: bumped at once",
     [smp8(t / 20, 500 + max(0, int(20000 * (t / 20 - 0.1)))) for t in range(0, 30)], 0.1, 0.1),
    # (With no quiet interval seen, a climb could be churn until it passes 7x or `warn`: here 7x is
    # 3,500 entries at 0.16 s, and `warn` at 0.27 s; the table fills at 0.4 s.)
    ("idle 8,192 (500 entries), 20k/s from right after the first sample (no quiet interval seen): past 7x, before warn",
     [smp8(t / 20, 500 + max(0, int(20000 * (t / 20 - 0.01)))) for t in range(0, 30)], 0.01, 0.2),
    ("a flood of 20k/s already running when the watch began, into 40% of 262,144: bumped from warn, before full",
     [smp(t / 10, 262144, min(262144, 105000 + 2000 * t)) for t in range(0, 80)], 0.0, 4.0),
]


@pytest.mark.parametrize("name, samples, began, within", FIRST_WINDOW_FLOODS, ids=[r[0] for r in FIRST_WINDOW_FLOODS])
def test_a_real_flood_in_the_first_minute_is_still_bumped(name, samples, began, within):
    ds = timed(samples)
    got = bumps(ds)
    assert got and got[0][0] - began <= within, (name, got[:3], [d.summary for _, d in ds][:12])
    first = next(i for i, (_, d) in enumerate(ds) if d.of(SetMax))
    assert samples[first].namespaces[0].count < samples[first].limits.max, (name, "bumped before the table was full")
