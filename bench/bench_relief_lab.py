#!/usr/bin/env python3
"""Relief on real traffic: users served past the ceiling, relief off / advise / graduated.

    sudo python3 bench/bench_relief_lab.py [--scenario dns] [--rate 500] [--duration 45]

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
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "src"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="dns", choices=("dns", "syn_flood", "flash_crowd"))
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
    run = getattr(lab, args.scenario)
    print(f"# sudo python3 bench/bench_relief_lab.py --scenario {args.scenario} --rate {args.rate:g} "
          f"--duration {args.duration:g} --table {args.table} --longlived {args.longlived:g}")
    rows = []
    for arm in args.arms.split(","):
        kw = dict(rate=args.rate, duration=args.duration, table=args.table, ceiling=args.table,
                  longlived=args.longlived, capture_wait=0)
        if arm == "ideal":
            o = run("ideal", **kw)
        else:
            o = run("ctguard", overrides={"relief": {"mode": arm}}, **kw)
        gw = o.kernel.of("gateway")
        steps = {}
        for ln in (o.agent.relief if o.agent else ()):
            for word in ("entering relief", "relief steps down", "relief steps up", "relief over", "would lower",
                         "capped the remaining"):
                if word in ln:
                    steps[word] = steps.get(word, 0) + 1
        row = {"arm": arm, "served": o.users.completed, "attempted": o.users.attempted, "drop": gw.drop,
               "early_drop": gw.early_drop, "longlived_cuts": o.longlived.cuts if o.longlived else None,
               "relief": steps, "left_changed": list(o.agent.timeouts_left_changed) if o.agent else []}
        rows.append(row)
        print(json.dumps(row), flush=True)
    ideal = next((r["served"] for r in rows if r["arm"] == "ideal"), None)
    print()
    print("| arm | served | x ideal | gateway drop | early_drop | long-lived flow cut | relief lines |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        share = f"{r['served'] / ideal:.3f}" if ideal else "-"
        steps = ", ".join(f"{k} {v}" for k, v in r["relief"].items()) or "-"
        print(f"| {r['arm']} | {r['served']:,} | {share} | {r['drop']:,} | {r['early_drop']:,} | "
              f"{r['longlived_cuts']} | {steps} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
