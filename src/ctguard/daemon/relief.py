"""Relief's actor: carries out ShortenTimeout / RestoreTimeout / TrimEntries.

A restore is a compare-and-set: a value other than the one ctguard wrote is the operator's,
and wins. The originals are saved (ctguard.store.relief) before the first write. Trims run in
a child process (`python3 -m ctguard.host.trim`): a slow pass never holds the loop.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from ctguard.config.policy import Policy
from ctguard.core.relief import advised_why
from ctguard.core.model import Instant, Outcome, RestoreTimeout, Sample, ShortenTimeout, TrimEntries
from ctguard.core.timeouts import sysctl_name
from ctguard.host.timeouts import SYSCTL_DIR, TimeoutChanged, read_timeouts, write_timeout
from ctguard.host.observe import Observer
from ctguard.store.relief import Record, ReliefStore

log = logging.getLogger(__name__)

TRIM_ENTRIES = 50_000       # entries a trim may change per pass
TRIM_BUDGET = 2.0           # seconds a trim pass may take


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

    def note(self, outcomes: list[Outcome], observe_only: bool) -> bool:
        """Remember what relief did or would have done (for `recommend`); True when the store changed."""
        noted = False
        for o in outcomes:
            a = o.action
            if isinstance(a, ShortenTimeout) and a.step != "up" and (o.ok or a.advise or observe_only):
                self.store.note(a.key, a.old, a.new, a.held, time.time())
                noted = True
        return noted

    def carry_out(self, action, policy) -> Outcome:
        if isinstance(action, ShortenTimeout):
            if action.advise:
                return Outcome(action, False, f"{advised_why(policy, action.key)}: nothing changed")
            return self._step_up(action) if action.step == "up" else self._shorten(action)
        if isinstance(action, RestoreTimeout):
            if action.advise:
                return Outcome(action, False, f"{advised_why(policy, action.key)}: nothing to restore")
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

    def _step_up(self, a: ShortenTimeout) -> Outcome:
        """A step back up: compare-and-set from what ctguard wrote to the next level's value; the
        saved original stays (only `value` changes in the record)."""
        key = (a.netns, a.key)
        prior = self.store.records.get(key)
        found, path = self._path(a.netns)
        if not found:
            return Outcome(a, False, f"netns {a.name} is gone")
        try:
            got = write_timeout(path, a.key, a.new, expect=a.old, sysctl_dir=self.sysctl_dir)
        except TimeoutChanged as exc:
            self._forget(key)
            return Outcome(a, False, f"{sysctl_name(a.key)} in netns {a.name} was set to {exc.found} "
                                     "by someone else during relief; their value stays", extra={"forget": True})
        except OSError as exc:
            return Outcome(a, False, f"cannot set {sysctl_name(a.key)} to {a.new} in netns {a.name}: {exc}; "
                                     "retried next turn")
        if prior is not None:
            self.store.records[key] = replace(prior, value=got)
            self._save_quietly()
        return Outcome(a, True, f"{sysctl_name(a.key)} {a.old} -> {got} s in netns {a.name}", read_back=got,
                       extra={"old": a.old})

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
        previous = dict(a.previous)
        for k, v in a.timeouts:
            args += ["--timeout", f"{k}={v}" + (f"/{previous[k]}" if k in previous else "")]
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


def relief_look(observer: Observer, policy: Policy, sample: Sample, netns: int) -> Sample:
    """What relief decides with: what holds the namespace's table (its shape, bounded by
    guard.sample_budget) and the namespace's current timeouts."""
    shape = sample.shape
    if shape is None or shape.netns != netns or not shape.states:
        shape = observer.shape(netns, policy.guard)
    found, path = observer.path_of(netns)
    values: dict[str, int] = {}
    if found:
        try:
            values = read_timeouts(path, [k for k, _ in policy.relief.timeouts])
        except OSError as exc:
            log.warning("relief cannot read the conntrack timeouts of netns %s: %s", netns, exc)
    return replace(sample, shape=shape, timeouts=((netns, tuple(sorted(values.items()))),))
