#!/usr/bin/env python3
"""What `ctguard run` costs: CPU time and memory, idle and under pressure.

    sudo python3 bench/bench_overhead.py [--duration 600] [--cases idle1,idle50,pressure] [--pressure-duration 120]
    sudo python3 bench/bench_overhead.py --quick     # 3 s per case (the smoke test)

Cases (each a fresh `python3 -m ctguard run --policy P`, every path in a temporary folder,
default [watch] and [thresholds]; mode = "observe" — it samples, decides and records the same,
but never writes to the kernel, so it cannot bump under another test's flood on this machine):
  idle1      the namespaces the machine has (normally only the host's), default intervals
  idle50     49 more made with `ip netns add` (50 in all), default intervals
  pressure   one namespace held at ~73% of nf_conntrack_max (above thresholds.warn, below act)
             by a steady 320 new UDP flows/s expiring after the 30 s UDP timeout: fast
             sampling (fast_interval) for the whole case; holds the tests' kernel lock, so it
             has its own, shorter duration

Measured from /proc/PID after the daemon took its first sample (pressure: once the fill is
steady): CPU = utime + stime over the case, as % of one core; children = reaped evidence
captures (the pressure case captures once after thresholds.sustain); RSS = VmRSS at the end,
HWM = VmHWM (peak). `namespaces` is how many the daemon reported in its metrics; `kernel
lines` how many table-full lines it heard (the kernel log is global: on a shared machine other
sessions' floods wake an idle daemon, and it captures evidence for them — in `children s`).
The daemon runs in its own mount and PID namespaces and sees only the benchmark's network
namespaces (and the host's).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import clean_exit_on_signals, Daemon, Flood, header, kernelenv, proc_times, write_policy  # noqa: E402

from helpers.kernelenv import netns_pair, saved_kernel_values, set_max  # noqa: E402

PRESSURE_MAX = 12288
PRESSURE_RATE = 320         # x ~28 s (the UDP timeout, as the kernel expires) = ~9,000 entries = 73% of 12,288


def measure(daemon: Daemon, seconds: float) -> dict:
    pid = daemon.pid
    cpu0, ch0, _, _ = proc_times(pid)
    t0 = time.monotonic()
    time.sleep(seconds)
    cpu1, ch1, rss, hwm = proc_times(pid)
    wall = time.monotonic() - t0
    text = daemon.metrics.read_text().splitlines()
    ns = sum(1 for line in text if line.startswith("ctguard_conntrack_entries{"))
    # Table-full lines are global (the kernel log): another session's flood on a shared machine
    # wakes an idle daemon too. Reported so an idle figure that was not idle says so.
    lines = next((float(line.split()[-1]) for line in text if line.startswith("ctguard_table_full_events_total")), 0.0)
    return {"kernel_lines": int(lines), "cpu_s": cpu1 - cpu0, "children_s": ch1 - ch0, "wall": wall, "pct": 100 * (cpu1 - cpu0) / wall,
            "rss": rss, "hwm": hwm, "namespaces": ns}


def idle(folder: Path, extra: int, seconds: float, max_: int = 0) -> dict:
    """With max_, nf_conntrack_max is held at that value (under the tests' kernel lock) so the
    idle sampling interval ([watch] guard_rate) is the one of a table that size."""
    if max_:
        with saved_kernel_values():
            set_max(max_)
            return idle(folder, extra, seconds)
    names = []
    try:
        for i in range(extra):
            name = f"ctgo{os.getpid() % 1000}x{i}"
            subprocess.run(["ip", "netns", "add", name], check=True)
            names.append(name)
        with Daemon(write_policy(folder, 'mode = "observe"\n'), only_netns=names) as d:
            time.sleep(1.0)
            return measure(d, seconds)
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)


def pressure(folder: Path, seconds: float, warmup: float) -> dict:
    with saved_kernel_values(), netns_pair("ctgo") as pair:
        set_max(PRESSURE_MAX)
        flows = int(PRESSURE_RATE * (warmup + seconds + 5))
        flood = Flood(pair, flows, PRESSURE_RATE)
        try:
            with Daemon(write_policy(folder, 'mode = "observe"\n'), only_netns=[pair.sender, pair.receiver]) as d:
                time.sleep(warmup)
                r = measure(d, seconds)
                r["fill"] = pair.count() / PRESSURE_MAX
                return r
        finally:
            for p in flood.procs:
                p.terminate()
                p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0, help="seconds per idle case")
    ap.add_argument("--pressure-duration", type=float, default=120.0, help="seconds of the pressure case")
    ap.add_argument("--cases", default="idle1,idle50,pressure")
    ap.add_argument("--max", type=int, default=0,
                    help="idle cases: hold nf_conntrack_max at this value (0: the machine's own)")
    ap.add_argument("--quick", action="store_true", help="3 s per case, short warm-up (smoke test)")
    args = ap.parse_args()
    clean_exit_on_signals()
    warmup = 35.0                 # the table fills to its steady level over one UDP timeout
    if args.quick:
        args.duration = args.pressure_duration = 3.0
        warmup = 2.0
    if os.geteuid() != 0:
        print("bench_overhead: needs root (namespaces, nf_conntrack_max)", file=sys.stderr)
        return 77
    reason = kernelenv.kernel_ready()
    if reason:
        print(f"bench_overhead: {reason}", file=sys.stderr)
        return 77
    print(header())
    print(f"{'case':<9} {'namespaces':>10} {'seconds':>8} {'cpu s':>7} {'% core':>7} {'children s':>10} "
          f"{'RSS MB':>7} {'HWM MB':>7} {'kernel lines':>12}  note")
    with tempfile.TemporaryDirectory(prefix="ctguard-overhead-") as tmp:
        for case in [c for c in args.cases.split(",") if c]:
            folder = Path(tmp) / case
            if case == "idle1":
                r, note = idle(folder, 0, args.duration, args.max), "default intervals"
            elif case == "idle50":
                r, note = idle(folder, 49, args.duration, args.max), "default intervals"
            elif case == "pressure":
                r = pressure(folder, args.pressure_duration, warmup)
                note = f"fill {r['fill']:.0%} of {PRESSURE_MAX}: fast_interval"
            else:
                print(f"unknown case {case}", file=sys.stderr)
                return 2
            if case.startswith("idle"):
                note += f", max {args.max or kernelenv.get_max()}"
            print(f"{case:<9} {r['namespaces']:>10} {r['wall']:>8.0f} {r['cpu_s']:>7.2f} {r['pct']:>6.2f}% "
                  f"{r['children_s']:>10.2f} {r['rss'] / 2**20:>7.1f} {r['hwm'] / 2**20:>7.1f} {r['kernel_lines']:>12}  {note}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
