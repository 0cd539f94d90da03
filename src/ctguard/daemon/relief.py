"""Relief at the edges: per-namespace timeouts, the originals file, the actor and the trim child.

- `read_timeouts` / `write_timeout`: the nf_conntrack_*_timeout sysctls of ONE network
  namespace. They are per namespace (a write inside one changes that one only), so each
  access runs in a short-lived thread that entered the namespace (netns.run_in_netns); every
  write is read back.
- `ReliefStore`: `relief.json` in the state folder. The original value is written there
  before the first kernel write, so a crash, SIGKILL or reboot during relief still ends with
  the originals back (at the next start; a value written in another boot was undone by the
  reboot, since relief is never persisted to /etc).
- `ReliefActor`: carries out ShortenTimeout / RestoreTimeout / TrimEntries. A restore is a
  compare-and-set: a value other than the one ctguard wrote is the operator's, and wins.
- Trims run in a child process (`python3 -m ctguard.host.trim`): pyroute2's import alone
  costs ~20 MB of RSS, which the daemon never pays, and a slow pass never holds the loop.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ctguard.store.files import atomic_write, ensure_private_dir, read_text_nofollow
from ctguard.core.model import Instant, Outcome, Relieved, ReliefState, RestoreTimeout, ShortenTimeout, TrimEntries
from ctguard.host.netns import run_in_netns
from ctguard.config.policy import RELIEF_TIMEOUTS, sysctl_name

RELIEF_FILE = "relief.json"
FORMAT = 1
SYSCTL_DIR = "/proc/sys/net/netfilter"
TRIM_ENTRIES = 50_000       # entries a trim may change per pass
TRIM_BUDGET = 2.0           # seconds a trim pass may take


class TimeoutChanged(Exception):
    """The value is not the one ctguard wrote: someone else changed it."""

    def __init__(self, found: int) -> None:
        super().__init__(found)
        self.found = found


def sysctl_path(key: str, sysctl_dir: str = SYSCTL_DIR) -> str:
    if key not in RELIEF_TIMEOUTS:
        raise ValueError(f"not a relief timeout: {key!r}")
    return f"{sysctl_dir}/{sysctl_name(key)}"


def read_timeouts(netns_path: str | None, keys: Iterable[str], sysctl_dir: str = SYSCTL_DIR) -> dict[str, int]:
    """The current values of `keys` in the namespace at `netns_path` (None: ctguard's own)."""
    keys = list(keys)

    def read() -> dict[str, int]:
        out = {}
        for k in keys:
            try:
                with open(sysctl_path(k, sysctl_dir)) as fh:
                    out[k] = int(fh.read())
            except FileNotFoundError:
                continue        # an older kernel without this timeout
        return out

    return run_in_netns(netns_path, read)


def write_timeout(netns_path: str | None, key: str, value: int, expect: int | None = None,
                  sysctl_dir: str = SYSCTL_DIR) -> int:
    """Set one timeout in one namespace and return the value read back. With `expect`, only
    when the namespace still holds `expect` (else TimeoutChanged with what it holds)."""
    path = sysctl_path(key, sysctl_dir)

    def write() -> int:
        with open(path) as fh:
            found = int(fh.read())
        if expect is not None and found != expect:
            raise TimeoutChanged(found)
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)   # (O_TRUNC: a test's plain file)
        try:
            os.write(fd, str(value).encode())
        finally:
            os.close(fd)
        with open(path) as fh:
            got = int(fh.read())
        if got != value:
            raise OSError(errno.EIO, f"{path} holds {got} after writing {value}")
        return got

    return run_in_netns(netns_path, write)


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

    def boot_ids(self) -> list[tuple[int, str, str]]:
        return [(r.netns, r.key, r.since.boot_id) for r in self.records.values()]


Resolver = Callable[[int], "tuple[bool, str | None]"]   # netns inode -> (found, path or None for our own)


@dataclass
class Trim:
    proc: subprocess.Popen
    netns: int
    name: str


class ReliefActor:
    """Carries out relief actions through the timeout writer, the store and the trim child."""

    def __init__(self, store: ReliefStore, resolve: Resolver, now: Callable[[], Instant],
                 sysctl_dir: str = SYSCTL_DIR, python: str = sys.executable) -> None:
        self.store = store
        self.resolve = resolve
        self.now = now
        self.sysctl_dir = sysctl_dir
        self.python = python
        self.trims: list[Trim] = []

    def carry_out(self, action, policy) -> Outcome:
        if isinstance(action, ShortenTimeout):
            return self._shorten(action)
        if isinstance(action, RestoreTimeout):
            return self._restore(action)
        if isinstance(action, TrimEntries):
            return self._trim(action)
        return Outcome(action, False, "not a relief action")

    def _path(self, netns: int) -> tuple[bool, str | None]:
        rec = next((r for (n, _), r in self.store.records.items() if n == netns), None)
        if rec is not None and rec.path is not None:
            try:
                if os.stat(rec.path).st_ino == netns:
                    return True, rec.path
            except OSError:
                pass
        return self.resolve(netns)

    def _shorten(self, a: ShortenTimeout) -> Outcome:
        found, path = self._path(a.netns)
        if not found:
            return Outcome(a, False, f"netns {a.name} is gone; nothing changed")
        try:
            current = read_timeouts(path, [a.key], self.sysctl_dir).get(a.key)
        except OSError as exc:
            return Outcome(a, False, f"cannot read {sysctl_name(a.key)} in netns {a.name}: {exc}")
        if current is None or current <= a.new:
            return Outcome(a, False, f"{sysctl_name(a.key)} in netns {a.name} is {current}, "
                                     f"already at or below {a.new}")
        key = (a.netns, a.key)
        prior = self.store.records.get(key)
        self.store.records[key] = Record(a.netns, a.name, path, a.key, prior.original if prior else current,
                                         a.new, prior.since if prior else self.now())
        try:
            self.store.save()       # the original is on disk before the kernel changes
        except OSError as exc:
            if prior is None:
                del self.store.records[key]
            else:
                self.store.records[key] = prior
            return Outcome(a, False, f"cannot save the original in {self.store.path}: {exc}; "
                                     "relief changes nothing it could not undo")
        try:
            got = write_timeout(path, a.key, a.new, expect=current, sysctl_dir=self.sysctl_dir)
        except TimeoutChanged as exc:
            self._forget(key, prior)
            return Outcome(a, False, f"{sysctl_name(a.key)} in netns {a.name} changed to {exc.found} "
                                     "while ctguard looked; left as is")
        except OSError as exc:
            return Outcome(a, False, f"cannot set {sysctl_name(a.key)} to {a.new} in netns {a.name}: {exc}",
                           extra={"saved": True})
        self.store.total += 1
        self._save_quietly()
        return Outcome(a, True, f"{sysctl_name(a.key)} {current} -> {got} s in netns {a.name}",
                       read_back=got, extra={"old": current})

    def _forget(self, key: tuple[int, str], prior: Record | None = None) -> None:
        if prior is None:
            self.store.records.pop(key, None)
        else:
            self.store.records[key] = prior
        self._save_quietly()

    def _save_quietly(self) -> None:
        try:
            self.store.save()
        except OSError:
            pass    # the next save carries it; a stale record only leads to a compare-and-set that declines

    def _restore(self, a: RestoreTimeout) -> Outcome:
        key = (a.netns, a.key)
        found, path = self._path(a.netns)
        if not found:
            self._forget(key)
            return Outcome(a, False, f"netns {a.name} is gone; its relief is forgotten", extra={"forget": True,
                                                                                            "why": "gone"})
        try:
            got = write_timeout(path, a.key, a.original, expect=a.relieved, sysctl_dir=self.sysctl_dir)
        except TimeoutChanged as exc:
            self._forget(key)
            return Outcome(a, False, f"{sysctl_name(a.key)} in netns {a.name} was set to {exc.found} "
                                     f"by someone else during relief; their value stays (original {a.original})",
                           extra={"forget": True, "why": "operator", "found": exc.found})
        except FileNotFoundError:
            self._forget(key)
            return Outcome(a, False, f"netns {a.name} is gone; its relief is forgotten",
                           extra={"forget": True, "why": "gone"})
        except OSError as exc:
            return Outcome(a, False, f"cannot restore {sysctl_name(a.key)} to {a.original} in netns "
                                     f"{a.name}: {exc}; retried next turn")
        self._forget(key)
        return Outcome(a, True, f"{sysctl_name(a.key)} {a.relieved} -> {got} s in netns {a.name}",
                       read_back=got)

    def _trim(self, a: TrimEntries) -> Outcome:
        if any(t.netns == a.netns and t.proc.poll() is None for t in self.trims):
            return Outcome(a, False, f"a trim of netns {a.name} is still running")
        found, path = self._path(a.netns)
        if not found:
            return Outcome(a, False, f"netns {a.name} is gone")
        args = [self.python, "-m", "ctguard.host.trim", "--netns-path", path or "",
                "--max-entries", str(TRIM_ENTRIES), "--budget", str(TRIM_BUDGET)]
        for k, v in a.timeouts:
            args += ["--timeout", f"{k}={v}"]
        try:
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    close_fds=True)
        except OSError as exc:
            return Outcome(a, False, f"cannot start a trim: {exc}")
        self.trims.append(Trim(proc, a.netns, a.name))
        return Outcome(a, True, f"trim of netns {a.name} started (pid {proc.pid})")

    def reap(self) -> list[tuple[Trim, dict]]:
        """Finished trims and what each reported ({"changed": N, ...} or {"error": ...})."""
        done = []
        for t in list(self.trims):
            if t.proc.poll() is None:
                continue
            out, err = t.proc.communicate()
            self.trims.remove(t)
            try:
                report = json.loads(out.decode(errors="replace").strip().splitlines()[-1])
            except (ValueError, IndexError):
                report = {"error": err.decode(errors="replace").strip()[-500:] or f"exit code {t.proc.returncode}"}
            done.append((t, report))
        return done

    def cancel(self) -> None:
        """Relief is over (restored, turned off): a trim still running has nothing left to do."""
        for t in self.trims:
            if t.proc.poll() is None:
                t.proc.terminate()
            try:
                t.proc.communicate(timeout=1.0)
            except subprocess.TimeoutExpired:
                t.proc.kill()
                t.proc.communicate()
        self.trims.clear()

    def stop(self, timeout: float = 1.0) -> None:
        for t in self.trims:
            try:
                t.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                t.proc.terminate()


def bundle_collector(ctx) -> tuple[dict, dict[str, bytes]]:
    """Evidence: the relief in force when the bundle was taken (relief.json of the policy's
    state folder), so a review sees which timeouts were shortened, where, since when, and
    what they will be put back to."""
    import tomllib

    from ctguard.config.policy import State

    try:
        doc = tomllib.loads(ctx.policy_text) if ctx.policy_text else {}
    except tomllib.TOMLDecodeError:
        doc = {}
    relief_doc = doc.get("relief", {}) if isinstance(doc.get("relief"), dict) else {}
    state = doc.get("state", {}) if isinstance(doc.get("state"), dict) else {}
    store = ReliefStore(Path(state.get("dir", str(State().dir))))
    problems: list[str] = []
    store.load(warn=problems.append, set_aside=False)
    data = {"mode": relief_doc.get("mode", "advise"), "file": str(store.path), "total": store.total,
            "active": [r.to_json() for r in store.records.values()]}
    if problems:
        data["problems"] = problems
    files = {}
    try:
        files["relief.json"] = read_text_nofollow(store.path).encode()
    except OSError:
        pass
    return data, files
