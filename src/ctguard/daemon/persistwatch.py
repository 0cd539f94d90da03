"""The daemon's side of issue 16, kept out of daemon.py: three hooks per turn.

- `before_decide`: a max lower than the one ctguard last set or found was written by someone
  else: journal it (`max-lowered`, with the likely writer), count it and, by policy, set it
  back (lowered.judge decides; the daemon's Actor writes and reads back).
- `after_turn`: remember the max after ctguard's own writes; after a persisted modprobe file,
  hand `update-initramfs` to the worker (`[persist] update_initramfs`); every so often, and
  after each write, look whether a file applied after ctguard's decides the boot value and
  journal that once per (file, value) with the fix (`persist-shadowed`).
- `metrics`: ctguard_persist_shadowed{file}, ctguard_max_lowered_total, ctguard_max_defended_total.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ctguard.boot import initramfs, writers
from ctguard.boot import values as bootvalues
from ctguard.config.policy import Policy
from ctguard.core import lowered
from ctguard.core.decide import upper_bound
from ctguard.core.model import Decision, Instant, Outcome, Persist, Sample, SetMax
from ctguard.daemon import metrics
from ctguard.host.act import Actor
from ctguard.host.events import EventLog

log = logging.getLogger(__name__)

BOOT_CHECK_EVERY = 60.0     # seconds between looks at sysctl.d/modprobe.d (a few small files)


class PersistWatch:
    """`policy()` is the policy in force; `actor` carries out the defence; `events` journals."""

    def __init__(self, policy: Callable[[], Policy], actor: Actor, events: EventLog,
                 proc_root: str = "/proc", root: Path | str = "/") -> None:
        self.policy = policy
        self.actor = actor
        self.events = events
        self.proc_root = proc_root
        self.root = Path(root)
        self.watch = lowered.MaxWatch()
        self.shadows: list[bootvalues.Shadow] = []
        self._said: set[tuple[str, str, str]] = set()
        self._boot_at = -1e9
        self.updater = initramfs.Updater()

    # -- someone else lowered max ----------------------------------------------------------

    def before_decide(self, sample: Sample, now: Instant) -> tuple[Sample, list[Outcome], str | None]:
        """(the sample with the max in force, the defence's outcomes for the history, the last action)."""
        policy = self.policy()
        upper = upper_bound(policy, sample.limits)[0]
        verdict, self.watch = lowered.judge(policy, self.watch, sample.limits.max, upper, now)
        if verdict is None:
            return sample, [], None
        writer = self._writer(verdict.new)
        fields = dict(CTGUARD_OLD_MAX=verdict.old, CTGUARD_NEW_MAX=verdict.new, CTGUARD_WRITER=writer,
                      CTGUARD_REASON=verdict.verdict)
        by = f" (likely writer: {writer})" if writer else " (no other writer is visible now)"
        head = f"nf_conntrack_max was lowered {verdict.old} -> {verdict.new} by another writer{by}"
        if verdict.action is None:
            self.events.emit("max-lowered", f"{head}; {verdict.reason}", **fields)
            return sample, [], None
        outcomes = self.actor.carry_out(Decision((verdict.action,), None, 0.0, 0.0, False, verdict.action.reason))
        o = outcomes[0]
        self.watch = lowered.defended(self.watch, o.ok, o.read_back)
        if o.ok:
            self.events.emit("max-lowered", f"{head}; ctguard set {o.read_back} back ([persist] defend; it does so "
                                            f"at most once per [bump] cooldown)", **fields)
            return (replace(sample, limits=replace(sample.limits, max=o.read_back)), outcomes,
                    f"set max back {verdict.new} -> {o.read_back} (lowered by another writer)")
        fields["CTGUARD_REASON"] = "defend-failed"
        self.events.emit("max-lowered", f"{head}; setting it back failed: {o.detail}", **fields)
        return sample, outcomes, None

    def _writer(self, new_max: int) -> str:
        try:
            eff = bootvalues.sysctl_effective(self.root)
            win = eff.winner
            value = int(win.value) if win is not None and win.value.isdigit() else None
            return writers.likely_writer(self.proc_root, new_max, os.cpu_count() or 1,
                                         win.path if win else None, value)
        except OSError as exc:
            return f"cannot tell ({exc})"

    def accept_max(self, value: int) -> None:
        """ctguard itself set `value` (e.g. an operator's --lower through the daemon): not a foreign write."""
        self.watch = self.watch.accept(value)

    # -- after the turn: remember, initramfs, shadowing --------------------------------------

    def after_turn(self, sample: Sample, outcomes: list[Outcome]) -> None:
        final = sample.limits.max
        wrote_modprobe = False
        for o in outcomes:
            if isinstance(o.action, SetMax) and o.ok and o.read_back is not None:
                final = o.read_back
            if isinstance(o.action, Persist) and o.ok and o.action.buckets and str(self.policy().persist.modprobe_file) in o.detail:
                wrote_modprobe = True
        if self.watch.known is None or final != self.watch.known:
            self.watch = self.watch.accept(final)
        if wrote_modprobe:
            self._update_initramfs()
        self._report_update()
        wrote = any(isinstance(o.action, Persist) and o.ok for o in outcomes)
        if wrote or time.monotonic() - self._boot_at >= BOOT_CHECK_EVERY:
            self.check_boot()

    def reloaded(self) -> None:
        self._said.clear()
        self._boot_at = -1e9

    def check_boot(self) -> None:
        self._boot_at = time.monotonic()
        p = self.policy().persist
        try:
            view = bootvalues.boot_view(self.root, p.sysctl_file, p.modprobe_file,
                                        proc_root=self.proc_root)
        except OSError as exc:
            log.warning("cannot model the boot values: %s", exc)
            return
        self.shadows = view.shadows
        for s in self.shadows:
            key = (s.key, s.file, s.value)
            if key in self._said:
                continue
            self._said.add(key)
            self.events.emit("persist-shadowed", f"persisted {s.key} does not hold at boot: {s.message()}",
                               CTGUARD_FILE=s.file, CTGUARD_NEW_MAX=s.value, CTGUARD_OLD_MAX=s.ours_value or "",
                               CTGUARD_REASON=s.key)

    def _update_initramfs(self) -> None:
        p = self.policy().persist
        if not p.update_initramfs or self.policy().observe_only:
            return
        release = initramfs.release(self.proc_root)
        cache = self.policy().state.dir
        root, modprobe = self.root, p.modprobe_file
        started = self.updater.request(lambda: initramfs.update_if_needed(root, release, cache, modprobe))
        log.info("update-initramfs %s after writing %s", "requested" if started else "queued", modprobe)

    def _report_update(self) -> None:
        out = self.updater.poll()
        if out is None:
            return
        if not out.ran and out.ok:
            log.info("update-initramfs %s", out.output)
            return
        tail = out.output.splitlines()[-1] if out.output else ""
        if out.ok:
            self.events.emit("initramfs", f"update-initramfs -u done in {out.seconds:.1f} s: the next boot loads "
                                            f"nf_conntrack with ctguard's hash size ({tail})", CTGUARD_REASON="updated")
        else:
            self.events.emit("initramfs", f"update-initramfs -u failed (exit {out.code}): {out.output[-500:]}; "
                                            "run it by hand, the next boot otherwise keeps the old hash size",
                               priority=4, CTGUARD_REASON="failed")

    # -- metrics and stop -------------------------------------------------------------------

    def metrics(self) -> str:
        shadowed = []
        for s in self.shadows:
            try:
                shadowed.append((s.file, int(s.value)))
            except ValueError:
                continue
        return metrics.render_persist(shadowed, self.watch.lowered_total, self.watch.defended_total)

    def stop(self) -> None:
        self.updater.stop()
