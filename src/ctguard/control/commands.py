"""What the control socket's commands do inside the daemon (`status`, `bump`, `capture`, `reload`),
and the operator's bump as both the daemon and a daemon-less `ctguard bump` carry it out.

Each command is a function of the running daemon and the request's args returning the answer's
`result`; a refusal raises ControlError with advice. The daemon's `control_handlers()` is the table.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ctguard.config import policy as policy_mod
from ctguard.control.protocol import OTHER_POLICY, ControlError
from ctguard.core.decide import advance, decide_manual
from ctguard.core.model import Capture, Decision, History, Instant, Outcome, Persist, Refuse, Sample, SetMax
from ctguard.config.policy import KERNEL_UINT_LIMIT, Policy

if TYPE_CHECKING:
    from ctguard.daemon.loop import Daemon


def who(peer: Mapping[str, Any]) -> str:
    """The operator as the journal names them: the caller's uid and pid (SO_PEERCRED)."""
    if "uid" in peer:
        return f"operator (uid {peer['uid']}, pid {peer.get('pid', '?')})"
    return f"operator (uid {os.getuid()}, pid {os.getpid()})"


def daemon_info(d: "Daemon") -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "policy": os.path.realpath(d.policy_path),
        "policy_source": d.policy.source,
        "mode": d.policy.mode,
        "started_at": d.started_at,
        "reload_rejected": d.reload_rejected,
        "socket": str(d.policy.control.socket),
    }


def same_policy(d: "Daemon", args: Mapping[str, Any]) -> None:
    """A caller that names a policy file (`ctguard --policy P ...`) is answered only by the daemon
    running P: another daemon's answer would be about another policy, state and ceiling."""
    asked = args.get("policy")
    if isinstance(asked, str) and os.path.realpath(asked) != os.path.realpath(d.policy_path):
        raise ControlError(f"this daemon (pid {os.getpid()}) runs {d.policy_path}, not {asked}", OTHER_POLICY)


# -- status -----------------------------------------------------------------------------------

def status(d: "Daemon", args: Mapping[str, Any]) -> Mapping[str, Any]:
    same_policy(d, args)
    from ctguard.core import status as status_mod

    sample = d.last_sample
    if sample is None:
        raise ControlError("the daemon has no reading yet (is nf_conntrack loaded?); try again in a few seconds")
    now = d.clock.now()
    view = status_mod.build(d.policy, sample, d.history, now)
    return {
        "daemon": daemon_info(d),
        "code": view.code,
        "headline": view.headline,
        "view": view.data,
        "sample_age": round(now.since(sample.at), 3),
        "hour": {str(k): [[m, f] for m, f in v] for k, v in d.peaks.hour.items()},
    }


# -- bump -------------------------------------------------------------------------------------

def _to(args: Mapping[str, Any]) -> int:
    to = args.get("to")
    if isinstance(to, bool) or not isinstance(to, int) or not 0 < to <= KERNEL_UINT_LIMIT:
        raise ControlError(f"bump needs \"to\": a whole number between 1 and {KERNEL_UINT_LIMIT}, not {to!r}")
    return to


def persist_note(policy: Policy, decision: Decision, outcomes: list[Outcome]) -> str:
    """What happens to the new max at the next boot, in the operator's words."""
    p = policy.persist
    done = [o for o in outcomes if isinstance(o.action, Persist)]
    if policy.observe_only:
        return "observe mode: nothing is written to the kernel or to /etc"
    if done:
        o = done[0]
        return (f"persisted to {p.sysctl_file} (persist.mode {p.mode})" if o.ok
                else f"NOT persisted: {o.detail}")
    if not decision.of(SetMax):
        return ""
    return "not persisted (persist.mode is never): the next boot starts from the kernel's default"


def manual_bump(policy: Policy, actor, history: History, sample: Sample, now: Instant, to: int, lower: bool,
                operator: str) -> tuple[Decision, list[Outcome], History]:
    """Decide and carry out an operator's bump; the history it leaves (save it)."""
    worst = sample.worst
    decision = decide_manual(policy, sample.limits, to, lower=lower,
                             worst=(worst.inode if worst else None, worst.count if worst else 0), who=operator)
    outcomes = actor.carry_out(decision)
    return decision, outcomes, advance(history, None, [], outcomes, now, policy)


def bump_result(policy: Policy, decision: Decision, outcomes: list[Outcome]) -> dict[str, Any]:
    refused = decision.of(Refuse)
    if refused:
        raise ControlError(f"refused: {refused[0].reason}")
    return {
        "outcomes": [{"action": type(o.action).__name__, "ok": o.ok, "detail": o.detail} for o in outcomes],
        "max": next((o.read_back for o in outcomes if isinstance(o.action, SetMax) and o.ok), None),
        "ok": all(o.ok for o in outcomes if isinstance(o.action, SetMax)),
        "persist": persist_note(policy, decision, outcomes),
    }


def bump(d: "Daemon", args: Mapping[str, Any]) -> Mapping[str, Any]:
    same_policy(d, args)
    from ctguard.host.kernel import ConntrackNotLoaded

    to = _to(args)
    lower = bool(args.get("lower", False))
    try:
        sample = d.observer.sample()      # fresh: a lowering is checked against the count now
    except ConntrackNotLoaded as exc:
        raise ControlError(str(exc)) from None
    now = d.clock.now()
    decision, outcomes, d.history = manual_bump(d.policy, d.actor, d.history, sample, now, to, lower,
                                                who(args.get("peer") or {}))
    for o in outcomes:     # ctguard's own write (an operator's --lower too): not a foreign lowering
        if isinstance(o.action, SetMax) and o.ok and o.read_back is not None:
            d.persistwatch.accept_max(o.read_back)
    # Journaled by the daemon, so `journalctl -u ctguard` holds it, refused or done.
    d._report(decision, outcomes, [])
    d._safe(d.store.save_history, d.history, what="state")
    return {**bump_result(d.policy, decision, outcomes), "daemon_pid": os.getpid()}


# -- capture ----------------------------------------------------------------------------------

def capture(d: "Daemon", args: Mapping[str, Any]) -> Mapping[str, Any]:
    """Start a capture beside the loop ({"reason", "netns"}) -> {"pid"}; or ask about one
    ({"pid"}) -> {"state": "running"} / {"state": "done", "code", "bundle" or "error"}."""
    same_policy(d, args)
    if "pid" in args:
        pid = args["pid"]
        if any(p.pid == pid for p, _, _ in d.children.running):
            return {"state": "running", "pid": pid}
        if pid in d.children.finished:
            code, text = d.children.finished[pid]
            if code == 0:
                return {"state": "done", "pid": pid, "code": 0, "bundle": text.splitlines()[-1] if text else ""}
            return {"state": "done", "pid": pid, "code": code, "error": text[-2000:]}
        raise ControlError(f"no capture with pid {pid!r} is known to this daemon (it may have restarted); "
                           "see `ctguard bundles list`")
    reason = args.get("reason", "manual")
    if not isinstance(reason, str) or not reason or len(reason) > 64:
        raise ControlError("capture: \"reason\" must be a short text")
    inode = None
    spec = args.get("netns")
    if spec is not None:
        from ctguard.host.netns import NetnsError, resolve

        try:
            inode = resolve(str(spec)).inode
        except NetnsError as exc:
            raise ControlError(exc.strerror or str(exc)) from None
    s = d.last_sample
    worst = s.worst if s else None
    decision = Decision((), worst.inode if worst else None, s.worst_fill if s else 0.0, 0.0, False,
                        f"operator's capture: {who(args.get('peer') or {})}")
    try:
        detail = d._start_capture(Capture(reason, inode), decision)
    except OSError as exc:
        raise ControlError(f"cannot start a capture: {exc}") from None
    proc = d.children.running[-1][0]
    return {"state": "running", "pid": proc.pid, "detail": detail, "evidence_dir": str(d.policy.evidence.dir),
            "budget": d.policy.evidence.budget}


# -- reload -----------------------------------------------------------------------------------

def reload(d: "Daemon", args: Mapping[str, Any]) -> Mapping[str, Any]:
    """`systemctl reload ctguard` (ExecReload=ctguard reload): synchronous, so a bad file fails
    the reload itself instead of only a journal line saying so."""
    same_policy(d, args)
    problems = d._reload()
    if problems:
        raise ControlError("reload rejected, the previous policy stays in force:\n" + "\n".join(problems))
    return {"policy": str(d.policy_path), "summary": policy_mod.summary(d.policy)}
