"""The event loop: it wires the adapters to the core and decides nothing.

One selector holds the signal wake-up fd, the journal's fd, the resize worker's fd and the
control socket; the sampling timer is the selector's timeout. A kernel `table full` line
therefore leads to a sample and a decision in the same loop turn, not at the next tick, and
nothing polls busily. Each turn: observe -> core.decide -> act (read back) -> fold into the
history -> report (journal, STATUS=, metrics) -> captures. The Daemon is the only owner of the
history; what `ctguard status|bump|capture|reload` ask goes through its public methods
(ctguard.control.commands.Service).
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import time
from dataclasses import replace
from pathlib import Path

from ctguard import __version__
from ctguard.boot import persist
from ctguard.config import policy as policy_mod
from ctguard.config.policy import Policy, PolicyError
from ctguard.control import commands
from ctguard.control.protocol import ControlError, ControlServer
from ctguard.core import incident as incident_text
from ctguard.core import relief as relief_core
from ctguard.core import ticks, wording
from ctguard.core.decide import (
    advance, attribute_lines, decide, decide_start, incident_changes, next_interval, note_bundle,
    upper_bound,
)
from ctguard.core.model import Capture, Decision, History, Outcome, Sample, TableFull
from ctguard.core import sizing
from ctguard.daemon import metrics
from ctguard.daemon.captures import Captures, policy_for_child, top_findings
from ctguard.daemon.kernellines import KernelLines
from ctguard.daemon.paths import Paths
from ctguard.daemon.persistwatch import PersistWatch
from ctguard.daemon.recorder import FlightRecorder, metrics_text
from ctguard.daemon.relief import ReliefActor, relief_look
from ctguard.daemon.reporter import Reporter
from ctguard.daemon.resize import Resizer
from ctguard.daemon.saving import Saver
from ctguard.daemon.service import ControlService
from ctguard.host.act import Actor
from ctguard.host.clock import Clock
from ctguard.host.events import EventLog, echo_wanted
from ctguard.host.kernel import ConntrackNotLoaded, Kernel
from ctguard.host.notify import Notifier
from ctguard.host.observe import Observer
from ctguard.store.relief import ReliefStore
from ctguard.store.state import PeakRecorder, StateStore

log = logging.getLogger(__name__)

NOT_LOADED_RETRY = 2.0      # seconds between looks for nf_conntrack while it is not loaded


class Daemon:
    def __init__(self, policy_path: Path, policy: Policy, paths: Paths | None = None,
                 notifier: Notifier | None = None, events: EventLog | None = None) -> None:
        self.policy_path = policy_path
        self.policy = policy
        self.paths = paths or Paths()
        self.notifier = notifier or Notifier()
        self.events = events or EventLog()
        self.reporter = Reporter(self.events)
        self.clock = Clock(self.paths.proc_root)
        self.kernel = Kernel(self.paths.proc_root, self.paths.sys_root)
        self.observer = Observer(self.kernel, self.clock, policy.watch.namespaces,
                                 self.paths.proc_root, self.paths.run_netns)
        self.store = StateStore(policy.state.dir, warn=log.warning)
        self.saver = Saver(lambda: str(self.policy.state.dir))
        self.peaks = PeakRecorder(*self.store.load_recorded())
        self.relief_store = ReliefStore(policy.state.dir)
        self.relief_store.load(warn=log.warning)
        self.history: History = replace(self.store.load_history(), relief=self.relief_store.state())
        self._note_p99()
        self.relief_actor = ReliefActor(self.relief_store, self.observer.path_of, self.clock.now)
        self.resizer = Resizer(self.kernel.write_hashsize)
        self.actor = Actor(self.kernel, policy, self._capture_asked, wall_clock=time.time, relief=self.relief_actor,
                           start_resize=self.resizer.start)
        self.recorder = FlightRecorder()       # the last 15 minutes, for every bundle's timeline
        self.captures = Captures(lambda: Path(self.policy.state.dir),
                                 lambda: policy_for_child(self.policy, self.policy_path, self.reload_rejected),
                                 self.window)
        self.persistwatch = PersistWatch(lambda: self.policy, self.actor, self.events, self.paths.proc_root)
        self.metrics = metrics.MetricsWriter(under_systemd=bool(os.environ.get("INVOCATION_ID")))
        self.lines = KernelLines(lambda: self.policy.state.dir, self.clock.now)
        self.control: ControlServer | None = None
        self.running = True
        self.ready = False
        self.last_sample: Sample | None = None
        self.reload_rejected: str | None = None  # why the last reload was refused, until one succeeds
        self.started_at = time.time()
        self._not_loaded_said = False
        self._sel = selectors.DefaultSelector()
        self._sig_r, self._sig_w = socket.socketpair()
        self._findings: list[str] = []         # finding ids of the last automatic bundle (metrics)
        self._in_turn = False
        self._ticks: ticks.Ticks | None = None  # count-only reads until the next full turn (ctguard.core.ticks)
        self._quiet: tuple[float, dict[int, int]] | None = None  # the last tick that woke nothing
        # A reload asks for a full turn at once: a calm host's next one may be 5 s away, and the new
        # policy (or the rejection) must show in STATUS=, metrics and decisions now.
        self._turn_now = False

    def _note_p99(self) -> None:
        """What persists is sized on the recorded peaks too (sizing.advice): keep their p99 in the history."""
        recent = sizing.recent(self.peaks.current(), lambda p: p.minute, time.time())
        used = sizing.peaks_used((p.count, p.attack) for p in recent)
        self.history = self.history.with_(recorded_p99=used.p99, recorded_high=used.high, recorded_minutes=used.minutes,
                                          recorded_attack_minutes=used.attack_minutes)

    def _fold(self, sample: Sample | None, events: list[TableFull], outcomes: list[Outcome]) -> None:
        self.history = advance(self.history, sample, events, outcomes, self.clock.now(), self.policy)

    def save_state(self) -> None:
        self.saver.save("state", lambda: self.store.save_history(self.history))

    def _save_relief(self) -> None:
        self.saver.save("relief", self.relief_store.save, where=str(self.relief_store.path))

    def carry_out(self, decision: Decision) -> list[Outcome]:
        """Act, fold the outcomes into the history and report them (outside a turn)."""
        outcomes = self.actor.carry_out(decision)
        self._fold(None, [], outcomes)
        self.reporter.outcomes(outcomes, self.history.incident, self.policy.observe_only)
        return outcomes

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> int:
        self._sig_r.setblocking(False)
        self._sig_w.setblocking(False)
        signal.set_wakeup_fd(self._sig_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, lambda *_: None)  # the wake-up fd carries the number
        self._sel.register(self._sig_r.fileno(), selectors.EVENT_READ, "signal")
        self._sel.register(self.resizer.fileno(), selectors.EVENT_READ, "resize")
        self._open_control()
        self.events.echo = self.events.echo or echo_wanted()     # a terminal: every entry on stderr too
        self.events.emit("start", wording.start_line(self.policy, __version__, self.kernel.read_max_or_none()))
        for warning in policy_mod.warnings_for(self.policy, self.kernel.read_max_or_none()):
            log.warning("%s", warning)
        backlog = self.lines.open()
        if backlog is None:
            self.events.emit("journal-unavailable", "no journald: running on sampling alone")
        else:
            self._sel.register(self.lines.fileno(), selectors.EVENT_READ, "journal")
            if backlog:     # written while ctguard was down: history, counted, not acted on
                self._fold(None, backlog, [])
                self.save_state()
                log.info("%d kernel table-full lines were written while ctguard was not running", len(backlog))
        next_sample = next_tick = next_watchdog = time.monotonic()
        wd = self.notifier.watchdog_interval()
        try:
            while self.running:
                wake = next_sample if self._ticks is None else min(next_sample, next_tick)
                timeouts = [wake - time.monotonic(), next_watchdog - time.monotonic() if wd else None,
                            self.lines.timeout(), self.notifier.status_timeout(), self.metrics.timeout(),
                            self.control.timeout() if self.control else None]
                kernel_events: list[TableFull] = []
                for key, _ in self._sel.select(max(0.0, min(t for t in timeouts if t is not None))):
                    if key.data == "signal":
                        self._signals()
                    elif key.data == "journal":
                        kernel_events.extend(self.lines.read())
                    elif key.data == "resize":
                        self._resize_done(self.resizer.collect())
                    elif key.data == "control" and self.control is not None:
                        self.control.ready(key.fileobj)
                if self.control is not None:
                    self.control.expire()
                if not self.running:
                    break
                if self._turn_now:
                    self._turn_now = False
                    next_sample = min(next_sample, time.monotonic())
                now = time.monotonic()
                if not kernel_events and now < next_sample and self._ticks is not None and now >= next_tick:
                    next_tick = now + self._ticks.every
                    if self._tick():
                        next_sample = now      # a count rose: a full turn now
                if kernel_events or now >= next_sample:
                    if not kernel_events:
                        kernel_events = self.lines.read()   # a safety net for a missed wake-up
                    next_sample = time.monotonic() + self._turn(kernel_events)
                    next_tick = time.monotonic() + (self._ticks.every if self._ticks else 0.0)
                self.resizer.launch()   # after the turn's files are written (ctguard.daemon.resize)
                self.notifier.flush_status()
                if not self.resizer.running():
                    self.metrics.flush()    # a turn's metrics held by the 1-s limit
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
        if ticks.woken(self._ticks, counts, at, self.kernel.read_max_or_none(), self.observer.changed()) is None:
            self._quiet = (at, counts)
            return False
        if self._quiet is not None:
            self.history = ticks.note_quiet(self.history, self._ticks, *self._quiet)
        return True

    def _turn(self, kernel_events: list[TableFull]) -> float:
        """One observe-decide-act-record turn; returns the seconds until the next one."""
        self._ticks = None      # planned again at the end of a turn that completes
        self._reap_children()
        try:
            sample = self.observer.sample()
        except ConntrackNotLoaded as exc:
            return self._not_loaded(exc)
        now = self.clock.now()
        if self.last_sample is None:
            self._start(sample)
        if self.resizer.busy():
            sample = replace(sample, resizing=self.resizer.target)
        if kernel_events:
            # Only a line some sampled namespace shows is this moment's (decide.attribute_lines).
            kernel_events = list(attribute_lines(self.policy, sample, self.history, kernel_events))
            elsewhere = [e for e in kernel_events if e.unattributed]
            if elsewhere:
                log.info("%d kernel table-full line(s) (netns %s) shown by no sampled namespace (no drop, "
                         "none near its max): counted, not acted on", len(elsewhere),
                         ", ".join(sorted({str(e.netns or "unnamed") for e in elsewhere})))
        sample, defended, note = self.persistwatch.before_decide(sample, now)
        if defended:
            self._fold(None, [], defended)
            self.reporter.last_action = note or self.reporter.last_action
        decision = decide(self.policy, sample, self.history, now, kernel_events)
        if decision.needs_shape is not None:
            # The bump would pass [guard] ceiling: look at the table (bounded by
            # guard.sample_budget) and decide again knowing its shape.
            sample = replace(sample, shape=self.observer.shape(decision.needs_shape, self.policy.guard))
            decision = decide(self.policy, sample, self.history, now, kernel_events)
        if decision.needs_relief is not None:
            # Relief may shorten timeouts here: look at what holds the table and at the
            # namespace's current timeouts, and decide again knowing them.
            sample = relief_look(self.observer, self.policy, sample, decision.needs_relief)
            decision = decide(self.policy, sample, self.history, now, kernel_events)
        self._in_turn = True           # captures asked for now are automatic: queued, limited per incident
        try:
            outcomes = self.actor.carry_out(decision) if decision.actions else []
        finally:
            self._in_turn = False
        before = self.history
        self.history = advance(self.history, sample, kernel_events, outcomes, now, self.policy)
        noted = self.relief_actor.note(outcomes, self.policy.observe_only)
        if self.relief_store.track_calm(self.history.relief) or noted:
            self._save_relief()
        self.reporter.saw(sample)
        started, ended = incident_changes(before, self.history)
        if started is not None:
            self.reporter.incident_started(started, sample)
        open_incident = self.history.incident
        self.recorder.turn(sample, decision.pressure, outcomes, kernel_events,
                           open_incident.id if open_incident is not None else None)
        self.reporter.outcomes(outcomes, self.history.incident, self.policy.observe_only)
        if ended is not None:
            self.reporter.incident_ended(ended)
            # The end of an incident gets its own bundle: the whole incident's timeline and its peak
            # (within [evidence] incident_captures: 1 keeps the first bundle only).
            if self.recorder.capture_allowed("incident-end", self.policy.evidence.incident_captures):
                self.captures.queue(Capture("incident-end", ended.netns), decision, incident_text.summary(ended))
        self.persistwatch.after_turn(sample, outcomes)
        # While the kernel rehashes, an fsync waits for it (ctguard.daemon.resize): files wait too.
        rehashing = self.resizer.running()
        inc = self.history.incident
        if self.peaks.observe(sample, sum(1 + e.suppressed for e in kernel_events if e.live),
                              inc.started.wall if inc is not None and inc.attack else None):
            self.saver.save_or_hold("peaks", lambda: self.store.save_peaks(self.peaks.peaks, self.peaks.hour), rehashing)
            self._note_p99()
        if outcomes or kernel_events or started is not None or ended is not None:
            self.saver.save_or_hold("state", lambda: self.store.save_history(self.history), rehashing)
        # Captures start once the bump is on record (state file) and the recorder holds this turn.
        self.captures.launch_queued()
        self.last_sample = sample
        if not rehashing:
            self._write_metrics(sample)
        self.notifier.status(self._status_line(f"{decision.summary}; last action: {self.reporter.last_action}"))
        self.events.flush()
        self._ready()
        self._ticks, self._quiet = ticks.plan(self.policy, sample, decision, self.history), None
        # A calm host's next full turn is further away, ticks between (ctguard.core.ticks).
        return self._ticks.full_in if self._ticks is not None else next_interval(self.policy, decision)

    def _ready(self) -> None:
        if not self.ready:
            self.notifier.ready()
            self.ready = True

    def _not_loaded(self, exc: ConntrackNotLoaded) -> float:
        if not self._not_loaded_said:
            log.warning("%s", exc)
            self.events.emit("waiting", "nf_conntrack is not loaded; ctguard waits for it and starts guarding when it appears")
            self._not_loaded_said = True
        self.notifier.status("waiting for nf_conntrack to be loaded")
        self._ready()   # running and healthy, just nothing to guard yet
        return NOT_LOADED_RETRY

    def _start(self, sample: Sample) -> None:
        """The first sample: undo what relief left behind, re-apply the persisted max."""
        self._not_loaded_said = False
        now = self.clock.now()
        restores, kept = relief_core.at_start(self.history.relief, now.boot_id, self.relief_store.boot_ids())
        for n, k in self.relief_store.keep_only(kept):
            log.info("relief of nf_conntrack_%s_timeout in netns %s was undone by a reboot; forgotten", k, n)
        self.history = replace(self.history, relief=kept)
        if restores:
            self._restore(Decision(tuple(restores), None, 0.0, 0.0, False, "relief left behind"))
        start = decide_start(self.policy, sample.limits, persist.read_persisted_max(self.policy.persist.sysctl_file))
        if start.actions:
            self.carry_out(start)
            self.save_state()

    def _restore(self, decision: Decision) -> None:
        outcomes = self.actor.carry_out(decision)
        self.history = replace(self.history, relief=relief_core.advance(
            self.history.relief, self.history, None, outcomes, self.clock.now(), self.policy))
        self.reporter.outcomes(outcomes, self.history.incident, self.policy.observe_only)

    def _relief_restore_all(self, why: str) -> None:
        """Put every relieved timeout back now (stop, or relief turned off by a reload)."""
        self.relief_actor.cancel()
        actions = relief_core.restore_all(self.history.relief, why)
        if actions:
            self._restore(Decision(actions, None, 0.0, 0.0, False, why))

    def _resize_done(self, outcomes: list[Outcome]) -> None:
        """A resize beside the loop finished: fold its read-back outcome in and report it."""
        if not outcomes:
            return
        self._fold(None, [], outcomes)
        self.reporter.outcomes(outcomes, self.history.incident, self.policy.observe_only)
        self.saver.flush_held()
        self.save_state()
        self.events.flush()

    def _reap_children(self) -> None:
        for done in self.captures.reap():
            if done.code == 0 and done.output:
                self._findings = top_findings(done.bundle)
                self.reporter.bundle(done.reason, done.bundle, done.output, self._findings[0] if self._findings else "")
                self.history = note_bundle(self.history, Path(done.bundle).name)
            else:
                log.warning("evidence capture (%s) failed with exit code %s: %s", done.reason, done.code,
                            done.output[-500:])
        for trim, report in self.relief_actor.reap():
            self.reporter.trimmed(trim.name, trim.netns, report)

    def _write_metrics(self, sample: Sample) -> None:
        last = self.history.incident or self.history.last_incident
        self.metrics.write(self.policy, sample, self.history, self.kernel.slab_bytes, self.saver,
                           lambda: metrics_text(last.started.wall if last else None, self._findings)
                           + self.persistwatch.metrics())

    # -- signals ------------------------------------------------------------------------------

    def _signals(self) -> None:
        try:
            data = self._sig_r.recv(64)
        except BlockingIOError:
            return
        for signum in data:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.running = False
            elif signum == signal.SIGHUP:
                self.reload()

    # -- captures -------------------------------------------------------------------------------

    def _capture_asked(self, action: Capture, decision: Decision) -> str:
        """The Actor's hook for a Capture action: automatic captures wait for the end of the turn,
        once the flight recorder holds this turn's sample and actions (a capture never delays a bump)."""
        if not self._in_turn:
            return f"capture started (pid {self.captures.launch(action, decision)})"
        if not self.recorder.capture_allowed(action.reason, self.policy.evidence.incident_captures):
            return ("capture skipped: this incident has its bundles for this moment, the next comes when it "
                    "gets worse or at its end ([evidence] incident_captures)")
        self.captures.queue(action, decision)
        return "capture queued"

    def window(self, incident: dict | None = None) -> dict:
        """The flight recorder's window with the bounds in force; a capture during an incident
        carries the open incident (no end yet), so its bundle says which incident it belongs to."""
        if incident is None and self.history.incident is not None:
            incident = incident_text.summary(self.history.incident)
        limits = self.last_sample.limits if self.last_sample is not None else None
        upper, binding = upper_bound(self.policy, limits) if limits is not None else (self.policy.bump.ceiling, "ceiling")
        return self.recorder.window(ceiling=self.policy.bump.ceiling, upper=upper, upper_by=binding, incident=incident)

    def _status_line(self, text: str) -> str:
        # A rejected reload leads every STATUS= line until a reload succeeds: `systemctl status`
        # must not look as if the new file were in force.
        return f"{self.reload_rejected}; {text}" if self.reload_rejected else text

    # -- reload and the control socket ----------------------------------------------------------

    def reload(self) -> list[str]:
        """Load the policy file again; the problems that kept the old policy in force, or []."""
        self.notifier.reloading()
        self._turn_now = True
        try:
            new = policy_mod.load(self.policy_path)
        except PolicyError as exc:
            self.events.emit("policy-rejected", f"policy reload rejected, the old policy stays in force: {exc}",
                             CTGUARD_REASON="; ".join(exc.problems))
            stamp = time.strftime("%H:%M:%S", time.localtime())
            self.reload_rejected = f"reload REJECTED at {stamp}, running the previous policy: {exc.problems[0]}"
            self.notifier.ready(self._status_line(self.reporter.last_action))
            return list(exc.problems)
        self.reload_rejected = None
        self.policy = self.actor.policy = new
        if new.relief.mode != "enforce" or new.observe_only:
            self._relief_restore_all(f"relief.mode is {new.relief.mode}" if new.relief.mode != "enforce"
                                     else "mode is observe")
        self.observer.namespaces = new.watch.namespaces
        self.observer.rediscover()
        if new.state.dir != self.store.folder:
            self.store = StateStore(new.state.dir, warn=log.warning)
        for warning in policy_mod.warnings_for(new, self.kernel.read_max_or_none()):
            log.warning("%s", warning)
        self.events.emit("policy-reloaded", f"policy reloaded from {self.policy_path}")
        self.persistwatch.reloaded()
        self.notifier.ready(f"policy reloaded from {self.policy_path}")
        return []

    def _open_control(self) -> None:
        path = self.policy.control.socket
        try:
            self.control = ControlServer(path, commands.handlers(ControlService(self)))
        except (ControlError, OSError) as exc:
            log.warning("no control socket at %s: %s; `ctguard status` and `bump` will act directly", path, exc)
            return
        self.control.attach(self._sel, "control")

    # -- stop ---------------------------------------------------------------------------------

    def _stop(self) -> None:
        self.notifier.stopping()
        self.persistwatch.stop()
        self.relief_actor.stop()
        self._relief_restore_all("ctguard stopping")
        self.save_state()
        self.saver.save("peaks", lambda: self.store.save_peaks(self.peaks.current(), self.peaks.hour))
        self.lines.close()
        # A resize in flight cannot be interrupted (the kernel is rehashing); record its outcome.
        self._resize_done(self.resizer.wait(10.0))
        self.resizer.close()
        self.captures.stop()
        self.observer.close()
        if self.control is not None:
            self.control.close()
        signal.set_wakeup_fd(-1)
        self.events.emit("stop", "ctguard stopped")
        self.events.flush_all()
