"""Shared pieces of the benchmarks: a paced UDP flood that reports what it achieved, and
`ctguard run` in the background with every path in a temporary folder.

The kernel helpers (lock + restore, namespaces, drop counters) are the tests' own
`tests/helpers/` (kernelenv, the policy writer, wait_for), imported, not copied.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(SRC))

from helpers import kernelenv  # noqa: E402
from helpers.policy import write_policy as _write_policy  # noqa: E402
from helpers.wait import wait_for  # noqa: E402

_SENDER = kernelenv.FLOOD_SCRIPT   # one flood script for tests, benchmarks and the system test


@dataclass
class FloodResult:
    start: float        # CLOCK_MONOTONIC of the first datagram (earliest sender)
    end: float          # CLOCK_MONOTONIC of the last one (latest sender)
    sent: int
    errors: int

    @property
    def rate(self) -> float:
        return self.sent / max(1e-9, self.end - self.start)


class Flood:
    """`senders` processes in the sender namespace sharing `flows` at `rate` flows/s in all.

    Every process waits for a common start time, so the start is known to the millisecond
    and does not include interpreter start-up.
    """

    def __init__(self, pair, flows: int, rate: float, senders: int = 1, first_port: int = 1) -> None:
        self.start_at = time.monotonic() + 0.4
        share = flows // senders
        self.procs = []
        for i in range(senders):
            n = share if i < senders - 1 else flows - share * (senders - 1)
            self.procs.append(subprocess.Popen(
                ["ip", "netns", "exec", pair.sender, sys.executable, "-c", _SENDER, pair.receiver_addr,
                 str(n), str(rate / senders), str(first_port), repr(self.start_at)],
                stdout=subprocess.PIPE, text=True))

    def running(self) -> bool:
        return any(p.poll() is None for p in self.procs)

    def wait(self, timeout: float = 120) -> FloodResult:
        results = []
        for p in self.procs:
            out, _ = p.communicate(timeout=timeout)
            results.append(json.loads(out.strip().splitlines()[-1]))
        return FloodResult(min(r["start"] for r in results), max(r["end"] for r in results),
                           sum(r["sent"] for r in results), sum(r["errors"] for r in results))


def stat_totals(pair, *columns: str) -> dict[str, int]:
    """The receiver's per-CPU conntrack counters, summed (kernelenv's `drops()` reads only `drop`)."""
    text = pair.exec(pair.receiver, "cat", "/proc/net/stat/nf_conntrack").stdout.split("\n")
    header = text[0].split()
    return {c: sum(int(line.split()[header.index(c)], 16) for line in text[1:] if line.strip()) for c in columns}


def write_policy(folder: Path, body: str) -> Path:
    """A policy whose every path is under `folder`, plus `body` (whole TOML tables): persist mode
    never, no control socket of its own (the benchmark's body names one where it needs it)."""
    folder.mkdir(parents=True, exist_ok=True)
    return _write_policy(folder, body, "never", defend=None, control=False)


# Run inside `unshare --mount --pid --fork --mount-proc`: show the daemon only the /run/netns
# entries named on the command line (a tmpfs of bind mounts over /run/netns) and, with its own
# /proc, only its own processes; then exec the daemon (it becomes PID 1 there).
_ISOLATE = r"""
import os, subprocess, sys
i = sys.argv.index("--")
view, names, cmd = sys.argv[1], sys.argv[2:i], sys.argv[i + 1:]
os.makedirs(view, exist_ok=True)
subprocess.run(["mount", "-t", "tmpfs", "ctguard-bench", view], check=True)
for n in names:
    open(os.path.join(view, n), "w").close()
    subprocess.run(["mount", "--bind", "/run/netns/" + n, os.path.join(view, n)], check=True)
subprocess.run(["mount", "--rbind", view, "/run/netns"], check=True)
os.execvp(cmd[0], cmd)
"""


class Daemon:
    """`python3 -m ctguard run --policy P` in the background; SIGTERM (then SIGKILL) on exit.

    With `only_netns` (a list of /run/netns names), the daemon runs in its own mount and PID
    namespaces and sees the host's network namespace and those only: other sessions' test
    namespaces on a shared machine cannot make an idle measurement busy.
    """

    def __init__(self, policy: Path, only_netns: list[str] | None = None, env: dict[str, str] | None = None,
                 src: Path | None = None) -> None:
        extra = env or {}
        env = {**os.environ, "PYTHONPATH": str(src or SRC)}
        env.pop("NOTIFY_SOCKET", None)
        env.pop("WATCHDOG_PID", None)
        env.update(extra)       # e.g. NOTIFY_SOCKET + WATCHDOG_USEC to time the watchdog pings
        self.log = policy.parent / "daemon.log"
        self.metrics = policy.parent / "ctguard.prom"
        self._logf = open(self.log, "w")
        cmd = [sys.executable, "-m", "ctguard", "run", "--policy", str(policy)]
        if only_netns is not None:
            cmd = ["unshare", "--mount", "--pid", "--fork", "--mount-proc", sys.executable, "-c", _ISOLATE,
                   str(policy.parent / "netns-view"), *only_netns, "--", *cmd]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._logf,
                                     env=env)
        self.pid = self.proc.pid
        if only_netns is not None:
            self.pid = self._forked_child()

    def _forked_child(self) -> int:
        """The host PID of unshare's child (the daemon, once the wrapper has exec'd)."""
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        for _ in range(500):
            kids = path.read_text().split() if path.exists() else []
            if kids:
                return int(kids[0])
            time.sleep(0.01)
        raise RuntimeError("unshare did not start the daemon")

    def __enter__(self) -> "Daemon":
        if not wait_for(lambda: self.metrics.exists() or self.proc.poll() is not None, 20):
            raise RuntimeError(f"ctguard did not take its first sample within 20 s; see {self.log}")
        if self.proc.poll() is not None:
            raise RuntimeError(f"ctguard exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        return self

    def stop(self) -> None:
        if self.proc.poll() is None:
            if self.pid != self.proc.pid:
                try:
                    os.kill(self.pid, signal.SIGTERM)   # the daemon; unshare exits after it
                except ProcessLookupError:
                    pass
            else:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()

    def __exit__(self, *exc) -> None:
        self.stop()


def proc_times(pid: int) -> tuple[float, float, int, int]:
    """(utime + stime, cutime + cstime (reaped children) in seconds, VmRSS, VmHWM in bytes)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tck = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / tck
    children = (int(fields[13]) + int(fields[14])) / tck
    rss = hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    return cpu, children, rss, hwm


def clean_exit_on_signals() -> None:
    """SIGTERM and SIGINT (ignored by default in a shell's background job) unwind through the
    `finally` blocks, so namespaces are deleted and kernel values restored."""
    def stop(signum, _frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def header() -> str:
    return f"# {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, kernel {os.uname().release}, Python {sys.version.split()[0]}"
