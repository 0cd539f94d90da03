"""What the control socket's commands do inside the daemon (`status`, `bump`, `capture`, `reload`,
`timeline`), and the operator's bump as both the daemon and a daemon-less `ctguard bump` tell it.

Each command is a function of the running daemon's public service (`Service`: a few methods,
never its private state) and the request's args, returning the answer's `result`; a refusal
raises ControlError with advice. `handlers(service)` is the table the daemon serves.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from ctguard.config import policy as policy_mod
from ctguard.config.policy import KERNEL_UINT_LIMIT, Policy
from ctguard.control import status as status_mod
from ctguard.control.protocol import OTHER_POLICY, ControlError
from ctguard.core.model import Decision, History, Instant, Outcome, Persist, Refuse, Sample, SetMax
from ctguard.host.kernel import ConntrackNotLoaded
from ctguard.host.netns import NetnsError, resolve


@dataclass(frozen=True)
class Reading:
    """What `status` is built from: the daemon's last sample and its history, now."""

    policy: Policy
    sample: Sample
    history: History
    now: Instant
    hour: Mapping[int, list[tuple[int, float]]]


class Service(Protocol):
    """The daemon as the commands see it (ctguard.daemon.loop.Daemon implements it)."""

    policy: Policy

    def info(self) -> dict[str, Any]: ...
    def status_reading(self) -> Reading | None: ...
    def manual_bump(self, to: int, lower: bool, operator: str) -> tuple[Decision, list[Outcome]]: ...
    def start_capture(self, reason: str, inode: int | None, operator: str) -> int: ...
    def capture_state(self, pid: int) -> dict[str, Any] | None: ...
    def reload(self) -> list[str]: ...
    def timeline(self) -> dict: ...


Handler = Callable[[Mapping[str, Any]], Mapping[str, Any]]


def handlers(svc: Service) -> dict[str, Handler]:
    """The command table; another command is one more entry here."""
    return {
        "status": lambda args: status(svc, args),
        "bump": lambda args: bump(svc, args),
        "capture": lambda args: capture(svc, args),
        "reload": lambda args: reload(svc, args),
        "timeline": lambda args: {"timeline": svc.timeline()},
    }


def who(peer: Mapping[str, Any]) -> str:
    """The operator as the journal names them: the caller's uid and pid (SO_PEERCRED)."""
    if "uid" in peer:
        return f"operator (uid {peer['uid']}, pid {peer.get('pid', '?')})"
    return f"operator (uid {os.getuid()}, pid {os.getpid()})"


def same_policy(svc: Service, args: Mapping[str, Any]) -> None:
    """A caller that names a policy file (`ctguard --policy P ...`) is answered only by the daemon
    running P: another daemon's answer would be about another policy, state and ceiling."""
    asked = args.get("policy")
    running = svc.info()["policy"]
    if isinstance(asked, str) and os.path.realpath(asked) != running:
        raise ControlError(f"this daemon (pid {os.getpid()}) runs {running}, not {asked}", OTHER_POLICY)


# -- status -----------------------------------------------------------------------------------

def status(svc: Service, args: Mapping[str, Any]) -> Mapping[str, Any]:
    same_policy(svc, args)
    r = svc.status_reading()
    if r is None:
        raise ControlError("the daemon has no reading yet (is nf_conntrack loaded?); try again in a few seconds")
    view = status_mod.build(r.policy, r.sample, r.history, r.now)
    return {
        "daemon": svc.info(),
        "code": view.code,
        "headline": view.headline,
        "view": view.data,
        "sample_age": round(r.now.since(r.sample.at), 3),
        "hour": {str(k): [[m, f] for m, f in v] for k, v in r.hour.items()},
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


def bump(svc: Service, args: Mapping[str, Any]) -> Mapping[str, Any]:
    same_policy(svc, args)
    to = _to(args)
    try:
        decision, outcomes = svc.manual_bump(to, bool(args.get("lower", False)), who(args.get("peer") or {}))
    except ConntrackNotLoaded as exc:
        raise ControlError(str(exc)) from None
    return {**bump_result(svc.policy, decision, outcomes), "daemon_pid": os.getpid()}


# -- capture ----------------------------------------------------------------------------------

def capture(svc: Service, args: Mapping[str, Any]) -> Mapping[str, Any]:
    """Start a capture beside the loop ({"reason", "netns"}) -> {"pid"}; or ask about one
    ({"pid"}) -> {"state": "running"} / {"state": "done", "code", "bundle" or "error"}."""
    same_policy(svc, args)
    if "pid" in args:
        pid = args["pid"]
        state = svc.capture_state(pid)
        if state is None:
            raise ControlError(f"no capture with pid {pid!r} is known to this daemon (it may have restarted); "
                               "see `ctguard bundles list`")
        return state
    reason = args.get("reason", "manual")
    if not isinstance(reason, str) or not reason or len(reason) > 64:
        raise ControlError("capture: \"reason\" must be a short text")
    inode = None
    spec = args.get("netns")
    if spec is not None:
        try:
            inode = resolve(str(spec)).inode
        except NetnsError as exc:
            raise ControlError(exc.strerror or str(exc)) from None
    try:
        pid = svc.start_capture(reason, inode, who(args.get("peer") or {}))
    except OSError as exc:
        raise ControlError(f"cannot start a capture: {exc}") from None
    return {"state": "running", "pid": pid, "detail": f"capture started (pid {pid})",
            "evidence_dir": str(svc.policy.evidence.dir), "budget": svc.policy.evidence.budget}


# -- reload -----------------------------------------------------------------------------------

def reload(svc: Service, args: Mapping[str, Any]) -> Mapping[str, Any]:
    """`systemctl reload ctguard` (ExecReload=ctguard reload): synchronous, so a bad file fails
    the reload itself instead of only a journal line saying so."""
    same_policy(svc, args)
    problems = svc.reload()
    if problems:
        raise ControlError("reload rejected, the previous policy stays in force:\n" + "\n".join(problems))
    return {"policy": str(svc.info()["policy"]), "summary": policy_mod.summary(svc.policy)}
