"""Issue 22, the pure parts: a table row per case, each naming its input.

Kernel facts cited beside the numbers: net/netfilter/nf_conntrack_core.c nf_conntrack_init_start
(default buckets and max from totalram_pages), nf_ct_alloc_hashtable (rounded up to pages of
hlist_nulls_head).
"""

from __future__ import annotations

import pytest

from ctguard.config import policy as policy_mod
from ctguard.core.decide import advance, decide, memory_cap, namespaces_at_once, persist_advice
from ctguard.core.model import (
    History, Incident, Instant, KernelLimits, NamespaceReading, Outcome, Persist, Refuse, Sample, SetMax, TableShape,
)
from ctguard.core.sizing import advice, kernel_default_buckets, kernel_default_max, kernel_ratio, peaks_used, round_up

GiB = 1 << 30
MiB = 1 << 20


def at(t: float) -> Instant:
    return Instant(1_800_000_000 + t, 1000 + t, "b")


def pol(text: str = "") -> policy_mod.Policy:
    return policy_mod.loads(text, "t.toml")


# -- the kernel's defaults: nf_conntrack_init_start ------------------------------------------------

@pytest.mark.parametrize("name, mem, release, buckets, max_", [
    ("1.9 GiB host, 6.1 (> 1 GiB: 65,536; max_factor 1)", int(1.9 * GiB), "6.1.0-18-amd64", 65536, 65536),
    ("1.9 GiB host, 5.10 (> 1 GiB: 16,384; max_factor 4)", int(1.9 * GiB), "5.10.0-28-amd64", 16384, 65536),
    ("512 MiB, 6.1 (RAM/16384/8 = 4,096)", 512 * MiB, "6.1.0", 4096, 4096),
    ("512 MiB, 5.4 (4,096 x 4)", 512 * MiB, "5.4.0", 4096, 16384),
    ("64 MiB, 6.1 (512: the floor 1,024)", 64 * MiB, "6.1.0", 1024, 1024),
    ("exactly 1 GiB, 6.1 (not above 1 GiB: 8,192)", 1 * GiB, "6.1.0", 8192, 8192),
    ("exactly 4 GiB, 6.1 (above 1 GiB, not above 4: 65,536)", 4 * GiB, "6.1.0", 65536, 65536),
    ("24 GiB, 6.18 (> 4 GiB on 64-bit: 262,144)", 24 * GiB, "6.18.44", 262144, 262144),
    ("24 GiB, 5.10 (> 4 GiB: 65,536 x 4)", 24 * GiB, "5.10.0", 65536, 262144),
    ("unknown release: taken as >= 5.15", 24 * GiB, "", 262144, 262144),
    ("600 MiB, 6.1 (4,800 rounded up to a page of 512 buckets)", 600 * MiB, "6.1.0", 5120, 5120),
])
def test_kernel_defaults_as_the_running_kernel_computes_them(name, mem, release, buckets, max_):
    assert kernel_default_buckets(mem, release) == buckets, name
    assert kernel_default_max(mem, release) == max_, name
    assert kernel_ratio(release) == max_ // buckets


@pytest.mark.parametrize("name, text, limits, cap, at_once", [
    # object 256 + extensions 128 + 8 B bucket head per entry at ratio 1: 392 B an entry
    ("1.9 GiB, fraction 0.25, ratio 1", "[bump]\nmemory_fraction = 0.25",
     KernelLimits(65536, 65536, 256, int(1.9 * GiB), 0, "6.1.0"), int(0.25 * int(1.9 * GiB) / 392), 20),  # 0.25 x 1.9 GiB / (65,536 x 384 B)
    ("ratio 4: a quarter bucket head an entry", "[bump]\nmemory_fraction = 0.25\n[buckets]\nratio = 4",
     KernelLimits(65536, 16384, 256, int(1.9 * GiB), 0, "6.1.0"), int(0.25 * int(1.9 * GiB) / 386), 20),
    ("24 GiB at 1,048,576: how many namespaces could fill at once", "",
     KernelLimits(1048576, 1048576, 256, 24 * GiB, 0, "6.18"), None, 6),  # 0.1 x 24 GiB / (1 Mi x 384 B)
])
def test_memory_cap_counts_object_extensions_and_bucket(name, text, limits, cap, at_once):
    p = pol(text)
    if cap is not None:
        assert memory_cap(p, limits) == cap, name
    assert namespaces_at_once(p, limits) == at_once, name


# -- what persists: advice rows -----------------------------------------------------------------------

@pytest.mark.parametrize("name, kw, want, why", [
    ("follows p99 down by at most half: persisted 786,432, p99 10,000",
     dict(peak=10000, persisted=786432), 393216, "at most 1/2"),
    ("down to the sizing once within half: persisted 40,960, p99 15,000",
     dict(peak=15000, persisted=40960), 30720, "no longer needs it"),
    ("never below the kernel default (1.9 GiB, 6.1: 65,536)",
     dict(peak=1000, persisted=None, boot_default=65536), 65536, "boot default"),
    ("never below what the table held in the window (80,000 held, act 0.85)",
     dict(peak=20000, persisted=None, held=80000), round_up(80000 / 0.85), "held"),
    ("up with the load: p99 200,000 after drops",
     dict(peak=200000, persisted=262144, drops=True), 600064, ""),
])
def test_advice_rows(name, kw, want, why):
    args = dict(peak=0, drops=False, boot_default=8192, persisted=None, upper=4 << 20, held=0)
    args.update(kw)
    a = advice(args["peak"], args["drops"], args["boot_default"], args["persisted"], args["upper"], True, 1,
               1024, 1024, args["held"], 0.85)
    assert a.max == want, (name, a)
    assert why in " ".join(a.why), (name, a.why)


@pytest.mark.parametrize("name, rows, used", [
    ("no minutes", [], (0, 0, 0, 0)),
    ("attack minutes left out of p99 and highest", [(1000, False)] * 99 + [(390000, True)] * 5, (104, 5, 1000, 1000)),
    ("legitimate peaks count", [(1000, False)] * 50 + [(5000, False)], (51, 0, 5000, 5000)),
])
def test_peaks_used(name, rows, used):
    u = peaks_used(rows)
    assert (u.minutes, u.attack_minutes, u.p99, u.high) == used, name
    assert ("left out" in u.text()) == bool(used[1])


# -- the scenario: a spoofed SYN flood on a 1.9 GiB host -------------------------------------

def flood(policy_text: str, shape_share: float, sources: int, *, rate: float = 30000.0, seconds: float = 60.0,
          mem: int = int(1.9 * GiB), start_max: int = 65536):
    """Drive decide/advance through a flood of `rate` new flows/s for `seconds` (the table holds
    what fits below max; the kernel drops the rest), then calm; return (history, every action)."""
    p = pol(policy_text)
    h = History()
    mx, count, drops, t = start_max, 5000, 0, 0.0
    actions: list = []
    step = 0.1
    while t < seconds + p.persist.stable_for + 30:
        arriving = rate * step if t < seconds else 0.0
        if t >= seconds:
            count = max(5000, int(count * 0.9))
        room = mx - count
        count += int(min(room, arriving))
        drops += int(max(0, arriving - room))
        ns = NamespaceReading(1, "host", count, (("drop", drops),))
        shape = TableShape(1, min(count, 5000), int(min(count, 5000) * shape_share), sources)
        s = Sample(at(t), KernelLimits(mx, mx, 256, mem, mem // 2, "6.1.0"), (ns,), shape)
        d = decide(p, s, h, s.at)
        outs = []
        for a in d.actions:
            if isinstance(a, SetMax):
                mx = a.new
                outs.append(Outcome(a, True, read_back=a.new))
            else:
                outs.append(Outcome(a, True))
            actions.append(a)
        h = advance(h, s, (), outs, s.at, p)
        t += step
    return h, actions, mx


def test_a_spoofed_syn_flood_never_sizes_the_next_boot_above_the_guard_ceiling():
    # Issue 22, item 1: 1.9 GiB at 65,536, a spoofed SYN flood at 30k/s for 60 s. Before: bumps to
    # 262,144, 536 guard refusals, then 786,432 persisted ("3x peak").
    text = "[guard]\nceiling = 131072\n[persist]\nmode = 'stable'\nstable_for = 60\n[bump]\ncooldown = 1"
    h, actions, mx = flood(text, shape_share=0.95, sources=5000)
    persisted = [a for a in actions if isinstance(a, Persist)]
    assert persisted, "the raised max is persisted once calm"
    assert all(a.max <= 131072 for a in persisted), [a.max for a in persisted]
    assert mx <= 131072
    assert any(isinstance(a, Refuse) and a.kind == "guard" for a in actions)
    inc = h.last_incident or h.incident
    assert inc is not None and inc.attack
    # The flood's peak never became the sizing peak: what persists is the kernel's default here.
    assert persisted[-1].max == kernel_default_max(int(1.9 * GiB), "6.1.0") == 65536


def test_a_legitimate_burst_of_the_same_size_is_still_persisted_from_its_peak():
    text = "[guard]\nceiling = 131072\n[persist]\nmode = 'stable'\nstable_for = 60\n[bump]\ncooldown = 1"
    h, actions, mx = flood(text, shape_share=0.1, sources=20, rate=3000, seconds=40)
    persisted = [a for a in actions if isinstance(a, Persist)]
    inc = h.last_incident or h.incident
    assert inc is not None and not inc.attack
    assert persisted and persisted[-1].max >= 2 * 100000, [a.max for a in persisted]


# -- the daily decay --------------------------------------------------------------------------------

def calm_sample(t: float, count: int = 5000, mem: int = int(1.9 * GiB)) -> Sample:
    return Sample(at(t), KernelLimits(786432, 786432, 256, mem, mem // 2, "6.1.0"),
                  (NamespaceReading(1, "host", count, (("drop", 0),)),))


@pytest.mark.parametrize("name, hist, persists", [
    ("a day of legitimate minutes, persisted 786,432 two days ago: down by half",
     History(persisted_max=786432, persisted_at=at(-2 * 86400), recorded_minutes=1440, recorded_p99=6000,
             recorded_high=7000), 393216),
    ("persisted an hour ago: waits for the day",
     History(persisted_max=786432, persisted_at=at(-3600), recorded_minutes=1440, recorded_p99=6000), None),
    ("less than a day of minutes: too little history to come down",
     History(persisted_max=786432, persisted_at=at(-2 * 86400), recorded_minutes=600, recorded_p99=6000), None),
    ("an incident open: no decay",
     History(persisted_max=786432, persisted_at=at(-2 * 86400), recorded_minutes=1440, recorded_p99=6000,
             incident=Incident(started=at(-5), netns=1)), None),
    ("already at the sizing (the kernel default 65,536): nothing to write",
     History(persisted_max=65536, persisted_at=at(-2 * 86400), recorded_minutes=1440, recorded_p99=6000), None),
    ("the load grew without a bump (p99 60,000, persisted 65,536): up to 2x p99",
     History(persisted_max=65536, persisted_at=at(-2 * 86400), recorded_minutes=1440, recorded_p99=60000,
             recorded_high=70000), 120832),
    ("nothing persisted yet: nothing to bring down",
     History(recorded_minutes=1440, recorded_p99=6000), None),
])
def test_the_persisted_size_follows_the_recorded_p99_down(name, hist, persists):
    d = decide(pol(), calm_sample(0), hist, at(0))
    got = [a.max for a in d.of(Persist)]
    assert got == ([] if persists is None else [persists]), (name, d.actions)
    if persists is not None:
        assert "follows the load" in d.of(Persist)[0].reason and "p99" in d.of(Persist)[0].reason


def test_an_attack_incidents_live_count_is_not_a_sizing_peak():
    inc = Incident(started=at(-5), netns=1, attack="spoofed", sizing_base=3000)
    h = History(incident=inc, sizing_peak=3000)
    s = calm_sample(0, count=120000)
    assert persist_advice(pol(), s.limits, h, at(0), s).peak == 3000
    h2 = advance(h, s, (), (), at(0), pol())
    assert h2.sizing_peak == 3000


# -- what ctguard cannot do here (probed at start) ----------------------------------------------------

@pytest.mark.parametrize("name, cannot", [
    ("both writable", ()),
    ("max read-only (a container)", ("nf_conntrack_max: read-only here",)),
    ("hashsize read-only (not the initial netns)", ("hashsize: read-only here",)),
])
def test_what_the_probe_finds_read_only_is_still_tried_and_said(name, cannot):
    # The write is still made where the probe says read-only: the kernel's own error and the
    # advice are journaled and the failed attempt recorded (tests/kernel/test_faults.py pins
    # that); the probe's finding is what `status` says ctguard cannot do (control.status).
    s = Sample(at(10), KernelLimits(8192, 8192, 256, 16 * GiB, 8 * GiB, "6.1.0", cannot),
               (NamespaceReading(1, "host", 7500, (("drop", 0),)),))
    d = decide(pol(), s, History(), s.at)
    got = {type(a).__name__ for a in d.actions} - {"Capture", "Warn"}
    assert got == {"SetMax", "SetBuckets"}, (name, d.actions)
