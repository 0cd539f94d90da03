"""`ctguard bundles report ID -o FILE.html`: one self-contained HTML file, charts as inline SVG.

No network fetch of any kind (no external script, style, font or image; no script at all), so the
file can be attached to a ticket and opened offline, and reads the same without JavaScript. Every
value from the bundle is escaped. Long series are reduced to one min/max pair per pixel column,
so a 15-minute timeline sampled ten times a second draws as fast as a calm one.
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ctguard.core.diagnose import BundleData, Finding, diagnose, facts, verdict
from ctguard.evidence.review import (busiest, decision_sentences, evidence_rows, fill_points, load, role_sentence,
                                     top_section)

W, H = 880, 260                 # chart size (px)
PAD_L, PAD_R, PAD_T, PAD_B = 70, 20, 16, 34
COLOURS = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf")
MARK_STYLE = {"bump": ("#2ca02c", "bump"), "refusal": ("#d62728", "refusal"), "kernel": ("#ff7f0e", "kernel table-full"),
              "relief": ("#9467bd", "relief"), "capture": ("#7f7f7f", "capture")}
SEV_COLOUR = {"critical": "#b71c1c", "warning": "#e65100", "info": "#1565c0"}

CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:960px;color:#222;line-height:1.45}
h1{font-size:1.4em;margin-bottom:4px}h2{font-size:1.15em;margin-top:28px;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:.9em}.verdict{background:#f5f7fa;border-left:4px solid #1565c0;padding:10px 14px}
.finding{border:1px solid #ddd;border-left-width:6px;padding:8px 12px;margin:10px 0}
.sev{font-weight:bold;text-transform:uppercase;font-size:.8em}code,pre{font-family:ui-monospace,monospace;font-size:.85em}
pre{background:#f6f6f6;padding:8px;overflow-x:auto}table{border-collapse:collapse;font-size:.9em}
td,th{padding:2px 8px;text-align:left;border-bottom:1px solid #eee}.note{color:#666;font-size:.85em}
svg text{font-family:system-ui,sans-serif;font-size:11px;fill:#333}
.story{font-size:1.05em}table.rows td{border:none;padding:0 8px 0 0}.finding th{vertical-align:top;white-space:nowrap}
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.gmtime(t))


def _reduce(points: Sequence[tuple[float, float]], x0: float, x1: float, columns: int) -> list[tuple[float, float]]:
    """At most two points (min, max) per pixel column, in time order."""
    if len(points) <= 2 * columns:
        return list(points)
    span = max(x1 - x0, 1e-9)
    out: list[tuple[float, float]] = []
    col = -1
    lo = hi = None
    for t, v in points:
        c = int((t - x0) / span * columns)
        if c != col:
            if lo is not None:
                out.extend(sorted({lo, hi}))  # type: ignore[arg-type]
            col, lo, hi = c, (t, v), (t, v)
        else:
            if v < lo[1]:  # type: ignore[index]
                lo = (t, v)
            if v > hi[1]:  # type: ignore[index]
                hi = (t, v)
    if lo is not None:
        out.extend(sorted({lo, hi}))  # type: ignore[arg-type]
    return out


class Chart:
    """A time-by-value SVG chart with an x axis in UTC clock time."""

    def __init__(self, x0: float, x1: float, y1: float, title: str, unit: str = "") -> None:
        self.x0, self.x1 = x0, max(x1, x0 + 1)
        self.y1 = max(y1, 1e-9)
        self.title = title
        self.unit = unit
        self.parts: list[str] = []
        self.legend: list[tuple[str, str, str]] = []

    def x(self, t: float) -> float:
        return PAD_L + (t - self.x0) / (self.x1 - self.x0) * (W - PAD_L - PAD_R)

    def y(self, v: float) -> float:
        return H - PAD_B - min(v, self.y1 * 1.02) / self.y1 * (H - PAD_T - PAD_B)

    def line(self, points: Sequence[tuple[float, float]], colour: str, label: str, dash: str = "", step: bool = False) -> None:
        pts = _reduce(points, self.x0, self.x1, W - PAD_L - PAD_R)
        if not pts:
            return
        coords: list[str] = []
        prev = None
        for t, v in pts:
            if step and prev is not None:
                coords.append(f"{self.x(t):.1f},{self.y(prev):.1f}")
            coords.append(f"{self.x(t):.1f},{self.y(v):.1f}")
            prev = v
        if len(coords) == 1:
            coords.append(coords[0])
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.6"{d} points="{" ".join(coords)}"/>')
        self.legend.append((colour, label, dash))

    def hline(self, v: float, colour: str, label: str) -> None:
        if v > self.y1 * 1.02:
            self.legend.append((colour, f"{label} (above the chart)", "6,3"))
            return
        y = self.y(v)
        self.parts.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" stroke="{colour}" '
                          f'stroke-width="1.2" stroke-dasharray="6,3"/>')
        self.legend.append((colour, label, "6,3"))

    def marker(self, t: float, kind: str, text: str) -> None:
        colour, _ = MARK_STYLE.get(kind, ("#555", kind))
        x = self.x(t)
        self.parts.append(f'<g><title>{_e(_clock(t))} {_e(kind)}: {_e(text)}</title>'
                          f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{PAD_T}" y2="{H - PAD_B}" stroke="{colour}" '
                          f'stroke-width="1" opacity="0.7"/>'
                          f'<path d="M{x - 4:.1f},{PAD_T - 2} L{x + 4:.1f},{PAD_T - 2} L{x:.1f},{PAD_T + 5} Z" '
                          f'fill="{colour}"/></g>')

    def svg(self) -> str:
        axes = [f'<rect x="{PAD_L}" y="{PAD_T}" width="{W - PAD_L - PAD_R}" height="{H - PAD_T - PAD_B}" '
                f'fill="#fff" stroke="#ccc"/>']
        for i in range(5):
            v = self.y1 * i / 4
            y = self.y(v)
            label = f"{v:.0%}" if self.unit == "%" else f"{v:,.0f}"
            axes.append(f'<line x1="{PAD_L}" x2="{W - PAD_R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                        f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
        for i in range(5):
            t = self.x0 + (self.x1 - self.x0) * i / 4
            axes.append(f'<text x="{self.x(t):.1f}" y="{H - PAD_B + 16}" text-anchor="middle">{_clock(t)}</text>')
        legend = []
        lx = PAD_L
        for colour, label, dash in self.legend[:10]:
            d = f' stroke-dasharray="{dash}"' if dash else ""
            legend.append(f'<line x1="{lx}" x2="{lx + 18}" y1="{H - 6}" y2="{H - 6}" stroke="{colour}" stroke-width="2"{d}/>'
                          f'<text x="{lx + 22}" y="{H - 2}">{_e(label)}</text>')
            lx += 30 + 6 * len(label)
        return (f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{_e(self.title)}" '
                f'viewBox="0 0 {W} {H + 14}" width="{W}" height="{H + 14}">'
                f'<title>{_e(self.title)}</title>{"".join(axes)}{"".join(self.parts)}'
                f'<g transform="translate(0,14)">{"".join(legend)}</g></svg>')


def bars(title: str, items: Sequence[tuple[str, int]], total: int, note: str = "") -> str:
    """Horizontal bars with each item's share of `total`."""
    if not items or not total:
        return ""
    row_h = 20
    height = row_h * len(items) + 8
    label_w = max(90, min(260, 8 * max(len(k) for k, _ in items)))
    scale = (W - label_w - 150) / max(v for _, v in items)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{_e(title)}" viewBox="0 0 {W} {height}" '
           f'width="{W}" height="{height}"><title>{_e(title)}</title>']
    for i, (k, v) in enumerate(items):
        y = 4 + i * row_h
        out.append(f'<text x="{label_w - 6}" y="{y + 13}" text-anchor="end">{_e(k)}</text>'
                   f'<rect x="{label_w}" y="{y + 2}" width="{max(1.0, v * scale):.1f}" height="{row_h - 6}" fill="#1f77b4"/>'
                   f'<text x="{label_w + max(1.0, v * scale) + 6:.1f}" y="{y + 13}">{v:,} ({100 * v / total:.1f}%)</text>')
    out.append("</svg>")
    return f"<h3>{_e(title)}</h3>" + (f'<p class="note">{_e(note)}</p>' if note else "") + "".join(out)


def _rates(ns: Mapping[str, Any], key: str) -> list[tuple[float, float]]:
    t = ns.get("t", [])
    v = ns.get(key, [])
    out = []
    for i in range(1, min(len(t), len(v))):
        dt = float(t[i]) - float(t[i - 1])
        if dt > 0:
            d = int(v[i]) - int(v[i - 1])
            out.append((float(t[i]), max(0, d) / dt))
    return out


def charts(data: BundleData) -> list[str]:
    tl = data.timeline
    if not tl or not tl.get("namespaces"):
        note = data.manifest.get("timeline_note") or "no timeline in this bundle (taken without a running daemon)"
        return [f'<p class="note">Timeline: {_e(note)}</p>']
    f = facts(data)
    x0, x1 = float(tl.get("from", 0)), float(tl.get("to", 0))
    top, rest = busiest(tl)
    events = [e for e in tl.get("events", []) if isinstance(e, Mapping)]
    peak_y = 0.0
    max_points: list[tuple[float, float]] = []
    for ns in top:
        for t, _fill, entries, m in fill_points(ns):
            peak_y = max(peak_y, entries, m)
    limits = tl.get("limits", {}) or {}
    for t, m in zip(limits.get("t", []), limits.get("max", [])):
        max_points.append((float(t), float(m)))
        peak_y = max(peak_y, float(m))
    chart = Chart(x0, x1, peak_y * 1.1, "conntrack entries per namespace, with nf_conntrack_max and the ceiling")
    for i, ns in enumerate(top):
        chart.line([(t, float(e)) for t, _f, e, _m in fill_points(ns)], COLOURS[i % len(COLOURS)],
                   f"{ns.get('name')} entries")
    if not max_points and top:
        max_points = [(t, float(m)) for t, _f, _e, m in fill_points(top[0])]
    chart.line(max_points, "#000", "nf_conntrack_max", dash="4,2", step=True)
    if f.ceiling:
        chart.hline(float(f.ceiling), "#d62728", f"ceiling {f.ceiling:,}")
    if f.upper and f.upper_by == "memory" and f.upper != f.ceiling:
        chart.hline(float(f.upper), "#8c564b", f"memory cap {f.upper:,}")
    for e in events:
        if e.get("kind") in MARK_STYLE:
            chart.marker(float(e.get("t", x0)), str(e.get("kind")), str(e.get("text", "")))
    out = ["<h3>Fill per namespace</h3>",
           '<p class="note">Entries over the recorded window; the dashed black line is nf_conntrack_max in force at '
           'each moment. Markers: <span style="color:#2ca02c">&#9660; bump</span>, '
           '<span style="color:#d62728">&#9660; refusal</span>, <span style="color:#ff7f0e">&#9660; kernel '
           'table-full line</span>, <span style="color:#9467bd">&#9660; relief</span>, '
           '<span style="color:#7f7f7f">&#9660; capture</span>.</p>', chart.svg()]
    fill_chart = Chart(x0, x1, 1.0, "fill per namespace against the max in force", unit="%")
    for i, ns in enumerate(top):
        fill_chart.line([(t, fl) for t, fl, _e, _m in fill_points(ns)], COLOURS[i % len(COLOURS)], f"{ns.get('name')}")
    out += ["<h3>Fill ratio</h3>", fill_chart.svg()]
    if rest:
        out.append(f'<p class="note">{len(rest)} more namespaces are not drawn (lower peaks).</p>')
    series = []
    peak_rate = 0.0
    for i, ns in enumerate(top):
        for key, dash in (("drop", ""), ("early_drop", "4,2")):
            pts = _rates(ns, key)
            if any(v > 0 for _, v in pts):
                series.append((pts, COLOURS[i % len(COLOURS)], f"{ns.get('name')} {key}/s", dash))
                peak_rate = max(peak_rate, max(v for _, v in pts))
    rate_chart = Chart(x0, x1, peak_rate * 1.1 if peak_rate else 1.0, "drop and early_drop per second")
    for pts, colour, label, dash in series:
        rate_chart.line(pts, colour, label, dash=dash)
    for e in events:
        if e.get("kind") == "kernel":
            rate_chart.marker(float(e.get("t", x0)), "kernel", str(e.get("text", "")))
    out += ["<h3>Drops and early drops per second</h3>",
            rate_chart.svg() if series else '<p class="note">The kernel dropped nothing in the recorded window.</p>']
    return out


def lead_chart(data: BundleData) -> str:
    """The story's chart: the captured namespace's entries against nf_conntrack_max in force,
    with the bumps, refusals, kernel table-full lines, relief and captures marked."""
    tl = data.timeline
    if not tl or not tl.get("namespaces"):
        return ""
    f = facts(data)
    spaces = [ns for ns in tl.get("namespaces", []) if ns.get("t")]
    own = next((ns for ns in spaces if f.inode and int(ns.get("inode", 0) or 0) == f.inode), None)
    ns = own or (busiest(tl, 1)[0] or [None])[0]
    if ns is None:
        return ""
    pts = fill_points(ns)
    x0, x1 = float(tl.get("from", 0)), float(tl.get("to", 0))
    limits = tl.get("limits", {}) or {}
    max_points = [(float(t), float(m)) for t, m in zip(limits.get("t", []), limits.get("max", []))]
    if not max_points:
        max_points = [(t, float(m)) for t, _f, _e, m in pts]
    top = max([e for _t, _f, e, _m in pts] + [m for _t, m in max_points] + [1])
    chart = Chart(x0, x1, top * 1.1, f"{ns.get('name')}: entries against nf_conntrack_max, bumps marked")
    chart.line([(t, float(e)) for t, _f, e, _m in pts], COLOURS[0], f"{ns.get('name')} entries")
    chart.line(max_points, "#000", "nf_conntrack_max in force", dash="4,2", step=True)
    events = [e for e in tl.get("events", []) if isinstance(e, Mapping)]
    for e in events:
        if e.get("kind") in MARK_STYLE and e.get("netns") in (None, "", ns.get("inode")):
            chart.marker(float(e.get("t", x0)), str(e.get("kind")), str(e.get("text", "")))
    largest, max_then = f.largest
    note = (f"Largest count seen: {largest:,} entries against a max of {max_then:,} in force then. Markers: "
            '<span style="color:#2ca02c">&#9660; bump</span>, <span style="color:#d62728">&#9660; refusal</span>, '
            '<span style="color:#ff7f0e">&#9660; kernel table-full line</span>, '
            '<span style="color:#9467bd">&#9660; relief</span>, <span style="color:#7f7f7f">&#9660; capture</span>.')
    return f'<div class="lead-chart">{chart.svg()}<p class="note">{note}</p></div>'


def _evidence_html(fd: Finding) -> str:
    rows = []
    for label, text, table in evidence_rows(fd.evidence):
        if table:
            inner = "".join(f"<tr><td>{_e(a)}</td><td>{_e(b)}</td></tr>" for a, b in table)
            rows.append(f"<tr><th>{_e(label)}</th><td><table class=\"rows\">{inner}</table></td></tr>")
        else:
            rows.append(f"<tr><th>{_e(label)}</th><td>{_e(text)}</td></tr>")
    return "".join(rows)


def _finding_html(fd: Finding) -> str:
    colour = SEV_COLOUR.get(fd.severity, "#555")
    ev = _evidence_html(fd)
    rule = ""
    if fd.rule:
        rule = (f'<p><b>Suggested rule</b> <span class="note">(a suggestion: ctguard never applies it)</span></p>'
                f"<pre>{_e(fd.rule)}</pre>")
    return (f'<div class="finding" style="border-left-color:{colour}" id="{_e(fd.id)}">'
            f'<span class="sev" style="color:{colour}">{_e(fd.severity)}</span> <code>{_e(fd.id)}</code>'
            f"<p>{_e(fd.summary)}</p><p><b>Do:</b> {_e(fd.action)}</p><table>{ev}</table>{rule}</div>")


def _top_items(top: Mapping[str, Any], n: int = 10) -> list[tuple[str, int]]:
    return [(str(r.get("key")), int(r.get("count", 0))) for r in (top.get("rows", []) or [])[:n]]


def render(path: Path, data: BundleData) -> str:
    m, ev = data.manifest, data.evidence
    found = diagnose(data)
    table = ev.get("table", {}) or {}
    entries = int(table.get("entries", 0) or 0)
    body = [f"<h1>ctguard incident report: {_e(m.get('id', path.name))}</h1>",
            f'<p class="meta">Taken {_e(m.get("created"))} on {_e(m.get("host"))} because: {_e(m.get("reason"))}; '
            f'namespace {_e((m.get("netns") or {}).get("path", "?"))}</p>',
            "<h2>Verdict</h2>", f'<p class="verdict">{_e(verdict(data, found))}</p>']
    if found:
        body += [f'<p class="story"><b>The cause:</b> {_e(found[0].summary)}. <b>Do:</b> {_e(found[0].action)}</p>']
    body += [lead_chart(data), f'<p class="note">{_e(role_sentence(facts(data)))}</p>', "<h2>Findings</h2>"]
    body += [_finding_html(x) for x in found] or ['<p>None: no rule matched this bundle; the verdict says what it holds.</p>']
    body.append("<h2>Timeline</h2>")
    body += charts(data)
    body.append("<h2>What the table held at capture</h2>")
    if entries:
        protos = sorted(((str(k), int(v)) for k, v in (table.get("by_proto", {}) or {}).items()), key=lambda kv: -kv[1])
        states = sorted(((str(k), int(v)) for k, v in (table.get("by_tcp_state", {}) or {}).items()), key=lambda kv: -kv[1])
        body.append(bars("Protocols", protos, entries))
        body.append(bars("TCP states", states, sum(v for _, v in states)))
        for key, title in (("top_sources", "Top sources"), ("top_destinations", "Top destinations"),
                           ("top_dports", "Top destination ports")):
            top = table.get(key, {}) or {}
            sect = top_section(title, top, entries)
            if len(sect) == 1:      # no dominant entry: one line, not a row of noise bars
                body.append(f"<h3>{_e(title)}</h3><p class=\"note\">{_e(sect[0])}</p>")
                continue
            note = "" if top.get("exact", True) else "Approximate counts (each may overstate by its error bound)."
            body.append(bars(title, _top_items(top), entries, note))
    else:
        body.append('<p class="note">No table in this bundle (empty, or the dump failed).</p>')
    sentences = decision_sentences(m.get("decision"))
    if sentences:
        body.append("<h2>The decision that led here</h2>")
        body.append("<p>" + " ".join(_e(s) for s in sentences) + "</p>")
    body.append(f'<p class="note">Generated by ctguard from {_e(path.name)}. Self-contained: no script, no '
                "network fetch.</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
            "img-src data:\">"
            f"<title>ctguard report {_e(m.get('id', path.name))}</title><style>{CSS}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")


def report(folder: Path | str, bundle_id: str) -> str:
    path, data = load(folder, bundle_id)
    return render(path, data)
