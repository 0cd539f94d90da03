#!/usr/bin/env python3
"""What a hashsize resize costs: ctguard's loop during one, and new flows during one.

    sudo python3 bench/bench_resize.py [--entries 1000000] [--runs 3] [--probe-sizes 262144,1000000]
    sudo python3 bench/bench_resize.py --quick        # tiny (the smoke test)
    sudo python3 bench/bench_resize.py --parts loop --src /path/to/old/src   # the loop, older code

Part "loop" (issue 15 item 3). Namespace A holds --entries UDP flows (the kernel's hash is
global: a resize rehashes every namespace's entries, ~0.4 us each); hashsize 262,144 at the
start of every run. `ctguard run` (its own mount namespace shows it the host and the namespaces
of the case only) with `act = 1.0`, `horizon = 0`, `cooldown = 0`, the guard off (its look at
the table before a big bump is a bounded wait of its own), NOTIFY_SOCKET and WATCHDOG_USEC =
40 ms (--watchdog-usec; ctguard pings every half of it: one due every 20 ms, so a stall of the
loop well under 50 ms shows). Three cases, each run in every --modes:

  quiet   the daemon sees namespace B only (2,000 of max 2,048), `[buckets] ratio = 1`; at T
          the bench raises max to 1,048,576 and the daemon resizes the whole table
  burst   the same, and at T + 150 ms max back to 2,048 and 2,000 new flows (unpaced) into B:
          they arrive during the rehash; the kernel prints `table full`, ctguard bumps
  storm   the daemon sees A itself (max = its count + 500, ratio 4: no resize wanted); at T
          5,000 new flows at 5,000/s into A: table full, a bump to the ceiling (2,097,152: 8
          entries a bucket), which wants 524,288 buckets while the flows still arrive

Modes: `never` (`[buckets] resize = "never"`: the same run without the daemon's resize, the
baseline; ratios are to its run of the same case and round), `calm` (the default: mid-storm, an
expensive resize waits for calm) and `at-once`; with --src, the code there runs instead (its
policy without the `resize` key), to show the loop before the resize moved off it. The daemon
and the CLI run byte-compiled (PYTHONPYCACHEPREFIX), as installed. Per run, from T:

  wd gap       largest gap between two WATCHDOG=1 pings (ms), and where it started (`at`, ms)
  ticker       the control: largest gap of a process that only sleeps 2 ms at a time (ms); when
               it is as large as `wd gap`, nothing ran on the machine (the kernel held both CPUs:
               new flows spin on the bucket locks the resize holds), not ctguard's loop
  sock         the daemon's answer to `status` on its control socket, requests 5 ms apart
               (ctguard.control.protocol.request of the code under test): p50/max of those started from
               T to the end of the resize (`never`: T to T + 500 ms), how many, failures
  cli med      `ctguard status --json` wall time every ~0.3 s, median (ms; a new Python each
               call, most of it start-up: for reference, not the loop's latency)
  full->bump   the kernel's first table-full line of the run (/dev/kmsg timestamp on
               CLOCK_MONOTONIC, as bench_journal_latency.py does) to the raised max (polled
               every ms)
  resize end   the kernel's new bucket count in /proc/sys/net/netfilter/nf_conntrack_buckets
               (polled every ms): the end of the rehash, ms from T. (Not the module parameter:
               reading it waits for the parameter lock the write holds until its very end.)

A summary at the end lists every run per case and mode, with the gaps as ratios to `never`.

Part "probe" (item 4). New-flow latency from a probe: one UDP datagram from a fresh source port
(so a new conntrack entry) to an echo server in the tracked receiver and back, every ~1 ms. Per
--probe-sizes N: the receiver filled with N flows, then the probe for 1.5 s at max/buckets =
each of --chains (4, 8, 16, 64; hashsize = N / chain; with the kernel's `chaintoolong` counter,
new flows refused because their bucket chain passed 50-80 tuples), and the probe during one resize from
N/4 to N/2 buckets (what a x2 bump asks for at ratio 4). p50 / p99 / max RTT, probes slower
than 10 ms, and each p50 as a ratio to the chain-4 row (the ratio ctguard keeps).

Holds the tests' kernel lock for the whole run; restores nf_conntrack_max and hashsize; deletes
its namespaces. Needs root, and a journald for the full->bump column (tests/helpers/journald.py starts one).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import SRC, clean_exit_on_signals, Daemon, Flood, header, kernelenv, write_policy  # noqa: E402

from helpers.kernelenv import get_buckets, netns_pair, saved_kernel_values, set_max  # noqa: E402

B_MAX = 2048
B_FILL = 2000
B_BURST = 2000
START_BUCKETS = 262144
PROC_BUCKETS = "/proc/sys/net/netfilter/nf_conntrack_buckets"
RAISE_TO = 1048576
WATCHDOG_USEC = 40_000       # a ping due every 20 ms: a 50 ms stall shows (--watchdog-usec)
STORM_ROOM = 500             # storm: max = the watched table's count + this
STORM_FLOWS = 5000           # storm: new flows at STORM_RATE/s (1 s): table full, a bump, a resize wanted mid-storm
STORM_RATE = 5000
STORM_PORT = 30000
STORM_CEILING = 8 * START_BUCKETS   # the bump's ceiling: max/buckets 8 after it, within `calm`'s chain bound
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)     # Linux; Python does not name it
DEFAULT_MODES = "never,calm,at-once"
SOCK_PAUSE = 0.005           # between two `status` requests on the control socket

ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(64)
    s.sendto(data, peer)
"""

# A control: a process that only sleeps 2 ms at a time and records when it woke. A gap here
# means the machine ran nothing for that long (both CPUs held by the kernel), not ctguard's loop.
TICKER = r"""
import json, sys, time
end = time.monotonic() + float(sys.argv[1]); out = []
while time.monotonic() < end:
    time.sleep(0.002); out.append(time.monotonic())
print(json.dumps(out))
"""

# One new flow per probe: an explicit, never reused source port. Prints [[t_sent, rtt], ...].
PROBE = r"""
import json, socket, sys, time
dst, port, first, seconds, gap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
out, sport, end = [], first, time.monotonic() + seconds
while time.monotonic() < end and sport < 65535:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("0.0.0.0", sport)); sport += 1
    s.settimeout(3.0)
    t = time.monotonic()
    try:
        s.sendto(b"p", (dst, port)); s.recv(16); out.append([t, time.monotonic() - t])
    except OSError as exc:
        out.append([t, None, type(exc).__name__])
    s.close()
    time.sleep(gap)
print(json.dumps(out))
"""


def chaintoolong(pair) -> int:
    """New flows the kernel refused for a too-long bucket chain (only ctnetlink reports it)."""
    out = pair.exec(pair.receiver, "conntrack", "-S", check=False).stdout
    return sum(int(w.split("=")[1]) for w in out.split() if w.startswith("chaintoolong="))


def ns_sysctl(pair, key: str, value: str) -> None:
    pair.exec(pair.receiver, "sysctl", "-qw", f"{key}={value}")


def fill(pair, n: int, senders: int, first_port: int = 1) -> None:
    Flood(pair, n, 0, senders=senders, first_port=first_port).wait(timeout=600)


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


# --- part "loop" ------------------------------------------------------------------------------

def policy_body(mode: str, old_src: bool, control_sock: Path | None, storm: bool = False) -> str:
    # The guard is off: before a bump past its ceiling it looks at the table on the loop, for up
    # to guard.sample_budget (50 ms), a wait of its own in every mode; these figures are the resize's.
    body = ("[thresholds]\nact = 1.0\nhorizon = 0\n"
            f"[bump]\nceiling = {STORM_CEILING if storm else 4194304}\ncooldown = 0\nmax_per_hour = 60\n"
            f"[guard]\nenabled = false\n[buckets]\nratio = {4 if storm else 1}\n")
    if not old_src:
        body += f'resize = "{mode}"\n'
    if control_sock is not None:
        body += f'[control]\nsocket = "{control_sock}"\n'
    return body


class Pings:
    """WATCHDOG=1 datagrams on our NOTIFY_SOCKET, each with the kernel's timestamp of its sending
    (SO_TIMESTAMPNS, on CLOCK_MONOTONIC here): when this listener runs late, the gaps do not."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.sock.bind(str(path))
        self.path = path
        self.times: list[float] = []
        m0 = time.monotonic()
        self._offset = time.time() - (m0 + time.monotonic()) / 2     # CLOCK_REALTIME - CLOCK_MONOTONIC
        self._stop = False
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop:
            if select.select([self.sock], [], [], 0.2)[0]:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16))
                if b"WATCHDOG=1" not in data:
                    continue
                sent = None
                for level, kind, raw in anc:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(raw) >= 16:
                        sec, nsec = struct.unpack("qq", raw[:16])
                        sent = sec + nsec / 1e9 - self._offset
                self.times.append(sent if sent is not None else time.monotonic())

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()


class StatusLoop:
    """The daemon's answer to `status` on its control socket, back to back (SOCK_PAUSE apart), and
    `ctguard status --json` (a new Python each call: its start-up is not the loop's latency)
    every ~0.3 s, for reference; each timed."""

    def __init__(self, policy: Path, src: Path, control_sock: Path | None, env: dict[str, str]) -> None:
        self._env = env
        self.cli: list[tuple[float, float]] = []     # (started, seconds)
        self.sock: list[tuple[float, float]] = []
        self.sock_failed: list[tuple[float, str]] = []
        self._stop = False
        self._policy, self._src, self._control = policy, src, control_sock
        self._threads = [threading.Thread(target=self._cli, daemon=True)]
        if control_sock is not None:
            self._threads.append(threading.Thread(target=self._sock, daemon=True))
        for t in self._threads:
            t.start()

    def _cli(self) -> None:
        env = {**os.environ, **self._env, "PYTHONPATH": str(self._src)}
        while not self._stop:
            t = time.monotonic()
            subprocess.run([sys.executable, "-m", "ctguard", "status", "--json", "--policy", str(self._policy)],
                           env=env, capture_output=True, timeout=30)
            self.cli.append((t, time.monotonic() - t))
            time.sleep(0.3)     # back to back, the CLI's start-up alone would load the 2 cores

    def _sock(self) -> None:
        sys.path.insert(0, str(self._src))
        from ctguard.control.protocol import request  # the code under test's client side
        while not self._stop:
            t = time.monotonic()
            try:
                answer = request(str(self._control), "status", timeout=2.0)
            except Exception as exc:    # a refusal or a timeout: counted, never timed as an answer
                self.sock_failed.append((t, f"{type(exc).__name__}: {exc}"))
                answer = None
            else:
                if answer is None:      # no daemon listening (yet)
                    self.sock_failed.append((t, "no answer"))
                else:
                    self.sock.append((t, time.monotonic() - t))
            time.sleep(SOCK_PAUSE)

    def close(self) -> None:
        self._stop = True
        for t in self._threads:
            t.join(60)


def loop_run(mode: str, args, tmp: Path, run: int, tap, case: str, hidden) -> dict:
    """One run of `case`:

    quiet/burst: a steady daemon watching B; at T the max goes to RAISE_TO (the daemon wants
    RAISE_TO buckets at ratio 1 and resizes the whole table); with burst, at T + 150 ms max goes
    back to B_MAX and B gets B_BURST new flows (unpaced) (B is sparse in the hash: early_drop
    fails, the kernel drops and says `table full` as soon as the rehash lets the flows in).

    storm: the daemon watches the hidden namespace itself (its entries fill the table: max =
    its count + STORM_ROOM, ratio 4, hashsize START_BUCKETS); at T a paced flood of STORM_FLOWS
    new flows starts: table full, a bump to the ceiling (STORM_CEILING: max/buckets 8), which
    wants a resize of the whole table while new flows still arrive."""
    from bench_journal_latency import kmsg_offset
    from ctguard.host.journal import match_kernel_line

    folder = tmp / f"{mode}-{case}-{run}"
    folder.mkdir(parents=True)
    src = Path(args.src) if args.src else SRC
    control_sock = folder / "control.sock" if (src / "ctguard/control.py").exists() else None
    storm = case == "storm"
    policy = write_policy(folder, policy_body(mode, bool(args.src), control_sock, storm))
    with contextlib.ExitStack() as stack:
        if storm:
            b = hidden
            start_max = hidden.count() + STORM_ROOM
        else:
            b = stack.enter_context(netns_pair("ctgb"))
            start_max = B_MAX
        set_max(start_max)
        kernelenv.HASHSIZE.write_text(str(START_BUCKETS))    # the bench's own resize: not measured
        if not storm:
            ns_sysctl(b, "net.netfilter.nf_conntrack_udp_timeout", "600")
            fill(b, B_FILL, 1)
        offset = kmsg_offset(tap) if tap is not None else None
        pings = Pings(folder / "notify.sock")
        env = {**args.compiled, "NOTIFY_SOCKET": str(pings.path), "WATCHDOG_USEC": str(args.watchdog_usec)}
        daemon = Daemon(policy, only_netns=[b.sender, b.receiver], env=env, src=src)
        status = None
        fd = os.open(kernelenv.PROC_MAX, os.O_RDONLY)
        # Buckets from /proc/sys, not the module parameter: reading that takes the parameter
        # lock the resize holds for the whole write, so a poll of it stalls until the write ends.
        hfd = os.open(PROC_BUCKETS, os.O_RDONLY)
        raised = burst = burst_at = resize_end = bumped = None
        no_resize = False
        try:
            daemon.__enter__()
            status = StatusLoop(policy, src, control_sock, args.compiled)
            time.sleep(1.0)                     # steady: pings flowing, the status loop running
            ticker = subprocess.Popen([sys.executable, "-c", TICKER, "16.0" if storm and not args.quick else "6.0"],
                                      stdout=subprocess.PIPE, text=True)
            if storm:
                burst = Flood(b, STORM_FLOWS, STORM_RATE, first_port=STORM_PORT + run * 7)
                burst_at = burst.start_at
                time.sleep(max(0.0, burst_at - time.monotonic()))
                raised = burst_at
            elif case == "burst":
                burst = Flood(b, B_BURST, 0, first_port=40000)     # its senders start at start_at
                burst_at = burst.start_at
                time.sleep(max(0.0, burst_at - 0.15 - time.monotonic()))
            if not storm:
                raised = time.monotonic()
                set_max(RAISE_TO)
            lowered = storm
            deadline = raised + 20
            while time.monotonic() < deadline:
                now = time.monotonic()
                if burst is not None and not lowered and now >= burst_at - 0.005:
                    set_max(B_MAX)
                    lowered = True
                if resize_end is None and int(os.pread(hfd, 32, 0)) != START_BUCKETS:
                    resize_end = time.monotonic()   # the kernel's new size: the rehash is over
                if lowered and bumped is None:
                    got = int(os.pread(fd, 32, 0))
                    if got != (start_max if storm else B_MAX):
                        bumped = time.monotonic()
                        # storm: a bump that fits the buckets at ratio 4 (a small --quick table) wants no resize
                        no_resize = storm and got <= 4 * START_BUCKETS
                resized = resize_end is not None and now - resize_end > 2.0
                done = resized or ((mode == "never" or (storm and bumped is not None and no_resize))
                                   and now - raised > 3.0)
                if done and (burst is None or bumped is not None) and (not storm or now - raised > 3.0):
                    break
                time.sleep(0.001)
            if burst is not None:
                burst.wait()
            ticks = json.loads(ticker.communicate(timeout=60)[0])
        finally:
            os.close(fd)
            os.close(hfd)
            if status is not None:
                status.close()
            daemon.stop()
            pings.close()
            if args.keep_logs:
                Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
                (Path(args.keep_logs) / f"{folder.name}.log").write_text(daemon.log.read_text())
        first_line = None
        if tap is not None and burst_at is not None:
            for rec in tap.read():
                if (rec.facility == 0 and match_kernel_line(rec.message)
                        and rec.usec / 1e6 + offset >= burst_at - 0.05):
                    first_line = rec.usec / 1e6 + offset
                    break
        window = [t for t in pings.times if t >= raised - 0.2] if raised else []
        gaps = [y - x for x, y in zip(window, window[1:])]
        worst = max(range(len(gaps)), key=gaps.__getitem__) if gaps else None
        tw = [t for t in ticks if raised is not None and raised - 0.2 <= t <= (window[-1] if window else t)]
        tgaps = [y - x for x, y in zip(tw, tw[1:])]
        in_window = lambda xs: [d * 1000 for t, d in xs if raised is not None and t >= raised - 0.2]  # noqa: E731
        # "During the resize": requests started from T to the end of the rehash (for `never`,
        # which does not resize, the same 0.5 s after T).
        until = resize_end if resize_end is not None else (raised + 0.5 if raised else None)
        during = [d * 1000 for t, d in status.sock if raised <= t <= until] if status and until else []
        return {
            "mode": mode, "case": case, "run": run, "pings": len(window),
            "wd_gap_ms": max(gaps) * 1000 if gaps else None,
            "wd_gap_at_ms": (window[worst] - raised) * 1000 if worst is not None else None,
            "ticker_gap_ms": max(tgaps) * 1000 if tgaps else None,
            "status_ms": in_window(status.cli) if status else [], "status_sock_ms": in_window(status.sock) if status else [],
            "status_sock_during_ms": during,
            "status_sock_failed": [(round((t - raised) * 1000), why) for t, why in status.sock_failed
                                   if raised is not None and t >= raised - 0.2] if status else [],
            "full_to_bump_ms": (bumped - first_line) * 1000 if bumped and first_line else None,
            "resize_end_ms": (resize_end - raised) * 1000 if resize_end and raised else None,
            "bump_ms": (bumped - raised) * 1000 if bumped and raised else None,
            "line_ms": (first_line - raised) * 1000 if first_line and raised else None,
            "pings_ms": [round((t - raised) * 1000, 1) for t in window] if raised else [],
        }


def compiled(src: Path, tmp: Path) -> dict[str, str]:
    """Environment for the daemon and the CLI: the code under test byte-compiled once, as the
    package installs it. With PYTHONDONTWRITEBYTECODE (set on this machine) every process would
    compile each module it imports, on the loop for a late import: the first bundle's diagnosis
    compiled ctguard.evidence.review, 23 ms of a 54 ms turn."""
    prefix = tmp / "pycache"
    env = {"PYTHONPYCACHEPREFIX": str(prefix), "PYTHONDONTWRITEBYTECODE": ""}
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(src)], env={**os.environ, **env}, check=True,
                   stdout=subprocess.DEVNULL)
    return env


def loop_summary(out: list[dict], modes: list[str], cases: list[str]) -> None:
    """Per case and mode, every run's figure; watchdog and ticker gaps also as a ratio to the
    `never` run of the same round (same case, same run number)."""
    base = {(r["case"], r["run"]): r for r in out if r["mode"] == "never"}
    one = lambda v, d=0: "-" if v is None else f"{v:.{d}f}"  # noqa: E731

    def ratio(r: dict, key: str) -> str:
        b = base.get((r["case"], r["run"]))
        if b is None or r[key] is None or not b[key]:
            return ""
        return f" ({r[key] / b[key]:.2f}x)"

    print("\n# summary: every run, ' / ' between runs; (x) = ratio to `never` of the same case and run", flush=True)
    print(f"{'case':<5} {'mode':<8} | {'wd gap ms':<36} | {'ticker gap ms':<36} | {'sock during p50/max ms':<30} | "
          f"{'cli med ms':<16} | {'full->bump ms':<16} | resize end ms", flush=True)
    for case in cases:
        for mode in modes:
            rs = [r for r in out if r["case"] == case and r["mode"] == mode]
            if not rs:
                continue
            wd = " / ".join(one(r["wd_gap_ms"]) + ratio(r, "wd_gap_ms") for r in rs)
            tk = " / ".join(one(r["ticker_gap_ms"]) + ratio(r, "ticker_gap_ms") for r in rs)
            sk = " / ".join(f"{statistics.median(r['status_sock_during_ms']):.1f}/{max(r['status_sock_during_ms']):.1f}"
                            if r["status_sock_during_ms"] else "-" for r in rs)
            cl = " / ".join(f"{statistics.median(r['status_ms']):.0f}" if r["status_ms"] else "-" for r in rs)
            fb = " / ".join(one(r["full_to_bump_ms"], 1) for r in rs)
            re = " / ".join(one(r["resize_end_ms"]) for r in rs)
            print(f"{case:<5} {mode:<8} | {wd:<36} | {tk:<36} | {sk:<30} | {cl:<16} | {fb:<16} | {re}", flush=True)


def part_loop(args, tmp: Path) -> list[dict]:
    tap = None
    jd = None
    try:
        from helpers.journald import Journald, journald_unavailable_reason
        from ctguard.host.journal import KmsgTap
        if journald_unavailable_reason() is None:
            jd = Journald()
            jd.start()
            tap = KmsgTap()
    except (ImportError, OSError) as exc:
        print(f"# no journald or /dev/kmsg ({exc}): no full->bump column", flush=True)
    args.compiled = compiled(Path(args.src) if args.src else SRC, tmp)
    modes = ["old"] if args.src else [m for m in args.modes.split(",") if m]
    cases = [x for x in args.loop_cases.split(",") if x]
    out = []
    f = lambda v: f"{v:.0f}" if v is not None else "-"  # noqa: E731
    try:
        with netns_pair("ctga") as hidden:
            # The hidden namespace's flows make the (global) hash big; the daemon does not see
            # them, except in the storm case, where they are the table it guards.
            set_max(int(args.entries * 1.1) + 1024)
            kernelenv.HASHSIZE.write_text(str(START_BUCKETS))
            ns_sysctl(hidden, "net.netfilter.nf_conntrack_udp_timeout", "600")
            fill(hidden, args.entries, 2)
            print(f"\n# loop: {hidden.count()} entries in namespace A; hashsize {START_BUCKETS}. quiet/burst: the daemon "
                  f"sees B only ({B_FILL} of max {B_MAX}); at T max -> {RAISE_TO} (ratio 1: the daemon resizes the whole "
                  f"table); burst: at T+150 ms max -> {B_MAX} and {B_BURST} new flows into B. storm: the daemon sees A, "
                  f"max = its count + {STORM_ROOM}, ratio 4; at T {STORM_FLOWS} new flows at {STORM_RATE}/s into A: "
                  f"table full, a bump to {STORM_CEILING} that wants {STORM_CEILING // 4} buckets. WATCHDOG_USEC "
                  f"{args.watchdog_usec} (a ping due every {args.watchdog_usec / 2000:.0f} ms). sock: the daemon's "
                  f"answer to `status` on its control socket, requests started from T to the end of the resize "
                  f"(`never`: T to T+500 ms). Times in ms from T. Code: {args.src or SRC}")
            print(f"{'mode':<8} {'case':<5} {'run':>3} {'pings':>5} {'wd gap':>6} {'at':>5} {'ticker':>6} "
                  f"{'sock p50/max':>12} {'n':>4} {'fail':>4} {'cli med':>7} {'resize end':>10} {'bump':>5} {'line':>5} "
                  f"{'full->bump':>10}", flush=True)
            for run in range(args.runs):
                for case in cases:
                    for mode in modes:
                        t = time.monotonic()
                        r = loop_run(mode, args, tmp, run, tap, case, hidden)
                        out.append(r)
                        st, sd = r["status_ms"], r["status_sock_during_ms"]
                        fb = f"{r['full_to_bump_ms']:.1f}" if r["full_to_bump_ms"] is not None else "-"
                        print(f"{mode:<8} {case:<5} {run + 1:>3} {r['pings']:>5} "
                              f"{f(r['wd_gap_ms']):>6} {f(r['wd_gap_at_ms']):>5} {f(r['ticker_gap_ms']):>6} "
                              f"{(f'{statistics.median(sd):.1f}/{max(sd):.1f}' if sd else '-'):>12} {len(sd):>4} "
                              f"{len(r['status_sock_failed']):>4} "
                              f"{(f'{statistics.median(st):.0f}' if st else '-'):>7} "
                              f"{f(r['resize_end_ms']):>10} {f(r['bump_ms']):>5} {f(r['line_ms']):>5} "
                              f"{fb:>10}",
                              flush=True)
                        # net_ratelimit: 10 lines per 5 s; give every run a fresh first line.
                        time.sleep(max(0.0, t + 6.0 - time.monotonic()))
            loop_summary(out, modes, cases)
    finally:
        if tap is not None:
            tap.close()
        if jd is not None:
            jd.stop()
    return out


# --- part "probe" -----------------------------------------------------------------------------

def probe(pair, seconds: float, first_port: int, during=None) -> list[list]:
    proc = subprocess.Popen(["ip", "netns", "exec", pair.sender, sys.executable, "-c", PROBE, pair.receiver_addr, "7",
                             str(first_port), str(seconds), "0.001"], stdout=subprocess.PIPE, text=True)
    window = None
    if during is not None:
        time.sleep(seconds / 3)
        t = time.monotonic()
        during()
        window = (t, time.monotonic())
    out, _ = proc.communicate(timeout=seconds + 60)
    return json.loads(out), window


def summary(samples: list[list]) -> dict:
    rtts = [x[1] for x in samples if x[1] is not None]
    lost = sum(1 for x in samples if x[1] is None)
    errors = sorted({x[2] for x in samples if len(x) > 2})
    return {"n": len(samples), "lost": lost, "p50": pct(rtts, 0.5) * 1e3 if rtts else None,
            "p99": pct(rtts, 0.99) * 1e3 if rtts else None, "max": max(rtts) * 1e3 if rtts else None,
            "slow": sum(1 for r in rtts if r > 0.010), "errors": errors}


def part_probe(args) -> list[dict]:
    out = []
    chains = [int(c) for c in args.chains.split(",") if c]
    print(f"\n# probe: a new UDP flow per probe (fresh source port) to an echo server in the tracked receiver, "
          f"every ~1 ms; p50/p99/max RTT in ms; slow = probes over 10 ms", flush=True)
    print(f"{'entries':>9} {'case':<22} {'probes':>6} {'p50':>7} {'p99':>7} {'max':>8} {'slow':>5} {'p50 ratio':>9} "
          f"{'chaintoolong':>5}", flush=True)
    for n in [int(x) for x in args.probe_sizes.split(",") if x]:
        with netns_pair("ctgq") as pair:
            set_max(int(n * 1.1) + 1024)
            kernelenv.HASHSIZE.write_text(str(max(1024, n // 4)))
            ns_sysctl(pair, "net.netfilter.nf_conntrack_udp_timeout", "600")
            fill(pair, n, 2)
            echo = subprocess.Popen(["ip", "netns", "exec", pair.receiver, sys.executable, "-c", ECHO, "7"],
                                    stdout=subprocess.PIPE, text=True)
            try:
                echo.stdout.readline()
                entries = pair.count()
                port = 40000
                base = None
                rows = []
                for c in chains:
                    kernelenv.HASHSIZE.write_text(str(max(1024, n // c)))
                    before = chaintoolong(pair)
                    samples, _ = probe(pair, args.probe_seconds, port)
                    port += len(samples) + 10
                    s = summary(samples)
                    s["chaintoolong"] = chaintoolong(pair) - before
                    base = base or s["p50"]
                    rows.append((f"max/buckets {c}", s))
                kernelenv.HASHSIZE.write_text(str(max(1024, n // 4)))
                buckets = get_buckets()
                took = {}

                def resize() -> None:
                    t = time.perf_counter()
                    kernelenv.HASHSIZE.write_text(str(buckets * 2))
                    took["ms"] = (time.perf_counter() - t) * 1000

                samples, window = probe(pair, args.probe_seconds * 2, port, during=resize)
                s = summary(samples)
                inside = [x[1] for x in samples if x[1] is not None and window[0] - 0.002 <= x[0] <= window[1]]
                s["in_window"] = len(inside)
                rows.append((f"resize x2 ({took['ms']:.0f} ms)", s))
                for name, s in rows:
                    if s["p50"] is None:
                        print(f"{entries:>9} {name:<22} {s['n']:>6} all lost: {', '.join(s['errors'])}; "
                              f"chaintoolong +{s.get('chaintoolong', '?')}", flush=True)
                        out.append({"entries": entries, "case": name, **s})
                        continue
                    ratio = s["p50"] / base if base else float("nan")
                    print(f"{entries:>9} {name:<22} {s['n']:>6} {s['p50']:>7.3f} {s['p99']:>7.3f} {s['max']:>8.1f} "
                          f"{s['slow']:>5} {ratio:>8.2f}x {s.get('chaintoolong', '-'):>5}", flush=True)
                    out.append({"entries": entries, "case": name, **s})
            finally:
                echo.kill()
                echo.wait()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="loop,probe")
    ap.add_argument("--entries", type=int, default=1_000_000, help="hidden entries for the loop part")
    ap.add_argument("--runs", type=int, default=3, help="runs per mode in the loop part")
    ap.add_argument("--modes", default=DEFAULT_MODES)
    ap.add_argument("--loop-cases", default="quiet,burst,storm",
                    help="quiet: the resize alone; burst: with new flows; storm: a bump mid-storm on the big table")
    ap.add_argument("--src", help="run the daemon from this src/ folder (older code, no `resize` key)")
    ap.add_argument("--probe-sizes", default="262144,1000000")
    ap.add_argument("--chains", default="4,8,16,64")
    ap.add_argument("--probe-seconds", type=float, default=1.5)
    ap.add_argument("--json", help="also write every figure to this file")
    ap.add_argument("--watchdog-usec", type=int, default=WATCHDOG_USEC,
                    help="WATCHDOG_USEC for the daemon (it pings every half of it)")
    ap.add_argument("--keep-logs", help="copy each daemon's log into this folder")
    ap.add_argument("--quick", action="store_true", help="tiny tables, one run (the smoke test)")
    args = ap.parse_args()
    clean_exit_on_signals()
    if args.quick:
        args.entries, args.runs, args.probe_sizes, args.chains, args.probe_seconds = 20000, 1, "20000", "4,16", 0.3
        if args.modes == DEFAULT_MODES:
            args.modes = "never,at-once"    # the smoke test's few minutes; `calm` runs the same code paths
    if os.geteuid() != 0:
        print("bench_resize: needs root (namespaces, nf_conntrack_max, hashsize)", file=sys.stderr)
        return 77
    reason = kernelenv.kernel_ready()
    if reason:
        print(f"bench_resize: {reason}", file=sys.stderr)
        return 77
    print(header())
    results: dict = {}
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory(prefix="ctguard-resize-") as tmp, saved_kernel_values():
        if "loop" in parts:
            results["loop"] = part_loop(args, Path(tmp))
        if "probe" in parts:
            results["probe"] = part_probe(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
