#!/usr/bin/env python3
"""Time to relief: new UDP flows at a steady rate into a table of 8,192, with and without ctguard.

    sudo python3 bench/bench_ramp.py [--rates 10000,20000,40000] [--flows 120000] [--cooldown 1]
    sudo python3 bench/bench_ramp.py --quick          # tiny: one rate, few flows (the smoke test)

For every rate, three runs side by side, each in a fresh pair of namespaces (tests/helpers/kernelenv's
`netns_pair`: the receiver tracks every new flow) with nf_conntrack_max = --max (8,192) and
hashsize = --buckets (262,144: this kernel's default on this machine; see the README on early_drop):

  none       no agent
  reactive   ctguard, act = 1.0, horizon = 0 (bumps on the table-full line or drops)
  default    ctguard with its default thresholds

Both ctguard runs use `python3 -m ctguard run --policy P` with every path in a temporary
folder, bump.ceiling = --ceiling (1,048,576), bump.cooldown = --cooldown (the one setting
shortened for the test: the 30 s default would leave a 3-12 s flood with one bump), and
persist.mode = "never". Everything else is the default, evidence capture included.

Columns:
  sent/s      the rate the senders achieved (datagrams / time from first to last), to show
              the generator really sustained the asked rate
  drop        the receiver's kernel `drop` counters (per-CPU, summed), after minus before:
              packets the kernel dropped because the table was full
  early_drop  entries the kernel evicted to make room (unreplied flows sacrificed): also loss
  1st bump    from the first datagram to the first change of nf_conntrack_max seen by this
              process (it polls the sysctl every millisecond)
  drop<bump   of those drops, how many came before the first bump (the rest: after it)
  last drop   from the first datagram to the last change of the drop counters
  final max   nf_conntrack_max after the flood; bumps = how many times it changed, and the
              triggers ctguard recorded
Then, per --resize size N (262,144 and 1,000,000): one namespace filled with N flows (max raised
to 1.1 N first, hashsize N/4), and timed as ctguard does them (write + read back): an
nf_conntrack_max write (mean of 50), a hashsize resize to twice its size, and a write of the same
size again (what a resize costs without rehashing).
The benchmark holds the tests' kernel lock and restores nf_conntrack_max and hashsize.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import clean_exit_on_signals, Daemon, Flood, header, kernelenv, stat_totals, write_policy  # noqa: E402

from ctguard.host.netns import open_in_namespace  # noqa: E402
from helpers.kernelenv import get_max, netns_pair, saved_kernel_values, set_max  # noqa: E402


def drop_total(raw: bytes) -> int:
    lines = raw.decode().split("\n")
    col = lines[0].split().index("drop")
    return sum(int(line.split()[col], 16) for line in lines[1:] if line.strip())

MODES = ("none", "reactive", "default")


def policy_body(mode: str, ceiling: int, cooldown: float) -> str:
    bump = f"[bump]\nceiling = {ceiling}\ncooldown = {cooldown}\n"
    if mode == "reactive":
        return "[thresholds]\nact = 1.0\nhorizon = 0\n" + bump
    return bump


def one_run(mode: str, rate: int, flows: int, args, folder: Path, src: Path | None = None, label: str = "") -> dict:
    with netns_pair("ctgp") as pair:
        set_max(args.max)
        if args.buckets:
            kernelenv.HASHSIZE.write_text(str(args.buckets))
        if args.prefill:
            # A table already holding --prefill entries (issue 15 item 5): they stay for the run
            # (the receiver's UDP timeout raised; the namespace is deleted after), from other
            # source ports than the flood's.
            pair.exec(pair.receiver, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=600")
            Flood(pair, args.prefill, 0, senders=2, first_port=30000).wait(timeout=600)
        daemon = None
        if mode != "none":
            daemon = Daemon(write_policy(folder / f"{mode}-{rate}{label}", policy_body(mode, args.ceiling, args.cooldown)),
                            src=src)
            daemon.__enter__()
        try:
            # A few idle samples, as a daemon that has been running; the random part puts the
            # flood's start at a random point of the daemon's sampling period (without it, the
            # start-up timing lines the two up the same way every run).
            time.sleep(args.settle + random.uniform(0.0, 1.0))
            before = stat_totals(pair, "drop", "early_drop")
            fd = os.open(kernelenv.PROC_MAX, os.O_RDONLY)
            # The receiver's stat file, opened from inside its namespace once, read with pread:
            # a drop timeline at millisecond resolution for a few microseconds a read.
            stat_fd = open_in_namespace(f"/run/netns/{pair.receiver}", "net/stat/nf_conntrack")
            changes: list[tuple[float, int]] = []
            last, last_drops, drops_at_first_bump, last_drop_at = args.max, before["drop"], None, None
            flood = Flood(pair, flows, rate, senders=args.senders)
            end = None
            while end is None or time.monotonic() < end:
                value = int(os.pread(fd, 32, 0))
                drops = drop_total(os.pread(stat_fd, 65536, 0))
                now = time.monotonic()
                if drops != last_drops:
                    last_drop_at, last_drops = now, drops
                if value != last:
                    if not changes:
                        drops_at_first_bump = drops - before["drop"]
                    changes.append((now, value))
                    last = value
                if end is None and not flood.running():
                    end = now + 0.3             # a bump in flight, and late drops, still count
                time.sleep(0.001)
            result = flood.wait()
            os.close(fd)
            os.close(stat_fd)
            after = stat_totals(pair, "drop", "early_drop")
            count = pair.count()
        finally:
            if daemon is not None:
                daemon.stop()
        triggers = []
        if daemon is not None:
            state = daemon.log.parent / "state" / "state.json"
            if state.exists():
                triggers = [b["trigger"] for b in json.loads(state.read_text())["bumps"] if b["ok"]]
        return {
            "mode": mode + (f"@{label}" if label else ""), "rate": rate, "sent_rate": result.rate, "send_errors": result.errors,
            "drop": after["drop"] - before["drop"], "early_drop": after["early_drop"] - before["early_drop"],
            "first_bump_ms": (changes[0][0] - result.start) * 1000 if changes else None,
            "drop_before_bump": drops_at_first_bump,
            "last_drop_ms": (last_drop_at - result.start) * 1000 if last_drop_at else None,
            "final_max": get_max(), "final_buckets": kernelenv.get_buckets(), "bumps": len(changes), "triggers": triggers, "count": count,
        }


def resize_costs(entries: int, senders: int) -> dict:
    """Fill one namespace to `entries` (max raised first, hashsize at max/4 as ctguard keeps it),
    then time, as the daemon does them (ctguard.host.kernel: write, read back): nf_conntrack_max
    writes, and one hashsize resize to twice its size (what a x2 bump asks for)."""
    from ctguard.host.kernel import Kernel

    k = Kernel()
    with netns_pair("ctgz") as pair:
        top = int(entries * 1.1) + 1024
        set_max(top)
        start_buckets = max(1024, top // 4)
        k.write_hashsize(start_buckets)
        flood = Flood(pair, entries, 0, senders=senders)
        result = flood.wait(timeout=300)
        count = pair.count()
        t = time.perf_counter()
        for i in range(50):
            k.write_max(top + 1024 * (i % 2))
        max_write = (time.perf_counter() - t) / 50
        t = time.perf_counter()
        got = k.write_hashsize(start_buckets * 2)
        resize = time.perf_counter() - t
        t = time.perf_counter()
        k.write_hashsize(start_buckets * 2 + 1)     # the same size again: the fixed cost of a write
        noop = time.perf_counter() - t
        return {"entries": count, "fill_rate": result.rate, "max_write_us": max_write * 1e6,
                "buckets_from": start_buckets, "buckets_to": got, "resize_ms": resize * 1000, "noop_ms": noop * 1000}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="10000,20000,40000", help="flows per second, comma-separated")
    ap.add_argument("--flows", type=int, default=120000, help="new flows per run")
    ap.add_argument("--max", type=int, default=8192, help="nf_conntrack_max at the start of each run")
    ap.add_argument("--buckets", type=int, default=262144, help="hashsize at the start of each run (0: leave it)")
    ap.add_argument("--ceiling", type=int, default=1048576)
    ap.add_argument("--cooldown", type=float, default=1.0, help="bump.cooldown of the ctguard runs (default 30 s)")
    ap.add_argument("--senders", type=int, default=1, help="sender processes sharing the rate")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds the daemon runs idle before the flood")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--repeat", type=int, default=1, help="runs per (rate, mode)")
    ap.add_argument("--json", help="also write every run to this file")
    ap.add_argument("--prefill", type=int, default=0,
                    help="entries the receiver holds before the daemon starts (e.g. 1000000 with --max 1048576)")
    ap.add_argument("--resize", default="262144,1000000",
                    help="after the runs: table sizes at which to time a hashsize resize and max writes ('' skips)")
    ap.add_argument("--trees", default="",
                    help="compare source trees in one invocation, interleaved: 'before=/work/main/src,after=src' "
                         "(each ctguard run uses that tree's src/; default: this tree only)")
    ap.add_argument("--quick", action="store_true", help="one rate, 3,000 flows into a table of 2,048 (smoke test)")
    args = ap.parse_args()
    clean_exit_on_signals()
    if args.quick:
        args.rates, args.flows, args.max, args.settle, args.resize = "5000", 3000, 2048, 1.0, "20000"
    if os.geteuid() != 0:
        print("bench_ramp: needs root (namespaces, nf_conntrack_max)", file=sys.stderr)
        return 77
    reason = kernelenv.kernel_ready()
    if reason:
        print(f"bench_ramp: {reason}", file=sys.stderr)
        return 77
    rates = [int(r) for r in args.rates.split(",")]
    modes = [m for m in args.modes.split(",") if m]
    trees = [(t.split("=", 1)[0], Path(t.split("=", 1)[1]).resolve()) for t in args.trees.split(",") if t] or [("", None)]
    if args.trees:
        print("# trees: " + ", ".join(f"{label} = {src}" for label, src in trees))
    print(header())
    print(f"# max {args.max}, hashsize {args.buckets or kernelenv.get_buckets()}, {args.flows} flows per run, ceiling {args.ceiling}, "
          f"cooldown {args.cooldown:g} s, {args.senders} sender(s), prefill {args.prefill}, UDP timeout "
          f"{Path('/proc/sys/net/netfilter/nf_conntrack_udp_timeout').read_text().strip()} s")
    print(f"{'rate/s':>7} {'run':<9} {'sent/s':>7} {'drop':>7} {'early_drop':>10} {'1st bump ms':>11} "
          f"{'drop<bump':>9} {'last drop ms':>12} {'final max':>9} {'bumps':>5} {'buckets':>8}  triggers")
    runs = []
    with tempfile.TemporaryDirectory(prefix="ctguard-ramp-") as tmp, saved_kernel_values():
        for rate in rates:
            for rep in range(args.repeat):
                for mode, (label, src) in [(m, t) for m in modes for t in (trees if m != "none" else trees[:1])]:
                    r = one_run(mode, rate, args.flows, args, Path(tmp) / f"r{rep}", src, label)
                    runs.append(r)
                    fb = f"{r['first_bump_ms']:.0f}" if r["first_bump_ms"] is not None else "-"
                    db = r["drop_before_bump"] if r["drop_before_bump"] is not None else "-"
                    ld = f"{r['last_drop_ms']:.0f}" if r["last_drop_ms"] is not None else "-"
                    print(f"{rate:>7} {r['mode']:<9} {r['sent_rate']:>7.0f} {r['drop']:>7} {r['early_drop']:>10} {fb:>11} "
                          f"{db:>9} {ld:>12} "
                          f"{r['final_max']:>9} {r['bumps']:>5} {r['final_buckets']:>8}  {','.join(r['triggers']) or '-'}",
                          flush=True)
        sizes = [int(x) for x in args.resize.split(",") if x]
        if sizes:
            print(f"\n{'entries':>9} {'max write us':>12} {'hashsize':>17} {'resize ms':>9} {'same size ms':>12}")
        for n in sizes:
            c = resize_costs(n, max(2, args.senders))
            runs.append({"resize": c})
            print(f"{c['entries']:>9} {c['max_write_us']:>12.1f} {c['buckets_from']:>8}->{c['buckets_to']:<8} "
                  f"{c['resize_ms']:>9.1f} {c['noop_ms']:>12.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
