"""Carries out a Decision's actions: write, read back, report what happened.

Order matters: the max goes first (it is what stops the drops), buckets next (a resize with
many entries takes a while), files after, and a capture is only ever started, never waited
for. In observe mode nothing is written: each would-be write is reported as not done.
"""

from __future__ import annotations

from collections.abc import Callable

from ctguard.boot import persist
from ctguard.host.kernel import Kernel, KernelWriteError
from ctguard.core.model import (
    Action, Capture, Decision, Outcome, Persist, Refuse, RestoreTimeout, SetBuckets, SetMax, ShortenTimeout,
    TrimEntries, Warn,
)
from ctguard.config.policy import Policy, sysctl_name
from ctguard.core.relief import advised_why

_ORDER = {SetMax: 0, SetBuckets: 1, Persist: 2, Refuse: 3, Warn: 4, Capture: 5,
          RestoreTimeout: 6, ShortenTimeout: 7, TrimEntries: 8}

CaptureStarter = Callable[[Capture, Decision], str]
ResizeStarter = Callable[[SetBuckets], Outcome]     # hands a resize to a worker (ctguard.daemon.resize); never waits


class Actor:
    def __init__(self, kernel: Kernel, policy: Policy, start_capture: CaptureStarter | None = None,
                 wall_clock: Callable[[], float] = lambda: 0.0, relief=None,
                 start_resize: ResizeStarter | None = None) -> None:
        self.kernel = kernel
        self.relief = relief    # daemon.relief.ReliefActor: timeouts per namespace, entry trims
        self.start_resize = start_resize
        self.policy = policy
        self.start_capture = start_capture
        self.wall_clock = wall_clock

    def carry_out(self, decision: Decision) -> list[Outcome]:
        outcomes: list[Outcome] = []
        max_failed = False
        for action in sorted(decision.actions, key=lambda a: _ORDER[type(a)]):
            if isinstance(action, Persist) and max_failed:
                outcomes.append(Outcome(action, False, "not persisted: the new max is not in force"))
                continue
            outcome = self._one(action, decision)
            if isinstance(action, SetMax) and not outcome.ok:
                max_failed = True
            outcomes.append(outcome)
        return outcomes

    def _one(self, action: Action, decision: Decision) -> Outcome:
        observe = self.policy.observe_only
        if isinstance(action, (ShortenTimeout, RestoreTimeout, TrimEntries)):
            if isinstance(action, ShortenTimeout) and (observe or action.advise):
                verb = "raise" if action.step == "up" else "lower"
                return Outcome(action, False, ("observe mode" if observe else advised_why(self.policy, action.key))
                               + f": would {verb} {sysctl_name(action.key)} {action.old} -> {action.new} "
                               f"in netns {action.name}")
            if isinstance(action, RestoreTimeout) and action.advise:
                return Outcome(action, False, f"{advised_why(self.policy, action.key)}: would leave relief in netns "
                                              f"{action.name}")
            if isinstance(action, TrimEntries) and observe:
                return Outcome(action, False, "observe mode: no entry trimmed")
            if self.relief is None:
                return Outcome(action, False, "relief is not available here")
            return self.relief.carry_out(action, self.policy)
        if isinstance(action, SetMax):
            if observe:
                return Outcome(action, False, f"observe mode: would raise nf_conntrack_max {action.old} -> {action.new}")
            try:
                got = self.kernel.write_max(action.new)
            except KernelWriteError as exc:
                return Outcome(action, False, str(exc))
            return Outcome(action, True, f"nf_conntrack_max {action.old} -> {got}", read_back=got)
        if isinstance(action, SetBuckets):
            if observe:
                return Outcome(action, False, f"observe mode: would resize buckets {action.old} -> {action.new}")
            if self.start_resize is not None:
                return self.start_resize(action)    # the daemon: beside the loop, reported when done
            try:
                got = self.kernel.write_hashsize(action.new)
            except KernelWriteError as exc:
                return Outcome(action, False, f"{exc} (max was still raised; buckets stay at {action.old})")
            return Outcome(action, True, f"buckets {action.old} -> {got}", read_back=got)
        if isinstance(action, Persist):
            if observe or self.policy.persist.mode == "never":
                return Outcome(action, False, "observe mode: nothing written to /etc" if observe else "persist.mode is never")
            p = self.policy.persist
            try:
                written = persist.write(p.sysctl_file, p.modprobe_file, action.max, action.buckets,
                                        action.reason, self.wall_clock())
            except OSError as exc:
                return Outcome(action, False, f"cannot write {p.sysctl_file}: {exc}; the previous file is unchanged")
            return Outcome(action, True, "wrote " + ", ".join(map(str, written)))
        if isinstance(action, Capture):
            if self.start_capture is None:
                return Outcome(action, False, "evidence capture is not available")
            try:
                detail = self.start_capture(action, decision)
            except OSError as exc:
                return Outcome(action, False, f"cannot start a capture: {exc}")
            return Outcome(action, True, detail)
        return Outcome(action, True, action.reason)  # Warn, Refuse: reported, nothing to write
