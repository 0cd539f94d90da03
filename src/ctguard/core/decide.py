"""PURE decision core: (policy, sample, history, now, kernel events) -> Decision.

No I/O, no clock: everything it knows arrives as arguments, so every branch is a row in a
table-driven test. `advance` folds a decision and what carrying it out did back into the
history, also purely.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ctguard.core.model import (
    Action, BumpRecord, Capture, Decision, History, Incident, Instant, KernelLimits, NamespaceReading, Outcome, Persist,
    RefusalMark, Refuse, Sample, SetBuckets, SetMax, ShortenTimeout, TableFull, TableShape, Trigger, Warn,
)
from ctguard.core.sizing import DECAY_EVERY, DECAY_MIN_MINUTES, GROWTH_COVER, Advice, BumpSize, advice, bump_size, entry_bytes, kernel_default_buckets, \
    kernel_default_max, kernel_ratio, round_up
from ctguard.core import refusals, relief

if TYPE_CHECKING:   # the policy's nouns, typed only: the core never loads a file
    from ctguard.config.policy import Policy

RATE_WINDOW = 3.0           # seconds of samples kept whole to estimate growth
# The kernel reaps expired entries in garbage-collection passes, not continuously
# (nf_conntrack_core.c gc_worker: GC_SCAN_INTERVAL_MIN 1 s .. GC_SCAN_INTERVAL_MAX 60 s apart,
# adaptive), so a table with steady churn climbs between passes and falls at each: a slope over
# 20 ms - 1 s reads that climb as growth (issue 22: a 60% table with 12k/s churn read "growing
# 12000/s, full in 8.7 s" and was bumped). Growth counts only the demand above the highest seen
# in the last GC_WINDOW seconds (points older than RATE_WINDOW kept one a second).
GC_WINDOW = 60.0
# Until a namespace has been watched for a GC window there may be no high to measure against: a
# table with steady churn first read mid-climb looks like growth (issue 22: 60% of 262,144, 12k/s
# arrivals and as many expiring, bumped within the first minute after a start). The kernel's
# `insert` counter would give the arrivals, but the running kernel does not count packet-path
# entries in it (6.18 here: 0 after 3,000 new flows). So in its first GC_WINDOW a namespace's climb is
# held as "not yet known growth" while all of these hold: the watch has not seen it quiet (one
# interval flat within QUIET_RATE/s: idle or a trickle; or a fall after a rise it saw: a GC pass
# whose peak the high-water rule can now measure against; a fall seen first, the watch begun
# during a pass, leaves the high below the churn's peak); its demand is within CHURN_SPAN times
# what it was when the watch began; the table is below [thresholds] warn. Churn climbs between
# passes by what expired since the last one: r new flows/s held T seconds climb from their live
# entries, r x T, to at most r x (T + 60) before the next pass (GC_SCAN_INTERVAL_MAX: 60 s), so
# (T + 60) / T times. T is 30 s for unanswered UDP and ICMP, but 10 s for TCP closed by a reset
# (nf_conntrack_proto_tcp.c: TCP_CONNTRACK_CLOSE 10 s) and for a UDP timeout lowered to 10 s: a
# churn of 1,000/s held 10 s climbed 3.4x between passes 27 s apart on the CI machine and was
# bumped when this span was 3. So (10 + 60) / 10 = 7: churn held under 10 s may still be bumped
# once in its first minute, within the ceiling. A flood that begins after the start is growth at
# once when the watch saw the table quiet, or from 7x or `warn`, whichever comes first (an idle
# 8,192 table: warn); a flood already running at the start is bumped from `warn`.
QUIET_RATE = 100.0
CHURN_SPAN = 7.0
HOUR = 3600.0
REWARN_AFTER = HOUR         # a pressure episode that lasts is warned about again every hour
MIN_CAPTURE_GAP = 5.0       # even with cooldown = 0, do not capture more often than this
BUCKETS_RETRY = 300.0       # a hashsize write that failed (read-only /sys) is retried this rarely, or with a bump

# bench/bench_ramp.py (max 8192, 20k new flows/s, cooldown 1 s) found three shortfalls:
# - The first bump was sized from the slope since the last idle sample (up to 1 s old; the flood
#   began somewhere in between): 8k/s for a 20k/s flood, so the bump ran out 0.4 s before the
#   cooldown ended, and 4,960 of the run's 4,999 drops came after the first bump. Now a bump due
#   on a reference older than STALE_AFTER fast intervals waits CONFIRM_AFTER for one more sample
#   and is sized from the slope between the two.
# - A full table's count stops growing, so later bumps were sized as if growth had stopped:
#   the rate now counts the flows the kernel refused (drop) or made room for (early_drop).
# - Sampling idly every watch.interval leaves a small table unwatched for longer than a flood
#   takes to fill it (8,192 entries fill in 0.41 s at 20k/s). The idle interval is now at most
#   the time the table takes to reach thresholds.act at IDLE_GUARD_RATE new flows/s: nothing
#   changes for tables with 25,000+ entries of headroom (a default 262,144 table samples every
#   1 s), a table of 8,192 is sampled every 0.28 s (0.07% of a core with one namespace).
CONFIRM_AFTER = 0.02
STALE_AFTER = 2.0           # fast intervals
# Issue 15 (bench_ramp.py at 40k-100k new flows/s into 8,192): the guard rate is a policy key,
# [watch] guard_rate (default 100,000/s), and the guard interval may go below fast_interval,
# down to MIN_GUARD_INTERVAL: a table of 8,192 is looked at every 70 ms while idle, a default
# 262,144 table every 1 s. As full turns that cost 1.08% of a core idle (3.10% with 50
# namespaces), so an idle table gets count-only ticks at that period instead (ctguard.core.ticks).
# Under pressure a table that is growing gets full turns at the guard interval when that is
# shorter than fast_interval.
MIN_GUARD_INTERVAL = 0.02
# [buckets] resize = "calm" (bench/bench_resize.py, bench/README.md "Resizing during a storm"):
# while the kernel rehashes it holds every bucket lock and new flows wait, ~0.4 us per entry in
# the (global) table: 123 ms at 262,144 entries, 435 ms at 1,000,000 (one new flow waited 111 and
# 417 ms). Longer chains cost new flows far less: +7% median new-flow latency at max/buckets 8,
# +14% at 16. But the kernel refuses a new flow whose bucket chain passes a random 50-80 tuples
# ("chaintoolong"; every entry is hashed twice, so a full table at max/buckets 16 averages 32
# tuples a bucket and its long tail drops flows; at 64 every new flow in the probe was lost).
# So mid-storm a resize waits for calm unless it is cheap (CHEAP_RESIZE_ENTRIES: ~10 ms) or the
# chains would pass CHAIN_BOUND entries per bucket at the new max (16 tuples: no chaintoolong).
CHEAP_RESIZE_ENTRIES = 25_000
CHAIN_BOUND = 8
CALM_AFTER = 10.0           # seconds without a bump or a drop before a storm counts as over
# Issue 11: sizing a bump from rate x cooldown sent 4,096 to 177,152 for a 5,000/s flood that
# stopped after 20,000 flows. A bump now makes room for what the table holds and lost plus
# `cover` seconds of the growth still going on (sizing.bump_size), and growth that goes on is met
# by another bump before the cooldown once it would reach `act` within `cover / 2` seconds, or
# while the kernel still drops above warn ("urgent", `_urgent`), still within the budget.
FAST_COVER = 3              # fast intervals of growth a bump covers at least: the next look (1) and a re-bump (urgent at cover/2)
LOSS_WINDOW = 7 * 86400.0   # drops this recent make the persisted sizing use sizing.HEADROOM_AFTER_DROPS


def cover_for(policy: Policy) -> float:
    """Seconds of current growth a bump makes room for."""
    return max(GROWTH_COVER, FAST_COVER * policy.watch.fast_interval)


def ratio_of(policy: Policy, release: str = "") -> int:
    """max / buckets ctguard keeps: the policy's [buckets] ratio, or the kernel's own (0)."""
    return policy.buckets.ratio or kernel_ratio(release)


def per_entry(policy: Policy, limits: KernelLimits, default_object_size: int = 320) -> float:
    """Bytes one entry costs the kernel: object + extensions + its share of the buckets."""
    obj = limits.slab_object_size or default_object_size
    return entry_bytes(obj, ratio_of(policy, limits.release)) if policy.buckets.manage else entry_bytes(obj, math.inf)


def memory_cap(policy: Policy, limits: KernelLimits, default_object_size: int = 320) -> int:
    """Largest max whose entries fit in memory_fraction of MemTotal, each entry costing its
    nf_conn object, its extensions and its share of the buckets (sizing.entry_bytes).

    When /proc/slabinfo cannot be read, 320 bytes of object are assumed: larger than the
    nf_conntrack slab object (/proc/slabinfo: 256 bytes on the x86_64 6.18 test VM), so the
    cap errs low. The limit applies to each namespace separately: one namespace filling to
    this max uses the fraction; `namespaces_at_once` says how many could.
    """
    return int(policy.bump.memory_fraction * limits.mem_total / per_entry(policy, limits, default_object_size))


def namespaces_at_once(policy: Policy, limits: KernelLimits, max_value: int | None = None) -> int:
    """How many namespaces could each fill to `max_value` (the live max by default) at once within
    memory_fraction of MemTotal: nf_conntrack_max is compared with each namespace's own count."""
    m = max_value if max_value is not None else limits.max
    if m <= 0:
        return 0
    obj = limits.slab_object_size or 320
    return int(policy.bump.memory_fraction * limits.mem_total // (m * entry_bytes(obj, math.inf)))


def upper_bound(policy: Policy, limits: KernelLimits) -> tuple[int, str]:
    """The highest max ctguard may ever set, and what binds it ("ceiling" or "memory")."""
    mem = memory_cap(policy, limits)
    if mem < policy.bump.ceiling:
        return mem, "memory"
    return policy.bump.ceiling, "ceiling"


def wanted_max(policy: Policy, old: int, count: int, rate: float, lost: int = 0) -> int:
    """old x factor rounded up to 1024, or more: room below `act` for what the table holds,
    what it lost in this incident, and `cover_for(policy)` seconds of the current growth."""
    return size_bump(policy, old, count, lost, rate).want


def size_bump(policy: Policy, old: int, count: int, lost: int, rate: float) -> BumpSize:
    return bump_size(old, count, lost, rate, policy.thresholds.act, policy.bump.factor, cover_for(policy))


def buckets_for(policy: Policy, max_value: int, release: str = "") -> int:
    return int(math.ceil(max_value / ratio_of(policy, release)))


def demand(ns) -> int:
    """What the table was asked to hold, in flows: its count plus the entries the kernel evicted to
    make room (early_drop) or could not insert (insert_failed). Not `drop`: it counts packets
    (nf_conntrack_core.c: NF_CONNTRACK_STAT_INC(net, drop) for every packet refused an entry), so
    2,000 streams at 200 pps read as 400,000 flows a second (issue 22)."""
    return ns.count + ns.stat("early_drop") + ns.stat("insert_failed")


def flows_lost(ns) -> int:
    """The flow counters in `demand` (early_drop + insert_failed)."""
    return ns.stat("early_drop") + ns.stat("insert_failed")


def current_rate(history: History, sample: Sample, inode: int, warn: float = 1.0) -> tuple[float, float]:
    """(growth since the previous sample, that sample's age in seconds); (0, inf) without one.

    The one rate: the growth trigger, the bump's size, its journal entry and the decision all
    use it. It is the rise of the demand (count + early drops + failed inserts) above the highest
    demand seen in the last GC_WINDOW seconds, over the time since the previous sample: a full
    table that keeps evicting still shows its growth, a burst that has stopped shows none, and a
    table that only refills between the kernel's GC passes shows none either."""
    now = sample.at.boot
    current = next((demand(ns) for ns in sample.namespaces if ns.inode == inode), None)
    if current is None:
        return 0.0, math.inf
    high = None
    for t, counts in history.points:
        before = dict(counts).get(inode)
        if before is not None and now - t <= GC_WINDOW:
            high = before if high is None else max(high, before)
    for t, counts in reversed(history.points):
        before = dict(counts).get(inode)
        if before is not None and now - t > 0.0:
            rise = (current - max(before, high if high is not None else before)) / (now - t)
            if rise > 0 and held_in_first_window(history, sample, inode, warn):
                rise = 0.0
            return rise, now - t
    return 0.0, math.inf


def arrivals(history: History, sample: Sample, inode: int) -> float:
    """New entries a second arriving in namespace `inode`: the growth of its demand
    (current_rate) plus what the kernel refused since the previous sample (drop); 0 unknown."""
    growth, age = current_rate(history, sample, inode)
    if not math.isfinite(age) or age <= 0:
        return max(0.0, growth)
    ns = next((n for n in sample.namespaces if n.inode == inode), None)
    before = dict(history.drops).get(inode)
    dropped = max(0, ns.drops - before) if ns is not None and before is not None else 0
    return max(0.0, growth) + dropped / age


def held_in_first_window(history: History, sample: Sample, inode: int, warn: float = 1.0) -> bool:
    """Namespace `inode` has climbed in every interval since its watch began, less than GC_WINDOW
    ago, to within CHURN_SPAN times its demand then, and is below `warn`: its climb may be churn
    between the kernel's GC passes (see GC_WINDOW). The intervals are those of History.points
    (full turns and quiet ticks), which reach back GC_WINDOW: the whole watch while it is held."""
    ns = next((n for n in sample.namespaces if n.inode == inode), None)
    w = next((w for w in history.watched if w[0] == inode), None)
    if ns is None or w is None:
        return False
    _, since, demand0 = w
    if sample.at.boot - since >= GC_WINDOW or sample.fill(ns) >= warn or demand(ns) > CHURN_SPAN * demand0:
        return False
    seen = [(t, d) for t, counts in history.points for i, d in counts if i == inode and t >= since]
    rose = False
    for (t1, d1), (t2, d2) in zip(seen, seen[1:]):
        slack = QUIET_RATE * (t2 - t1)
        if abs(d2 - d1) <= slack:
            return False        # flat: idle or a trickle
        if d2 < d1 and rose:
            return False        # a GC pass after a climb the watch saw: its peak is the high to measure against
        rose = rose or d2 > d1
    return True


def _watched(h: History, sample: Sample) -> tuple[tuple[int, float, int], ...]:
    """When each namespace in `sample` was first sampled, and its demand then (History.watched)."""
    old = {w[0]: w for w in h.watched}
    return tuple(old.get(ns.inode, (ns.inode, sample.at.boot, demand(ns))) for ns in sample.namespaces)


def _bumps_in_last_hour(history: History, now: Instant) -> int:
    return sum(1 for b in history.bumps if b.ok and b.trigger not in ("manual", "reapply") and now.since(b.at) < HOUR)


def budget_left(policy: Policy, history: History, now: Instant) -> int:
    return max(0, policy.bump.max_per_hour - _bumps_in_last_hour(history, now))


def _last_attempt(history: History) -> BumpRecord | None:
    auto = [b for b in history.bumps if b.trigger not in ("manual", "reapply")]
    return auto[-1] if auto else None


def _new_drops(history: History, sample: Sample) -> int:
    before = dict(history.drops)
    return sum(max(0, ns.drops - before[ns.inode]) for ns in sample.namespaces if ns.inode in before)


def _new_early(history: History, sample: Sample) -> int:
    before = dict(history.early)
    return sum(max(0, ns.stat("early_drop") - before[ns.inode]) for ns in sample.namespaces if ns.inode in before)


def lost_in_incident(history: History, sample: Sample, inode: int | None) -> int:
    """Flows namespace `inode` refused (drop) or evicted (early_drop) during the open incident,
    or since the previous sample when none is open: what the table was asked to hold beyond its count."""
    ns = next((n for n in sample.namespaces if n.inode == inode), None)
    if ns is None:
        return 0
    if history.incident is not None:
        base = dict(history.incident.loss_base).get(inode)
    else:
        base = dict(history.lost).get(inode)
    if base is None:
        return 0
    return max(0, flows_lost(ns) - base)


def _urgent(policy: Policy, sample: Sample, history: History, fill: float, rate: float) -> str | None:
    """Why a bump may not wait for the cooldown: the kernel is still dropping above `warn`, or
    the growth reaches `act` (or is past it) within half the cover of a bump."""
    t = policy.thresholds
    last = _last_attempt(history)
    if last is not None and not last.ok:
        return None     # a write that failed (or observe mode) is not retried every sample
    # (A table that sits at act without growing or dropping waits for the cooldown like any other.)
    # Drops counted since a sample taken before the last bump may predate it: not evidence.
    since_bump = last is None or (bool(history.points) and last.at.boot_id == sample.at.boot_id
                                  and history.points[-1][0] >= last.at.boot)
    if fill >= t.warn and since_bump and _new_drops(history, sample) + _new_early(history, sample) > 0:
        return "the kernel is still dropping"
    worst = sample.worst
    if rate > 0 and worst is not None:
        to_act = (t.act * sample.limits.max - worst.count) / rate
        if to_act <= cover_for(policy) / 2:
            return f"growing {rate:.0f}/s, at act in {max(0.0, to_act):.1f} s"
    return None


def attribute_lines(policy: Policy, sample: Sample, history: History,
                    events: Sequence[TableFull]) -> tuple[TableFull, ...]:
    """The kernel's table-full lines of this turn, each marked `unattributed` unless a sampled
    namespace shows it: the one it names (any, for a line that names none) dropped since the
    last sample or sits at `thresholds.warn` or above.

    The kernel counts `drop` in the namespace before it prints the line, and the line reaches
    ctguard before the sample of its turn is read, so a line of this moment shows in a counter
    or a full table (a line journald handed over late may have had its drop counted by the
    sample before, which acted on that counter then). A line that shows nowhere is another namespace's (another
    tenant's, a test's, a gone namespace whose inode a new one reuses) or an old one that
    journald handed over late: acting on it bumps a table that is not full, and `status` said
    "table full 8 s ago" (CRITICAL) with 0 drops in the lab's dead-upstream run (issue 24)."""
    before = dict(history.drops)
    showing = {ns.inode for ns in sample.namespaces
               if ns.drops > before.get(ns.inode, ns.drops) or sample.fill(ns) >= policy.thresholds.warn}
    out = []
    for e in events:
        seen = bool(showing) if e.netns is None else e.netns in showing
        out.append(e if e.backlog or seen else replace(e, unattributed=True))
    return tuple(out)


def _trigger(policy: Policy, sample: Sample, history: History, events: Sequence[TableFull],
             fill: float, rate: float) -> tuple[Trigger | None, str]:
    t = policy.thresholds
    live = [e for e in events if e.live]
    if live:
        where = f" in netns {live[0].netns}" if live[0].netns else ""
        return "table-full", f"the kernel reported the table full{where}"
    if fill >= t.act:
        return "fill", f"fill {fill:.1%} reached thresholds.act {t.act:.0%}"
    new_drops = _new_drops(history, sample) if fill >= t.warn else 0
    if new_drops > 0:
        return "drops", f"the kernel counted {new_drops} new drops at fill {fill:.1%}"
    if t.horizon > 0 and rate > 0:
        count = sample.worst.count if sample.worst else 0
        if history.incident is not None and history.incident.bumps > 0:
            # The horizon's early warning is spent once this incident has bumped: the next bump
            # comes when the growth reaches act within half a cover. (Doubling again on every
            # 10 s prediction overshot sustained floods: bench_ramp at 40k/s ended at 425,984
            # for 120,000 flows.)
            to_act = (t.act * sample.limits.max - count) / rate
            if to_act <= cover_for(policy) / 2:
                return "growth", f"growing {rate:.0f}/s, at act in {max(0.0, to_act):.1f} s (this incident's last bump runs out)"
            return None, ""
        seconds_left = (sample.limits.max - count) / rate
        if seconds_left <= t.horizon:
            return "growth", f"growing {rate:.0f}/s, full in {seconds_left:.1f} s (horizon {t.horizon:g} s)"
    return None, ""


def decide(policy: Policy, sample: Sample, history: History, now: Instant,
           events: Sequence[TableFull] = ()) -> Decision:
    worst = sample.worst
    worst_inode = worst.inode if worst else None
    fill = sample.worst_fill
    rate, ref_age = (current_rate(history, sample, worst_inode, policy.thresholds.warn) if worst_inode is not None
                     else (0.0, math.inf))
    # A table-full line names its namespace; trust it over the sample for which one is worst.
    event_ns = next((e.netns for e in events if e.live and e.netns), None)
    netns = event_ns or worst_inode
    actions: list[Action] = []
    limits = sample.limits
    pressure = fill >= policy.thresholds.warn

    trigger, why = _trigger(policy, sample, history, events, fill, rate)
    stale = ref_age > STALE_AFTER * policy.watch.fast_interval
    confirm = (trigger in ("growth", "fill") and rate > 0 and worst is not None and worst.count < limits.max
               and stale)
    if confirm:
        trigger = None      # no loss yet: one more sample, CONFIRM_AFTER from now, sizes the bump
    bumped_to: int | None = None
    needs_shape: int | None = None
    if trigger is not None:
        attack, note = judge(policy, sample, history, netns)
        if note:
            why = f"{why}; {note}"
        lost = lost_in_incident(history, sample, worst_inode)
        # Losses are happening: bump at once. A slope over a stale interval cannot tell a burst
        # that has stopped from one that goes on (issue 11: an 80 ms burst sent max to the
        # ceiling), so such a bump is sized on what arrived, and the next sample, CONFIRM_AFTER
        # from now, measures a fresh rate and bumps again before the cooldown if growth goes on.
        size_rate = 0.0 if stale else rate
        if stale and rate > 0:
            why = f"{why}; no fresh rate (last sample {ref_age:.2f} s old): sized on what arrived, sampling again at once"
        action = _bump_or_refuse(policy, limits, history, now, trigger, why, netns, fill,
                                 worst.count if worst else 0, size_rate, attack, lost,
                                 _urgent(policy, sample, history, fill, size_rate))
        if isinstance(action, Refuse) and action.kind != "cooldown":
            # Refused again on every sample while the table stays at the bound: one refused bump.
            action = replace(action, repeat=refusals.repeats(
                history.last_refusal, action.kind, action.current, now.boot, refusals.repeat_window(policy.bump.cooldown)))
        actions.append(action)
        if isinstance(action, SetMax):
            bumped_to = action.new
            confirm = stale and rate > 0
            looked = sample.shape is not None and sample.shape.netns == netns
            if (policy.guard.enabled and attack is None and not looked and netns is not None
                    and action.new > policy.guard.ceiling):
                # Only growth past the guard's ceiling needs the table's shape: below it, bump
                # at once; past it, the caller looks (bounded) and asks again.
                needs_shape = netns
        elif action.kind not in ("cooldown",) and (
                _capture_due(policy, history, now)
                or (_worsens(history, "refused") and action.kind in WORSENING_REFUSALS and _gap_ok(history, now))):
            # A bump refused at a bound in an incident is a worse moment than the first bump:
            # captured again, once (until the incident has a refused bundle; the recorder bounds
            # it per incident). A refusal that came within MIN_CAPTURE_GAP of another capture
            # (the first bump's, or a `grown` one) is taken at the next refused turn the gap
            # allows: the table still stands at the bound.
            actions.append(Capture(reason=f"refused-{action.kind}", netns=netns))

    for e in events:
        if e.live:
            actions.append(Warn("table-full", e.netns, fill, "the kernel reported: table full, dropping packet"))
            break

    inc = history.incident
    recent = (history.last_drop, _last_ok_bump_at(history), (inc.last_active or inc.started) if inc else None)
    calm = (trigger is None and not confirm and not pressure
            and not any(x is not None and now.since(x) < CALM_AFTER for x in recent))
    actions.extend(_buckets_action(policy, limits, history, now, bumped_to, sample, calm))
    if bumped_to is not None:
        if _capture_due(policy, history, now):
            actions.append(Capture(reason="bump", netns=netns))
        if policy.persist.mode == "immediate":
            adv = persist_advice(policy, sample.limits, history, now, sample)
            actions.append(Persist(adv.max, adv.buckets, f"persist.mode is immediate; sized {adv.text()}"))
    if pressure:
        actions.extend(_pressure_actions(policy, history, now, worst_inode, fill,
                                         may_capture=not any(isinstance(a, Capture) for a in actions)))
    if bumped_to is None:
        actions.extend(_stable_persist(policy, limits, history, now, sample) or _decay_persist(policy, limits, history, now))

    relief_actions, needs_relief = relief.plan(policy, sample, history, now, actions,
                                               lambda inode: arrivals(history, sample, inode))
    actions.extend(relief_actions)
    if not any(isinstance(a, Capture) for a in actions) and _gap_ok(history, now):
        # The incident worsened since its first bundle: the kernel began dropping, or relief
        # acts. The bundle of that moment tells more than the first bump's.
        if _worsens(history, "drops-began") and (_new_drops(history, sample) > 0 or _new_early(history, sample) > 0):
            actions.append(Capture(reason="drops-began", netns=worst_inode))
        elif _worsens(history, "relief") and (relieved := _relief_moment(history, relief_actions)) is not None:
            actions.append(Capture(reason="relief", netns=relieved))
        elif _worsens(history, "grown") and _grown(history, worst):
            actions.append(Capture(reason="grown", netns=worst_inode))
    summary = _summary(sample, fill, rate, actions)
    left = limits.max - (worst.count if worst else 0)
    to_full = left / rate if rate > 0 else math.inf
    headroom = int(policy.thresholds.act * limits.max) - (worst.count if worst else 0)
    acted = any(isinstance(a, SetMax) or (isinstance(a, Refuse) and a.kind != "cooldown") for a in actions)
    ends = (history.incident is not None and not _active(policy, sample, events, acted)
            and _calm_for(history.incident, now) >= policy.thresholds.calm)
    return Decision(tuple(actions), netns, fill, max(0.0, size_rate if trigger is not None else rate), pressure,
                    summary, to_full, headroom, confirm,
                    needs_shape, ends, needs_relief=needs_relief)


def _buckets_action(policy: Policy, limits: KernelLimits, history: History, now: Instant,
                    bumped_to: int | None, sample: Sample | None = None, calm: bool = True) -> list[Action]:
    """Buckets kept at max/ratio; a failed resize is retried with the next bump or after a while.
    One resize at a time; with resize = "calm", an expensive one waits for the storm to end."""
    if not policy.buckets.manage or policy.buckets.resize == "never":
        return []
    if sample is not None and sample.resizing is not None:
        return []       # one in flight: the next sample after it sees its result
    if bumped_to is None and history.buckets_failed is not None and now.since(history.buckets_failed) < BUCKETS_RETRY:
        return []
    target_max = bumped_to or limits.max
    want = buckets_for(policy, target_max, limits.release)
    if limits.buckets >= want:
        return []
    if policy.buckets.resize == "calm" and not calm and sample is not None:
        entries = sum(ns.count for ns in sample.namespaces)
        if entries > CHEAP_RESIZE_ENTRIES and target_max / max(1, limits.buckets) <= CHAIN_BOUND:
            return []   # mid-storm: a resize would stall every new flow longer than the chains cost them
    return [SetBuckets(limits.buckets, want, f"keep max/buckets <= {ratio_of(policy, limits.release)} for max {target_max}")]


def _pressure_actions(policy: Policy, history: History, now: Instant, inode: int | None, fill: float,
                      may_capture: bool) -> list[Action]:
    """Above `warn` for `sustain` seconds: warn (again each hour) and capture evidence."""
    if history.pressure_since is None:
        return []
    sustained = now.since(history.pressure_since)
    if sustained < policy.thresholds.sustain:
        return []
    if history.last_warn is not None and now.since(history.last_warn) < REWARN_AFTER:
        return []
    out: list[Action] = [Warn("pressure", inode, fill, f"fill above {policy.thresholds.warn:.0%} for {sustained:.0f} s")]
    if may_capture and _capture_due(policy, history, now):
        out.append(Capture(reason="pressure", netns=inode))
    return out


def persist_advice(policy: Policy, limits: KernelLimits, history: History, now: Instant,
                   sample: Sample | None = None) -> Advice:
    """What persists (and what `recommend` advises): sizing.advice over the same history, from
    legitimate load only: the peak since the last write (attack-shaped incidents left out, see
    advance), the recorded p99 and the highest recorded minute (attack-shaped minutes left out,
    sizing.peaks_used), and the live count unless the open incident is attack-shaped."""
    attack_now = history.incident is not None and bool(history.incident.attack)
    live = sample.worst.count if sample and sample.worst and not attack_now else 0
    peak = max(history.sizing_peak, history.recorded_p99, live)
    drops_seen = history.last_drop is not None and now.since(history.last_drop) < LOSS_WINDOW
    if sample is not None:
        drops_seen = drops_seen or (_new_drops(history, sample) + _new_early(history, sample) > 0
                                    and sample.worst_fill >= policy.thresholds.warn)
    return advice(peak, drops_seen, kernel_default_max(limits.mem_total, limits.release), history.persisted_max,
                  upper_bound(policy, limits)[0], policy.buckets.manage, ratio_of(policy, limits.release), limits.buckets,
                  kernel_default_buckets(limits.mem_total, limits.release), history.recorded_high,
                  policy.thresholds.act)


def persist_due_in(policy: Policy, history: History, now: Instant) -> float | None:
    """Seconds until a raised max is persisted (persist.mode = "stable"), 0 when due; None when
    nothing waits to be persisted or the mode never persists later."""
    if policy.persist.mode != "stable" or history.unpersisted_max is None:
        return None
    quiet_since = [x for x in (history.last_drop, _last_ok_bump_at(history)) if x is not None]
    quiet = min((now.since(x) for x in quiet_since), default=math.inf)
    return max(0.0, policy.persist.stable_for - quiet)


def _stable_persist(policy: Policy, limits: KernelLimits, history: History, now: Instant,
                    sample: Sample | None = None) -> list[Action]:
    """persist.mode = "stable": once no drop was seen for stable_for after a bump, write the
    sizing (sizing.advice), not the emergency value."""
    due = persist_due_in(policy, history, now)
    if due is None or due > 0:
        return []
    adv = persist_advice(policy, limits, history, now, sample)
    return [Persist(adv.max, adv.buckets,
                    f"no drop for {policy.persist.stable_for:g} s since the last bump; sized {adv.text()}")]


def _decay_persist(policy: Policy, limits: KernelLimits, history: History, now: Instant) -> list[Action]:
    """The persisted size follows the recorded p99 down and up (issue 22): once a day, with no
    incident open and nothing waiting to be persisted, and a day of per-minute peaks recorded, a
    sizing other than the persisted value is written; down by at most 1/sizing.DECAY at a time,
    never below the kernel's default nor what the table held in the window (sizing.advice)."""
    if (policy.persist.mode == "never" or history.persisted_max is None or history.incident is not None
            or history.unpersisted_max is not None or history.recorded_minutes < DECAY_MIN_MINUTES):
        return []
    if history.persisted_at is not None and now.since(history.persisted_at) < DECAY_EVERY:
        return []
    adv = persist_advice(policy, limits, history, now)
    if adv.max == history.persisted_max:
        return []
    way = "down" if adv.max < history.persisted_max else "up"
    return [Persist(adv.max, adv.buckets,
                    f"the persisted {history.persisted_max} follows the load {way}: {history.recorded_minutes} "
                    f"minute(s) recorded, p99 {history.recorded_p99}, highest {history.recorded_high}"
                    f"{f', {history.recorded_attack_minutes} attack-shaped minute(s) left out' if history.recorded_attack_minutes else ''}"
                    f"; sized {adv.text()}")]


def next_interval(policy: Policy, decision: Decision) -> float:
    """Seconds to the next full turn. Sample fast above `warn`, and also while growth would fill
    the table within a few horizons: a steep ramp must be seen again before it crosses `act`,
    not a second later. An idle table with little room is watched between full turns by
    count-only ticks at the guard period (ctguard.core.ticks), not by full turns."""
    watch_window = max(policy.thresholds.horizon, policy.watch.interval) * 3
    if decision.confirm:
        return min(CONFIRM_AFTER, policy.watch.fast_interval)
    guard = guard_interval(policy, decision.headroom)
    growing = decision.seconds_to_full <= watch_window
    if decision.pressure or growing:
        return min(policy.watch.fast_interval, guard) if growing and guard is not None else policy.watch.fast_interval
    return policy.watch.interval


def guard_interval(policy: Policy, headroom: int | None) -> float | None:
    """Seconds the worst namespace's headroom to `act` lasts at [watch] guard_rate new flows/s
    (at least MIN_GUARD_INTERVAL); None when the guard is off or there is no headroom left."""
    if headroom is None or headroom <= 0 or policy.watch.guard_rate <= 0:
        return None
    return max(MIN_GUARD_INTERVAL, headroom / policy.watch.guard_rate)


def _last_ok_bump_at(history: History) -> Instant | None:
    ok = [b for b in history.bumps if b.ok]
    return ok[-1].at if ok else None


# A look "cannot tell yet" when at least one entry in this many has its own source: the source
# count is bounded by the table's size, not by the traffic (a few busy clients give far fewer).
UNSETTLED_SOURCES = 2


# Issue 22: the guard judges with what it knows of the host.
DOMINANT = 0.5              # one destination (or port) holding this share of the sampled entries dominates
INVALID_OVER_BASELINE = 4.0  # `invalid` this many times its own calm rate (and above INVALID_FLOOR/s) ...
INVALID_FLOOR = 100.0
INVALID_BASELINE_SECONDS = 10.0  # ... once the calm rate was watched this long (no baseline: no judgement)
INVALID_BASE_WEIGHT = 0.05  # weight of a new calm sample in the baseline (an exponential average)


def attack_shape(policy: Policy, sample: Sample, history: History, inode: int | None) -> str | None:
    """Why the growth in namespace `inode` looks like an attack, or None (see `judge`)."""
    return judge(policy, sample, history, inode)[0]


def _invalid_sign(g, ns, history: History, now: float, inode: int) -> str | None:
    """`invalid` climbing with the drops, well above this namespace's own calm rate."""
    drops_before = dict(history.drops).get(inode)
    invalid_before = dict(history.invalid).get(inode)
    if drops_before is None or invalid_before is None or history.counters_at is None:
        return None
    dt = now - history.counters_at
    new_drops = ns.drops - drops_before
    new_invalid = ns.stat("invalid") - invalid_before
    if dt <= 0 or new_drops <= 0 or new_invalid < new_drops:
        return None
    base = next(((r, secs) for i, r, secs in history.invalid_base if i == inode), None)
    if base is None or base[1] < INVALID_BASELINE_SECONDS:
        return None     # no baseline yet: a busy gateway's normal `invalid` is not an attack
    rate = new_invalid / dt
    if rate < max(INVALID_FLOOR, INVALID_OVER_BASELINE * base[0]):
        return None
    return (f"`invalid` climbs with the drops (+{new_invalid} invalid, +{new_drops} dropped in {dt:.2f} s: "
            f"{rate:.0f}/s against its calm {base[0]:.0f}/s)")


def judge(policy: Policy, sample: Sample, history: History, inode: int | None) -> tuple[str | None, str]:
    """(why the growth in namespace `inode` looks like an attack or None, a note on what it is instead).

    Signs of an attack, any one enough:
    - `invalid` climbs at least as fast as the drops, and at INVALID_OVER_BASELINE times this
      namespace's own calm rate (no baseline yet: no judgement);
    - a look into the table (`sample.shape`) finds most entries never answered or half-open,
      from many sources that are not the namespace's internal side (a spoofed SYN or UDP flood);
    - answered traffic, nearly one entry per source, most to one local port: a query flood or
      reflection through a local service.
    Not an attack, said in the note: most entries unanswered to one destination that is not this
    namespace's, from its internal clients: an outage upstream (clients retrying a dead server),
    bumped within the ceiling; unanswered traffic from internal clients (a CGNAT's UDP).

    A look that cannot tell yet counts as attack-shaped: mostly unanswered, nearly every entry
    from its own source, but fewer entries than [guard] min_sources (a spoofed flood caught in
    its first half-second). Holding it at the guard's ceiling until the next look costs a
    legitimate burst one sample, since the table is still far below full.
    """
    g = policy.guard
    if not g.enabled or inode is None:
        return None, ""
    ns = next((n for n in sample.namespaces if n.inode == inode), None)
    if ns is not None:
        sign = _invalid_sign(g, ns, history, sample.at.boot, inode)
        if sign is not None:
            return sign, ""
    shape = sample.shape
    if shape is None or shape.error or shape.netns != inode or not shape.seen:
        return None, ""
    host = shape.host
    internal = bool(host and shape.top_sources and all(host.is_internal(a) for a in shape.top_sources))
    where = f" ({host.role})" if host is not None else ""
    if shape.share >= g.suspicious_share:
        dst_share = shape.top_dst_count / shape.seen
        if host is not None and internal and shape.top_dst and dst_share >= DOMINANT and not host.is_local(shape.top_dst):
            return None, (f"an outage, not an attack: {shape.share:.0%} of {shape.seen} sampled entries unanswered, "
                          f"{dst_share:.0%} to one destination {shape.top_dst} from internal clients{where}: "
                          f"an upstream is down and its clients retry; bumped within the ceiling")
        if host is not None and internal:
            return None, (f"{shape.share:.0%} of {shape.seen} sampled entries unanswered, from internal "
                          f"clients{where}: not a spoofed flood; bumped within the ceiling")
        return shape_judgement(g, shape), ""
    answered = shape.answered if shape.answered >= 0 else shape.seen - shape.suspicious
    port_share = shape.top_port_count / shape.seen
    one_each = shape.sources * UNSETTLED_SOURCES >= shape.seen and shape.sources >= g.min_sources
    local_dst = host is not None and shape.top_dst and host.is_local(shape.top_dst)
    if (answered * 2 >= shape.seen and one_each and shape.top_port and port_share >= DOMINANT
            and (local_dst or host is None) and not internal):
        return (f"answered traffic, one entry per source ({shape.sources} sources in {shape.seen} sampled entries), "
                f"{port_share:.0%} to one local port {shape.top_port}: a query flood or reflection through a "
                f"local service"), ""
    return None, ""


def shape_judgement(g: Any, shape: TableShape) -> str | None:
    """The guard's reading of a look into one table (`g`: [guard] suspicious_share and
    min_sources), shared by the daemon's guard and the diagnosis of a bundle taken without one."""
    if shape.error or not shape.seen or shape.share < g.suspicious_share:
        return None
    if shape.sources >= g.min_sources:
        return (f"{shape.share:.0%} of {shape.seen} sampled entries unanswered or half-open, "
                f"from {shape.sources} or more sources")
    if shape.sources * UNSETTLED_SOURCES >= shape.seen:
        return (f"too early to tell: {shape.share:.0%} of {shape.seen} sampled entries unanswered or "
                f"half-open, from {shape.sources} sources, too few entries yet to reach [guard] "
                f"min_sources ({g.min_sources}); held at the guard's ceiling until a look can tell")
    return None


# The moments an incident gets worse, each worth its own bundle once per incident (the
# recorder's [evidence] incident_captures bounds them): a bump refused at a bound, the kernel's
# first drops, relief's first shortening, and the table grown GROWN_FACTOR-fold since the first
# bundle. The first bundle comes with the first bump, which growth can bring while the table is
# still small: in the lab's CGNAT mix (bench_users.py) it came at 403 entries, mostly the web
# clients' TIME_WAIT, and its verdict named them; the unanswered UDP that filled the table to
# ~99,000 was in no bundle, as the run ended before the incident did.
WORSENING_REFUSALS = ("ceiling", "memory", "guard")
WORSENING_CAPTURES = ("refused-ceiling", "refused-memory", "refused-guard", "drops-began", "relief", "grown")
GROWN_FACTOR = 4


def moment_of(reason: str) -> str:
    """The worsening moment a capture reason stands for: a refusal at any bound is one moment."""
    return "refused" if reason.startswith("refused-") else reason


WORSENING_MOMENTS = len({moment_of(r) for r in WORSENING_CAPTURES})    # refused, drops-began, relief, grown


def _worsens(history: History, what: str) -> bool:
    """The open incident has no bundle of moment `what` yet (none open: not a worsening). A
    moment that came within MIN_CAPTURE_GAP of another capture is taken at the next turn it
    still holds (drops still rising), not lost."""
    inc = history.incident
    if inc is None:
        return False
    slug = "-refused-" if what == "refused" else f"-{what}"
    return not any(slug in b or b.endswith(slug) for b in inc.bundles)


def _grown(history: History, worst: NamespaceReading | None) -> bool:
    """The worst namespace holds GROWN_FACTOR times what it held when the open incident's first
    bundle was asked for: that bundle shows an earlier, smaller table."""
    inc = history.incident
    return (inc is not None and worst is not None and inc.first_bundle_count > 0
            and worst.count >= GROWN_FACTOR * inc.first_bundle_count)


def _relief_moment(history: History, relief_actions: Sequence[Action]) -> int | None:
    """The namespace relief acted in during the open incident: this turn's first shortened
    timeout (enforced, not advised), or one shortened since the incident began whose bundle
    waited (relief entered in the turn of another capture, or within MIN_CAPTURE_GAP of one)."""
    for a in relief_actions:
        if isinstance(a, ShortenTimeout) and not a.advise and a.step != "up":     # "up" eases, not acts
            return a.netns
    inc = history.incident
    if inc is None:
        return None
    # Instant.since is never negative: relieved at or after the start is the start being no later.
    return next((r.netns for r in history.relief.active if inc.started.since(r.since) == 0), None)


def _gap_ok(history: History, now: Instant) -> bool:
    return history.last_capture is None or now.since(history.last_capture) >= MIN_CAPTURE_GAP


def _capture_due(policy: Policy, history: History, now: Instant) -> bool:
    gap = max(policy.bump.cooldown, MIN_CAPTURE_GAP)
    return history.last_capture is None or now.since(history.last_capture) >= gap


def _bump_or_refuse(policy: Policy, limits: KernelLimits, history: History, now: Instant,
                    trigger: Trigger, why: str, netns: int | None, fill: float, count: int,
                    rate: float, attack: str | None = None, lost: int = 0,
                    urgent: str | None = None) -> SetMax | Refuse:
    old = limits.max
    size = size_bump(policy, old, count, lost, rate)
    want = size.want
    last = _last_attempt(history)
    if last is not None and now.since(last.at) < policy.bump.cooldown:
        if urgent is None:
            wait = policy.bump.cooldown - now.since(last.at)
            return Refuse(want, old, "cooldown", trigger, netns, fill, f"{why}; cooldown: next bump allowed in {wait:.0f} s")
        why = f"{why}; before the cooldown: {urgent}"
    if _bumps_in_last_hour(history, now) >= policy.bump.max_per_hour:
        return Refuse(want, old, "budget", trigger, netns, fill,
                      f"{why}; bump budget spent ({policy.bump.max_per_hour} in the last hour)")
    upper, binding = upper_bound(policy, limits)
    if attack is not None and policy.guard.ceiling < upper:
        upper, binding = policy.guard.ceiling, "guard"
        why = f"{why}; attack-shaped growth: {attack}"
    new = min(want, upper)
    if new <= old:
        what = {"ceiling": f"bump.ceiling {policy.bump.ceiling}",
                "memory": f"memory cap {upper} ({policy.bump.memory_fraction:.0%} of MemTotal)",
                "guard": f"[guard] ceiling {upper}, the limit for attack-shaped growth"}[binding]
        return Refuse(want, old, binding, trigger, netns, fill, f"{why}; max {old} is already at the {what}")  # type: ignore[arg-type]
    clipped = binding if new < want else None
    note = f", clipped by the {binding}" if clipped else ""
    return SetMax(old, new, trigger, netns, fill, f"{why}; {old} -> {new}{note}; sized: {size.text()}", clipped,
                  size.rate, size.need, size.cover, attack or "")


def decide_manual(policy: Policy, limits: KernelLimits, to: int, lower: bool = False,
                  worst: tuple[int | None, int] = (None, 0), who: str = "operator") -> Decision:
    """`ctguard bump --to N [--lower]`: the operator's change, held to the same bounds (no budget).

    The operator's value is a deliberate sizing, not an emergency: it is persisted at once
    unless persist.mode is never (stable's wait is there so that an emergency value does not
    become the boot value; and a lowering must not come back at the next boot). A lowering
    (`lower`, an undo of a bump) is refused below what the table holds now (the worst
    namespace's count / thresholds.act: it would be at `act` at once); live buckets are never
    shrunk. `worst` is (namespace inode, entries) of the fullest namespace.
    """
    actions: list[Action] = []
    upper, binding = upper_bound(policy, limits)
    netns, count = worst
    fill = count / limits.max if limits.max > 0 else 0.0
    if to == limits.max:
        actions.append(Refuse(to, limits.max, "unchanged", "manual", netns, fill,
                              f"{who} asked for {to}, which is the current max already; nothing to do"))
    elif to < limits.max and not lower:
        actions.append(Refuse(to, limits.max, "lower", "manual", netns, fill,
                              f"{who} asked for {to}, below the current max {limits.max}; ctguard never lowers "
                              f"max unless told to: `ctguard bump --to {to} --lower`"))
    elif to < limits.max:
        floor = round_up(count / policy.thresholds.act, 1) if count else 1
        if to < floor:
            actions.append(Refuse(to, limits.max, "lower", "manual", netns, fill,
                                  f"{who} asked to lower max to {to}, below what the table holds now: {count} "
                                  f"entries need at least {floor} to stay under thresholds.act "
                                  f"{policy.thresholds.act:g}"))
        else:
            actions.append(SetMax(limits.max, to, "manual", netns, fill, f"{who} lowered max to {to}"))
            if policy.persist.mode != "never":
                buckets = (max(buckets_for(policy, to, limits.release), limits.buckets, kernel_default_buckets(limits.mem_total, limits.release))
                           if policy.buckets.manage else None)
                actions.append(Persist(to, buckets, f"operator lowered max to {to}"))
    elif to > upper:
        actions.append(Refuse(to, limits.max, binding, "manual", netns, fill,  # type: ignore[arg-type]
                              f"{who} asked for {to}, above the {binding} {upper}"))
    else:
        actions.append(SetMax(limits.max, to, "manual", netns, fill, f"{who} asked for {to}"))
        if policy.buckets.manage and policy.buckets.resize != "never" and limits.buckets < buckets_for(policy, to, limits.release):
            actions.append(SetBuckets(limits.buckets, buckets_for(policy, to, limits.release), f"keep max/buckets <= {ratio_of(policy, limits.release)}"))
        if policy.persist.mode != "never":
            # Persisted buckets never below the live ones nor the kernel's default (issue 11).
            buckets = (max(buckets_for(policy, to, limits.release), limits.buckets, kernel_default_buckets(limits.mem_total, limits.release))
                       if policy.buckets.manage else None)
            actions.append(Persist(to, buckets, f"operator raised max to {to}"))
    return Decision(tuple(actions), netns, fill, 0.0, False, actions[0].reason)  # type: ignore[union-attr]


def decide_start(policy: Policy, limits: KernelLimits, persisted_max: int | None) -> Decision:
    """At start: a persisted max the kernel does not hold (nf_conntrack loaded after
    systemd-sysctl ran) is applied again, still under the ceiling and the memory cap."""
    actions: list[Action] = []
    if persisted_max is not None and persisted_max > limits.max:
        upper, binding = upper_bound(policy, limits)
        target = min(persisted_max, upper)
        if target > limits.max:
            actions.append(SetMax(limits.max, target, "reapply", None, 0.0,
                                  f"persisted max {persisted_max} is not in force (kernel has {limits.max})"
                                  + (f", clipped by the {binding}" if target < persisted_max else "")))
            if policy.buckets.manage and policy.buckets.resize != "never" and limits.buckets < buckets_for(policy, target, limits.release):
                actions.append(SetBuckets(limits.buckets, buckets_for(policy, target, limits.release), "with the persisted max"))
    return Decision(tuple(actions), None, 0.0, 0.0, False, "start")


def _active(policy: Policy, sample: Sample | None, events: Sequence[TableFull], acted: bool) -> bool:
    """Does this turn keep an incident going (or start one)?"""
    hot = sample is not None and sample.worst_fill >= policy.thresholds.warn
    return hot or acted or any(e.live for e in events)


def _calm_for(incident: Incident, now: Instant) -> float:
    return now.since(incident.last_active or incident.started)


def _acted(outcomes: Sequence[Outcome]) -> bool:
    """An automatic bump made or refused (not a cooldown wait, not the operator's, not a re-apply)."""
    for o in outcomes:
        a = o.action
        if isinstance(a, SetMax) and a.trigger not in ("manual", "reapply"):
            return True
        if isinstance(a, Refuse) and a.kind != "cooldown" and a.trigger != "manual":
            return True
    return False


def _incident_turn(h: History, sample: Sample | None, events: Sequence[TableFull], outcomes: Sequence[Outcome],
                   now: Instant, policy: Policy) -> dict:
    """Open, update or close the incident for one turn; the changes to the history."""
    acted = _acted(outcomes)
    active = _active(policy, sample, events, acted)
    inc = h.incident
    if inc is None:
        if not active or sample is None:
            return {}
        worst = sample.worst
        inc = Incident(started=now, netns=worst.inode if worst else None, name=worst.name if worst else "",
                       unit=worst.unit if worst else "", max_at_start=sample.limits.max,
                       loss_base=h.lost, last_active=now,
                       sizing_base=h.sizing_peak)
    changes: dict = {}
    live = [e for e in events if e.live]
    upd: dict = {
        "table_full_lines": inc.table_full_lines + len(live) + sum(e.suppressed for e in live),
        "bumps": inc.bumps + sum(1 for o in outcomes if o.ok and isinstance(o.action, SetMax)
                                 and o.action.trigger not in ("manual", "reapply")),
        "refusals": inc.refusals + sum(1 for o in outcomes if isinstance(o.action, Refuse)
                                       and refusals.counted(o.action) and o.action.trigger != "manual"),
        "rate": max([inc.rate] + [o.action.rate for o in outcomes if o.ok and isinstance(o.action, SetMax)]),
        "attack": inc.attack or _attack_of(outcomes),
    }
    if sample is not None:
        worst = sample.worst
        upd["drops"] = inc.drops + _new_drops(h, sample)
        upd["early_drops"] = inc.early_drops + _new_early(h, sample)
        upd["peak_fill"] = max(inc.peak_fill, sample.worst_fill)
        count = worst.count if worst else 0
        upd["peak_count"] = max(inc.peak_count, count)
        if count > inc.peak_count or not inc.peak_max:
            # The max read with this count (before this turn's bump): the max in force at the peak.
            upd["peak_max"] = sample.limits.max
        upd["max_now"] = max([sample.limits.max] + [o.read_back or 0 for o in outcomes
                                                    if o.ok and isinstance(o.action, SetMax)])
    if active:
        upd["last_active"] = now
    if not inc.first_bundle_count and sample is not None and sample.worst is not None and any(
            o.ok and isinstance(o.action, Capture) for o in outcomes):
        upd["first_bundle_count"] = max(1, sample.worst.count)
    inc = _replace(inc, upd)
    if not active and _calm_for(inc, now) >= policy.thresholds.calm:
        changes["incident"] = None
        changes["last_incident"] = _replace(inc, {"ended": now})
    else:
        changes["incident"] = inc
    return changes


def _attack_of(outcomes: Sequence[Outcome]) -> str:
    """The guard's judgement in this turn's outcomes: why the growth is attack-shaped, or ""."""
    for o in outcomes:
        a = o.action
        if isinstance(a, SetMax) and a.attack:
            return a.attack
        if isinstance(a, Refuse) and a.kind == "guard":
            return a.reason
    return ""


def _replace(inc: Incident, changes: dict) -> Incident:
    return replace(inc, **changes)


def incident_changes(before: History, after: History) -> tuple[Incident | None, Incident | None]:
    """(the incident that started, the incident that ended) between two histories: the hooks for
    the daemon's journal entries and for anything that acts when an incident starts or ends.
    Both can be set in one turn only when one ended and the next began at once (never, as
    advance closes only on a calm turn)."""
    started = after.incident if after.incident is not None and (
        before.incident is None or before.incident.started != after.incident.started) else None
    ended = after.last_incident if after.last_incident is not None and (
        before.last_incident is None or before.last_incident.started != after.last_incident.started) else None
    return started, ended


def note_bundle(history: History, bundle: str) -> History:
    """A capture finished: its bundle belongs to the open incident (or the last one, if it ended meanwhile)."""
    if history.incident is not None:
        return history.with_(incident=_replace(history.incident, {"bundles": history.incident.bundles + (bundle,)}))
    if history.last_incident is not None:
        last = history.last_incident
        return history.with_(last_incident=_replace(last, {"bundles": last.bundles + (bundle,)}))
    return history


def advance(history: History, sample: Sample | None, events: Sequence[TableFull], outcomes: Sequence[Outcome],
            now: Instant, policy: Policy) -> History:
    """Fold one turn (a sample, kernel events, and what acting did) into the history."""
    h = history
    bumps = list(h.bumps)
    changes: dict = _incident_turn(h, sample, events, outcomes, now, policy)
    for o in outcomes:
        a = o.action
        if isinstance(a, SetMax):
            bumps.append(BumpRecord(now, a.old, o.read_back if o.ok and o.read_back else a.new, a.trigger, o.ok))
            if o.ok and a.new < a.old:
                changes["unpersisted_max"] = None   # an operator's lowering: nothing higher is pending
            elif o.ok and a.trigger != "reapply":
                changes["unpersisted_max"] = max(o.read_back or a.new, h.unpersisted_max or 0)
                changes["bumps_total"] = changes.get("bumps_total", h.bumps_total) + 1
        elif isinstance(a, SetBuckets) and not o.pending:
            changes["buckets_failed"] = None if o.ok else now
        elif isinstance(a, Persist) and o.ok:
            changes["persisted_max"] = a.max
            changes["persisted_buckets"] = a.buckets
            changes["unpersisted_max"] = None
            changes["sizing_peak"] = 0
            changes["persisted_at"] = now
        elif isinstance(a, Capture) and o.ok:
            changes["last_capture"] = now
        elif isinstance(a, Warn) and a.kind == "pressure":
            changes["last_warn"] = now
        elif isinstance(a, Refuse) and refusals.counted(a):
            counts = dict(changes.get("refusals", h.refusals))
            counts[a.kind] = counts.get(a.kind, 0) + 1
            changes["refusals"] = tuple(sorted(counts.items()))
            if a.trigger != "manual":   # an operator's command is its own refusal, never a repeat
                changes["last_refusal"] = RefusalMark(now.boot, a.kind, a.current)
    # Keep what budget, cooldown and `status` need: the last hour and at least the last 20.
    keep = [b for b in bumps if now.since(b.at) < HOUR]
    changes["bumps"] = tuple(bumps[-20:] if len(keep) < 20 else keep)

    changes["relief"] = relief.advance(h.relief, h, sample, outcomes, now, policy)
    live_events = [e for e in events if e.live]
    if live_events:
        changes["last_drop"] = now
        changes["last_packet_drop"] = now
        changes["table_full_events"] = h.table_full_events + len(events) + sum(e.suppressed for e in events)
    elif events:
        changes["table_full_events"] = h.table_full_events + len(events) + sum(e.suppressed for e in events)

    if sample is not None:
        if _new_drops(h, sample) > 0 or (_new_early(h, sample) > 0 and sample.worst_fill >= policy.thresholds.warn):
            changes["last_drop"] = now
        if _new_drops(h, sample) > 0:
            changes["last_packet_drop"] = now
        if h.incident is not None or changes.get("incident") is not None or h.unpersisted_max is not None \
                or changes.get("unpersisted_max") is not None:
            # Peaks during an incident and after it, until the raised max is persisted: what persists is sized on.
            # An incident the guard judged attack-shaped adds nothing: the peak goes back to what it
            # was before that incident (issue 22: a flood's peak must not become the next boot's size).
            inc = changes.get("incident", h.incident)
            if inc is not None and inc.attack:
                changes["sizing_peak"] = min(inc.sizing_base, h.sizing_peak if "sizing_peak" not in changes else 0)
            else:
                peak = max(h.sizing_peak if "sizing_peak" not in changes else 0, sample.worst.count if sample.worst else 0)
                changes["sizing_peak"] = peak
        changes["drops"] = tuple((ns.inode, ns.drops) for ns in sample.namespaces)
        changes["early"] = tuple((ns.inode, ns.stat("early_drop")) for ns in sample.namespaces)
        changes["lost"] = tuple((ns.inode, flows_lost(ns)) for ns in sample.namespaces)
        changes["invalid"] = tuple((ns.inode, ns.stat("invalid")) for ns in sample.namespaces)
        changes["invalid_base"] = _invalid_base(h, sample, policy)
        changes["counters_at"] = sample.at.boot
        changes["watched"] = _watched(h, sample)
        point = (sample.at.boot, tuple((ns.inode, demand(ns)) for ns in sample.namespaces))
        changes["points"] = _keep_points(h.points, sample.at.boot) + (point,)
        if sample.worst_fill >= policy.thresholds.warn:
            if h.pressure_since is None:
                changes["pressure_since"] = now
        else:
            changes["pressure_since"] = None
            changes["last_warn"] = None
    return h.with_(**changes)


def _invalid_base(h: History, sample: Sample, policy: Policy) -> tuple[tuple[int, float, float], ...]:
    """Each namespace's calm `invalid` rate (an exponential average over samples below `warn`
    without drops): what the guard compares a climbing `invalid` with."""
    if h.counters_at is None or sample.at.boot <= h.counters_at:
        return h.invalid_base
    dt = sample.at.boot - h.counters_at
    before, drops = dict(h.invalid), dict(h.drops)
    base = {i: (r, secs) for i, r, secs in h.invalid_base}
    for ns in sample.namespaces:
        if ns.inode not in before:
            continue
        calm = sample.fill(ns) < policy.thresholds.warn and ns.drops == drops.get(ns.inode, ns.drops)
        if not calm:
            continue
        rate = max(0, ns.stat("invalid") - before[ns.inode]) / dt
        r, secs = base.get(ns.inode, (rate, 0.0))
        weight = min(1.0, max(INVALID_BASE_WEIGHT, dt / 60.0))
        base[ns.inode] = (r + weight * (rate - r) if secs else rate, secs + dt)
    live = {ns.inode for ns in sample.namespaces}
    return tuple((i, r, secs) for i, (r, secs) in sorted(base.items()) if i in live)


def _keep_points(points, now: float) -> tuple:
    """The last RATE_WINDOW seconds whole, and one point a second back to GC_WINDOW (the highest
    demand of each second stands for it: current_rate only needs the highs)."""
    recent = tuple(p for p in points if now - p[0] <= RATE_WINDOW)
    older: dict[int, tuple] = {}
    for p in points:
        age = now - p[0]
        if RATE_WINDOW < age <= GC_WINDOW:
            sec = int(p[0])
            kept = older.get(sec)
            if kept is None:
                older[sec] = p
            else:   # merge: per inode, the higher demand
                merged = dict(kept[1])
                for inode, d in p[1]:
                    merged[inode] = max(d, merged.get(inode, d))
                older[sec] = (kept[0], tuple(merged.items()))
    return tuple(older[k] for k in sorted(older)) + recent


def _summary(sample: Sample, fill: float, rate: float, actions: list[Action]) -> str:
    worst = sample.worst
    where = worst.name if worst else "-"
    head = f"worst {where} {fill:.0%} of max {sample.limits.max}"
    if rate > 1:
        head += f", +{rate:.0f}/s"
    for a in actions:
        if isinstance(a, SetMax):
            return f"{head}; bump {a.old} -> {a.new} ({a.trigger})"
        if isinstance(a, Refuse) and a.kind != "cooldown":
            return f"{head}; bump refused: {a.kind}"
    return head
