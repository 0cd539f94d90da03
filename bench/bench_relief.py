#!/usr/bin/env python3
"""Relief past the ceiling: the same flood with relief off and relief on, in the same run.

    sudo python3 bench/bench_relief.py [--duration 40] [--udp-rate 300] [--syn-rate 300]
    sudo python3 bench/bench_relief.py --quick        # tiny: short floods (the smoke test)

Two scenarios, each run twice side by side (relief.mode "off", then "enforce"), each run in a
fresh pair of namespaces (tests/helpers/kernelenv's `netns_pair`), nf_conntrack_max = 4,096, the daemon
isolated so it sees only the host's and this run's namespaces (benchlib.Daemon only_netns):

  udp   the receiver's nf_conntrack_udp_timeout raised to 600 s (a tuned host), bump.ceiling =
        4,096 so every bump is refused, --udp-rate new UDP flows/s for --duration seconds
  syn   a spoofed-source SYN flood (600 sources per round, a new destination port per round)
        at --syn-rate SYNs/s for --duration seconds; bump.ceiling 65,536 but [guard] ceiling
        4,096, so the guard holds the table

Relief uses the default [relief.timeouts] (udp 5 s, tcp_syn_sent 10 s, ...) and calm_for 5.
Columns:
  drop, early_drop  the receiver's kernel counters, after minus before (both are lost flows:
                    drop refused a new one, early_drop evicted an unanswered one to make room)
  at/above act      seconds the receiver's count spent at or above thresholds.act (85%) during
                    the flood, polled every 0.2 s
  back below act    from the first time the count reached act to the first time after it was
                    below act again ("-": never, during the flood)
  daemon HWM        the daemon's peak RSS (VmHWM): the trims run in a child, so it must not grow
Then the trim itself: N unanswered UDP entries under a 600 s timeout, capped to 10 s by
`python3 -m ctguard.host.trim` (one pass, no bounds hit): seconds, entries/s, the child's
peak RSS, against `python3 -c "import ctguard.daemon.loop"`'s.
The benchmark holds the tests' kernel lock and restores nf_conntrack_max and hashsize.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from benchlib import Daemon, kernelenv, stat_totals, wait_for, write_policy  # noqa: E402

MAX = 4096
ACT = 0.85


def policy_body(scenario: str, mode: str) -> str:
    guard = "[guard]\nceiling = 4096\nmin_sources = 500\n" if scenario == "syn" else ""
    ceiling = 4096 if scenario == "udp" else 65536
    return (f"[bump]\nceiling = {ceiling}\ncooldown = 0.5\nmax_per_hour = 100\n{guard}"
            f"[relief]\nmode = \"{mode}\"\ncalm_for = 5\n")


def run_one(scenario: str, mode: str, args, folder: Path) -> dict:
    with kernelenv.netns_pair("ctbr") as pair:
        kernelenv.set_max(MAX)
        if scenario == "udp":
            pair.exec(pair.receiver, "sh", "-c", "echo 600 > /proc/sys/net/netfilter/nf_conntrack_udp_timeout")
        policy = write_policy(folder / f"{scenario}-{mode}", policy_body(scenario, mode))
        with Daemon(policy, only_netns=[pair.sender, pair.receiver]) as daemon:
            before = stat_totals(pair, "drop", "early_drop")
            stop = threading.Event()
            start = time.monotonic()

            def flood() -> None:
                if scenario == "udp":
                    pair.flood_udp(int(args.udp_rate * args.duration), rate=args.udp_rate)
                    return
                per_round, port = 600, 1000
                period = per_round / args.syn_rate
                while not stop.is_set() and time.monotonic() - start < args.duration:
                    t = time.monotonic()
                    pair.flood_syn(per_round, sources=2000, dport=port)
                    port += 1
                    time.sleep(max(0.0, period - (time.monotonic() - t)))

            sender = threading.Thread(target=flood, daemon=True)
            sender.start()
            above = 0.0
            first_act = back = None
            hwm = 0
            while sender.is_alive():
                count = pair.count()
                now = time.monotonic() - start
                if count >= ACT * MAX:
                    above += 0.2
                    if first_act is None:
                        first_act = now
                elif first_act is not None and back is None:
                    back = now
                hwm = max(hwm, benchlib.proc_times(daemon.pid)[3])
                time.sleep(0.2)
            stop.set()
            sender.join()
            after = stat_totals(pair, "drop", "early_drop")
            relieved = pair.exec(pair.receiver, "cat", "/proc/sys/net/netfilter/nf_conntrack_udp_timeout"
                                 if scenario == "udp" else
                                 "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_syn_sent").stdout.strip()
        return {"scenario": scenario, "mode": mode, "drop": after["drop"] - before["drop"],
                "early_drop": after["early_drop"] - before["early_drop"], "above_act": round(above, 1),
                "back_below_act": None if first_act is None or back is None else round(back - first_act, 1),
                "daemon_hwm_mb": round(hwm / 1e6, 1), "timeout_at_end": relieved}


def trim_cost(entries: int) -> dict:
    env_py = [sys.executable]
    with kernelenv.netns_pair("ctbt") as pair:
        kernelenv.set_max(max(MAX, entries * 2))
        pair.exec(pair.receiver, "sh", "-c", "echo 600 > /proc/sys/net/netfilter/nf_conntrack_udp_timeout")
        pair.flood_udp(entries)
        wait_for(lambda: pair.count() >= entries * 0.99, 10)
        found = pair.count()
        env = {"PYTHONPATH": str(benchlib.SRC), "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        out = subprocess.run([*env_py, "-m", "ctguard.host.trim", "--netns-path", f"/run/netns/{pair.receiver}",
                              "--timeout", "udp=10", "--max-entries", str(entries * 2), "--budget", "60"],
                             capture_output=True, text=True, env=env, check=True).stdout
        report = json.loads(out.strip().splitlines()[-1])
        base = subprocess.run([*env_py, "-c", "import ctguard.daemon.loop, resource; "
                               "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"],
                              capture_output=True, text=True, env=env, check=True).stdout
        report["entries_in_table"] = found
        report["daemon_import_rss_kb"] = int(base.strip())
        return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=40.0)
    ap.add_argument("--udp-rate", type=float, default=300.0)
    ap.add_argument("--syn-rate", type=float, default=300.0)
    ap.add_argument("--trim-entries", type=int, default=20000)
    ap.add_argument("--scenarios", default="udp,syn")
    ap.add_argument("--quick", action="store_true", help="short floods, small trim (the smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.trim_entries = 4.0, 500
    reason = kernelenv.kernel_ready()
    if reason:
        print(f"skipped: {reason}")
        return 0
    benchlib.clean_exit_on_signals()
    print(benchlib.header())
    print(f"# sudo python3 bench/bench_relief.py --duration {args.duration:g} --udp-rate {args.udp_rate:g} "
          f"--syn-rate {args.syn_rate:g} --trim-entries {args.trim_entries}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="ctguard-relief-") as tmp, kernelenv.saved_kernel_values():
        for scenario in args.scenarios.split(","):
            for mode in ("off", "enforce"):
                rows.append(run_one(scenario, mode, args, Path(tmp)))
                print(json.dumps(rows[-1]), flush=True)
        trim = trim_cost(args.trim_entries)
    print(json.dumps({"trim": trim}))
    print()
    print("| scenario | relief | drop | early_drop | s at/above act | back below act (s) | daemon HWM MB |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        back = "-" if r["back_below_act"] is None else f"{r['back_below_act']:g}"
        print(f"| {r['scenario']} | {r['mode']} | {r['drop']:,} | {r['early_drop']:,} | {r['above_act']:g} | {back} | "
              f"{r['daemon_hwm_mb']:g} |")
    rate = trim["changed"] / max(1e-9, trim["seconds"])
    print(f"\ntrim: {trim['changed']:,} of {trim['entries_in_table']:,} entries capped in {trim['seconds']} s "
          f"({rate:,.0f}/s, pyroute2 import included); child peak RSS {trim['max_rss_kb'] / 1024:.1f} MB "
          f"vs {trim['daemon_import_rss_kb'] / 1024:.1f} MB for `import ctguard.daemon.loop`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
