"""`ctguard run`: the event loop. It wires the adapters to the core and decides nothing.

One selector holds the signal wake-up fd and the journal's fd; the sampling timer is the
selector's timeout. A kernel `table full` line therefore leads to a sample and a decision in
the same loop turn, not at the next tick, and nothing polls busily.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path

from ctguard import metrics, persist
from ctguard import policy as policy_mod
from ctguard.act import Actor
from ctguard.clock import Clock
from ctguard.files import atomic_write, ensure_private_dir
from ctguard import incident as incident_text
from ctguard.decide import (
    advance, budget_left, decide, decide_start, incident_changes, next_interval, note_bundle, upper_bound,
)
from ctguard.kernel import ConntrackNotLoaded, Kernel
from ctguard.model import (
    Capture, Decision, History, Instant, Outcome, Persist, Refuse, Sample, SetBuckets, SetMax, TableFull, Warn,
)
from ctguard.observe import Observer
from ctguard.policy import Policy, PolicyError, sysctl_name
from ctguard import relief as relief_core
from ctguard.model import RestoreTimeout, ShortenTimeout, TrimEntries
from ctguard.relief_io import ReliefActor, ReliefStore, read_timeouts
from ctguard.resize import Resizer
from ctguard.sizing import p99
from ctguard import ticks
from ctguard.ticks import Ticks
from ctguard.state import PEAK_DAYS, PeakRecorder, StateStore
from ctguard.persistwatch import PersistWatch

log = logging.getLogger("ctguard")

EX_CONFIG = 78
METRICS_EVERY = 1.0         # seconds: the textfile is rewritten at most this often, even at fast_interval
CURSOR_EVERY = 5.0          # seconds between journal-cursor saves while lines keep coming
NOT_LOADED_RETRY = 2.0      # seconds between looks for nf_conntrack while it is not loaded


def jsonable(obj):
    if is_dataclass(obj):
        d = {k: jsonable(v) for k, v in asdict(obj).items()}
        d["kind"] = type(obj).__name__
        return d
    if isinstance(obj, (list, tuple)):
        return [jsonable(x) for x in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


@dataclass
class Paths:
    proc_root: str = "/proc"
    sys_root: str = "/sys"
    run_netns: str = "/run/netns"


@dataclass
class Children:
    """Capture processes started beside the loop; reaped without ever waiting on them."""

    running: list[tuple[subprocess.Popen, str, Path]] = field(default_factory=list)
    finished: dict[int, tuple[int, str]] = field(default_factory=dict)   # pid -> (exit code, output), the last 32

    def reap(self) -> list[tuple[str, int, str]]:
        done = []
        for entry in list(self.running):
            proc, reason, decision_file = entry
            if proc.poll() is not None:
                out, err = proc.communicate()
                text = out.decode(errors="replace").strip() if proc.returncode == 0 else err.decode(errors="replace").strip()
                done.append((reason, proc.returncode, text))
                self.finished[proc.pid] = (proc.returncode, text)   # for `ctguard capture` waiting on it
                while len(self.finished) > 32:
                    del self.finished[next(iter(self.finished))]
                self.running.remove(entry)
                decision_file.unlink(missing_ok=True)
                decision_file.with_name(decision_file.name.replace("-decision-", "-timeline-")).unlink(missing_ok=True)
        return done


class Daemon:
    def __init__(self, policy_path: Path, policy: Policy, paths: Paths | None = None,
                 notifier=None, events=None) -> None:
        from ctguard.events import EventLog
        from ctguard.notify import Notifier

        self.policy_path = policy_path
        self.policy = policy
        self.paths = paths or Paths()
        self.notifier = notifier or Notifier()
        self.events = events or EventLog()
        self.clock = Clock(self.paths.proc_root)
        self.kernel = Kernel(self.paths.proc_root, self.paths.sys_root)
        self.observer = Observer(self.kernel, self.clock, policy.watch.namespaces,
                                 self.paths.proc_root, self.paths.run_netns)
        self.store = StateStore(policy.state.dir, warn=lambda m: log.warning("%s", m))
        self.history: History = self.store.load_history()
        self.peaks = PeakRecorder(*self.store.load_recorded())
        self._note_p99()
        self.relief_store = ReliefStore(policy.state.dir)
        self.relief_store.load(warn=lambda m: log.warning("%s", m))
        self.history = replace(self.history, relief=self.relief_store.state())
        self.relief_actor = ReliefActor(self.relief_store, self.observer.path_of, self.clock.now)
        self.resizer = Resizer(self.kernel.write_hashsize)
        self.actor = Actor(self.kernel, policy, self._start_capture, wall_clock=time.time, relief=self.relief_actor,
                           start_resize=self.resizer.start)
        self.children = Children()
        self.follower = None
        self.running = True
        self.ready = False
        self.last_sample: Sample | None = None
        self.last_action = "none yet"
        self._metrics_at = -1e9
        self._metrics_folder_said: bool | None = None   # what was last said about the textfile folder
        self._cursor_at = -1e9
        self._cursor_saved: str | None = None
        self._not_loaded_said = False
        self._sel = selectors.DefaultSelector()
        self._sig_r, self._sig_w = socket.socketpair()
        self._captures = 0
        self._failing: dict[str, str] = {}     # file kind -> the error last said about it
        self._deferred: set[str] = set()       # files not written while the kernel rehashed
        self.persistwatch = PersistWatch(self)  # issue 16: boot values, initramfs, max lowered by others
        from ctguard.recorder import FlightRecorder

        self.recorder = FlightRecorder()       # the last 15 minutes, for every bundle's timeline
        self._queued: list[tuple[Capture, Decision, dict | None]] = []  # started once the turn is recorded
        self._findings: list[str] = []         # finding ids of the last automatic bundle (metrics)
        self._in_turn = False
        self.control = None                     # the control socket (ctguard.control), once open
        self.reload_rejected: str | None = None  # why the last reload was refused, until one succeeds
        self.started_at = time.time()
        self._labels: dict = {}                 # inode -> NamespaceReading of the last sample (names in entries)
        self._ticks: Ticks | None = None        # count-only reads until the next full turn (ctguard.ticks)
        self._quiet: tuple[float, dict[int, int]] | None = None  # the last tick that woke nothing

    def _note_p99(self) -> None:
        """What persists is sized on the recorded peaks too (sizing.advice): keep their p99 in the history."""
        cutoff = time.time() - PEAK_DAYS * 86400
        recent = [p.count for p in self.peaks.current() if p.minute > cutoff]
        self.history = self.history.with_(recorded_p99=p99(recent))

    # -- wiring -----------------------------------------------------------------------------

    def _open_journal(self) -> None:
        from ctguard import journal

        cursor = journal.load_cursor(self.policy.state.dir)
        self.follower = journal.open_follower(cursor=cursor)
        if self.follower is None:
            self.events.emit("journal-unavailable", "no journald: running on sampling alone")
            return
        self._sel.register(self.follower.fileno(), selectors.EVENT_READ, "journal")
        # Lines written while ctguard was down are history: count them, do not act on them.
        backlog = self.follower.read_events()
        if backlog:
            self.history = advance(self.history, None, [self._table_full(e) for e in backlog], [],
                                   self.clock.now(), self.policy)
            self._safe(self.store.save_history, self.history, what="state")
            log.info("%d kernel table-full lines were written while ctguard was not running", len(backlog))

    def _table_full(self, ev) -> TableFull:
        return TableFull(self.clock.now(), ev.netns, ev.suppressed, ev.backlog)

    def _install_signals(self) -> None:
        self._sig_r.setblocking(False)
        self._sig_w.setblocking(False)
        signal.set_wakeup_fd(self._sig_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, lambda *_: None)  # the wake-up fd carries the number
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self._sel.register(self._sig_r.fileno(), selectors.EVENT_READ, "signal")
        self._sel.register(self.resizer.fileno(), selectors.EVENT_READ, "resize")

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        self._open_control()
        from ctguard.events import echo_wanted

        self.events.echo = self.events.echo or echo_wanted()
        self.events.emit("start", self._start_line())
        for warning in policy_mod.warnings_for(self.policy, self._kernel_max()):
            log.warning("%s", warning)
        self._open_journal()
        next_sample = time.monotonic()
        next_tick = next_sample
        wd = self.notifier.watchdog_interval()
        next_watchdog = time.monotonic()
        try:
            while self.running:
                now = time.monotonic()
                wake = next_sample if self._ticks is None else min(next_sample, next_tick)
                wake = wake if not wd else min(wake, next_watchdog)
                journal_timeout = self.follower.timeout() if self.follower else None
                timeout = max(0.0, wake - now)
                if journal_timeout is not None:
                    timeout = min(timeout, journal_timeout)
                control_timeout = self.control.timeout() if self.control else None
                if control_timeout is not None:
                    timeout = min(timeout, control_timeout)
                kernel_events: list[TableFull] = []
                for key, _ in self._sel.select(timeout):
                    if key.data == "signal":
                        self._signals()
                    elif key.data == "journal":
                        kernel_events.extend(self._read_journal())
                    elif key.data == "resize":
                        self._resize_done(self.resizer.collect())
                    elif key.data == "control" and self.control is not None:
                        self.control.ready(key.fileobj)
                if self.control is not None:
                    self.control.expire()
                if not self.running:
                    break
                now = time.monotonic()
                if not kernel_events and now < next_sample and self._ticks is not None and now >= next_tick:
                    next_tick = now + self._ticks.every
                    if self._tick():
                        next_sample = now      # a count rose: a full turn now
                if kernel_events or now >= next_sample:
                    if self.follower is not None and not kernel_events:
                        kernel_events = self._read_journal()   # a safety net for a missed wake-up
                    interval = self._turn(kernel_events)
                    next_sample = time.monotonic() + interval
                    next_tick = time.monotonic() + (self._ticks.every if self._ticks else 0.0)
                self.resizer.launch()   # after the turn's files are written (ctguard.resize)
                if wd and time.monotonic() >= next_watchdog:
                    # Only a loop that gets here pings: a stuck loop lets systemd's watchdog fire.
                    self.notifier.watchdog()
                    next_watchdog = time.monotonic() + wd
        finally:
            self._stop()
        return 0

    def _tick(self) -> bool:
        """A count-only read between full turns; True when it wakes a full turn now. The quiet
        tick before the wake is the reference of that turn's rate (ticks.note_quiet)."""
        assert self._ticks is not None
        counts = self.observer.counts()
        at = self.clock.now().boot
        if ticks.woken(self._ticks, counts) is None:
            self._quiet = (at, counts)
            return False
        if self._quiet is not None:
            self.history = ticks.note_quiet(self.history, self._ticks, *self._quiet)
        return True

    def _start_line(self) -> str:
        """The start entry: version, the policy files in force, mode, what is watched, max and ceiling."""
        from ctguard import __version__

        p = self.policy
        files = ", ".join([p.source, *p.dropins])
        kmax = self._kernel_max()
        return (f"ctguard {__version__} starting with {files} (mode {p.mode}); watching "
                f"{'every network namespace' if p.watch.namespaces == 'all' else 'the host namespace only'}; "
                f"nf_conntrack_max {kmax if kmax is not None else 'unknown (nf_conntrack not loaded)'}, "
                f"ceiling {p.bump.ceiling}")

    def _kernel_max(self) -> int | None:
        try:
            return self.kernel.read_max()
        except OSError:
            return None

    def _read_journal(self) -> list[TableFull]:
        if self.follower is None:
            return []
        try:
            raw = self.follower.read_events()
        except Exception as exc:  # the journal must never take the loop down
            log.warning("reading the journal failed: %s", exc)
            return []
        now = time.monotonic()
        cursor = self.follower.cursor
        if cursor and cursor != self._cursor_saved and now - self._cursor_at >= CURSOR_EVERY:
            self._save_cursor()
        return [self._table_full(e) for e in raw]

    def _save_cursor(self) -> None:
        from ctguard import journal

        cursor = self.follower.cursor if self.follower else None
        if not cursor or cursor == self._cursor_saved:
            return
        try:
            journal.save_cursor(self.policy.state.dir, cursor)
            self._cursor_saved = cursor
            self._cursor_at = time.monotonic()
        except OSError as exc:
            log.warning("cannot save the journal cursor in %s: %s", self.policy.state.dir, exc)

    def _signals(self) -> None:
        try:
            data = self._sig_r.recv(64)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.running = False
            elif signum == signal.SIGHUP:
                self._reload()

    def _turn(self, kernel_events: list[TableFull]) -> float:
        """One observe-decide-act-record turn; returns the seconds until the next one."""
        self._ticks = None      # planned again at the end of a turn that completes
        for reason, code, out in self.children.reap():
            if code == 0 and out:
                top = self._diagnose(out.splitlines()[-1])
                self.events.emit("bundle", f"evidence bundle captured ({reason}): {out}"
                                 + (f"; top finding: {top}" if top else ""),
                                 CTGUARD_BUNDLE=out.splitlines()[-1], CTGUARD_REASON=reason,
                                 CTGUARD_FINDING=top or None)
                self.history = note_bundle(self.history, Path(out.splitlines()[-1]).name)
            else:
                log.warning("evidence capture (%s) failed with exit code %s: %s", reason, code, out[-500:])
        self._reap_trims()
        try:
            sample = self.observer.sample()
        except ConntrackNotLoaded as exc:
            if not self._not_loaded_said:
                log.warning("%s", exc)
                self.events.emit("waiting", "nf_conntrack is not loaded; ctguard waits for it and starts guarding when it appears")
                self._not_loaded_said = True
            self.notifier.status("waiting for nf_conntrack to be loaded")
            if not self.ready:
                self.notifier.ready()   # running and healthy, just nothing to guard yet
                self.ready = True
            return NOT_LOADED_RETRY
        now = self.clock.now()
        if self.last_sample is None:
            self._start(sample, now)
        if self.resizer.busy():
            sample = replace(sample, resizing=self.resizer.target)
        sample = self.persistwatch.before_decide(sample, now)
        decision = decide(self.policy, sample, self.history, now, kernel_events)
        if decision.needs_shape is not None:
            # The bump would pass [guard] ceiling: look at the table (bounded by
            # guard.sample_budget) and decide again knowing its shape.
            sample = replace(sample, shape=self.observer.shape(decision.needs_shape, self.policy.guard))
            decision = decide(self.policy, sample, self.history, now, kernel_events)
        if decision.needs_relief is not None:
            # Relief may shorten timeouts here: look at what holds the table and at the
            # namespace's current timeouts, and decide again knowing them.
            sample = self._relief_look(sample, decision.needs_relief)
            decision = decide(self.policy, sample, self.history, now, kernel_events)
        self._in_turn = True           # captures asked for now are automatic: queued, limited per incident
        try:
            outcomes = self.actor.carry_out(decision) if decision.actions else []
        finally:
            self._in_turn = False
        before = self.history
        self.history = advance(self.history, sample, kernel_events, outcomes, now, self.policy)
        calm = {n: t for n, t in self.history.relief.calm_since if any(x.netns == n for x in self.history.relief.active)}
        if calm != self.relief_store.calm:
            self.relief_store.calm = calm       # for `ctguard status`: the time left before the restore
            self._safe(lambda _: self.relief_store.save(), None, what="relief", where=str(self.relief_store.path))
        self._labels = {ns.inode: ns for ns in sample.namespaces}
        started, ended = incident_changes(before, self.history)
        if started is not None:
            w = sample.worst
            self.events.emit("incident-start", incident_text.start_message(started, sample.worst_fill, w.count if w else 0),
                             **incident_text.start_fields(started, sample.worst_fill))
        open_incident = self.history.incident
        self.recorder.turn(sample, decision.pressure, outcomes, kernel_events,
                           open_incident.id if open_incident is not None else None)
        self._report(decision, outcomes, kernel_events)
        if ended is not None:
            self.events.emit("incident-end", incident_text.end_message(ended), **incident_text.end_fields(ended))
            # The end of an incident gets its own bundle: the whole incident's timeline and its peak.
            self._queued.append((Capture("incident-end", ended.netns), decision, incident_text.summary(ended)))
        self.persistwatch.after_turn(sample, outcomes)
        extra_drops = sum(1 + e.suppressed for e in kernel_events if not e.backlog)
        # While the kernel rehashes, an fsync waits for it (ctguard.resize): files wait too.
        rehashing = self.resizer.running()
        if self.peaks.observe(sample, extra_drops):
            if rehashing:
                self._deferred.add("peaks")
            else:
                self._safe(lambda p: self.store.save_peaks(p, self.peaks.hour), self.peaks.peaks, what="peaks")
            self._note_p99()
        if outcomes or kernel_events or started is not None or ended is not None:
            if rehashing:
                self._deferred.add("state")
            else:
                self._safe(self.store.save_history, self.history, what="state")
        # Captures start once the bump is on record (state file) and the recorder holds this turn.
        self._launch_captures()
        self.last_sample = sample
        if not rehashing:
            self._write_metrics(sample)
        self.notifier.status(self._status_line(f"{decision.summary}; last action: {self.last_action}"))
        self.events.flush()
        if not self.ready:
            self.notifier.ready()
            self.ready = True
        self._ticks, self._quiet = ticks.plan(self.policy, sample, decision), None
        return next_interval(self.policy, decision)

    def _resize_done(self, outcomes: list[Outcome]) -> None:
        """A resize beside the loop finished: fold its read-back outcome in and report it."""
        if not outcomes:
            return
        self.history = advance(self.history, None, [], outcomes, self.clock.now(), self.policy)
        self._report(Decision((), None, 0.0, 0.0, False, "resize done"), outcomes, [])
        self._safe(self.store.save_history, self.history, what="state")
        if "peaks" in self._deferred:
            self._safe(lambda p: self.store.save_peaks(p, self.peaks.hour), self.peaks.peaks, what="peaks")
        self._deferred.clear()
        self.events.flush()

    def _relief_look(self, sample: Sample, netns: int) -> Sample:
        shape = sample.shape
        if shape is None or shape.netns != netns or not shape.states:
            shape = self.observer.shape(netns, self.policy.guard)
        found, path = self.observer.path_of(netns)
        values: dict[str, int] = {}
        if found:
            try:
                values = read_timeouts(path, [k for k, _ in self.policy.relief.timeouts])
            except OSError as exc:
                log.warning("relief cannot read the conntrack timeouts of netns %s: %s", netns, exc)
        return replace(sample, shape=shape, timeouts=((netns, tuple(sorted(values.items()))),))

    def _reap_trims(self) -> None:
        for trim, report in self.relief_actor.reap():
            if "error" in report:
                log.warning("relief: the trim of netns %s failed: %s", trim.name, report["error"])
                continue
            self.events.emit("relief-trimmed",
                             f"relief: capped the remaining timeout of {report.get('changed', 0)} existing entries "
                             f"in netns {trim.name} ({report.get('seen', 0)} looked at, {report.get('gone', 0)} "
                             f"already gone, {report.get('seconds', 0)} s"
                             + (", cut short by its bounds)" if report.get("cut_short") else ")"),
                             CTGUARD_NETNS=trim.netns, CTGUARD_ENTRIES=report.get("changed", 0),
                             CTGUARD_REASON="trim")

    def _relief_restore_all(self, why: str) -> None:
        """Put every relieved timeout back now (stop, or relief turned off by a reload)."""
        actions = tuple(RestoreTimeout(x.netns, x.name, x.key, x.original, x.value, why)
                        for x in self.history.relief.active)
        self.relief_actor.cancel()
        if not actions:
            return
        decision = Decision(actions, None, 0.0, 0.0, False, why)
        outcomes = self.actor.carry_out(decision)
        self.history = replace(self.history, relief=relief_core.advance(
            self.history.relief, self.history, None, outcomes, self.clock.now(), self.policy))
        self._report(decision, outcomes, [])

    def _start(self, sample: Sample, now: Instant) -> None:
        self._not_loaded_said = False
        restores, kept = relief_core.at_start(self.history.relief, now.boot_id, self.relief_store.boot_ids())
        for (n, k) in list(self.relief_store.records):
            if not any(x.netns == n and x.key == k for x in kept.active):
                log.info("relief of nf_conntrack_%s_timeout in netns %s was undone by a reboot; forgotten", k, n)
                del self.relief_store.records[(n, k)]
        self.history = replace(self.history, relief=kept)
        if restores:
            decision = Decision(tuple(restores), None, 0.0, 0.0, False, "relief left behind")
            outcomes = self.actor.carry_out(decision)
            self.history = replace(self.history, relief=relief_core.advance(
                self.history.relief, self.history, None, outcomes, now, self.policy))
            self._report(decision, outcomes, [])
        persisted = persist.read_persisted_max(self.policy.persist.sysctl_file)
        start = decide_start(self.policy, sample.limits, persisted)
        if start.actions:
            outcomes = self.actor.carry_out(start)
            self.history = advance(self.history, None, [], outcomes, now, self.policy)
            self._report(start, outcomes, [])
            self._safe(self.store.save_history, self.history, what="state")

    def _safe(self, fn, arg, what: str, where: str | None = None) -> None:
        """Write a file; a failure is said once (and its recovery once), not every turn."""
        try:
            fn(arg)
        except OSError as exc:
            said = f"{exc.strerror or exc} ({exc.filename or where or self.policy.state.dir})"
            if self._failing.get(what) != said:
                log.warning("cannot write the %s file: %s; the previous file is unchanged, ctguard goes on "
                            "and will say when it can write again", what, said)
                self._failing[what] = said
        else:
            if self._failing.pop(what, None) is not None:
                log.info("the %s file is written again", what)

    def _write_metrics(self, sample: Sample) -> None:
        if not self.policy.metrics.textfile:
            return
        now = time.monotonic()
        if now - self._metrics_at < METRICS_EVERY:
            return
        self._metrics_at = now
        if not self._metrics_folder_ready():
            return
        text = metrics.render(sample, self.history, self.policy.bump.ceiling,
                              budget_left(self.policy, self.history, sample.at),
                              upper_bound(self.policy, sample.limits)[0], self.kernel.slab_bytes())
        from ctguard.recorder import metrics_text

        last = self.history.incident or self.history.last_incident
        text += metrics_text(last.started.wall if last else None, self._findings)
        text += self.persistwatch.metrics()
        self._safe(lambda t: metrics.write(self.policy.metrics.textfile, t), text, what="metrics",
                   where=self.policy.metrics.textfile)

    def _metrics_folder_ready(self) -> bool:
        """A host without node_exporter has no textfile folder (and the unit's sandbox keeps
        /var read-only): metrics are off until the folder appears, said once, not a failure."""
        path = self.policy.metrics.textfile
        ready = metrics.folder_ready(path)
        if ready != self._metrics_folder_said:
            if not ready:
                # Under systemd the sandbox's writable folders are fixed when the service starts:
                # a folder made later stays read-only to ctguard until it is restarted.
                then = ("; once it exists, `systemctl restart ctguard` (the sandbox fixes its writable "
                        "folders at start)") if os.environ.get("INVOCATION_ID") else ""
                log.info("metrics are off until %s exists (node_exporter's textfile folder: install "
                         "prometheus-node-exporter, or set [metrics] textfile)%s", Path(path).parent, then)
            elif self._metrics_folder_said is not None:
                log.info("%s exists: metrics are written to %s", Path(path).parent, path)
            self._metrics_folder_said = ready
        return ready

    def _report(self, decision: Decision, outcomes: list[Outcome], kernel_events: list[TableFull]) -> None:
        ev = self.events
        for o in outcomes:
            a = o.action
            if o.pending:
                log.info("%s", o.detail)    # reported when the worker is done (_resize_done)
                continue
            if isinstance(a, SetMax):
                fields = dict(CTGUARD_NETNS=a.netns or "", CTGUARD_FILL=f"{a.fill:.4f}", CTGUARD_OLD_MAX=a.old,
                              CTGUARD_NEW_MAX=o.read_back or a.new, CTGUARD_REASON=a.trigger)
                fields.update(self._ns_fields(a.netns))
                if a.need:
                    fields.update(CTGUARD_RATE=f"{a.rate:.0f}", CTGUARD_NEED=a.need, CTGUARD_HORIZON=f"{a.cover:g}")
                if self.history.incident is not None:
                    fields["CTGUARD_INCIDENT"] = self.history.incident.id
                in_ns = self._in_ns(a.netns)
                if o.ok:
                    verb = "lowered" if a.new < a.old else "raised"   # an operator's --lower
                    self.last_action = f"{'bumped' if a.new > a.old else 'lowered'} {a.old} -> {o.read_back} ({a.trigger})"
                    ev.emit("bump", f"{verb} nf_conntrack_max {a.old} -> {o.read_back}{in_ns}: {a.reason}",
                            limited=a.trigger != "manual", **fields)
                else:
                    self.last_action = f"bump to {a.new} not done"
                    ev.emit("bump-failed", f"did not raise nf_conntrack_max to {a.new}: {o.detail}", **fields)
            elif isinstance(a, SetBuckets):
                if o.ok:
                    took = o.extra.get("seconds")
                    ev.emit("buckets", f"resized conntrack buckets {a.old} -> {o.read_back}"
                            + (f" in {took * 1000:.0f} ms" if took is not None else ""),
                            CTGUARD_OLD_MAX=a.old, CTGUARD_NEW_MAX=o.read_back or a.new, CTGUARD_REASON=a.reason)
                else:
                    ev.emit("bump-failed", f"buckets not resized: {o.detail}", CTGUARD_REASON="buckets")
            elif isinstance(a, Refuse):
                if a.kind == "cooldown":
                    log.debug("%s", a.reason)
                    continue
                self.last_action = f"bump refused ({a.kind})"
                ev.emit("refused", f"bump refused ({a.kind}){self._in_ns(a.netns)}: {a.reason}",
                        limited=a.trigger != "manual", CTGUARD_NETNS=a.netns or "",
                        CTGUARD_FILL=f"{a.fill:.4f}", CTGUARD_OLD_MAX=a.current, CTGUARD_NEW_MAX=a.wanted,
                        CTGUARD_REASON=a.kind, CTGUARD_TRIGGER=a.trigger, **self._ns_fields(a.netns))
            elif isinstance(a, Persist):
                if o.ok:
                    ev.emit("persisted", f"persisted nf_conntrack_max {a.max}: {o.detail}", CTGUARD_NEW_MAX=a.max,
                            CTGUARD_REASON=a.reason)
                elif not o.detail.startswith(("observe", "persist.mode", "not persisted")):
                    # (A max that failed to apply was reported already; nothing new to say.)
                    log.warning("%s", o.detail)
            elif isinstance(a, Warn):
                if a.kind == "pressure":
                    ev.emit("pressure", f"conntrack pressure{self._in_ns(a.netns)}: {a.reason}", CTGUARD_NETNS=a.netns or "",
                            CTGUARD_FILL=f"{a.fill:.4f}", CTGUARD_REASON="pressure", **self._ns_fields(a.netns))
                else:
                    ev.emit("table-full", f"kernel reported the conntrack table full{self._in_ns(a.netns)}: {a.reason}",
                            CTGUARD_NETNS=a.netns or "", CTGUARD_FILL=f"{a.fill:.4f}", CTGUARD_REASON="table-full",
                            **self._ns_fields(a.netns))
            elif isinstance(a, Capture) and not o.ok:
                log.warning("%s", o.detail)
            elif isinstance(a, (ShortenTimeout, RestoreTimeout, TrimEntries)):
                self._report_relief(o)

    def _report_relief(self, o: Outcome) -> None:
        from ctguard.events import LOG_ERR

        a = o.action
        ev = self.events
        if isinstance(a, ShortenTimeout):
            if o.ok or a.advise or self.policy.observe_only:
                self.relief_store.note(a.key, a.old, a.new, a.held, time.time())
                self._safe(lambda _: self.relief_store.save(), None, what="relief", where=str(self.relief_store.path))
            fields = dict(CTGUARD_NETNS=a.netns, CTGUARD_KEY=a.key, CTGUARD_OLD=a.old, CTGUARD_NEW=a.new,
                          CTGUARD_REASON=a.reason)
            if o.ok:
                self.last_action = f"relief: {a.key} timeout {a.old} -> {o.read_back} in {a.name}"
                ev.emit("relief", f"relief: lowered {sysctl_name(a.key)} {o.extra.get('old', a.old)} -> "
                                  f"{o.read_back} s in netns {a.name}: {a.reason}", **fields)
            elif a.advise or self.policy.observe_only:
                ev.emit("relief-advice", f"relief would lower {sysctl_name(a.key)} {a.old} -> {a.new} s "
                                         f"in netns {a.name} ({o.detail.split(':')[0]}): {a.reason}", **fields)
            else:
                ev.emit("relief", f"relief: did not lower {sysctl_name(a.key)} in netns {a.name}: {o.detail}",
                        priority=LOG_ERR, **fields)
        elif isinstance(a, RestoreTimeout):
            why = o.extra.get("why", "calm" if o.ok else "failed")
            fields = dict(CTGUARD_NETNS=a.netns, CTGUARD_KEY=a.key, CTGUARD_OLD=a.relieved,
                          CTGUARD_NEW=a.original if o.ok else o.extra.get("found", ""), CTGUARD_REASON=why)
            if o.ok:
                self.last_action = f"relief over: {a.key} timeout back to {a.original} in {a.name}"
                ev.emit("relief-restored", f"relief over: {sysctl_name(a.key)} {a.relieved} -> {o.read_back} s "
                                           f"in netns {a.name} ({a.reason})", **fields)
            elif o.extra.get("forget"):
                ev.emit("relief-restored", f"relief over, nothing restored: {o.detail}", **fields)
            else:
                log.warning("%s", o.detail)
        elif isinstance(a, TrimEntries) and not o.ok and "still running" not in o.detail:
            log.warning("relief: %s", o.detail)

    def _in_ns(self, inode: int | None) -> str:
        """' in netns NAME (inode N, unit U)' for a message, by name and unit where known."""
        ns = self._labels.get(inode) if inode is not None else None
        return f" in {incident_text.where(ns.name, ns.unit, ns.inode)}" if ns is not None else ""

    def _ns_fields(self, inode: int | None) -> dict[str, str]:
        return incident_text.ns_fields(self._labels.get(inode) if inode is not None else None)

    # -- evidence beside the loop -------------------------------------------------------------

    def _start_capture(self, action: Capture, decision: Decision) -> str:
        if not self._in_turn:
            # Asked for outside a turn (an operator, through the control socket): at once.
            return self._launch_capture(action, decision, None)
        # Automatic: started at the end of the turn, once the flight recorder holds this turn's
        # sample and actions (the bump is made by then: a capture never delays one).
        if not self.recorder.capture_allowed(action.reason, self.policy.evidence.incident_captures):
            return ("capture skipped: this incident has its bundle, the next comes at its end "
                    "([evidence] incident_captures)")
        self._queued.append((action, decision, None))
        return "capture queued"

    def _launch_captures(self) -> None:
        queued, self._queued = self._queued, []
        for action, decision, incident in queued:
            try:
                detail = self._launch_capture(action, decision, incident)
            except OSError as exc:
                log.warning("cannot start the %s capture: %s", action.reason, exc)
            else:
                log.debug("%s", detail)

    def _diagnose(self, bundle: str) -> str:
        """The top finding's id of a bundle just written (for its journal entry and the metrics)."""
        from ctguard.evidence import review

        try:
            _path, data = review.load(Path(bundle).parent, Path(bundle).name)
            from ctguard.diagnose import diagnose

            found = diagnose(data)
        except Exception as exc:  # a bundle that cannot be read must not take the loop down
            log.warning("cannot diagnose %s: %s", bundle, exc)
            return ""
        self._findings = [f.id for f in found]
        return found[0].id if found else ""

    def _launch_capture(self, action: Capture, decision: Decision, incident: dict | None) -> str:
        # The decision goes to the capture in a private file (it names addresses and namespaces);
        # the file is removed when the capture is reaped.
        folder = ensure_private_dir(Path(self.policy.state.dir))
        self._captures += 1
        decision_file = folder / f"capture-decision-{os.getpid()}-{self._captures}.json"
        payload = json.dumps({"summary": decision.summary, "actions": jsonable(decision.actions),
                              "worst_netns": decision.worst_netns, "worst_fill": decision.worst_fill,
                              "rate": decision.rate, "policy": str(self.policy_path)})
        atomic_write(decision_file, payload, 0o600)
        timeline_file = folder / f"capture-timeline-{os.getpid()}-{self._captures}.json"
        # Tens of ms for 50 namespaces x 15 minutes (bench/bench_review.py), once or twice an
        # incident, after the bump was made; a failure costs the bundle its timeline only.
        _write_timeline(timeline_file, self._timeline(incident))
        args = [sys.executable, "-m", "ctguard", "--policy", str(self._policy_for_child()), "capture",
                "--reason", action.reason, "--decision-file", str(decision_file),
                "--timeline-file", str(timeline_file)]
        if action.netns:
            args += ["--netns", str(action.netns)]
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_lower_priority, close_fds=True)
        self.children.running.append((proc, action.reason, decision_file))
        return f"capture started (pid {proc.pid})"

    def control_timeline(self, args) -> dict:
        """The `timeline` control command: a hand-run `ctguard capture` asks for the window."""
        return {"timeline": self._timeline()}

    def _timeline(self, incident: dict | None = None, args=None) -> dict:
        """The flight recorder's window with the bounds in force (also the `timeline` command)."""
        limits = self.last_sample.limits if self.last_sample is not None else None
        upper, binding = upper_bound(self.policy, limits) if limits is not None else (self.policy.bump.ceiling, "ceiling")
        return self.recorder.window(ceiling=self.policy.bump.ceiling, upper=upper, upper_by=binding,
                                    incident=incident)

    # -- reload and stop -------------------------------------------------------------------

    def _reload(self) -> list[str]:
        """Load the policy file again; the problems that kept the old policy in force, or []."""
        self.notifier.reloading()
        try:
            new = policy_mod.load(self.policy_path)
        except PolicyError as exc:
            self.events.emit("policy-rejected", f"policy reload rejected, the old policy stays in force: {exc}",
                             CTGUARD_REASON="; ".join(exc.problems))
            stamp = time.strftime("%H:%M:%S", time.localtime())
            self.reload_rejected = f"reload REJECTED at {stamp}, running the previous policy: {exc.problems[0]}"
            self.notifier.ready(self._status_line(self.last_action))
            return list(exc.problems)
        else:
            self.reload_rejected = None
            self.policy = new
            self.actor.policy = new
            if new.relief.mode != "enforce" or new.observe_only:
                self._relief_restore_all(f"relief.mode is {new.relief.mode}" if new.relief.mode != "enforce"
                                         else "mode is observe")
            self.observer.namespaces = new.watch.namespaces
            self.observer.rediscover()
            if new.state.dir != self.store.folder:
                self.store = StateStore(new.state.dir, warn=lambda m: log.warning("%s", m))
            for warning in policy_mod.warnings_for(new, self._kernel_max()):
                log.warning("%s", warning)
            self.events.emit("policy-reloaded", f"policy reloaded from {self.policy_path}")
            self.persistwatch.reloaded()
        self.notifier.ready(f"policy reloaded from {self.policy_path}")
        return []

    def _policy_for_child(self) -> Path:
        """The policy file a capture child loads: after a rejected reload the files on disk are
        broken, so the child gets the policy in force, merged with its drop-ins
        (policy.effective), in a private folder of its own (no policy.d beside it)."""
        if self.reload_rejected is None:
            return self.policy_path
        folder = ensure_private_dir(Path(self.policy.state.dir) / "policy-in-force")
        copy = folder / "policy.toml"
        atomic_write(copy, policy_mod.effective(self.policy), 0o600)
        return copy

    def _status_line(self, text: str) -> str:
        # A rejected reload leads every STATUS= line until a reload succeeds: `systemctl status`
        # must not look as if the new file were in force.
        return f"{self.reload_rejected}; {text}" if self.reload_rejected else text

    # -- the control socket (ctguard.control): what `status`, `bump`, `capture` ask -----------

    def control_handlers(self) -> dict:
        """The command table; another command is one more entry here."""
        from ctguard import control_cmds as cmds

        return {
            "status": lambda args: cmds.status(self, args),
            "bump": lambda args: cmds.bump(self, args),
            "capture": lambda args: cmds.capture(self, args),
            "reload": lambda args: cmds.reload(self, args),
            "timeline": self.control_timeline,
        }

    def _open_control(self) -> None:
        from ctguard.control import ControlError, ControlServer

        path = self.policy.control.socket
        try:
            self.control = ControlServer(path, self.control_handlers())
        except (ControlError, OSError) as exc:
            log.warning("no control socket at %s: %s; `ctguard status` and `bump` will act directly", path, exc)
            self.control = None
            return
        self.control.attach(self._sel, "control")

    def _stop(self) -> None:
        self.notifier.stopping()
        self.persistwatch.stop()
        self.relief_actor.stop()
        self._relief_restore_all("ctguard stopping")
        self._safe(self.store.save_history, self.history, what="state")
        self._safe(lambda p: self.store.save_peaks(p, self.peaks.hour), self.peaks.current(), what="peaks")
        if self.follower is not None:
            self._save_cursor()
            self.follower.close()
        # A resize in flight cannot be interrupted (the kernel is rehashing); record its outcome.
        self._resize_done(self.resizer.wait(10.0))
        self.resizer.close()
        deadline = time.monotonic() + 1.0
        for proc, _, _ in self.children.running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()
        self.observer.close()
        if self.control is not None:
            self.control.close()
        signal.set_wakeup_fd(-1)
        self.events.emit("stop", "ctguard stopped")
        self.events.flush_all()


def _write_timeline(path: Path, window: dict) -> None:
    # A timeline that cannot be written costs the bundle its timeline (the capture says so), not the capture.
    try:
        atomic_write(path, json.dumps(window, separators=(",", ":")), 0o600)
    except (OSError, ValueError) as exc:
        log.warning("cannot write the flight recorder's window to %s: %s", path, exc)


def _lower_priority() -> None:
    # Evidence must never compete with the traffic or with the loop that bumps.
    try:
        os.nice(10)
    except OSError:
        pass


def run(policy_path: Path, paths: Paths | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="ctguard: %(message)s", stream=sys.stderr)
    try:
        policy = policy_mod.load(policy_path)
    except PolicyError as exc:
        print(f"ctguard: refusing to start, the policy has problems:\n" + "\n".join(f"  {p}" for p in exc.problems),
              file=sys.stderr)
        return EX_CONFIG
    try:
        daemon = Daemon(policy_path, policy, paths)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            print(f"ctguard: {exc}; run as root", file=sys.stderr)
            return 77
        raise
    return daemon.run()
