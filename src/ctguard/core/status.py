"""`ctguard status`: the live view and its monitoring-plugin exit code.

Built from a fresh sample (the same adapters the daemon uses) and the daemon's state on
disk, so it answers even when the daemon is down, and says so.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from ctguard.core import incident as incident_text
from ctguard.boot import persist
from ctguard.core.decide import budget_left as budget_left_of, persist_advice, persist_due_in, upper_bound
from ctguard.core.model import History, Instant, Sample
from ctguard.config.policy import Policy, sysctl_name
from ctguard.core import relief

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
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
    recent_drop = history.last_drop is not None and now.since(history.last_drop) < RECENT_DROPS
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
        problems.append((CRITICAL, f"table full {now.since(history.last_drop):.0f} s ago"))  # type: ignore[arg-type]
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
        "host_role": None if role is None else {"role": role.role, "roles": list(role.roles),
                                                 "evidence": list(role.evidence), "unknown": list(role.unknown)},
        "relief": relieved,
        "relief_mode": policy.relief.mode,
        "raised_timeouts": [{"name": t.name, "value": t.value, "default": t.default, "entries": t.entries}
                            for t in (timeouts or [])],
        "last_bundle": last_bundle,
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


def render_text(view: StatusView) -> str:
    d = view.data
    lines = [view.headline, ""]
    lines.append(f"{'namespace':<32} {'entries':>10} {'fill':>7} {'drops':>10}")
    for n in d["namespaces"]:
        lines.append(f"{n['name'][:32]:<32} {n['count']:>10} {n['fill']:>7.1%} {n['drops']:>10}")
    lines.append("")
    lines.append(f"max {d['max']}  buckets {d['buckets']}  ceiling {d['ceiling']}  "
                 f"headroom {d['headroom']} (bound by {d['upper_bound_by']})")
    lines.append(f"bump budget left this hour: {d['bump_budget_left']}  mode: {d['mode']}")
    if d["host_role"]:
        r = d["host_role"]
        lines.append(f"host: {r['role']}" + (f" (also {', '.join(r['roles'][1:])})" if len(r["roles"]) > 1 else "")
                     + (f" - {'; '.join(r['evidence'])}" if r["evidence"] else ""))
    for t in d["raised_timeouts"]:
        held = f", holding about {t['entries']} entries" if t["entries"] is not None else ""
        lines.append(f"raised timeout: {t['name']} = {t['value']} s (default {t['default']} s){held}")
    for r in d.get("relief", []):
        left = ("restored after calm_for once the namespace is calm" if r["seconds_left"] is None
                else f"restored in {r['seconds_left']:.0f} s if it stays calm")
        lines.append(f"relief: netns {r['name']}: {sysctl_name(r['key'])} {r['value']} s "
                     f"(was {r['original']} s), {left}")
    persisted = d["persisted_max"]
    pb = d.get("persisted_buckets")
    lines.append(f"persisted: {'max ' + str(persisted) if persisted is not None else 'nothing'}"
                 f"{f', buckets {pb}' if pb is not None else ''} in {d['persisted_file']} (persist.mode {d['persist_mode']})")
    pend = d.get("pending_persist")
    if pend:
        when = "now" if pend["in_seconds"] <= 0 else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(pend["at"]))
        lines.append(f"pending persist: max {pend['max']}"
                     f"{', buckets ' + str(pend['buckets']) if pend['buckets'] else ''} at {when}"
                     f" (if no drop until then; sized {pend['sizing']})")
    for key, label in (("incident", "open incident"), ("last_incident", "last incident")):
        inc = d.get(key)
        if inc:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(inc["started"]))
            lines.append(f"{label}: {inc['id']} from {stamp} in {inc['name'] or inc['netns']}: peak fill "
                         f"{inc['peak_fill']:.1%}, {inc['drops']} drops, {inc['early_drops']} early drops, "
                         f"{inc['bumps']} bump(s)" + (f", bundles {', '.join(inc['bundles'])}" if inc["bundles"] else ""))
    daemon = d.get("daemon")
    if daemon:
        lines.append(f"daemon: pid {daemon['pid']}, policy {daemon['policy_source']} ({daemon['note']})")
        if daemon.get("reload_rejected"):
            lines.append(f"policy: {daemon['reload_rejected']}")
    elif "daemon" in d:
        lines.append("daemon: none answering; read directly from the kernel and the state on disk")
    last = d.get("last_bundle")
    if last:
        top = last.get("top_finding")
        lines.append(f"last bundle: {last['id']}" + (f" - {top['severity']} {top['id']}: {top['summary']}" if top
                                                      else " - no finding"))
    lines.extend((d.get("boot") or {}).get("lines", []))
    if d["last_bumps"]:
        lines.append("last bumps:")
        for b in d["last_bumps"]:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b["at"]))
            lines.append(f"  {stamp}  {b['old']} -> {b['new']}  ({b['trigger']}{'' if b['ok'] else ', FAILED'})")
    return "\n".join(lines)


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


SPARKS = "▁▂▃▄▅▆▇█"
_COLOURS = {OK: "32", WARNING: "33", CRITICAL: "31", UNKNOWN: "35"}


def bar(fill: float, width: int = 20) -> str:
    filled = min(width, round(fill * width))
    return "█" * filled + "░" * (width - filled)


def sparkline(points: list[tuple[int, float]], now_minute: int, minutes: int = 60) -> str:
    """One character per minute of the last hour; blank where nothing was recorded."""
    by_minute = dict(points)
    out = []
    for m in range(now_minute - (minutes - 1) * 60, now_minute + 1, 60):
        f = by_minute.get(m)
        out.append(" " if f is None else SPARKS[min(len(SPARKS) - 1, int(f * len(SPARKS)))])
    return "".join(out)


def render_tty(view: StatusView, hour: dict[int, list[tuple[int, float]]], now_wall: float,
               warn: float, act: float) -> str:
    """For a terminal: colour, a fill bar per namespace and a sparkline of its last hour."""
    d = view.data

    def colour(code: int, text: str) -> str:
        return f"\x1b[{_COLOURS[code]}m{text}\x1b[0m"

    now_minute = int(now_wall // 60) * 60
    lines = [colour(view.code, view.headline), ""]
    lines.append(f"{'namespace':<28} {'entries':>9}  {'fill':<27} last hour (per-minute peak fill)")
    for n in d["namespaces"]:
        code = CRITICAL if n["fill"] >= act else WARNING if n["fill"] >= warn else OK
        spark = sparkline(hour.get(n["inode"], []), now_minute)
        lines.append(f"{n['name'][:28]:<28} {n['count']:>9}  {colour(code, bar(n['fill']))} {n['fill']:>5.1%}  {spark}")
    rest = render_text(view).split("\n")
    tail_start = next(i for i, line in enumerate(rest) if line.startswith("max "))
    return "\n".join(lines + [""] + rest[tail_start:])


def render_json(view: StatusView) -> str:
    return json.dumps(view.data, indent=2, sort_keys=True)
