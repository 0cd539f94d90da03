#!/usr/bin/env python3
"""Relief on real traffic: users served past the ceiling, relief off / advise / graduated.

    sudo python3 bench/bench_relief_lab.py [--scenario dns,flash_crowd] [--rate 500] [--duration 45]

Needs the traffic lab (tests/helpers/lab.py, issue 21): a client, a NAT gateway and a server
in three namespaces; the gateway's table at nf_conntrack_max = [bump] ceiling = `--table`, so
every bump is refused and relief is the lever left. One invocation runs the same load on:
ideal (nf_conntrack_max = 1,048,576, no agent), ctguard with relief "off", "advise" (the
packaged default) and "enforce" (graduated), each with a long-lived UDP flow beside it (a
stream: a packet at 0 s, 3 s, then every `--longlived` s). Columns: users served (answered
queries or completed requests) and that as a share of ideal's, the gateway's kernel drop and
early_drop, the long-lived flow's cuts, relief's journal lines by step.

The lab holds the tests' kernel lock and restores max, hashsize and every timeout; it deletes
its namespaces and stops its servers.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))


TRIM = re.compile(r"capped the remaining timeout of (\d+) existing entries(?: and deleted (\d+))?.*?"
                  r"\((\d+) looked at, \d+ already gone, ([\d.]+) s")
LOWERED = re.compile(r"relief: lowered (nf_conntrack_\w+) (\d+) -> (\d+) s")


def row_of(scenario: str, arm: str, o) -> dict:
    gw = o.kernel.of("gateway")
    steps: dict[str, int] = {}
    lowered, trims = [], []
    for ln in (o.agent.relief if o.agent else ()):
        for word in ("entering relief", "relief steps down", "relief steps up", "relief over", "would lower"):
            if word in ln:
                steps[word] = steps.get(word, 0) + 1
        m = LOWERED.search(ln)
        if m:
            lowered.append(f"{m.group(1)} {m.group(2)}->{m.group(3)}")
        t = TRIM.search(ln)
        if t and int(t.group(1)) + int(t.group(2) or 0):
            trims.append((int(t.group(1)), int(t.group(2) or 0), int(t.group(3)), float(t.group(4))))
    return {"scenario": scenario, "arm": arm, "served": o.users.completed, "attempted": o.users.attempted,
            "p99_ms": o.users.p99_ms, "drop": gw.drop, "early_drop": gw.early_drop, "peak": o.kernel.peak_count,
            "longlived": None if o.longlived is None else
            {"sent": o.longlived.sent, "answered": o.longlived.answered, "cuts": o.longlived.cuts},
            "relief": steps, "lowered": lowered, "trims": trims,
            "left_changed": list(o.agent.timeouts_left_changed) if o.agent else []}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="dns", help="comma-separated: dns, flash_crowd, syn_flood")
    ap.add_argument("--rate", type=float, default=500)
    ap.add_argument("--duration", type=float, default=45)
    ap.add_argument("--table", type=int, default=8192)
    ap.add_argument("--longlived", type=float, default=5)
    ap.add_argument("--arms", default="ideal,off,advise,enforce")
    args = ap.parse_args()
    try:
        from helpers import lab
    except ImportError:
        print("skipped: needs the traffic lab tests/helpers/lab.py (issue 21)")
        return 0
    why = lab.lab_ready()
    if why:
        print(f"skipped: {why}")
        return 0
    print(f"# sudo python3 bench/bench_relief_lab.py --scenario {args.scenario} --rate {args.rate:g} "
          f"--duration {args.duration:g} --table {args.table} --longlived {args.longlived:g} --arms {args.arms}")
    rows = []
    for scenario in args.scenario.split(","):
        run = getattr(lab, scenario)
        for arm in args.arms.split(","):
            kw = dict(rate=args.rate, duration=args.duration, table=args.table, ceiling=args.table,
                      longlived=args.longlived, capture_wait=0)
            if arm == "ideal":
                o = run("ideal", **kw)
            else:
                o = run("ctguard", overrides={"relief": {"mode": arm}}, **kw)
            rows.append(row_of(scenario, arm, o))
            print(json.dumps(rows[-1]), flush=True)
    print()
    print("| scenario | relief | served | x ideal | gateway drop | early_drop | peak entries | long-lived flow "
          "| timeouts lowered | trims (capped+deleted of looked at, s) |")
    print("|---|---|---:|---:|---:|---:|---:|---|---|---|")
    for r in rows:
        ideal = next((x["served"] for x in rows if x["arm"] == "ideal" and x["scenario"] == r["scenario"]), None)
        share = f"{r['served'] / ideal:.3f}" if ideal else "-"
        ll = r["longlived"]
        flow = "-" if ll is None else f"{ll['answered']}/{ll['sent']} answered, cut {ll['cuts']}"
        trims = "; ".join(f"{c}+{d} of {n}, {sec:g}" for c, d, n, sec in r["trims"][:3]) or "-"
        print(f"| {r['scenario']} | {r['arm']} | {r['served']:,} of {r['attempted']:,} | {share} | {r['drop']:,} | "
              f"{r['early_drop']:,} | {r['peak']:,} | {flow} | {', '.join(r['lowered']) or '-'} | {trims} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
