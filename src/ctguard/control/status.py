"""`ctguard status`: the live view (a StatusView) and its monitoring-plugin exit code.

The renderers are the command line's (ctguard.cli.status).

Built from a fresh sample (the same adapters the daemon uses) and the daemon's state on
disk, so it answers even when the daemon is down, and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctguard.core import incident as incident_text
from ctguard.boot import persist
from ctguard.core.decide import budget_left as budget_left_of, namespaces_at_once, persist_advice, persist_due_in, \
    upper_bound
from ctguard.core.model import History, Instant, Sample
from ctguard.core import relief
from ctguard.config.policy import Policy

from ctguard.core.exitcodes import CRITICAL, OK, UNKNOWN, WARNING

LABELS = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
RECENT_DROPS = 300.0    # a drop seen this recently keeps the status CRITICAL
RECENT_BUMP = 3600.0    # an automatic (emergency) bump this recent keeps the status WARNING, naming it


@dataclass(frozen=True)
class StatusView:
    code: int
    headline: str
    data: dict


def build(policy: Policy, sample: Sample, history: History, now: Instant, role=None,
          timeouts: list | None = None, last_bundle: dict | None = None, boot=None) -> StatusView:
    lim = sample.limits
    upper, binding = upper_bound(policy, lim)
    namespaces = sorted(sample.namespaces, key=lambda n: n.count, reverse=True)
    budget_left = budget_left_of(policy, history, now)
    fill = sample.worst_fill
    worst = sample.worst
    recent_drop = history.last_packet_drop is not None and now.since(history.last_packet_drop) < RECENT_DROPS
    # Entries evicted to make room (early_drop at warn) with no packet dropped: the table was at its
    # max, the flows evicted were unanswered ones; said as such, not as "table full" (issue 24).
    recent_evict = (not recent_drop and history.last_drop is not None
                    and now.since(history.last_drop) < RECENT_DROPS)
    persisted = persist.read_persisted_max(policy.persist.sysctl_file)
    persisted_buckets = persist.read_persisted_buckets(policy.persist.sysctl_file, policy.persist.modprobe_file)
    due = persist_due_in(policy, history, now)
    pending = None
    if due is not None:
        adv = persist_advice(policy, lim, history, now)
        pending = {"in_seconds": round(due, 1), "at": now.wall + due, "max": adv.max, "buckets": adv.buckets,
                   "sizing": adv.text()}

    problems: list[tuple[int, str]] = []
    if fill >= policy.thresholds.act:
        problems.append((CRITICAL, f"fill {fill:.0%} at or above act {policy.thresholds.act:.0%}"))
    elif fill >= policy.thresholds.warn:
        problems.append((WARNING, f"fill {fill:.0%} above warn {policy.thresholds.warn:.0%}"))
    if recent_drop:
        problems.append((CRITICAL, f"table full {now.since(history.last_packet_drop):.0f} s ago"))  # type: ignore[arg-type]
    elif recent_evict:
        problems.append((WARNING, f"table at its max {now.since(history.last_drop):.0f} s ago: the kernel "  # type: ignore[arg-type]
                                  "evicted unanswered entries to make room (early_drop), no packet dropped"))
    if lim.max >= upper:
        problems.append((WARNING, f"max {lim.max} is at the {binding} {upper}: no room left to bump"))
    if budget_left == 0:
        problems.append((WARNING, "bump budget for this hour is spent"))
    emergency = [b for b in history.bumps if b.ok and b.trigger not in ("manual", "reapply")
                 and now.since(b.at) < RECENT_BUMP]
    if emergency:
        b = emergency[-1]
        ago = now.since(b.at)
        problems.append((WARNING, f"emergency bump {b.old} -> {b.new} ({b.trigger}) {_ago(ago)} ago"
                                  f"{f', {len(emergency)} in the last hour' if len(emergency) > 1 else ''}"))
    if history.incident is not None:
        inc = history.incident
        problems.append((WARNING, f"incident {inc.id} in {incident_text.where(inc.name, inc.unit, inc.netns)} "
                                  f"open for {_ago(now.since(inc.started))}"))
    relieved = relief.rows(policy, history.relief, now)
    if relieved:
        problems.append((WARNING, f"timeout relief active in {len({r['netns'] for r in relieved})} namespace(s)"))
    for why in lim.cannot:
        problems.append((WARNING, f"ctguard cannot change {why}"))
    if boot is not None:   # a bootreport.BootReport: what the next boot keeps of ctguard's values
        for s in boot.view.shadows:
            problems.append((WARNING, f"{s.file} overrides ctguard's {s.key} at boot ({s.value})"))
    code = max((c for c, _ in problems), default=OK)
    worst_txt = f"{worst.name} {fill:.1%}" if worst else "no namespace"
    reasons = "; ".join(m for _, m in problems)
    headline = f"CTGUARD {LABELS[code]} - worst {worst_txt} of max {lim.max}" + (f" ({reasons})" if reasons else "")

    data = {
        "status": LABELS[code],
        "code": code,
        "problems": [m for _, m in problems],
        "mode": policy.mode,
        "namespaces": [
            {"inode": n.inode, "name": n.name, "count": n.count, "fill": round(sample.fill(n), 6), "drops": n.drops}
            for n in namespaces
        ],
        "max": lim.max,
        "buckets": lim.buckets,
        "ceiling": policy.bump.ceiling,
        "upper_bound": upper,
        "upper_bound_by": binding,
        "headroom": max(0, upper - lim.max),
        "slab_object_size": lim.slab_object_size,
        "mem_total": lim.mem_total,
        "mem_available": lim.mem_available,
        "last_bumps": [
            {"at": b.at.wall, "old": b.old, "new": b.new, "trigger": b.trigger, "ok": b.ok}
            for b in history.bumps[-5:]
        ],
        "bump_budget_left": budget_left,
        "persisted_max": persisted,
        "persisted_buckets": persisted_buckets,
        "persisted_file": str(policy.persist.sysctl_file),
        "persist_mode": policy.persist.mode,
        "pending_persist": pending,
        "incident": incident_text.summary(history.incident) if history.incident else None,
        "last_incident": incident_text.summary(history.last_incident) if history.last_incident else None,
        "table_full_events": history.table_full_events,
        "last_drop": history.last_drop.wall if history.last_drop else None,
        "last_packet_drop": history.last_packet_drop.wall if history.last_packet_drop else None,
        "host_role": None if role is None else role.as_dict(),
        "relief": relieved,
        "relief_mode": policy.relief.mode,
        # The classes relief writes in enforce mode; the others it only advises.
        "relief_enforced": list(policy.relief.enforce) if policy.relief.mode == "enforce" else [],
        "raised_timeouts": [t.as_dict() for t in (timeouts or [])],
        "last_bundle": last_bundle,
        # Which peaks sizing uses (issue 22): legitimate load only.
        "sizing_peaks": {"minutes": history.recorded_minutes, "attack_minutes_left_out": history.recorded_attack_minutes,
                         "p99": history.recorded_p99, "highest": history.recorded_high,
                         "since_persist": history.sizing_peak},
        # nf_conntrack_max applies to each namespace separately: how many could fill at once in memory_fraction.
        "namespaces_fillable_at_once": namespaces_at_once(policy, lim),
        "cannot": list(lim.cannot),
    }
    if boot is not None:
        data["boot"] = boot.as_dict()
        data["boot"]["lines"] = boot.text_lines(policy.buckets.manage)
    return StatusView(code, headline, data)


def with_boot(view: StatusView, boot, policy: Policy) -> StatusView:
    """A view the daemon built, with what the next boot keeps added here (bootreport.BootReport,
    read by the CLI like the host role): a shadowed file is a WARNING."""
    data = dict(view.data)
    data["boot"] = boot.as_dict()
    data["boot"]["lines"] = boot.text_lines(policy.buckets.manage)
    extra = [f"{s.file} overrides ctguard's {s.key} at boot ({s.value})" for s in boot.view.shadows]
    if not extra:
        return StatusView(view.code, view.headline, data)
    code = max(view.code, WARNING) if view.code != UNKNOWN else view.code
    data["problems"] = list(data.get("problems", [])) + extra
    data["status"], data["code"] = LABELS[code], code
    head = view.headline.replace(f"CTGUARD {LABELS[view.code]} ", f"CTGUARD {LABELS[code]} ", 1)
    head = head[:-1] + f"; {'; '.join(extra)})" if head.endswith(")") else head + f" ({'; '.join(extra)})"
    return StatusView(code, head, data)


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
