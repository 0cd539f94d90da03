"""`ctguard` as a separate process, from this checkout's src/: one command (`ctguard()`) or
`ctguard run` in the background (`Running`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers.paths import SRC
from helpers.wait import wait_for


def ctguard(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    """`python3 -m ctguard ARGS` from this checkout, output captured, at most 60 s."""
    env = {**os.environ, "PYTHONPATH": SRC}
    return subprocess.run([sys.executable, "-m", "ctguard", *args], capture_output=True, text=True, env=env,
                          timeout=60, **kw)


class Running:
    """`ctguard run` in the background; stopped with SIGTERM on exit, killed if it does not stop.

    `env` is added to the daemon's environment (without it, NOTIFY_SOCKET is removed); with
    `cgroups` (folders such as system.slice/<unit>) the daemon starts inside them, which is how
    journald files its entries under that unit. Used as a context manager it waits for the first
    metrics file; `started(socket=True)` waits for the control socket too.
    """

    def __init__(self, policy: Path, env: dict | None = None, cgroups: list[Path] = ()) -> None:
        self.policy = policy
        run_env = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
        if not env:
            run_env.pop("NOTIFY_SOCKET", None)

        def enter_unit() -> None:
            for folder in cgroups:
                (folder / "cgroup.procs").write_text(str(os.getpid()))

        self.log = policy.parent / "daemon.log"
        self.proc = subprocess.Popen([sys.executable, "-m", "ctguard", "run", "--policy", str(policy)],
                                     stdout=subprocess.DEVNULL, stderr=open(self.log, "w"), env=run_env,
                                     preexec_fn=enter_unit if cgroups else None)
        self.state = policy.parent / "state" / "state.json"
        self.metrics = policy.parent / "ctguard.prom"
        self.socket = policy.parent / "run" / "control.sock"

    def started(self, socket: bool = False) -> "Running":
        """Wait (15 s at most) for the first metrics file, and the control socket with `socket`."""
        assert wait_for(lambda: (not socket or self.socket.exists()) and self.metrics.exists()
                        or self.proc.poll() is not None, 15), self.output()
        assert self.proc.poll() is None, self.output()
        return self

    def __enter__(self) -> "Running":
        return self.started()

    def stop(self) -> float:
        t = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return time.monotonic() - t

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.stop()

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def bumps(self) -> list[dict]:
        if not self.state.exists():
            return []
        return [b for b in json.loads(self.state.read_text())["bumps"] if b["ok"]]
