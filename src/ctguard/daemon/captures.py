"""Evidence beside the loop: capture children, started at a low priority and reaped without
ever waiting on them, and the flight recorder's window each one is given.

An automatic capture asked for during a turn is queued and started at the end of the turn,
once the bump is on record and the recorder holds the turn (a capture never delays a bump);
an operator's capture (through the control socket) starts at once.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

from ctguard.config.policy import Policy, effective
from ctguard.core.diagnose import diagnose
from ctguard.core.model import Capture, Decision
from ctguard.evidence import review
from ctguard.host import procs
from ctguard.store.files import atomic_write, ensure_private_dir

log = logging.getLogger(__name__)

FINISHED_KEPT = 32          # finished captures remembered for `ctguard capture` asking about its pid


ACTION_KEY = "action"    # the class of an action in the decision file (the recorder's events say it so too)


def jsonable(obj: Any) -> Any:
    """A decision's actions as JSON: each dataclass's fields, its class under ACTION_KEY.

    The class goes under a key of its own because actions have a `kind` field of their own
    (Refuse.kind: the bound that refused, Warn.kind); bundles written before kept the class
    name in `kind` and lost that field, which readers still accept (core.diagnose.action_name)."""
    if is_dataclass(obj) and not isinstance(obj, type):
        d = {k: jsonable(v) for k, v in asdict(obj).items()}
        d[ACTION_KEY] = type(obj).__name__
        return d
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(x) for x in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


@dataclass(frozen=True)
class Done:
    reason: str
    code: int
    output: str

    @property
    def bundle(self) -> str:
        return self.output.splitlines()[-1] if self.output else ""


@dataclass
class _Child:
    proc: subprocess.Popen
    reason: str
    files: tuple[Path, ...]


@dataclass
class Captures:
    """`window(incident)` gives the flight recorder's window; `policy_file()` the file a child loads."""

    state_dir: Callable[[], Path]
    policy_file: Callable[[], Path]
    window: Callable[[dict | None], dict]
    running: list[_Child] = field(default_factory=list)
    finished: dict[int, tuple[int, str]] = field(default_factory=dict)   # pid -> (exit code, output)
    queued: list[tuple[Capture, Decision, dict | None]] = field(default_factory=list)
    started: int = 0

    def queue(self, action: Capture, decision: Decision, incident: dict | None = None) -> None:
        self.queued.append((action, decision, incident))

    def launch_queued(self) -> None:
        queued, self.queued = self.queued, []
        for action, decision, incident in queued:
            try:
                detail = self.launch(action, decision, incident)
            except OSError as exc:
                log.warning("cannot start the %s capture: %s", action.reason, exc)
            else:
                log.debug("%s", detail)

    def launch(self, action: Capture, decision: Decision, incident: dict | None = None) -> int:
        """Start one capture child now; its pid."""
        # The decision goes to the capture in a private file (it names addresses and namespaces);
        # the file is removed when the capture is reaped.
        folder = ensure_private_dir(self.state_dir())
        self.started += 1
        decision_file = folder / f"capture-decision-{os.getpid()}-{self.started}.json"
        payload = json.dumps({"summary": decision.summary, "actions": jsonable(decision.actions),
                              "worst_netns": decision.worst_netns, "worst_fill": decision.worst_fill,
                              "rate": decision.rate, "policy": str(self.policy_file())})
        atomic_write(decision_file, payload, 0o600)
        timeline_file = folder / f"capture-timeline-{os.getpid()}-{self.started}.json"
        # Tens of ms for 50 namespaces x 15 minutes (bench/bench_review.py), once or twice an
        # incident, after the bump was made; a failure costs the bundle its timeline only.
        _write_timeline(timeline_file, self.window(incident))
        args = [sys.executable, "-m", "ctguard", "--policy", str(self.policy_file()), "capture",
                "--reason", action.reason, "--decision-file", str(decision_file),
                "--timeline-file", str(timeline_file)]
        if action.netns:
            args += ["--netns", str(action.netns)]
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_lower_priority, close_fds=True)
        self.running.append(_Child(proc, action.reason, (decision_file, timeline_file)))
        return proc.pid

    def reap(self) -> list[Done]:
        done = []
        for child in list(self.running):
            proc = child.proc
            if proc.poll() is None:
                continue
            out, err = proc.communicate()
            text = (out if proc.returncode == 0 else err).decode(errors="replace").strip()
            done.append(Done(child.reason, proc.returncode, text))
            self.finished[proc.pid] = (proc.returncode, text)
            while len(self.finished) > FINISHED_KEPT:
                del self.finished[next(iter(self.finished))]
            self.running.remove(child)
            for f in child.files:
                f.unlink(missing_ok=True)
        return done

    def state_of(self, pid: int) -> dict[str, Any] | None:
        """What `ctguard capture` asks about its child: running, done (bundle or error), or None."""
        if any(c.proc.pid == pid for c in self.running):
            return {"state": "running", "pid": pid}
        if pid in self.finished:
            code, text = self.finished[pid]
            if code == 0:
                return {"state": "done", "pid": pid, "code": 0, "bundle": text.splitlines()[-1] if text else ""}
            return {"state": "done", "pid": pid, "code": code, "error": text[-2000:]}
        return None

    def stop(self, grace: float = 1.0) -> None:
        deadline = time.monotonic() + grace
        for child in self.running:
            try:
                child.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.terminate()


def policy_for_child(policy: Policy, path: Path, reload_rejected: str | None) -> Path:
    """The policy file a capture child loads: after a rejected reload the files on disk are
    broken, so the child gets the policy in force, merged with its drop-ins
    (policy.effective), in a private folder of its own (no policy.d beside it)."""
    if reload_rejected is None:
        return path
    copy = ensure_private_dir(Path(policy.state.dir) / "policy-in-force") / "policy.toml"
    atomic_write(copy, effective(policy), 0o600)
    return copy


def top_findings(bundle: str) -> list[str]:
    """The finding ids of a bundle just written (its journal entry and the metrics name the top one)."""
    try:
        _path, data = review.load(Path(bundle).parent, Path(bundle).name)
        return [f.id for f in diagnose(data)]
    except Exception as exc:  # a bundle that cannot be read must not take the loop down
        log.warning("cannot diagnose %s: %s", bundle, exc)
        return []


def _write_timeline(path: Path, window: dict) -> None:
    # A timeline that cannot be written costs the bundle its timeline (the capture says so), not the capture.
    try:
        atomic_write(path, json.dumps(window, separators=(",", ":")), 0o600)
    except (OSError, ValueError) as exc:
        log.warning("cannot write the flight recorder's window to %s: %s", path, exc)


def _lower_priority() -> None:
    # Evidence must never compete with the traffic or with the loop that bumps: nice 10 and
    # SCHED_IDLE (idle I/O class with it). A refusal leaves the capture at normal priority.
    procs.to_background(10)
