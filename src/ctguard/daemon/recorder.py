"""The flight recorder: the last 15 minutes of every namespace and of ctguard's own actions.

The daemon appends to it after each turn; every bundle it captures carries the window as
`timeline.json`, so a bundle taken at the first bump shows the minutes before it. Bounded:
per namespace one point per second while calm and a point per sample under pressure (only when
a value changed), in typed arrays (8 bytes a value, no object per point), trimmed to the window
and capped at `MAX_POINTS`; events (bumps, refusals, relief, captures, the kernel's table-full
lines) in a deque of at most `MAX_EVENTS`. bench/bench_recorder.py measures 50 namespaces over
15 minutes.

Each point keeps the `nf_conntrack_max` in force when it was sampled, so a fill is always stated
against the max of its moment, never against one raised afterwards.

Incidents are the core's (model.Incident, tracked by decide.advance); the recorder is told the
open one's id each turn, marks its start and end in the events, and counts the captures started
during it so that the daemon takes at most `[evidence] incident_captures` bundles per incident
(the first, and the one at its end).
"""

from __future__ import annotations

import bisect
import sys
from array import array
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from ctguard.core.decide import WORSENING_CAPTURES, WORSENING_MOMENTS, moment_of
from ctguard.core import refusals
from ctguard.core.model import Capture, Outcome, Refuse, Sample, SetBuckets, SetMax, TableFull

WINDOW = 900.0              # seconds of history kept
CALM_EVERY = 1.0            # at most one point per second per namespace while calm
MAX_POINTS = 9000           # per namespace: 15 minutes at 10 samples a second
MAX_EVENTS = 2000
TRIM_SLACK = 256            # points past the window before a trim (amortises the array shift)
COUNTERS = ("drop", "early_drop", "insert_failed", "invalid")
COLUMNS = ("entries", "max") + COUNTERS


class _Series:
    __slots__ = ("inode", "name", "unit", "container", "t", "cols", "last", "kept_at", "kept_entries", "idx", "idx_len")

    def __init__(self, inode: int, name: str, unit: str, container: str) -> None:
        self.inode, self.name, self.unit, self.container = inode, name, unit, container
        self.t = array("d")
        self.cols = {c: array("q") for c in COLUMNS}
        self.last: tuple[int, ...] | None = None
        self.kept_at = 0.0
        self.kept_entries = 0
        self.idx: tuple[int, ...] | None = None   # where the counters sit in a reading's stats
        self.idx_len = 0

    def append(self, when: float, values: tuple[int, ...]) -> None:
        self.t.append(when)
        for col, v in zip(self.cols.values(), values):
            col.append(v)
        self.last = values
        self.kept_at = when
        self.kept_entries = values[0]

    def trim(self, cutoff: float) -> None:
        n = bisect.bisect_left(self.t, cutoff)
        n = max(n, len(self.t) - MAX_POINTS)
        if n >= TRIM_SLACK or (n > 0 and len(self.t) > MAX_POINTS + TRIM_SLACK):
            del self.t[:n]
            for col in self.cols.values():
                del col[:n]

    def since(self, start: float) -> dict[str, Any]:
        i = bisect.bisect_left(self.t, start)
        out: dict[str, Any] = {"inode": self.inode, "name": self.name, "unit": self.unit,
                               "container": self.container, "t": self.t[i:].tolist()}
        for c in COLUMNS:
            out[c] = self.cols[c][i:].tolist()
        return out

    def nbytes(self) -> int:
        return sys.getsizeof(self.t) + sum(sys.getsizeof(a) for a in self.cols.values())


RELIEF_ACTIONS = ("shortentimeout", "restoretimeout", "trimentries")   # model's relief actions


def _event_kind(action: Any) -> str:
    name = type(action).__name__.lower()
    return "relief" if (name in RELIEF_ACTIONS or "relief" in name or "timeout" in name) else name


class FlightRecorder:
    def __init__(self, window: float = WINDOW, calm_every: float = CALM_EVERY, max_events: int = MAX_EVENTS) -> None:
        self.window_seconds = window
        self.calm_every = calm_every
        self.series: dict[int, _Series] = {}
        self.limits_t = array("d")
        self.limits_max = array("q")
        self.limits_buckets = array("q")
        self.events: deque[dict[str, Any]] = deque(maxlen=max_events)
        self.incident: str | None = None      # the core's open incident (its id), as last told
        self.incident_captures = 0             # captures started during it
        self.incident_reasons: set[str] = set()  # worsening moments already captured in it
        self._last_limits: tuple[int, int] | None = None
        self._last_t = 0.0

    # -- recording --------------------------------------------------------------------------

    def record(self, sample: Sample, pressure: bool) -> int:
        """Append the sample; returns the kernel's drops (drop, early_drop, insert_failed) since
        the previous one, summed over namespaces. Runs every turn: kept to plain loops."""
        now = sample.at.wall
        kmax = sample.limits.max
        dropped = 0
        due = now - self._last_t >= self.calm_every * 0.9
        calm_gap = self.calm_every * 0.9
        jump_at = 0.01 * max(kmax, 1)       # a steep rise below `warn` is kept: the growth that triggers a bump
        # Under pressure every sample is kept, but only for the namespaces it concerns: those whose
        # count moved by 0.1% of max or whose counters moved; a calm neighbour's jitter of a few
        # entries stays at one point a second.
        busy_at = 0.001 * max(kmax, 1)
        series = self.series
        for ns in sample.namespaces:
            s = series.get(ns.inode)
            if s is None:
                s = series[ns.inode] = _Series(ns.inode, ns.name, ns.unit, ns.container)
            stats = ns.stats
            idx = s.idx
            # The kernel's column order does not change while a namespace lives: check one key.
            if idx is None or len(stats) != s.idx_len or (idx[0] >= 0 and stats[idx[0]][0] != "drop"):
                keys = [k for k, _ in stats]
                idx = s.idx = tuple(keys.index(c) if c in keys else -1 for c in COUNTERS)
                s.idx_len = len(stats)
            i0, i1, i2, i3 = idx
            values = (ns.count, kmax, stats[i0][1] if i0 >= 0 else 0, stats[i1][1] if i1 >= 0 else 0,
                      stats[i2][1] if i2 >= 0 else 0, stats[i3][1] if i3 >= 0 else 0)
            last = s.last
            if last is None:
                s.append(now, values)
                continue
            d = values[2] - last[2]
            dropped += (d if d > 0 else 0)
            d = values[3] - last[3]
            dropped += (d if d > 0 else 0)
            d = values[4] - last[4]
            dropped += (d if d > 0 else 0)
            moved = abs(values[0] - s.kept_entries)
            if (now - s.kept_at >= calm_gap or moved >= jump_at
                    or (pressure and (moved >= busy_at or values[1:] != last[1:]))):
                s.append(now, values)
            else:
                s.last = values     # drops are counted from the latest reading, kept or not
        if due:
            cutoff = now - self.window_seconds
            seen = {ns.inode for ns in sample.namespaces}
            for inode, s in list(series.items()):
                if inode not in seen and (not s.t or s.t[-1] < cutoff):
                    del series[inode]
                else:
                    s.trim(cutoff)
        limits = (kmax, sample.limits.buckets)
        if limits != self._last_limits or due:
            self.limits_t.append(now)
            self.limits_max.append(kmax)
            self.limits_buckets.append(sample.limits.buckets)
            self._last_limits = limits
            n = bisect.bisect_left(self.limits_t, now - self.window_seconds)
            if n >= TRIM_SLACK:
                del self.limits_t[:n], self.limits_max[:n], self.limits_buckets[:n]
        if due:
            self._last_t = now
        return dropped

    def note(self, when: float, kind: str, text: str, netns: int | None = None, **extra: Any) -> None:
        self.events.append({"t": round(when, 3), "kind": kind, "netns": netns, "text": text, **extra})

    def turn(self, sample: Sample, pressure: bool, outcomes: Sequence[Outcome], kernel_events: Sequence[TableFull],
             incident: str | None = None) -> int:
        """Record one daemon turn; `incident` is the id of the core's open incident (None: none).
        Returns the captures started this turn."""
        now = sample.at.wall
        # A turn in which ctguard acted or the kernel complained is kept whole, like pressure.
        busy = pressure or any(type(o.action).__name__ not in ("Warn", "Persist") for o in outcomes) or any(
            e.live for e in kernel_events)
        self.record(sample, busy)
        captured = 0
        for o in outcomes:
            a = o.action
            if isinstance(a, SetMax):
                if o.ok:
                    self.note(now, "bump", f"{a.old} -> {o.read_back or a.new} ({a.trigger})", a.netns,
                              old=a.old, new=o.read_back or a.new, reason=a.trigger)
                else:
                    self.note(now, "bump-failed", o.detail, a.netns, old=a.old, new=a.new)
            elif isinstance(a, Refuse):
                if not refusals.counted(a):     # a wait, or the same refused bump again
                    continue
                self.note(now, "refusal", f"{a.kind}: wanted {a.wanted}, max {a.current}", a.netns,
                          old=a.current, new=a.wanted, reason=a.kind)
            elif isinstance(a, Capture):
                if o.ok and not o.detail.startswith("capture skipped"):
                    captured += 1
                self.note(now, "capture", f"{a.reason}: {o.detail}", a.netns, reason=a.reason)
            elif isinstance(a, SetBuckets):
                if o.ok:
                    self.note(now, "buckets", f"{a.old} -> {o.read_back or a.new}", None, old=a.old,
                              new=o.read_back or a.new)
            elif type(a).__name__ not in ("Warn", "Persist"):
                # Actions other helpers add (relief: shortened timeouts and their undo).
                self.note(now, _event_kind(a), str(getattr(a, "reason", "") or o.detail),
                          getattr(a, "netns", None), ok=o.ok, action=type(a).__name__,
                          **({"advise": True} if getattr(a, "advise", False) else {}))
        for e in kernel_events:
            if e.live:
                self.note(now, "kernel", "nf_conntrack: table full, dropping packet"
                          + (f" (+{e.suppressed} suppressed)" if e.suppressed else ""), e.netns)
        if incident != self.incident:
            if self.incident is not None:
                self.note(now, "incident-end", f"{self.incident} over", None, incident=self.incident)
            if incident is not None:
                self.note(now, "incident-start", f"{incident} began", None, incident=incident)
            self.incident = incident
            self.incident_captures = 0
            self.incident_reasons = set()
        if incident is not None:
            self.incident_captures += captured
        return captured

    def capture_allowed(self, reason: str, per_incident: int) -> bool:
        """At most `per_incident` bundles per incident: the first one, one for each moment it got
        worse (a bump refused at a bound, the first drops, relief: each once), and one kept for
        its end (1: the first only)."""
        if reason == "incident-end":
            return per_incident > 1
        if self.incident is None:
            return True
        if self.incident_captures >= max(1, per_incident - 1):
            return False
        if reason in WORSENING_CAPTURES:
            moment = moment_of(reason)
            if moment in self.incident_reasons:
                return False
            self.incident_reasons.add(moment)
            return True
        # Another bump or pressure is not a new moment: it gets only the slots left beyond the
        # first bundle, the worsening moments still to come and the end.
        left = WORSENING_MOMENTS - len(self.incident_reasons)
        return self.incident_captures == 0 or self.incident_captures + left < per_incident - 1

    # -- reading ----------------------------------------------------------------------------

    def window(self, since: float | None = None, *, ceiling: int | None = None, upper: int | None = None,
               upper_by: str = "", incident: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The recorded window as a JSON-able object (the `timeline.json` of a bundle)."""
        ends = [s.t[-1] for s in self.series.values() if s.t] + ([self.limits_t[-1]] if self.limits_t else [])
        to = max(ends, default=0.0)
        start = max(since if since is not None else 0.0, to - self.window_seconds)
        i = bisect.bisect_left(self.limits_t, start)
        firsts = [s.t[bisect.bisect_left(s.t, start)] for s in self.series.values() if s.t and s.t[-1] >= start]
        out: dict[str, Any] = {
            "format": 1,
            "window_seconds": self.window_seconds,
            "from": round(min(firsts, default=start), 3),
            "to": round(to, 3),
            "limits": {"t": self.limits_t[i:].tolist(), "max": self.limits_max[i:].tolist(),
                       "buckets": self.limits_buckets[i:].tolist()},
            "namespaces": [s.since(start) for s in self.series.values() if s.t and s.t[-1] >= start],
            "events": [e for e in self.events if e["t"] >= start],
        }
        if ceiling is not None:
            out["ceiling"] = ceiling
        if upper is not None:
            out["upper_bound"] = upper
            out["upper_bound_by"] = upper_by
        if incident is not None:
            out["incident"] = dict(incident)
        return out

    def nbytes(self) -> int:
        """Bytes held by the arrays and events (bench/bench_recorder.py measures the whole process too)."""
        total = sum(s.nbytes() for s in self.series.values())
        total += sys.getsizeof(self.limits_t) + sys.getsizeof(self.limits_max) + sys.getsizeof(self.limits_buckets)
        total += sum(sys.getsizeof(e) for e in self.events)
        return total


def metrics_text(last_incident_start: float | None, findings: Sequence[str]) -> str:
    """The review's metrics (docs/contract.md): appended to the textfile by the daemon."""
    out = ["# HELP ctguard_last_incident_timestamp_seconds Unix time the last incident started, 0 if none.\n"
           "# TYPE ctguard_last_incident_timestamp_seconds gauge\n",
           f"ctguard_last_incident_timestamp_seconds {last_incident_start or 0:.3f}\n",
           "# HELP ctguard_findings Findings of the last automatic bundle (1 for each finding id).\n"
           "# TYPE ctguard_findings gauge\n"]
    for fid in findings:
        out.append(f'ctguard_findings{{id="{fid}"}} 1\n')
    return "".join(out)
