"""The daemon as the control socket's commands see it: ctguard.control.commands.Service, a few
public methods over the running daemon (the commands never touch its state)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ctguard.control.commands import Reading
from ctguard.core.decide import decide_manual
from ctguard.core.model import Capture, Decision, Outcome, SetMax

if TYPE_CHECKING:       # the daemon holds this service; the service only calls back
    from ctguard.config.policy import Policy
    from ctguard.daemon.loop import Daemon


class ControlService:
    def __init__(self, daemon: Daemon) -> None:
        self._d = daemon

    @property
    def policy(self) -> Policy:
        return self._d.policy

    def info(self) -> dict[str, Any]:
        d = self._d
        return {"pid": os.getpid(), "policy": os.path.realpath(d.policy_path), "policy_source": d.policy.source,
                "mode": d.policy.mode, "started_at": d.started_at, "reload_rejected": d.reload_rejected,
                "socket": str(d.policy.control.socket)}

    def status_reading(self) -> Reading | None:
        d = self._d
        if d.last_sample is None:
            return None
        return Reading(d.policy, d.last_sample, d.history, d.clock.now(), d.peaks.hour)

    def manual_bump(self, to: int, lower: bool, operator: str) -> tuple[Decision, list[Outcome]]:
        d = self._d
        sample = d.observer.sample()      # fresh: a lowering is checked against the count now
        worst = sample.worst
        decision = decide_manual(d.policy, sample.limits, to, lower=lower,
                                 worst=(worst.inode if worst else None, worst.count if worst else 0), who=operator)
        outcomes = d.carry_out(decision)    # journaled by the daemon, refused or done
        for o in outcomes:     # ctguard's own write (an operator's --lower too): not a foreign lowering
            if isinstance(o.action, SetMax) and o.ok and o.read_back is not None:
                d.persistwatch.accept_max(o.read_back)
        d.save_state()
        return decision, outcomes

    def start_capture(self, reason: str, inode: int | None, operator: str) -> int:
        s = self._d.last_sample
        worst = s.worst if s else None
        decision = Decision((), worst.inode if worst else None, s.worst_fill if s else 0.0, 0.0, False,
                            f"operator's capture: {operator}")
        return self._d.captures.launch(Capture(reason, inode), decision)

    def capture_state(self, pid: int) -> dict[str, Any] | None:
        return self._d.captures.state_of(pid)

    def timeline(self) -> dict:
        return self._d.window()

    def reload(self) -> list[str]:
        return self._d.reload()
