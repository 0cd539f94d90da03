"""PURE decision core: (policy, sample, history, now, kernel events) -> Decision.

No I/O, no clock: everything it knows arrives as arguments, so every branch is a row in a
table-driven test. `advance` folds a decision and what carrying it out did back into the
history, also purely.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ctguard.model import (
    Action, BumpRecord, Capture, Decision, History, Instant, KernelLimits, Outcome, Persist,
    Refuse, Sample, SetBuckets, SetMax, TableFull, Trigger, Warn,
)
from ctguard.policy import Policy

STEP = 1024                 # nf_conntrack_max moves in whole multiples of this
RATE_WINDOW = 3.0           # seconds of samples kept to estimate growth
HOUR = 3600.0
REWARN_AFTER = HOUR         # a pressure episode that lasts is warned about again every hour
MIN_CAPTURE_GAP = 5.0       # even with cooldown = 0, do not capture more often than this
BUCKETS_RETRY = 300.0       # a hashsize write that failed (read-only /sys) is retried this rarely, or with a bump
HASH_HEAD_BYTES = 8         # one hlist_nulls_head per bucket
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
IDLE_GUARD_RATE = 25_000.0  # new flows/s a small table must be sampled fast enough to catch


def round_up(value: float, step: int = STEP) -> int:
    return int(math.ceil(value / step)) * step


def memory_cap(policy: Policy, limits: KernelLimits, default_object_size: int = 320) -> int:
    """Largest max whose entries (and their share of buckets) fit in memory_fraction of MemTotal.

    When /proc/slabinfo cannot be read, 320 bytes per entry is assumed: larger than the
    nf_conntrack object on every 64-bit kernel we know of, so the cap errs low.
    """
    obj = limits.slab_object_size or default_object_size
    per_entry = obj + (HASH_HEAD_BYTES / policy.buckets.ratio if policy.buckets.manage else 0)
    return int(policy.bump.memory_fraction * limits.mem_total / per_entry)


def upper_bound(policy: Policy, limits: KernelLimits) -> tuple[int, str]:
    """The highest max ctguard may ever set, and what binds it ("ceiling" or "memory")."""
    mem = memory_cap(policy, limits)
    if mem < policy.bump.ceiling:
        return mem, "memory"
    return policy.bump.ceiling, "ceiling"


def wanted_max(policy: Policy, old: int, count: int, rate: float) -> int:
    """old x factor rounded up to 1024, and large enough that the current growth does not
    bring the table back to `act` before the cooldown lets ctguard bump again."""
    want = round_up(old * policy.bump.factor)
    if rate > 0:
        after_cooldown = count + rate * max(policy.bump.cooldown, 1.0)
        want = max(want, round_up(after_cooldown / policy.thresholds.act))
    return want


def buckets_for(policy: Policy, max_value: int) -> int:
    return int(math.ceil(max_value / policy.buckets.ratio))


def demand(ns) -> int:
    """What the table was asked to hold: its count plus the new flows the kernel refused (drop)
    or made room for by evicting another (early_drop). Grows with the flood even at a full table."""
    return ns.count + ns.stat("drop") + ns.stat("early_drop")


def current_rate(history: History, sample: Sample, inode: int) -> tuple[float, float]:
    """(slope since the previous sample, that sample's age in seconds); (0, inf) without one.
    Used to size a bump once one is due, not to decide that one is."""
    now = sample.at.boot
    current = next((demand(ns) for ns in sample.namespaces if ns.inode == inode), None)
    for t, counts in reversed(history.points):
        before = dict(counts).get(inode)
        if current is not None and before is not None and now - t > 0.0:
            return (current - before) / (now - t), now - t
    return 0.0, math.inf


def growth_rate(history: History, sample: Sample, inode: int) -> float:
    """Entries per second in namespace `inode`.

    The smaller of two slopes: over the whole RATE_WINDOW (steady, but it remembers a burst
    for seconds after it stopped) and since the previous sample (current, but noisy). A
    steady ramp shows in both; a burst that has stopped shows in only one, and must not keep
    projecting growth that is no longer there.
    """
    now = sample.at.boot
    current = next((demand(ns) for ns in sample.namespaces if ns.inode == inode), None)
    if current is None:
        return 0.0
    slopes = []
    usable = [(t, dict(counts).get(inode)) for t, counts in history.points if 0.0 < now - t <= RATE_WINDOW]
    usable = [(t, c) for t, c in usable if c is not None]
    if not usable:
        return 0.0
    for t, before in (usable[0], usable[-1]):
        slopes.append((current - before) / (now - t))
    return min(slopes)


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


def _trigger(policy: Policy, sample: Sample, history: History, events: Sequence[TableFull],
             fill: float, rate: float) -> tuple[Trigger | None, str]:
    t = policy.thresholds
    live = [e for e in events if not e.backlog]
    if live:
        where = f" in netns {live[0].netns}" if live[0].netns else ""
        return "table-full", f"the kernel reported the table full{where}"
    if fill >= t.act:
        return "fill", f"fill {fill:.1%} reached thresholds.act {t.act:.0%}"
    new_drops = _new_drops(history, sample) if fill >= t.warn else 0
    if new_drops > 0:
        return "drops", f"the kernel counted {new_drops} new drops at fill {fill:.1%}"
    if t.horizon > 0 and rate > 0:
        seconds_left = (sample.limits.max - (sample.worst.count if sample.worst else 0)) / rate
        if seconds_left <= t.horizon:
            return "growth", f"growing {rate:.0f}/s, full in {seconds_left:.1f} s (horizon {t.horizon:g} s)"
    return None, ""


def decide(policy: Policy, sample: Sample, history: History, now: Instant,
           events: Sequence[TableFull] = ()) -> Decision:
    worst = sample.worst
    worst_inode = worst.inode if worst else None
    fill = sample.worst_fill
    rate = growth_rate(history, sample, worst_inode) if worst_inode is not None else 0.0
    # A table-full line names its namespace; trust it over the sample for which one is worst.
    event_ns = next((e.netns for e in events if not e.backlog and e.netns), None)
    netns = event_ns or worst_inode
    actions: list[Action] = []
    limits = sample.limits
    pressure = fill >= policy.thresholds.warn

    trigger, why = _trigger(policy, sample, history, events, fill, rate)
    now_rate, ref_age = current_rate(history, sample, worst_inode) if worst_inode is not None else (0.0, math.inf)
    confirm = (trigger in ("growth", "fill") and rate > 0 and worst is not None and worst.count < limits.max
               and ref_age > STALE_AFTER * policy.watch.fast_interval)
    if confirm:
        trigger = None      # no loss yet: one more sample, CONFIRM_AFTER from now, sizes the bump
    bumped_to: int | None = None
    needs_shape: int | None = None
    if trigger is not None:
        attack = attack_shape(policy, sample, history, netns)
        action = _bump_or_refuse(policy, limits, history, now, trigger, why, netns, fill,
                                 worst.count if worst else 0, max(rate, now_rate), attack)
        actions.append(action)
        if isinstance(action, SetMax):
            bumped_to = action.new
            looked = sample.shape is not None and sample.shape.netns == netns
            if (policy.guard.enabled and attack is None and not looked and netns is not None
                    and action.new > policy.guard.ceiling):
                # Only growth past the guard's ceiling needs the table's shape: below it, bump
                # at once; past it, the caller looks (bounded) and asks again.
                needs_shape = netns
        elif action.kind not in ("cooldown",) and _capture_due(policy, history, now):
            actions.append(Capture(reason=f"refused-{action.kind}", netns=netns))

    for e in events:
        if not e.backlog:
            actions.append(Warn("table-full", e.netns, fill, "the kernel reported: table full, dropping packet"))
            break

    actions.extend(_buckets_action(policy, limits, history, now, bumped_to))
    if bumped_to is not None:
        if _capture_due(policy, history, now):
            actions.append(Capture(reason="bump", netns=netns))
        if policy.persist.mode == "immediate":
            actions.append(Persist(bumped_to, buckets_for(policy, bumped_to) if policy.buckets.manage else None,
                                   "persist.mode is immediate"))
    if pressure:
        actions.extend(_pressure_actions(policy, history, now, worst_inode, fill,
                                         may_capture=not any(isinstance(a, Capture) for a in actions)))
    if bumped_to is None:
        actions.extend(_stable_persist(policy, limits, history, now))

    summary = _summary(sample, fill, rate, actions)
    left = limits.max - (worst.count if worst else 0)
    to_full = left / rate if rate > 0 else math.inf
    headroom = int(policy.thresholds.act * limits.max) - (worst.count if worst else 0)
    return Decision(tuple(actions), netns, fill, rate, pressure, summary, to_full, headroom, confirm, needs_shape)


def _buckets_action(policy: Policy, limits: KernelLimits, history: History, now: Instant,
                    bumped_to: int | None) -> list[Action]:
    """Buckets kept at max/ratio; a failed resize is retried with the next bump or after a while."""
    if not policy.buckets.manage:
        return []
    if bumped_to is None and history.buckets_failed is not None and now.since(history.buckets_failed) < BUCKETS_RETRY:
        return []
    target_max = bumped_to or limits.max
    want = buckets_for(policy, target_max)
    if limits.buckets >= want:
        return []
    return [SetBuckets(limits.buckets, want, f"keep max/buckets <= {policy.buckets.ratio} for max {target_max}")]


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


def _stable_persist(policy: Policy, limits: KernelLimits, history: History, now: Instant) -> list[Action]:
    """persist.mode = "stable": write the raised max once no drop was seen for stable_for."""
    if (policy.persist.mode != "stable" or history.unpersisted_max is None
            or history.unpersisted_max <= (history.persisted_max or 0)):
        return []
    quiet_since = [x for x in (history.last_drop, _last_ok_bump_at(history)) if x is not None]
    if min((now.since(x) for x in quiet_since), default=math.inf) < policy.persist.stable_for:
        return []
    value = max(history.unpersisted_max, limits.max)
    return [Persist(value, buckets_for(policy, value) if policy.buckets.manage else None,
                    f"no drop for {policy.persist.stable_for:g} s since the last bump")]


def next_interval(policy: Policy, decision: Decision) -> float:
    """Sample fast above `warn`, and also while growth would fill the table within a few
    horizons: a steep ramp must be seen again before it crosses `act`, not a second later."""
    watch_window = max(policy.thresholds.horizon, policy.watch.interval) * 3
    if decision.confirm:
        return min(CONFIRM_AFTER, policy.watch.fast_interval)
    if decision.pressure or decision.seconds_to_full <= watch_window:
        return policy.watch.fast_interval
    if decision.headroom is not None:
        guard = max(policy.watch.fast_interval, decision.headroom / IDLE_GUARD_RATE)
        return min(policy.watch.interval, guard)
    return policy.watch.interval


def _last_ok_bump_at(history: History) -> Instant | None:
    ok = [b for b in history.bumps if b.ok]
    return ok[-1].at if ok else None


def attack_shape(policy: Policy, sample: Sample, history: History, inode: int | None) -> str | None:
    """Why the growth in namespace `inode` looks like an attack, or None.

    Two signs, either enough: the kernel's `invalid` counter climbs at least as fast as its
    drops (garbage traffic, not new work), or a look into the table (`sample.shape`) finds
    most entries never answered or half-open, from many sources (a spoofed SYN or UDP flood;
    a burst from a few busy clients has few sources and passes).
    """
    g = policy.guard
    if not g.enabled or inode is None:
        return None
    ns = next((n for n in sample.namespaces if n.inode == inode), None)
    if ns is not None:
        drops_before = dict(history.drops).get(inode)
        invalid_before = dict(history.invalid).get(inode)
        if drops_before is not None and invalid_before is not None:
            new_drops = ns.drops - drops_before
            new_invalid = ns.stat("invalid") - invalid_before
            if new_drops > 0 and new_invalid >= new_drops:
                return f"`invalid` climbs with the drops (+{new_invalid} invalid, +{new_drops} dropped)"
    shape = sample.shape
    if (shape is not None and not shape.error and shape.netns == inode and shape.seen
            and shape.share >= g.suspicious_share and shape.sources >= g.min_sources):
        return (f"{shape.share:.0%} of {shape.seen} sampled entries unanswered or half-open, "
                f"from {shape.sources} or more sources")
    return None


def _capture_due(policy: Policy, history: History, now: Instant) -> bool:
    gap = max(policy.bump.cooldown, MIN_CAPTURE_GAP)
    return history.last_capture is None or now.since(history.last_capture) >= gap


def _bump_or_refuse(policy: Policy, limits: KernelLimits, history: History, now: Instant,
                    trigger: Trigger, why: str, netns: int | None, fill: float, count: int,
                    rate: float, attack: str | None = None) -> SetMax | Refuse:
    old = limits.max
    want = wanted_max(policy, old, count, rate)
    last = _last_attempt(history)
    if last is not None and now.since(last.at) < policy.bump.cooldown:
        wait = policy.bump.cooldown - now.since(last.at)
        return Refuse(want, old, "cooldown", trigger, netns, fill, f"{why}; cooldown: next bump allowed in {wait:.0f} s")
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
    return SetMax(old, new, trigger, netns, fill, f"{why}; {old} -> {new}{note}", clipped)


def decide_manual(policy: Policy, limits: KernelLimits, to: int, lower: bool = False,
                  worst: tuple[int | None, int] = (None, 0), who: str = "operator") -> Decision:
    """`ctguard bump --to N [--lower]`: the operator's change, held to the same bounds (no budget).

    A raise is persisted by `persist.mode` like an automatic bump (immediate: now; stable: once
    quiet for stable_for, by the daemon; never: not). A lowering (`lower`, an undo of a bump) is
    refused below what the table holds now (the worst namespace's count / thresholds.act: it
    would be at `act` at once) and persisted at once unless persist.mode is never, so the next
    boot does not bring back the value it undid; live buckets are never shrunk.
    `worst` is (namespace inode, entries) of the fullest namespace.
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
                buckets = max(limits.buckets, buckets_for(policy, to)) if policy.buckets.manage else None
                actions.append(Persist(to, buckets, f"operator lowered max to {to}"))
    elif to > upper:
        actions.append(Refuse(to, limits.max, binding, "manual", netns, fill,  # type: ignore[arg-type]
                              f"{who} asked for {to}, above the {binding} {upper}"))
    else:
        actions.append(SetMax(limits.max, to, "manual", netns, fill, f"{who} asked for {to}"))
        if policy.buckets.manage and limits.buckets < buckets_for(policy, to):
            actions.append(SetBuckets(limits.buckets, buckets_for(policy, to), f"keep max/buckets <= {policy.buckets.ratio}"))
        if policy.persist.mode == "immediate":
            actions.append(Persist(to, buckets_for(policy, to) if policy.buckets.manage else None, "operator's bump"))
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
            if policy.buckets.manage and limits.buckets < buckets_for(policy, target):
                actions.append(SetBuckets(limits.buckets, buckets_for(policy, target), "with the persisted max"))
    return Decision(tuple(actions), None, 0.0, 0.0, False, "start")


def advance(history: History, sample: Sample | None, events: Sequence[TableFull], outcomes: Sequence[Outcome],
            now: Instant, policy: Policy) -> History:
    """Fold one turn (a sample, kernel events, and what acting did) into the history."""
    h = history
    bumps = list(h.bumps)
    changes: dict = {}
    for o in outcomes:
        a = o.action
        if isinstance(a, SetMax):
            bumps.append(BumpRecord(now, a.old, o.read_back if o.ok and o.read_back else a.new, a.trigger, o.ok))
            if o.ok and a.new < a.old:
                changes["unpersisted_max"] = None   # an operator's lowering: nothing higher is pending
            elif o.ok and a.trigger != "reapply":
                changes["unpersisted_max"] = max(o.read_back or a.new, h.unpersisted_max or 0)
                changes["bumps_total"] = changes.get("bumps_total", h.bumps_total) + 1
        elif isinstance(a, SetBuckets):
            changes["buckets_failed"] = None if o.ok else now
        elif isinstance(a, Persist) and o.ok:
            changes["persisted_max"] = a.max
            changes["persisted_buckets"] = a.buckets
            changes["unpersisted_max"] = None
        elif isinstance(a, Capture) and o.ok:
            changes["last_capture"] = now
        elif isinstance(a, Warn) and a.kind == "pressure":
            changes["last_warn"] = now
    # Keep what budget, cooldown and `status` need: the last hour and at least the last 20.
    keep = [b for b in bumps if now.since(b.at) < HOUR]
    changes["bumps"] = tuple(bumps[-20:] if len(keep) < 20 else keep)

    live_events = [e for e in events if not e.backlog]
    if live_events:
        changes["last_drop"] = now
        changes["table_full_events"] = h.table_full_events + len(events) + sum(e.suppressed for e in events)
    elif events:
        changes["table_full_events"] = h.table_full_events + len(events) + sum(e.suppressed for e in events)

    if sample is not None:
        if _new_drops(h, sample) > 0:
            changes["last_drop"] = now
        changes["drops"] = tuple((ns.inode, ns.drops) for ns in sample.namespaces)
        changes["invalid"] = tuple((ns.inode, ns.stat("invalid")) for ns in sample.namespaces)
        point = (sample.at.boot, tuple((ns.inode, demand(ns)) for ns in sample.namespaces))
        changes["points"] = tuple(p for p in h.points if sample.at.boot - p[0] <= RATE_WINDOW) + (point,)
        if sample.worst_fill >= policy.thresholds.warn:
            if h.pressure_since is None:
                changes["pressure_since"] = now
        else:
            changes["pressure_since"] = None
            changes["last_warn"] = None
    return h.with_(**changes)


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
