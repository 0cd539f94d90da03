"""The command line's side of the control socket: `status`, `bump`, `capture` and `reload` ask the
running daemon first, and act directly (saying so) only when no daemon answers.

Through the daemon, a manual bump is carried out, journaled (under ctguard.service) and
persisted by the daemon with the policy in force, and `status` reports the daemon's own view,
both even while the policy file on disk is broken after a rejected reload.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctguard.config import policy as policy_mod
from ctguard.config.policy import Policy, PolicyError
from ctguard.control import protocol as control
from ctguard.control import status
from ctguard.control.commands import bump_result, who
from ctguard.control.protocol import ControlDenied, ControlError
from ctguard.core import wording
from ctguard.core.decide import advance, decide_manual
from ctguard.core.exitcodes import EX_CONFIG, EX_FAIL, EX_NOPERM, EX_OK
from ctguard.host.act import Actor
from ctguard.host.clock import Clock
from ctguard.host.events import EventLog
from ctguard.host.kernel import ConntrackNotLoaded, Kernel
from ctguard.host.observe import Observer
from ctguard.store.state import StateStore
BUMP_TIMEOUT = 30.0      # seconds: a bump may resize the hash table, which takes a while on a big one


def _err(message: str) -> None:
    print(f"ctguard: {message}", file=sys.stderr)


def _problems(head: str, problems: list[str]) -> None:
    _err(head)
    for p in problems:
        _err(f"  {p}")


def load(path: Path) -> tuple[Policy | None, list[str]]:
    try:
        return policy_mod.load(path), []
    except PolicyError as exc:
        return None, list(exc.problems)


def socket_of(policy: Policy | None, path: Path) -> Path:
    section = getattr(policy, "control", None)     # (the evidence commands' tests pass a bare namespace)
    return section.socket if section is not None else control.socket_for(path)


def ask(path: Path, policy: Policy | None, cmd: str, args: Mapping[str, Any] | None = None,
        timeout: float = 2.0) -> tuple[Mapping[str, Any] | None, str]:
    """(the daemon's result or None, a note for the operator saying where the answer came from).

    None: no daemon for this policy answers, act directly. ControlError: the daemon refused.
    """
    sock = socket_of(policy, path)
    try:
        result = control.request(sock, cmd, {**(args or {}), "policy": os.path.realpath(path)}, timeout)
    except ControlError as exc:
        if exc.code == control.OTHER_POLICY:
            return None, f"the daemon on {sock} runs another policy ({exc}); acting directly with {path}"
        raise
    if result is None:
        return None, f"no ctguard daemon answers on {sock}: acting directly"
    return result, f"answered by the running daemon on {sock}"


def _ask_or_exit(path: Path, policy: Policy | None, cmd: str, args: Mapping[str, Any],
                 timeout: float = 2.0) -> tuple[Mapping[str, Any] | None, str] | int:
    """`ask`, or the exit code when the daemon refused (said on stderr): 77 not allowed, 1 otherwise."""
    try:
        return ask(path, policy, cmd, args, timeout)
    except ControlDenied as exc:
        _err(str(exc))
        return EX_NOPERM
    except ControlError as exc:
        _err(str(exc))
        return EX_FAIL


# -- status -----------------------------------------------------------------------------------

def status_from_daemon(path: Path, policy: Policy | None, problems: list[str]):
    """(StatusView, hour) from the daemon, or None (with the reason printed) to read directly."""
    try:
        result, note = ask(path, policy, "status")
    except ControlDenied as exc:
        _err(f"{exc}; reading the kernel directly")
        return None
    except ControlError as exc:
        _err(f"the daemon did not answer: {exc}; reading the kernel directly")
        return None
    if result is None:
        if policy is not None:
            _err(note)
        return None
    d = result.get("daemon", {})
    data = dict(result["view"])
    data["daemon"] = {**d, "note": note, "sample_age": result.get("sample_age")}
    if problems:
        _problems(f"{path} has problems (the running daemon keeps the policy it loaded before):", problems)
    hour = {int(k): [(int(m), float(f)) for m, f in v] for k, v in result.get("hour", {}).items()}
    return status.StatusView(int(result["code"]), str(result["headline"]), data), hour


# -- bump -------------------------------------------------------------------------------------

def _print_bump(result: Mapping[str, Any]) -> int:
    code = EX_OK
    for o in result.get("outcomes", []):
        print(("" if o["ok"] else "not done: ") + o["detail"])
        if o["action"] == "SetMax" and not o["ok"]:
            code = EX_FAIL
    if result.get("persist"):
        print(result["persist"])
    return code


def bump(path: Path, to: int, lower: bool) -> int:
    policy, problems = load(path)
    asked = _ask_or_exit(path, policy, "bump", {"to": to, "lower": lower}, timeout=BUMP_TIMEOUT)
    if isinstance(asked, int):
        return asked
    result, note = asked
    if result is not None:
        code = _print_bump(result)
        print(f"done by the running daemon (pid {result.get('daemon_pid', '?')}); see `journalctl -u ctguard`")
        return code
    if policy is None:
        _problems("the policy has problems:", problems)
        return EX_CONFIG
    _err(f"{note} (the journal entry carries this command's unit, not ctguard.service)")
    return bump_directly(policy, to, lower)


def bump_directly(policy: Policy, to: int, lower: bool) -> int:
    kernel, clock = Kernel(), Clock()
    observer = Observer(kernel, clock, policy.watch.namespaces)
    try:
        sample = observer.sample()
    except ConntrackNotLoaded as exc:
        _err(str(exc))
        return EX_FAIL
    finally:
        observer.close()
    store = StateStore(policy.state.dir, warn=lambda m: print(f"warning: {m}", file=sys.stderr))
    worst = sample.worst
    decision = decide_manual(policy, sample.limits, to, lower=lower,
                             worst=(worst.inode if worst else None, worst.count if worst else 0), who=who({}))
    outcomes = Actor(kernel, policy, wall_clock=time.time).carry_out(decision)
    history = advance(store.load_history(), None, [], outcomes, clock.now(), policy)
    try:
        store.save_history(history)
    except OSError as exc:
        _err(f"warning: cannot record the bump in {policy.state.dir}: {exc}")
    journal_manual(outcomes)
    try:
        result = bump_result(policy, decision, outcomes)
    except ControlError as exc:
        _err(str(exc))
        return EX_FAIL
    return _print_bump(result)


def journal_manual(outcomes) -> None:
    """The daemon-less bump's journal entries: the daemon's kinds, words and fields (ctguard.core.wording)."""
    ev = EventLog()
    for o in outcomes:
        e = wording.entry(o)
        if e is not None and e.kind != "log":
            ev.emit(e.kind, e.message, priority=e.priority, limited=e.limited, **e.fields)
    ev.flush_all()


# -- capture ----------------------------------------------------------------------------------

def capture(path: Path, policy: Policy | None, reason: str, netns: str | None) -> int | None:
    """Ask the daemon to capture and wait for its bundle; None when no daemon answers (capture
    directly). Through the daemon the capture carries its decision context and is journaled
    under its unit."""
    args: dict[str, Any] = {"reason": reason}
    if netns:
        args["netns"] = netns
    asked = _ask_or_exit(path, policy, "capture", args)
    if isinstance(asked, int):
        return asked
    result, note = asked
    if result is None:
        _err(note)
        return None
    pid = result["pid"]
    _err(f"capture started by the running daemon (pid {pid} captures); waiting for its bundle")
    deadline = time.monotonic() + float(result.get("budget", 15.0)) + 60.0
    while time.monotonic() < deadline:
        time.sleep(0.25)
        try:
            state = control.request(socket_of(policy, path), "capture", {"pid": pid,
                                                                         "policy": os.path.realpath(path)})
        except ControlError as exc:
            _err(str(exc))
            return EX_FAIL
        if state is None:
            _err("the daemon stopped while the capture ran; see `ctguard bundles list`")
            return EX_FAIL
        if state.get("state") == "done":
            if state.get("code") == 0:
                print(state.get("bundle", ""))
                return EX_OK
            _err(f"capture failed: {state.get('error', '')}")
            return EX_FAIL
    _err(f"the capture (pid {pid}) is still running; see `ctguard bundles list` later")
    return EX_FAIL


# -- reload -----------------------------------------------------------------------------------

def reload(path: Path, pid: int | None) -> int:
    """`ExecReload=`: ask the daemon to reload now and fail when it rejects the file, so
    `systemctl reload` exits non-zero; without a control socket, check the file and signal."""
    policy, problems = load(path)
    try:
        result, note = ask(path, policy, "reload", timeout=BUMP_TIMEOUT)
    except ControlError as exc:
        _err(str(exc))
        return EX_FAIL
    if result is not None:
        print(f"reloaded: {result.get('summary', '')}")
        return EX_OK
    if problems:
        _problems(f"{path} has problems; not reloading, the running policy stays in force:", problems)
        return EX_FAIL
    if pid is None:
        _err(f"{note}; nothing to reload (pass --pid to signal a daemon without a control socket)")
        return EX_FAIL
    os.kill(pid, signal.SIGHUP)
    _err(f"{note}: the policy is valid, sent SIGHUP to pid {pid}")
    return EX_OK
