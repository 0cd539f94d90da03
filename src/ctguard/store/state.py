"""What survives a restart: bump history (cooldown, budget), persisted values, per-minute peaks.

Written atomically under `state.dir`; a corrupt or truncated file is set aside with a
warning and ctguard starts from what it can still trust, never a crash.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ctguard.store.files import atomic_write, ensure_private_dir, read_text_nofollow
from ctguard.core.model import BumpRecord, History, Incident, Instant, Sample
from ctguard.core.sizing import PEAK_WINDOW

STATE_FILE = "state.json"
PEAKS_FILE = "peaks.json"
PEAK_DAYS = round(PEAK_WINDOW / 86400)   # per-minute peaks kept on disk: the window sizing reads
FORMAT = 1


def _instant(d: dict | None) -> Instant | None:
    if not d:
        return None
    return Instant(float(d["wall"]), float(d["boot"]), str(d.get("boot_id", "")))


def _instant_json(i: Instant | None) -> dict | None:
    return None if i is None else {"wall": i.wall, "boot": i.boot, "boot_id": i.boot_id}


def _incident_json(i: Incident | None) -> dict | None:
    if i is None:
        return None
    return {"started": _instant_json(i.started), "netns": i.netns, "name": i.name, "unit": i.unit,
            "max_at_start": i.max_at_start, "peak_fill": i.peak_fill, "peak_count": i.peak_count,
            "peak_max": i.peak_max,
            "drops": i.drops, "early_drops": i.early_drops, "table_full_lines": i.table_full_lines,
            "bumps": i.bumps, "refusals": i.refusals, "max_now": i.max_now, "rate": i.rate,
            "bundles": list(i.bundles), "loss_base": [list(x) for x in i.loss_base],
            "last_active": _instant_json(i.last_active), "ended": _instant_json(i.ended),
            "attack": i.attack, "sizing_base": i.sizing_base, "first_bundle_count": i.first_bundle_count}


def _incident(d: dict | None) -> Incident | None:
    if not d:
        return None
    return Incident(
        started=_instant(d["started"]),  # type: ignore[arg-type]
        netns=None if d.get("netns") is None else int(d["netns"]), name=str(d.get("name", "")),
        unit=str(d.get("unit", "")), max_at_start=int(d.get("max_at_start", 0)),
        peak_fill=float(d.get("peak_fill", 0.0)), peak_count=int(d.get("peak_count", 0)),
        peak_max=int(d.get("peak_max", 0)),
        drops=int(d.get("drops", 0)), early_drops=int(d.get("early_drops", 0)),
        table_full_lines=int(d.get("table_full_lines", 0)), bumps=int(d.get("bumps", 0)),
        refusals=int(d.get("refusals", 0)), max_now=int(d.get("max_now", 0)), rate=float(d.get("rate", 0.0)),
        bundles=tuple(str(b) for b in d.get("bundles", [])),
        loss_base=tuple((int(a), int(b)) for a, b in d.get("loss_base", [])),
        last_active=_instant(d.get("last_active")), ended=_instant(d.get("ended")),
        attack=str(d.get("attack", "")), sizing_base=int(d.get("sizing_base", 0)),
        first_bundle_count=int(d.get("first_bundle_count", 0)),
    )


def history_to_json(h: History) -> dict:
    return {
        "format": FORMAT,
        "bumps": [{"at": _instant_json(b.at), "old": b.old, "new": b.new, "trigger": b.trigger, "ok": b.ok}
                  for b in h.bumps],
        "last_warn": _instant_json(h.last_warn),
        "last_drop": _instant_json(h.last_drop),
        "last_packet_drop": _instant_json(h.last_packet_drop),
        "last_capture": _instant_json(h.last_capture),
        "persisted_max": h.persisted_max,
        "persisted_buckets": h.persisted_buckets,
        "unpersisted_max": h.unpersisted_max,
        "table_full_events": h.table_full_events,
        "bumps_total": h.bumps_total,
        "incident": _incident_json(h.incident),
        "last_incident": _incident_json(h.last_incident),
        "sizing_peak": h.sizing_peak,
        "recorded_p99": h.recorded_p99,
        "recorded_high": h.recorded_high,
        "recorded_minutes": h.recorded_minutes,
        "recorded_attack_minutes": h.recorded_attack_minutes,
        "persisted_at": _instant_json(h.persisted_at),
        "refusals": dict(h.refusals),
    }


def _opt_int(v) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"not a count: {v!r}")
    return v


def history_from_json(d: dict) -> History:
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise ValueError("unknown state format")
    bumps = tuple(
        BumpRecord(_instant(b["at"]), int(b["old"]), int(b["new"]), str(b["trigger"]), bool(b.get("ok", True)))  # type: ignore[arg-type]
        for b in d.get("bumps", [])
    )
    return History(
        bumps=bumps,
        last_warn=_instant(d.get("last_warn")),
        last_drop=_instant(d.get("last_drop")),
        # A state file written before the two were told apart: its last loss may have been a drop.
        last_packet_drop=_instant(d["last_packet_drop"] if "last_packet_drop" in d else d.get("last_drop")),
        last_capture=_instant(d.get("last_capture")),
        persisted_max=_opt_int(d.get("persisted_max")),
        persisted_buckets=_opt_int(d.get("persisted_buckets")),
        unpersisted_max=_opt_int(d.get("unpersisted_max")),
        table_full_events=_opt_int(d.get("table_full_events")) or 0,
        bumps_total=_opt_int(d.get("bumps_total")) or 0,
        incident=_incident(d.get("incident")),
        last_incident=_incident(d.get("last_incident")),
        sizing_peak=_opt_int(d.get("sizing_peak")) or 0,
        recorded_p99=_opt_int(d.get("recorded_p99")) or 0,
        recorded_high=_opt_int(d.get("recorded_high")) or 0,
        recorded_minutes=_opt_int(d.get("recorded_minutes")) or 0,
        recorded_attack_minutes=_opt_int(d.get("recorded_attack_minutes")) or 0,
        persisted_at=_instant(d.get("persisted_at")),
        refusals=_refusals(d.get("refusals")),
    )


def _refusals(v) -> tuple[tuple[str, int], ...]:
    if v is None:
        return ()
    if not isinstance(v, dict):
        raise ValueError(f"not a table of counts: {v!r}")
    return tuple(sorted((str(k), _opt_int(n) or 0) for k, n in v.items()))


@dataclass(frozen=True)
class Peak:
    minute: int         # unix time of the minute's start
    count: int          # highest count of the worst namespace in that minute
    max: int            # nf_conntrack_max at that peak
    drops: int          # drops counted in that minute (kernel counters and table-full lines)
    attack: bool = False  # within an incident the guard judged attack-shaped: left out of sizing


class StateStore:
    def __init__(self, folder: Path, warn: Callable[[str], None] = lambda m: None) -> None:
        self.folder = Path(folder)
        self.warn = warn

    def _load_json(self, name: str) -> dict | None:
        path = self.folder / name
        try:
            text = read_text_nofollow(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.warn(f"cannot read {path}: {exc}; starting without it")
            return None
        try:
            return json.loads(text)
        except ValueError as exc:
            self._set_aside(path, f"not valid JSON ({exc})")
            return None

    def _set_aside(self, path: Path, why: str) -> None:
        aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
        try:
            os.rename(path, aside)
            self.warn(f"{path} is corrupt ({why}); set aside as {aside}, starting afresh: "
                      "cooldown and budget restart from zero")
        except OSError as exc:
            self.warn(f"{path} is corrupt ({why}) and could not be set aside: {exc}")

    def load_history(self) -> History:
        d = self._load_json(STATE_FILE)
        if d is None:
            return History()
        try:
            return history_from_json(d)
        except (KeyError, TypeError, ValueError) as exc:
            self._set_aside(self.folder / STATE_FILE, f"unexpected content: {exc}")
            return History()

    def save_history(self, h: History) -> None:
        ensure_private_dir(self.folder)
        atomic_write(self.folder / STATE_FILE, json.dumps(history_to_json(h), indent=1) + "\n", 0o600)

    def load_recorded(self) -> tuple[list[Peak], dict[int, list[tuple[int, float]]]]:
        """The per-minute peaks (7 days) and each namespace's last hour, from one read of the file."""
        d = self._load_json(PEAKS_FILE)
        if d is None:
            return [], {}
        try:
            peaks = [Peak(int(r[0]), int(r[1]), int(r[2]), int(r[3]), bool(r[4]) if len(r) > 4 else False)
                     for r in d["minutes"]]
        except (KeyError, TypeError, ValueError) as exc:
            self._set_aside(self.folder / PEAKS_FILE, f"unexpected content: {exc}")
            return [], {}
        try:
            hour = {int(k): [(int(m), float(f)) for m, f in v] for k, v in d.get("hour", {}).items()}
        except (AttributeError, TypeError, ValueError):
            hour = {}   # only the sparklines lose their history
        return peaks, hour

    def load_peaks(self) -> list[Peak]:
        return self.load_recorded()[0]

    def load_hour(self) -> dict[int, list[tuple[int, float]]]:
        """Per-namespace peak fill of each of the last 60 minutes (for sparklines)."""
        return self.load_recorded()[1]

    def save_peaks(self, peaks: list[Peak], hour: dict[int, list[tuple[int, float]]] | None = None) -> None:
        ensure_private_dir(self.folder)
        rows = [[p.minute, p.count, p.max, p.drops] + ([1] if p.attack else []) for p in peaks]
        doc = {"format": FORMAT, "minutes": rows,
               "hour": {str(k): [[m, round(f, 4)] for m, f in v] for k, v in (hour or {}).items()}}
        atomic_write(self.folder / PEAKS_FILE, json.dumps(doc) + "\n", 0o600)


class PeakRecorder:
    """Per-minute peaks of the worst namespace; hands back a finished minute to be saved."""

    def __init__(self, peaks: list[Peak], hour: dict[int, list[tuple[int, float]]] | None = None) -> None:
        self.peaks = peaks
        self.hour: dict[int, list[tuple[int, float]]] = hour or {}
        self._ns_fill: dict[int, float] = {}
        self._minute: int | None = None
        self._count = 0
        self._max = 0
        self._drops = 0
        self._attack = False
        self._last_drops: dict[int, int] = {}

    def observe(self, sample: Sample, extra_drops: int = 0, attack_since: float | None = None) -> bool:
        """Fold a sample in; True when a minute was completed (time to save). `attack_since`: the
        wall time an incident the guard judged attack-shaped started (its minutes, those already
        recorded too, are marked and left out of sizing), None when there is none."""
        minute = int(sample.at.wall // 60) * 60
        drops = 0
        for ns in sample.namespaces:
            before = self._last_drops.get(ns.inode)
            if before is not None and ns.drops > before:
                drops += ns.drops - before
            self._last_drops[ns.inode] = ns.drops
        finished = False
        if self._minute is not None and minute != self._minute:
            self.peaks.append(Peak(self._minute, self._count, self._max, self._drops, self._attack))
            cutoff = minute - PEAK_DAYS * 86400
            while self.peaks and self.peaks[0].minute < cutoff:
                self.peaks.pop(0)
            for inode, fill in self._ns_fill.items():
                self.hour.setdefault(inode, []).append((self._minute, fill))
            for inode in list(self.hour):
                kept = [(m, f) for m, f in self.hour[inode] if m > minute - 3600]
                if kept:
                    self.hour[inode] = kept
                else:
                    del self.hour[inode]
            self._ns_fill = {}
            self._count = self._drops = 0
            self._attack = False
            finished = True
        self._minute = minute
        if attack_since is not None:
            self._attack = True
            since = int(attack_since // 60) * 60
            if any(p.minute >= since and not p.attack for p in self.peaks):
                self.peaks = [p if p.minute < since or p.attack else Peak(p.minute, p.count, p.max, p.drops, True)
                              for p in self.peaks]
                finished = True
        worst = sample.worst
        if worst and worst.count >= self._count:
            self._count = worst.count
            self._max = sample.limits.max
        self._drops += drops + extra_drops
        for ns in sample.namespaces:
            fill = sample.fill(ns)
            if fill > self._ns_fill.get(ns.inode, -1.0):
                self._ns_fill[ns.inode] = fill
        return finished

    def current(self) -> list[Peak]:
        """Recorded peaks plus the minute in progress."""
        if self._minute is None:
            return list(self.peaks)
        return [*self.peaks, Peak(self._minute, self._count, self._max, self._drops, self._attack)]
