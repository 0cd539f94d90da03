#!/usr/bin/env python3
"""Relief under a flood that goes on: the pure functions driven by a simulated table.

    python3 bench/bench_relief_flood.py [--rate 15000] [--minutes 30] [--baseline REV]

No root, no kernel: ctguard's own `core.decide.decide` and `advance` (relief included) decide
every second on a simulated namespace whose table is pinned at the guard ceiling, and what they
decide is carried out on the simulation (timeouts set, existing entries' remaining time capped
by trims, originals restored), the way the daemon's actor would.

The flood: `--rate` spoofed SYNs a second, each a half-open entry held by
nf_conntrack_tcp_timeout_syn_recv (60 s) in one namespace, beside 5,000 established
connections, for `--minutes`; nf_conntrack_max = [bump] ceiling = [guard] ceiling = 262,144,
so every bump is refused. An entry arriving at a full table is a lost flow (the kernel drops
it, or early_drop evicts an unassured one for it). Relief enforces with calm_for 300 s.

Four runs in one invocation: relief off, advise (this tree), enforce with this tree's
relief, and enforce with the baseline's (`--baseline`, default the
commit before graduated relief: its src/ is exported with `git archive` into a temporary
folder and the same simulation runs on it in a child process). Columns: entries into relief,
returns to the original timeouts, flows lost, the timeout at the end, and the fill's range
after the first entry.

`simulate()` is imported by tests/unit/core/test_relief_schedule.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "0987dd0"        # relief before graduated aging (one jump, restore after calm_for)
NS, HOST = 4026532001, 4026531840
T0 = 1_800_000_000.0
MAX = 262144
KEY = "tcp_syn_recv"

POLICY = f"""
[bump]
ceiling = {MAX}
[guard]
ceiling = {MAX}
[relief]
mode = "enforce"
calm_for = 300
"""


def simulate(rate: float = 15000.0, seconds: int = 1800, timeout: int = 60, legit: int = 5000,
             policy_text: str = POLICY, dt: float = 1.0, stop_at: int | None = None, key: str = "tcp_syn_recv",
             max_: int = 262144) -> dict:
    """Run the flood through ctguard's pure decisions (whatever `ctguard` is importable). `key`
    names the class the flood's entries are in (the timeout that holds them, `timeout` s)."""
    KEY, MAX = key, max_  # noqa: N806
    from ctguard.config import policy as policy_mod
    from ctguard.core.decide import advance, decide
    from ctguard.core.model import (
        History, Instant, KernelLimits, NamespaceReading, Outcome, RestoreTimeout, Sample, ShortenTimeout,
        TableShape, TrimEntries,
    )

    policy = policy_mod.loads(policy_text, "sim.toml")
    sysctl = {k: v for k, v in (("udp", 30), ("udp_stream", 120), ("tcp_syn_sent", 120), ("tcp_syn_recv", 60),
                                ("tcp_time_wait", 120), ("tcp_close_wait", 60), ("tcp_fin_wait", 120),
                                ("tcp_last_ack", 30), ("tcp_unacknowledged", 300), ("tcp_established", 432000))}
    sysctl[KEY] = timeout
    cohorts: dict[int, int] = {}     # expiry second -> half-open entries expiring then
    drops = 0
    history = History()
    entries = restores = 0
    relieved = False
    fills: list[float] = []
    first_entry = None
    steps: list[tuple[int, int]] = []   # (second, timeout) at each change

    def count() -> int:
        return legit + sum(cohorts.values())

    def make_sample(t: float, look: bool) -> Sample:
        at = Instant(T0 + t, 1000.0 + t, "sim")
        n = count()
        s = Sample(at, KernelLimits(MAX, MAX // 4, 320, 64 << 30, 32 << 30),
                   (NamespaceReading(HOST, "host", 10, (("drop", 0),)),
                    NamespaceReading(NS, "flooded", n, (("drop", drops),))))
        if look:
            syn = n - legit
            shape = TableShape(NS, n, syn, 60000, states=((KEY, syn), ("tcp_established", legit)))
            keys = [k for k, _ in policy.relief.timeouts] + [KEY]
            s = replace(s, shape=shape, timeouts=((NS, tuple(sorted((k, sysctl[k]) for k in set(keys)
                                                                    if k in sysctl))),))
        return s

    second = 0
    while second < seconds:
        t = float(second)
        # the kernel: expire, then admit this second's arrivals while there is room
        for when in [w for w in cohorts if w <= second]:
            del cohorts[when]
        room = MAX - count()
        arriving = 0.0 if stop_at is not None and second >= stop_at else rate * dt
        admitted = int(min(arriving, max(0, room)))
        drops += int(arriving) - admitted
        if admitted:
            exp = second + sysctl[KEY]
            cohorts[exp] = cohorts.get(exp, 0) + admitted
        fills.append(count() / MAX)
        # ctguard: decide (again with a look at the table when it asks), carry out, advance
        s = make_sample(t, look=False)
        now = s.at
        d = decide(policy, s, history, now)
        if d.needs_shape is not None or getattr(d, "needs_relief", None) is not None:
            s = make_sample(t, look=True)
            d = decide(policy, s, history, now)
        outcomes = []
        order = {RestoreTimeout: 0, ShortenTimeout: 1, TrimEntries: 2}
        for a in sorted(d.actions, key=lambda a: order.get(type(a), -1)):
            if isinstance(a, ShortenTimeout):
                if getattr(a, "advise", False):
                    outcomes.append(Outcome(a, False, "advise"))
                    continue
                old = sysctl.get(a.key)
                sysctl[a.key] = a.new
                outcomes.append(Outcome(a, True, "", read_back=a.new, extra={"old": old}))
                if a.key == KEY:
                    steps.append((second, a.new))
            elif isinstance(a, RestoreTimeout):
                sysctl[a.key] = a.original
                outcomes.append(Outcome(a, True, "", read_back=a.original))
                if a.key == KEY:
                    steps.append((second, a.original))
            elif isinstance(a, TrimEntries):
                caps = dict(a.timeouts)
                if KEY in caps:
                    limit = second + caps[KEY]
                    moved = sum(n for w, n in cohorts.items() if w > limit)
                    for w in [w for w in cohorts if w > limit]:
                        del cohorts[w]
                    if moved:
                        cohorts[limit] = cohorts.get(limit, 0) + moved
                outcomes.append(Outcome(a, True, "trimmed"))
            else:
                outcomes.append(Outcome(a, True, ""))
        history = advance(history, s, [], outcomes, now, policy)
        now_relieved = bool(history.relief.active)
        if now_relieved and not relieved:
            entries += 1
            if first_entry is None:
                first_entry = second
        if relieved and not now_relieved:
            restores += 1
        relieved = now_relieved
        second += 1
    after = fills[first_entry:] if first_entry is not None else fills
    return {"rate": rate, "seconds": seconds, "entries": entries, "restores": restores, "lost": drops,
            "timeout_at_end": sysctl[KEY], "first_entry_s": first_entry,
            "fill_after_entry": [round(min(after), 3), round(max(after), 3)] if after else None,
            "changes": len(steps), "first_changes": steps[:8], "all_changes": steps}


def _baseline(rev: str, args) -> dict:
    """The same simulation on the baseline's src (git archive REV src/ into a temporary folder)."""
    with tempfile.TemporaryDirectory(prefix="ctguard-baseline-") as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        env = dict(os.environ, PYTHONPATH=str(Path(tmp) / "src"))
        out = subprocess.run([sys.executable, __file__, "--run-json", "--rate", str(args.rate),
                              "--minutes", str(args.minutes)], capture_output=True, text=True, env=env,
                             cwd=tmp, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=15000.0)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--baseline", default=BASELINE, help="git revision of the relief to compare with")
    ap.add_argument("--run-json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    seconds = int(args.minutes * 60)
    if args.run_json:       # a child run on whatever ctguard PYTHONPATH names
        print(json.dumps(simulate(args.rate, seconds)))
        return 0
    sys.path.insert(0, str(ROOT / "src"))
    print(f"# python3 bench/bench_relief_flood.py --rate {args.rate:g} --minutes {args.minutes:g} "
          f"--baseline {args.baseline}")
    rows = [("off", simulate(args.rate, seconds, policy_text=POLICY.replace('"enforce"', '"off"'))),
            ("advise (the default)", simulate(args.rate, seconds, policy_text=POLICY.replace('"enforce"', '"advise"'))),
            ("enforce, baseline " + args.baseline, _baseline(args.baseline, args)),
            ("enforce, graduated (this tree)", simulate(args.rate, seconds))]
    for name, r in rows:
        print(json.dumps({"relief": name, **r}))
    print()
    print("| relief | entries into relief | returns to the original | flows lost | syn_recv timeout at the end "
          "| fill after the first entry |")
    print("|---|---:|---:|---:|---:|---|")
    for name, r in rows:
        lo, hi = r["fill_after_entry"] or (0, 0)
        print(f"| {name} | {r['entries']} | {r['restores']} | {r['lost']:,} | {r['timeout_at_end']} s | "
              f"{lo:.0%}-{hi:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
