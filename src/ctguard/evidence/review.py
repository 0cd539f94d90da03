"""`ctguard bundles show`: a bundle read back as verdict, findings, timeline, then the details.

Loading is the only I/O here (`load`); everything else renders the pure diagnosis
(ctguard.core.diagnose) as text for a terminal or a pipe, or as JSON with the same content.
"""

from __future__ import annotations

import json
import os
import stat
import textwrap
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ctguard.core.diagnose import BundleData, Finding, action_name, diagnose, facts, refusal_bound, verdict
from ctguard.core.spark import spark
from ctguard.evidence import bundle as bundle_mod
from ctguard.evidence.bundle import BundleError, bundle_path

TIMELINE = "timeline.json"
MARKS = {"bump": "B", "refusal": "R", "kernel": "K", "capture": "C", "relief": "T"}
MARK_ORDER = "RKBTC"            # which marker wins a column shared by two events
TIMELINE_NAMESPACES = 6         # namespaces drawn; the rest are summed up in one line
DOMINANT_ROW = 0.05             # a top-k list is printed only if its first row holds this share
ROW_SHARE = 0.01                # and then only rows holding at least this share
MAX_TIMELINE_BYTES = 64 << 20


def _read_json(path: Path) -> Any:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{path} is not a regular file")
    if st.st_size > MAX_TIMELINE_BYTES:
        raise BundleError(f"{path} is larger than {MAX_TIMELINE_BYTES} bytes")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        return json.load(fh)


def load(folder: Path | str, bundle_id: str) -> tuple[Path, BundleData]:
    """The bundle's folder and its parsed files; a damaged optional file reads as empty."""
    path = bundle_path(folder, bundle_id)
    try:
        manifest = bundle_mod.load_toml(path / bundle_mod.MANIFEST)
    except FileNotFoundError:
        raise BundleError(f"{path.name} has no manifest: the capture is still running or it crashed") from None
    except tomllib.TOMLDecodeError as exc:
        raise BundleError(f"{path / bundle_mod.MANIFEST} is damaged: {exc}") from None
    try:
        evidence = bundle_mod.load_toml(path / bundle_mod.EVIDENCE)
    except (OSError, BundleError, tomllib.TOMLDecodeError):
        evidence = {}
    timeline: Mapping[str, Any] | None
    try:
        loaded = _read_json(path / TIMELINE)
        timeline = loaded if isinstance(loaded, Mapping) else None
    except (OSError, BundleError, ValueError):
        timeline = None
    try:
        policy = bundle_mod.load_toml(path / "policy.toml")
    except (OSError, BundleError, tomllib.TOMLDecodeError):
        policy = {}
    return path, BundleData(manifest, evidence, timeline, policy)


# --- pieces shared by the text, JSON and HTML views ---------------------------------------------


def fill_points(ns: Mapping[str, Any]) -> list[tuple[float, float, int, int]]:
    """(time, fill against the max in force then, entries, that max) per recorded point."""
    t = ns.get("t", [])
    entries = ns.get("entries", [])
    maxes = ns.get("max", [])
    out = []
    for i, when in enumerate(t):
        if i >= len(entries):
            break
        m = int(maxes[i]) if i < len(maxes) else 0
        out.append((float(when), int(entries[i]) / m if m else 0.0, int(entries[i]), m))
    return out


def busiest(timeline: Mapping[str, Any] | None, n: int = TIMELINE_NAMESPACES) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """The `n` namespaces with the highest peak fill, and the rest."""
    spaces = [ns for ns in (timeline or {}).get("namespaces", []) if ns.get("t")]
    spaces.sort(key=lambda ns: max((p[1] for p in fill_points(ns)), default=0.0), reverse=True)
    return spaces[:n], spaces[n:]


def decision_sentences(decision: Mapping[str, Any] | None) -> list[str]:
    """The decision that led to the capture, in sentences (not a dict)."""
    if not decision:
        return []
    out: list[str] = []
    fill = decision.get("worst_fill")
    if fill is not None:
        where = decision.get("worst_netns")
        rate = float(decision.get("rate", 0) or 0)
        out.append(f"The worst namespace{f' ({where})' if where else ''} was {float(fill):.1%} full"
                   + (f" and growing {rate:,.0f} entries/s." if rate >= 1 else "."))
    for a in decision.get("actions", []) or []:
        if not isinstance(a, Mapping):
            continue
        kind = action_name(a)
        if kind == "SetMax":
            out.append(f"ctguard raised nf_conntrack_max from {int(a.get('old', 0)):,} to {int(a.get('new', 0)):,} "
                       f"(trigger: {a.get('trigger')}) because {a.get('reason')}.")
        elif kind == "Refuse":
            bound = refusal_bound(a)
            out.append(f"ctguard did not raise nf_conntrack_max to {int(a.get('wanted', 0)):,}"
                       + (f" (refused by the {bound})" if bound else "") + f": {a.get('reason')}.")
        elif kind == "SetBuckets":
            out.append(f"It resized the hash buckets from {int(a.get('old', 0)):,} to {int(a.get('new', 0)):,}.")
        elif kind == "Persist":
            out.append(f"It persisted max {int(a.get('max', 0)):,} ({a.get('reason')}).")
        elif kind == "Warn":
            out.append(f"It warned: {a.get('reason')}.")
        elif kind == "Capture":
            out.append(f"It started this capture (reason: {a.get('reason')}).")
        elif kind:
            out.append(f"{kind}: {a.get('reason', '')}".rstrip(": ") + ".")
    if not out and decision.get("summary"):
        out.append(str(decision["summary"]) + ".")
    if not out:
        # A decision of a shape this version does not know: shown as it is, not dropped.
        out = [f"{k} = {v}" for k, v in decision.items()]
    return out


def top_section(title: str, top: Mapping[str, Any], entries: int, what: str = "entries") -> list[str]:
    """A top-k list, or one line when no entry dominates (no noise rows)."""
    rows = list(top.get("rows", []) or [])
    if not rows or not entries:
        return []
    lower = lambda r: int(r.get("count", 0)) - int(r.get("error", 0))  # noqa: E731
    distinct = f"{top.get('tracked')}{'' if top.get('exact', True) else '+'} distinct"
    if lower(rows[0]) < DOMINANT_ROW * entries:
        return [f"{title}: no dominant entry ({distinct}; the largest, {rows[0]['key']}, holds "
                f"{100 * int(rows[0]['count']) / entries:.1f}% or less)"]
    keep = [r for r in rows if lower(r) >= ROW_SHARE * entries]
    qual = "exact counts" if top.get("exact", True) else "approximate: each count may overstate by its ±"
    lines = [f"{title} ({qual}; {distinct}):"]
    width = max(len(str(r["key"])) for r in keep)
    for r in keep:
        err = f" ±{r['error']}" if r.get("error") else ""
        lines.append(f"  {str(r['key']).ljust(width)}  {int(r['count']):>9}{err:<8} "
                     f"{100 * int(r['count']) / entries:>5.1f}% of {what}")
    if len(keep) < len(rows):
        lines.append(f"  ({len(rows) - len(keep)} more below {ROW_SHARE:.0%} each)")
    return lines


def _clock(t: float, tenths: bool = False) -> str:
    out = time.strftime("%H:%M:%S", time.gmtime(t))
    return f"{out}.{int(t * 10) % 10}" if tenths else out


def sparkline(ns: Mapping[str, Any], events: Sequence[Mapping[str, Any]], start: float, end: float,
              width: int = 60) -> tuple[str, str]:
    """(fill sparkline, marker row) over [start, end] in `width` columns (peak fill per column)."""
    span = max(end - start, 1e-9)
    cols: list[float | None] = [None] * width
    for t, fill, _e, _m in fill_points(ns):
        c = min(width - 1, max(0, int((t - start) / span * width)))
        cols[c] = fill if cols[c] is None else max(cols[c], fill)  # type: ignore[type-var]
    line = "".join(spark(f) for f in cols)
    marks = [" "] * width
    inode = ns.get("inode")
    for e in events:
        kind = e.get("kind")
        if kind not in MARKS or (e.get("netns") not in (None, "", inode)):
            continue
        c = min(width - 1, max(0, int((float(e.get("t", start)) - start) / span * width)))
        m = MARKS[kind]
        if marks[c] == " " or MARK_ORDER.index(m) < MARK_ORDER.index(marks[c]):
            marks[c] = m
    return line, "".join(marks)


def timeline_lines(timeline: Mapping[str, Any] | None, manifest: Mapping[str, Any], tty: bool,
                   data: BundleData | None = None) -> list[str]:
    if not timeline or not timeline.get("namespaces"):
        note = manifest.get("timeline_note") or "no timeline in this bundle (taken without a running daemon)"
        return [f"Timeline: {note}"]
    start, end = float(timeline.get("from", 0)), float(timeline.get("to", 0))
    top, rest = busiest(timeline)
    events = [e for e in timeline.get("events", []) if isinstance(e, Mapping)]
    lines = [f"Timeline {_clock(start)} - {_clock(end)} UTC ({(end - start) / 60:.1f} min recorded; "
             "fill against the max in force at each sample)"]
    width = max([len(str(ns.get("name", ""))) for ns in top] + [9])
    captured_inode = (manifest.get("netns", {}) or {}).get("inode") if isinstance(manifest.get("netns"), Mapping) else None
    for ns in top:
        pts = fill_points(ns)
        fullest = max(pts, key=lambda p: p[1])
        largest = max(pts, key=lambda p: p[2])
        head = f"  {str(ns.get('name', ns.get('inode'))):<{width}}"
        tail = f" largest {largest[2]:,} ({largest[1]:.0%} of {largest[3]:,}) at {_clock(largest[0])}"
        if fullest[3] != largest[3]:
            tail += f"; fullest {fullest[1]:.0%} of {fullest[3]:,} at {_clock(fullest[0])}"
        if data is not None and captured_inode == ns.get("inode"):
            big, then = facts(data).largest
            if big > largest[2]:
                # The peak every view states: the dump at capture held more than the last sample.
                tail += f"; {big:,} at capture ({big / then:.0%} of {then:,}, the dump)" if then else ""
        if tty:
            line, marks = sparkline(ns, events, start, end)
            lines.append(f"{head} {line}{tail}")
            if marks.strip():
                lines.append(f"  {'':<{width}} {marks}")
        else:
            # Plain text: a few points spread over the window, each with its fill then.
            step = max(1, len(pts) // 8)
            shown = pts[::step] + ([pts[-1]] if (len(pts) - 1) % step else [])
            lines.append(head + tail)
            fine = any(b[0] - a[0] < 1.0 for a, b in zip(shown, shown[1:]))
            lines.append(f"  {'':<{width}} " + ", ".join(f"{_clock(t, fine)} {e:,} ({f:.0%})" for t, f, e, _m in shown))
    if rest:
        peak_rest = max(max((p[1] for p in fill_points(ns)), default=0.0) for ns in rest)
        lines.append(f"  ({len(rest)} more namespaces, none above {peak_rest:.0%})")
    if tty:
        lines.append("  markers: B bump, R refusal, K kernel table-full line, T relief, C capture")
    shown_events = [e for e in events if e.get("kind") in MARKS or e.get("kind", "").startswith("incident")]
    if shown_events:
        lines.append("  what happened:")
        for e in shown_events[:40]:
            lines.append(f"    {_clock(float(e.get('t', 0)))} {e.get('kind')}: {e.get('text', '')}")
        if len(shown_events) > 40:
            lines.append(f"    ... and {len(shown_events) - 40} more")
    return lines


def incident_line(inc: Mapping[str, Any]) -> str:
    """The core's incident summary (ctguard.core.incident.summary) as one sentence."""
    try:
        start, end = float(inc.get("started", 0)), float(inc.get("ended") or 0)
        span = f"{_clock(start)} - {_clock(end)} UTC ({end - start:.0f} s)" if end else f"from {_clock(start)} UTC"
        where = inc.get("name") or inc.get("netns") or "?"
        bumps = int(inc.get("bumps", 0))
        moved = (f", {bumps} bump(s) {int(inc.get('max_at_start', 0)):,} -> {int(inc.get('max_now', 0)):,}" if bumps
                 else f", no bump (max {int(inc.get('max_now', 0)):,})")
        return (f"Incident {inc.get('id', '?')}: {span} in {where}: peak {int(inc.get('peak_count', 0)):,} entries "
                f"({float(inc.get('peak_fill', 0)):.1%}){moved}, {int(inc.get('refusals', 0))} refused, "
                f"{int(inc.get('drops', 0)):,} drops, {int(inc.get('early_drops', 0)):,} early drops, "
                f"{int(inc.get('table_full_lines', 0))} table-full lines"
                + (f"; bundles {', '.join(map(str, inc['bundles']))}" if inc.get("bundles") else ""))
    except (TypeError, ValueError):
        return "Incident: " + ", ".join(f"{k} {v}" for k, v in inc.items())


def _wrap(text: str, indent: str = "  ") -> list[str]:
    return textwrap.wrap(text, width=100, initial_indent=indent, subsequent_indent=indent) or [indent]


# Evidence keys as a person reads them (any other key: its words, underscores as spaces).
EVIDENCE_LABELS = {
    "of": "entries in the table", "share": "share of the table", "drop": "new flows dropped",
    "early_drop": "entries evicted early", "insert_failed": "inserts failed", "table_full_lines": "table-full lines",
    "span": "counted", "largest_count": "largest count seen", "max_then": "nf_conntrack_max then",
    "fill": "fill (against the max then)", "timeout_s": "timeout (s)", "timeouts": "raised timeouts (s)",
    "defaults": "kernel defaults (s)", "share_of_tcp": "share of TCP", "share_of_udp": "share of UDP",
    "sources_exact": "source count exact", "flows_per_s_estimate": "new flows/s (estimate)",
    "upper_bound": "upper bound", "bound_by": "bound by", "refused_at": "refused at",
    "of_protocol": "entries of that protocol", "unanswered_or_half_open": "never answered or half-open",
    "invalid_increase": "invalid counter rise", "drop_increase": "drop counter rise",
    "guard_judgement": "guard's judgement", "max_per_bucket": "max per bucket",
    "entries_per_bucket": "entries per bucket", "clash_resolve": "clashes resolved",
}
SHARE_KEYS = ("share", "share_of_tcp", "share_of_udp", "fill")


def _scalar(key: str, v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float) and key in SHARE_KEYS:
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:,.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def evidence_table(value: Any) -> list[tuple[str, str]] | None:
    """A list of rows ({key, entries}) or a mapping ({name: number}) as (name, value) pairs;
    None for a plain value."""
    if isinstance(value, Mapping):
        return [(str(k), _scalar(str(k), v)) for k, v in value.items()]
    if isinstance(value, (list, tuple)) and all(isinstance(r, Mapping) for r in value):
        out = []
        for r in value:
            items = list(r.items())
            if not items:
                continue
            name = str(items[0][1])
            rest = ", ".join(f"{_scalar(str(k), v)} {k}" if k == "entries" else f"{k} {_scalar(str(k), v)}"
                             for k, v in items[1:])
            out.append((name, rest))
        return out
    return None


def evidence_rows(evidence: Mapping[str, Any]) -> list[tuple[str, str, list[tuple[str, str]] | None]]:
    """(label, value as text, table rows or None) per piece of evidence: the one reading of a
    finding's numbers the text, JSON and HTML views share (never a language's repr)."""
    out = []
    for k, v in evidence.items():
        label = EVIDENCE_LABELS.get(k, k.replace("_", " "))
        table = evidence_table(v)
        if table is not None:
            text = "; ".join(f"{a} ({b})" if b else a for a, b in table) or "none"
        elif isinstance(v, (list, tuple)):
            text = ", ".join(str(x) for x in v) or "none"
        else:
            text = _scalar(k, v)
        out.append((label, text, table))
    return out


def finding_lines(found: Sequence[Finding]) -> list[str]:
    if not found:
        return ["Findings: none (no rule matched this bundle; the verdict says what it holds)"]
    lines = ["Findings:"]
    for f in found:
        lines.extend(_wrap(f"{f.severity.upper()} {f.id}: {f.summary}", "  "))
        lines.append("      evidence:")
        rows = evidence_rows(f.evidence)
        width = min(28, max(len(label) for label, _t, _r in rows)) if rows else 0
        for label, text, _table in rows:
            lines.extend(textwrap.wrap(f"{label.ljust(width)}  {text}", width=100, initial_indent="        ",
                                       subsequent_indent="        " + " " * (width + 2)) or [""])
        lines.extend(_wrap(f"do: {f.action}", "      "))
        if f.rule:
            lines.append("      suggested (ctguard never applies it):")
            lines.extend("        " + line for line in f.rule.splitlines() if not line.startswith("# suggestion"))
    return lines


def role_sentence(f: Any) -> str:
    """The captured namespace's role, its forwarding and its NAT, said once."""
    fwd = {True: "forwards", False: "does not forward", None: "was not read for forwarding"}[f.forwards]
    kinds = ", ".join(f"{k} x{v}" for k, v in sorted(f.nat_kinds.items()) if v)
    if kinds:
        nat = f"does NAT ({kinds})"
    elif f.nat is False:
        nat = "does none"
    else:
        nat = "rules not read" if f.nat is None else "does NAT"
    return (f"Role: {f.netns_label} is {'an' if f.ns_role[:1] in 'aeiou' else 'a'} {f.ns_role or 'unknown'}: "
            f"it {fwd}; NAT: it {nat}.").replace("it rules not read", "its rules were not read")


def details_lines(path: Path, data: BundleData) -> list[str]:
    m, ev = data.manifest, data.evidence
    f = facts(data)
    out = ["Details:"]
    netns = m.get("netns", {}) or {}
    out.append(f"  namespace {netns.get('path')} (inode {netns.get('inode', '?')}); capture took "
               f"{float(m.get('seconds', 0)):.2f} s of a {float(m.get('budget', 0)):g} s budget")
    for note in m.get("cut_short_what", []) or []:
        out.append(f"  CUT SHORT: {note}")
    table = ev.get("table")
    if table:
        entries = int(table.get("entries", 0))
        at = f", {f.count / f.max:.1%} of the nf_conntrack_max {f.max:,} in force at capture" if f.max else ""
        out.append(f"  Table at capture: {entries:,} entries read{at}; {int(table.get('unreplied', 0)):,} never "
                   f"answered, {int(table.get('assured', 0)):,} assured")
        if table.get("by_proto") and entries:
            out.append("  by protocol: " + ", ".join(f"{k} {v:,} ({100 * v / entries:.1f}%)" for k, v in table["by_proto"].items()))
        if table.get("by_tcp_state"):
            out.append("  TCP states:  " + ", ".join(f"{k} {v:,}" for k, v in table["by_tcp_state"].items()))
        for key, title in (("top_sources", "Top sources"), ("top_destinations", "Top destinations"),
                           ("top_dports", "Top destination ports"), ("marks", "Marks"), ("zones", "Zones")):
            sect = top_section(title, table.get(key, {}) or {}, entries)
            if sect:
                out.extend("  " + line for line in sect)
    else:
        err = (m.get("collectors", {}) or {}).get("conntrack", {}).get("error", "no table in this bundle")
        out.append(f"  Table: not read ({err})")
    host = ev.get("host", {}) or {}
    out.append("  " + role_sentence(f))
    if host and not f.host_ns:
        out.append(f"  The host namespace (not this one) is a {host.get('role')}"
                   + (f": {'; '.join(host.get('seen', []))}" if host.get("seen") else ""))
    elif host and host.get("seen"):
        out.append(f"  seen: {'; '.join(host.get('seen', []))}")
    for t in host.get("raised_timeouts", []) or []:
        held = f", holding about {t['entries']:,} entries" if "entries" in t else ""
        out.append(f"  raised timeout: {t['name']} = {t['value']} s (kernel default {t['default']} s){held}")
    net = ev.get("network", {}) or {}
    if net:
        ifaces = ", ".join(f"{i.get('name')} {' '.join(i.get('addresses', []))}".strip()
                           for i in net.get("interfaces", []) or [])
        out.append(f"  Interfaces: {ifaces}")
        if net.get("top_sources_by_interface"):
            out.append("  top sources arrive on: " + ", ".join(
                f"{dev} ({n} of them)" for dev, n in sorted(net["top_sources_by_interface"].items(), key=lambda kv: -kv[1])))
    totals = (ev.get("cpu_stats", {}) or {}).get("totals", {}) or {}
    if totals:
        keys = [k for k in ("drop", "insert_failed", "early_drop", "invalid", "search_restart", "clashres") if k in totals]
        out.append("  Per-CPU totals since the namespace was created: " + ", ".join(f"{k} {totals[k]:,}" for k in keys))
    if f.buckets:
        out.append(f"  Buckets (hashsize): {f.buckets:,}")
    slab_info = (ev.get("slab", {}) or {}).get("slab")
    if slab_info and {"num_objs", "objsize", "bytes"} <= set(slab_info):
        out.append(f"  Slab: {slab_info['num_objs']:,} objects x {slab_info['objsize']} B = "
                   f"{slab_info['bytes'] / 1048576:.1f} MiB")
    jour = ev.get("journal", {}) or {}
    if jour:
        out.append(f"  Kernel journal: {jour.get('lines', 0)} conntrack lines" + (f"; last: {jour['last']}" if jour.get("last") else ""))
    sentences = decision_sentences(m.get("decision"))
    if sentences:
        out.append("  Decision that led here:")
        out.extend(line for s in sentences for line in _wrap(s, "    "))
    else:
        out.append("  Decision: none recorded (a capture by hand)")
    incident = m.get("incident")
    if isinstance(incident, Mapping):
        out.append("  " + incident_line(incident))
    errors = {k: c["error"] for k, c in (m.get("collectors", {}) or {}).items() if isinstance(c, Mapping) and c.get("error")}
    for k, e in errors.items():
        out.append(f"  collector {k} failed: {e}")
    out.append("  Files: " + ", ".join(m.get("files", []) or []))
    return out


def render_text(path: Path, data: BundleData, tty: bool = False) -> str:
    m = data.manifest
    found = diagnose(data)
    lines = [f"Bundle {m.get('id', path.name)} - taken {m.get('created')} on {m.get('host')} because: {m.get('reason')}", ""]
    lines.append("Verdict:")
    lines.extend(_wrap(verdict(data, found)))
    lines.append("")
    lines.extend(finding_lines(found))
    lines.append("")
    lines.extend(timeline_lines(data.timeline, m, tty, data))
    lines.append("")
    lines.extend(details_lines(path, data))
    return "\n".join(lines) + "\n"


def render_json(path: Path, data: BundleData) -> dict[str, Any]:
    found = diagnose(data)
    m = data.manifest
    timeline: Any = data.timeline
    if timeline is None:
        timeline = {"note": m.get("timeline_note") or "no timeline in this bundle (taken without a running daemon)"}
    return {
        "id": m.get("id", path.name),
        "created": m.get("created"),
        "reason": m.get("reason"),
        "verdict": verdict(data, found),
        "findings": [{**f.as_json(), "evidence_rows": [{"label": label, "value": text}
                                                       for label, text, _t in evidence_rows(f.evidence)]}
                     for f in found],
        "role": role_sentence(facts(data)),
        "timeline": timeline,
        "decision": decision_sentences(m.get("decision")),
        "manifest": m,
        "evidence": data.evidence,
    }


def show(folder: Path | str, bundle_id: str, tty: bool = False) -> str:
    path, data = load(folder, bundle_id)
    return render_text(path, data, tty)


def show_json(folder: Path | str, bundle_id: str) -> str:
    path, data = load(folder, bundle_id)
    return json.dumps(render_json(path, data), indent=2, default=str)


def top_finding(folder: Path | str, bundle_id: str) -> Finding | None:
    _path, data = load(folder, bundle_id)
    found = diagnose(data)
    return found[0] if found else None


def last_bundle(folder: Path | str) -> dict[str, Any] | None:
    """The newest complete bundle and its top finding (for `ctguard status`), None without one."""
    done = [b for b in bundle_mod.list_bundles(folder) if b.complete]
    if not done:
        return None
    b = done[-1]
    out: dict[str, Any] = {"id": b.id, "created": b.created, "reason": b.reason, "top_finding": None, "findings": []}
    try:
        _path, data = load(folder, b.id)
        found = diagnose(data)
    except (OSError, BundleError, ValueError) as exc:
        out["error"] = str(exc)
        return out
    out["findings"] = [f.id for f in found]
    if found:
        out["top_finding"] = {"id": found[0].id, "severity": found[0].severity, "summary": found[0].summary}
    return out
