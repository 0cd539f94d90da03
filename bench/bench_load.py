#!/usr/bin/env python3
"""Sustained flood with the table pinned at the ceiling: does ctguard stay well?

    sudo python3 bench/bench_load.py [--duration 600] [--rate 20000] [--ceiling 16384]

A receiver namespace gets new UDP flows at --rate for --duration seconds while ctguard runs
with max already at its ceiling, so every turn it is asked for a bump it may not make and
the kernel keeps logging `table full`. Reported (and the run fails on none of them: this is
a benchmark, the figures go to bench/README.md):

  status      `ctguard status --json` wall time, median and max, polled every 10 s
  watchdog    gaps between WATCHDOG=1 pings (WATCHDOG_USEC=2 s, so a ping is due every 1 s)
  rss         ctguard's VmRSS at the start (after warm-up) and at the end, and VmHWM
  cpu         ctguard's CPU seconds over the run, as a share of one core
  journal     ctguard's own entries written during the run, by MESSAGE_ID kind
  bundles     bundles kept and their bytes, against evidence.keep and evidence.max_bytes
  drops       the kernel's drop counter over the run (the flood really was past the ceiling)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))

from helpers.kernelenv import FLOOD_SCRIPT, netns_pair, saved_kernel_values, set_max  # noqa: E402


def proc_status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1])
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def count_entries(pid: int, log: Path) -> dict[str, int]:
    """ctguard's own entries by kind: from the journal, or from stderr where journald is absent."""
    from collections import Counter

    from ctguard.host.events import KINDS

    by_id = {k.message_id: name for name, k in KINDS.items()}
    kinds: Counter[str] = Counter()
    try:
        from systemd import journal

        r = journal.Reader()
        r.add_match(_PID=str(pid))
        for e in r:
            kinds[by_id.get(str(e.get("MESSAGE_ID", "")).replace("-", ""), "other")] += 1
    except ImportError:
        pass
    for line in log.read_text().splitlines():
        if " MESSAGE_ID=" in line and "[" in line:
            kinds[line.rsplit("[", 1)[1].split()[0]] += 1
    return dict(kinds)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--rate", type=float, default=20000.0)
    ap.add_argument("--ceiling", type=int, default=16384)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_load: needs root", file=sys.stderr)
        return 77

    work = Path(tempfile.mkdtemp(prefix="ctguard-load-"))
    policy = work / "policy.toml"
    policy.write_text(f"""
[bump]
ceiling = {args.ceiling}
cooldown = 5
[evidence]
dir = "{work}/bundles"
keep = 10
max_bytes = 10485760
budget = 2
[state]
dir = "{work}/state"
[persist]
mode = "never"
sysctl_file = "{work}/sysctl.conf"
modprobe_file = "{work}/modprobe.conf"
[metrics]
textfile = "{work}/ctguard.prom"
""")
    sock_path = str(work / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(sock_path)
    notify.settimeout(0.5)
    pings: list[float] = []
    stop = threading.Event()

    def listen() -> None:
        while not stop.is_set():
            try:
                msg = notify.recv(4096).decode()
            except socket.timeout:
                continue
            if "WATCHDOG=1" in msg:
                pings.append(time.monotonic())

    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NOTIFY_SOCKET": sock_path, "WATCHDOG_USEC": "2000000"}
    env.pop("WATCHDOG_PID", None)
    status_times: list[float] = []
    with saved_kernel_values(), netns_pair("ctgl") as pair:
        set_max(args.ceiling)
        daemon = subprocess.Popen([sys.executable, "-m", "ctguard", "run", "--policy", str(policy)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=open(work / "daemon.log", "w"))
        listener = threading.Thread(target=listen, daemon=True)
        listener.start()
        time.sleep(3)
        flows = int(args.rate * args.duration)
        drops0 = pair.drops()
        flood = subprocess.Popen(["ip", "netns", "exec", pair.sender, sys.executable, "-c", FLOOD_SCRIPT, pair.receiver_addr,
                                  str(flows), str(args.rate), "1"])
        t0 = time.monotonic()
        cpu0 = cpu_seconds(daemon.pid)
        rss0 = None
        try:
            while flood.poll() is None and time.monotonic() - t0 < args.duration + 30:
                time.sleep(10)
                s = time.monotonic()
                subprocess.run([sys.executable, "-m", "ctguard", "status", "--json", "--policy", str(policy)],
                               env=env, capture_output=True, timeout=30)
                status_times.append(time.monotonic() - s)
                if rss0 is None:
                    rss0 = proc_status(daemon.pid)["VmRSS"]
                print(f"  {time.monotonic() - t0:6.0f} s  status {status_times[-1] * 1000:5.0f} ms  "
                      f"rss {proc_status(daemon.pid)['VmRSS'] / 1024:.1f} MiB", file=sys.stderr)
        finally:
            flood.kill()
            flood.wait()
        elapsed = time.monotonic() - t0
        cpu = cpu_seconds(daemon.pid) - cpu0
        mem = proc_status(daemon.pid)
        drops = pair.drops() - drops0
        daemon.terminate()
        daemon.wait(10)
        stop.set()

    gaps = [b - a for a, b in zip(pings, pings[1:])]
    kinds = count_entries(daemon.pid, work / "daemon.log")
    journal_total = sum(kinds.values())
    bundles = [p for p in (work / "bundles").iterdir()] if (work / "bundles").exists() else []
    bundle_bytes = sum(f.stat().st_size for b in bundles for f in b.rglob("*") if f.is_file())
    print(f"# bench_load {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {elapsed:.0f} s at {args.rate:.0f} flows/s, "
          f"ceiling {args.ceiling}")
    print(f"status      median {statistics.median(status_times) * 1000:.0f} ms, max {max(status_times) * 1000:.0f} ms "
          f"over {len(status_times)} calls")
    print(f"watchdog    {len(pings)} pings, largest gap {max(gaps) if gaps else float('nan'):.2f} s (due every 1 s, "
          f"systemd would act after 2 s)")
    print(f"rss         {rss0 / 1024 if rss0 else float('nan'):.1f} MiB after warm-up, {mem['VmRSS'] / 1024:.1f} MiB at the end, "
          f"peak {mem['VmHWM'] / 1024:.1f} MiB")
    print(f"cpu         {cpu:.1f} s = {100 * cpu / elapsed:.2f}% of one core")
    print(f"journal     {journal_total} ctguard entries ({journal_total / (elapsed / 60):.1f}/min): "
          + json.dumps(kinds, sort_keys=True))
    print(f"bundles     {len(bundles)} kept (keep 10), {bundle_bytes} bytes (max_bytes 10485760)")
    print(f"drops       {drops} packets dropped by the kernel during the run")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
