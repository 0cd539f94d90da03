"""`ctguard status` for people and for programs: plain text, a terminal with colour and
sparklines, and JSON, all of one StatusView (ctguard.control.status)."""

from __future__ import annotations

import json
import time

from ctguard.control.status import CRITICAL, OK, UNKNOWN, WARNING, StatusView
from ctguard.core.incident import peak_text
from ctguard.core.spark import spark
from ctguard.core.timeouts import sysctl_name


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
                     + (f" - {'; '.join(r['seen'])}" if r["seen"] else ""))
    for t in d["raised_timeouts"]:
        held = f", holding about {t['entries']} entries" if t.get("entries") is not None else ""
        lines.append(f"raised timeout: {t['name']} = {t['value']} s (default {t['default']} s){held}")
    for r in d.get("relief", []):
        left = ("steps back up once the namespace stays below [relief] low" if r["seconds_left"] is None
                else f"next step up in {r['seconds_left']:.0f} s if it stays calm (and the fill predicted there "
                     "stays below [relief] low)")
        level = f" at level {r['level']}/{r['steps']}" if r.get("steps") else ""
        lines.append(f"relief: netns {r['name']}: {sysctl_name(r['key'])} {r['value']} s "
                     f"(was {r['original']} s){level}, {left}")
    persisted = d["persisted_max"]
    pb = d.get("persisted_buckets")
    lines.append(f"persisted: {'max ' + str(persisted) if persisted is not None else 'nothing'}"
                 f"{f', buckets {pb}' if pb is not None else ''} in {d['persisted_file']} (persist.mode {d['persist_mode']})")
    sp = d.get("sizing_peaks")
    if sp is not None:
        left = (f"; {sp['attack_minutes_left_out']} attack-shaped minute(s) left out"
                if sp["attack_minutes_left_out"] else "")
        lines.append(f"sizing peaks: p99 {sp['p99']} (highest {sp['highest']}) of "
                     f"{sp['minutes'] - sp['attack_minutes_left_out']} minute(s) of legitimate load{left}; "
                     f"peak since the last persist {sp['since_persist']}")
    if d.get("namespaces_fillable_at_once") is not None:
        lines.append(f"memory: {d['namespaces_fillable_at_once']} namespace(s) could fill to max {d['max']} at once "
                     "within [bump] memory_fraction (the max applies to each namespace separately)")
    for why in d.get("cannot", []):
        lines.append(f"ctguard cannot change {why}")
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
            peaks = peak_text(inc["peak_fill"], inc["peak_count"], inc.get("peak_max") or 0)
            lines.append(f"{label}: {inc['id']} from {stamp} in {inc['name'] or inc['netns']}: {peaks}, "
                         f"{inc['drops']} drops, {inc['early_drops']} early drops, "
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
        out.append(spark(f))
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
