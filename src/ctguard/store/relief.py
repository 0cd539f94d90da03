"""Relief's saved originals: `relief.json` in the state folder.

The original value is written there before the first kernel write, so a crash, SIGKILL or
reboot during relief still ends with the originals back (at the next start; a value written
in another boot was undone by the reboot, since relief is never persisted to /etc).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ctguard.core.model import Instant, Relieved, ReliefState
from ctguard.core.timeouts import RELIEF_TIMEOUTS
from ctguard.store.files import atomic_write, ensure_private_dir, read_text_nofollow

RELIEF_FILE = "relief.json"
FORMAT = 1


def _instant_json(i: Instant) -> dict:
    return {"wall": i.wall, "boot": i.boot, "boot_id": i.boot_id}


@dataclass
class Record:
    netns: int
    name: str
    path: str | None        # None: ctguard's own (host) namespace
    key: str
    original: int
    value: int
    since: Instant

    def to_json(self) -> dict:
        return {"netns": self.netns, "name": self.name, "path": self.path, "key": self.key,
                "original": self.original, "value": self.value, "since": _instant_json(self.since)}

    @classmethod
    def from_json(cls, d: dict) -> "Record":
        s = d["since"]
        rec = cls(int(d["netns"]), str(d["name"]), d["path"] if d.get("path") is None else str(d["path"]),
                  str(d["key"]), int(d["original"]), int(d["value"]),
                  Instant(float(s["wall"]), float(s["boot"]), str(s.get("boot_id", ""))))
        if rec.key not in RELIEF_TIMEOUTS:
            raise ValueError(f"unknown timeout {rec.key!r}")
        return rec


@dataclass
class ReliefStore:
    """relief.json: what relief changed and the originals, written before each kernel write."""

    folder: Path
    records: dict[tuple[int, str], Record] = field(default_factory=dict)
    total: int = 0
    calm: dict[int, Instant] = field(default_factory=dict)     # for `ctguard status`: time left
    seen: dict[str, dict] = field(default_factory=dict)        # per key, for `ctguard recommend`

    def note(self, key: str, original: int, value: int, held: float, when: float) -> None:
        """Remember that relief shortened (or would have shortened) `key`: recommend's evidence."""
        s = self.seen.setdefault(key, {"times": 0})
        s.update(times=int(s.get("times", 0)) + 1, original=original, value=value,
                 held=max(float(s.get("held", 0.0)), held), last=when)

    @property
    def path(self) -> Path:
        return Path(self.folder) / RELIEF_FILE

    def load(self, warn: Callable[[str], None] = lambda m: None, set_aside: bool = True) -> None:
        try:
            text = read_text_nofollow(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            warn(f"cannot read {self.path}: {exc}; relief left behind (if any) cannot be undone automatically")
            return
        try:
            doc = json.loads(text)
            if doc.get("format") != FORMAT:
                raise ValueError("unknown format")
            recs = [Record.from_json(d) for d in doc.get("active", [])]
            self.total = int(doc.get("total", 0))
            self.calm = {int(n): Instant(float(s["wall"]), float(s["boot"]), str(s.get("boot_id", "")))
                         for n, s in doc.get("calm_since", {}).items()}
            self.seen = {str(k): dict(v) for k, v in doc.get("seen", {}).items() if k in RELIEF_TIMEOUTS}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            if not set_aside:
                warn(f"{self.path} is damaged ({exc})")
                return
            warn(f"{self.path} is damaged ({exc}); set aside as {self.path.name}.bad. Check the conntrack timeouts "
                 "of namespaces under relief by hand (`ctguard status` lists none now)")
            os.replace(self.path, self.path.with_name(self.path.name + ".bad"))
            return
        self.records = {(r.netns, r.key): r for r in recs}

    def save(self) -> None:
        ensure_private_dir(Path(self.folder))
        doc = {"format": FORMAT, "total": self.total,
               "active": [r.to_json() for r in self.records.values()],
               "calm_since": {str(n): _instant_json(i) for n, i in self.calm.items()
                              if any(r.netns == n for r in self.records.values())},
               "seen": self.seen}
        atomic_write(self.path, json.dumps(doc, indent=1) + "\n", 0o600)

    def state(self) -> ReliefState:
        return ReliefState(active=tuple(Relieved(r.netns, r.name, r.key, r.original, r.value, r.since)
                                        for r in self.records.values()), total=self.total,
                           calm_since=tuple(self.calm.items()))

    def track_calm(self, state: ReliefState) -> bool:
        """Keep when each relieved namespace turned calm (for `ctguard status`: the time left
        before the restore); True when that changed and the file wants saving."""
        calm = {n: t for n, t in state.calm_since if any(x.netns == n for x in state.active)}
        if calm == self.calm:
            return False
        self.calm = calm
        return True

    def keep_only(self, state: ReliefState) -> list[tuple[int, str]]:
        """Forget the records `state` no longer holds (relief undone by a reboot); the (netns, key) forgotten."""
        gone = [nk for nk in self.records if not any(x.netns == nk[0] and x.key == nk[1] for x in state.active)]
        for nk in gone:
            del self.records[nk]
        return gone

    def boot_ids(self) -> list[tuple[int, str, str]]:
        return [(r.netns, r.key, r.since.boot_id) for r in self.records.values()]
