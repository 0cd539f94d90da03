#!/usr/bin/env python3
"""The journal path's latency: from the kernel's first table-full line to the raised max.

    sudo python3 bench/bench_journal_latency.py [--runs 20]
    sudo python3 bench/bench_journal_latency.py --quick      # 2 runs (the smoke test)

One `python3 -m ctguard run` with sampling slowed so that only the journal can explain a bump:
watch.interval = fast_interval = 60, thresholds.act = 1.0, horizon = 0, bump.cooldown = 0,
max_per_hour = 60. Per run, in a fresh pair of namespaces (tests/helpers/kernelenv's `netns_pair`),
nf_conntrack_max is set to 2,048 and 4,096 new UDP flows are sent unpaced; the kernel prints
"nf_conntrack: table full, dropping packet" at the first drop and ctguard, woken by its
journal follower (journald, with the /dev/kmsg fast path), raises the max.

  latency = (time nf_conntrack_max changed, polled every millisecond on CLOCK_MONOTONIC)
          - (the kernel's timestamp of the first table-full line of the run, read from /dev/kmsg
             by this process and put on CLOCK_MONOTONIC with a marker line written to /dev/kmsg
             just before the run)

The kernel rate-limits the line (net_ratelimit: 10 lines per 5 s), so runs start 6 s apart and
every run gets a fresh first line. A run whose bump came at a sample and not from the journal
is impossible by construction (the next sample is 60 s away), and is reported if seen.
Needs a journald (tests/helpers/journald.py's helper starts /lib/systemd/systemd-journald when none runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import clean_exit_on_signals, Daemon, Flood, header, kernelenv, write_policy  # noqa: E402

from ctguard.host.journal import KmsgTap, match_kernel_line  # noqa: E402
from helpers.kernelenv import get_max, netns_pair, saved_kernel_values, set_max  # noqa: E402

POLICY = """
[watch]
interval = 60
fast_interval = 60
[thresholds]
act = 1.0
horizon = 0
[bump]
ceiling = 1048576
cooldown = 0
max_per_hour = 60
"""
START_MAX = 2048
SPACING = 6.0


def kmsg_offset(tap: KmsgTap) -> float:
    """CLOCK_MONOTONIC minus the kernel's printk clock, from a marker line we write."""
    tap.read()
    marker = f"ctguard-bench: clock marker {os.getpid()} {time.monotonic_ns()}"
    with open("/dev/kmsg", "w") as fh:
        t0 = time.monotonic()
        fh.write(marker + "\n")
        fh.flush()
        t1 = time.monotonic()
    for _ in range(100):
        for rec in tap.read():
            if rec.message == marker:
                return (t0 + t1) / 2 - rec.usec / 1e6
        time.sleep(0.005)
    raise RuntimeError("the marker line did not come back from /dev/kmsg")


def one_run(tap: KmsgTap, port: int) -> tuple[float | None, str]:
    with netns_pair("ctgj") as pair:
        set_max(START_MAX)
        offset = kmsg_offset(tap)
        fd = os.open(kernelenv.PROC_MAX, os.O_RDONLY)
        flood = Flood(pair, 4096, 0, first_port=port)
        bumped = None
        deadline = flood.start_at + 5.0
        while time.monotonic() < deadline:
            if int(os.pread(fd, 32, 0)) != START_MAX:
                bumped = time.monotonic()
                break
            time.sleep(0.001)
        os.close(fd)
        flood.wait()
        first = None
        for rec in tap.read():
            if rec.facility == 0 and match_kernel_line(rec.message):
                first = rec.usec / 1e6 + offset
                break
        if first is None:
            return None, "no table-full line (rate-limited?)"
        if bumped is None:
            return None, "no bump within 5 s"
        return bumped - first, ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="2 runs (smoke test)")
    args = ap.parse_args()
    clean_exit_on_signals()
    if args.quick:
        args.runs = 2
    if os.geteuid() != 0:
        print("bench_journal_latency: needs root (namespaces, nf_conntrack_max, /dev/kmsg)", file=sys.stderr)
        return 77
    reason = kernelenv.kernel_ready()
    if reason:
        print(f"bench_journal_latency: {reason}", file=sys.stderr)
        return 77
    from helpers.journald import Journald, journald_unavailable_reason
    reason = journald_unavailable_reason()
    if reason:
        print(f"bench_journal_latency: {reason}", file=sys.stderr)
        return 77
    jd = Journald()
    jd.start()                       # uses the running journald, or starts one (and stops it after)
    print(header())
    print(f"# interval = fast_interval = 60 s, act = 1.0, horizon = 0, cooldown 0; max {START_MAX}, "
          f"4096 unpaced flows per run, runs {SPACING:g} s apart")
    print(f"{'run':>4} {'latency ms':>10}  note")
    lat: list[float] = []
    try:
        tap = KmsgTap()
        with tempfile.TemporaryDirectory(prefix="ctguard-jlat-") as tmp, saved_kernel_values():
            set_max(START_MAX)
            with Daemon(write_policy(Path(tmp), POLICY)) as daemon:
                started = time.monotonic()
                for i in range(args.runs):
                    t = time.monotonic()
                    value, note = one_run(tap, 1 + (i * 4096) % 60000)
                    if time.monotonic() - started > 55:
                        # The daemon samples again 60 s after its last turn; a bump then would
                        # not be the journal's. Start a fresh daemon well before that.
                        daemon.stop()
                        daemon = Daemon(write_policy(Path(tmp) / f"d{i}", POLICY)).__enter__()
                        started = time.monotonic()
                    if value is not None:
                        lat.append(value)
                    print(f"{i + 1:>4} {value * 1000 if value is not None else float('nan'):>10.1f}  {note}", flush=True)
                    time.sleep(max(0.0, t + SPACING - time.monotonic()))
                daemon.stop()
        tap.close()
    finally:
        jd.stop()
    if lat:
        s = sorted(lat)
        p95 = s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]
        print(f"runs {len(lat)}/{args.runs}: median {statistics.median(lat) * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms, "
              f"min {s[0] * 1000:.1f} ms, max {s[-1] * 1000:.1f} ms")
    return 0 if lat else 1


if __name__ == "__main__":
    raise SystemExit(main())
