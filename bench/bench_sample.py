#!/usr/bin/env python3
"""One sample's cost with 1, 10 and 50 network namespaces, against naive baselines in the same run.

    sudo python3 bench/bench_sample.py [--namespaces 1,10,50] [--rounds 2000]

Columns (microseconds per sample of every namespace):
  ctguard     Observer.sample(): pread on fds kept open per namespace, discovery amortised
              (a full /proc scan every 5 s; charged here at its real share)
  discovery   one rediscovery as the daemon runs it (the /proc + /run/netns scan; nothing new to open)
  cold        the first discovery, opening every namespace's reader (setns for /run/netns-only ones)
  naive       discover + open/read/close every namespace's stat file on every sample
  conntrack   `ip netns exec NS conntrack -C` for each namespace (what a shell script would do)
The ratio column is naive / ctguard.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from ctguard.host.clock import Clock  # noqa: E402
from ctguard.host.kernel import Kernel, parse_stat_table  # noqa: E402
from ctguard.host.netns import StatReaders, discover  # noqa: E402
from ctguard.host.observe import DISCOVER_EVERY, Observer  # noqa: E402


def make_namespaces(n: int, tag: str) -> list[str]:
    names = []
    for i in range(n):
        name = f"{tag}{i}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        names.append(name)
    return names


def bench(n_ns: int, rounds: int) -> dict[str, float]:
    tag = f"ctgb{os.getpid() % 1000}x"
    names = make_namespaces(max(0, n_ns - 1), tag)   # plus the host namespace
    try:
        obs = Observer(Kernel(), Clock())
        obs.sample()
        t = time.perf_counter()
        for _ in range(rounds):
            obs.sample()
        steady = (time.perf_counter() - t) / rounds
        t = time.perf_counter()
        for _ in range(20):
            obs.rediscover()            # as the daemon does: scan, open only what is new
        disc = (time.perf_counter() - t) / 20
        t = time.perf_counter()
        for _ in range(5):
            obs.readers.close()
            obs.rediscover()            # first discovery: every namespace opened (setns for /run/netns ones)
        cold = (time.perf_counter() - t) / 5
        # At the default 1 s interval a discovery happens every DISCOVER_EVERY samples.
        ours = steady + disc / DISCOVER_EVERY
        assert len(obs.sample().namespaces) >= n_ns
        obs.close()

        naive_rounds = max(20, rounds // 20)
        t = time.perf_counter()
        for _ in range(naive_rounds):
            readers = StatReaders()
            readers.refresh(discover())
            for _ref, fd in list(readers._open.values()):
                parse_stat_table(os.pread(fd, 65536, 0).decode())
            readers.close()
        naive = (time.perf_counter() - t) / naive_rounds

        t = time.perf_counter()
        subprocess.run(["conntrack", "-C"], capture_output=True)
        for name in names:
            subprocess.run(["ip", "netns", "exec", name, "conntrack", "-C"], capture_output=True)
        shell = time.perf_counter() - t
        return {"ctguard": ours * 1e6, "steady": steady * 1e6, "discovery": disc * 1e6, "cold": cold * 1e6, "naive": naive * 1e6,
                "conntrack": shell * 1e6}
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--namespaces", default="1,10,50")
    ap.add_argument("--rounds", type=int, default=2000)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_sample: needs root (creates namespaces, enters them)", file=sys.stderr)
        return 77
    print(f"# {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, kernel {os.uname().release}")
    print(f"{'namespaces':>10} {'ctguard us':>11} {'(steady)':>9} {'discovery':>10} {'cold':>8} {'naive us':>9} "
          f"{'conntrack -C':>13} {'naive/ctguard':>14}")
    for n in [int(x) for x in args.namespaces.split(",")]:
        r = bench(n, args.rounds)
        print(f"{n:>10} {r['ctguard']:>11.1f} {r['steady']:>9.1f} {r['discovery']:>10.1f} {r['cold']:>8.0f} {r['naive']:>9.1f} "
              f"{r['conntrack']:>13.0f} {r['naive'] / r['ctguard']:>13.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
