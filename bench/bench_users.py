"""What users behind a NAT gateway see (issue 21): each lab scenario with three arms in one
invocation, interleaved and repeated.

    sudo python3 bench/bench_users.py                       # every scenario, 3 runs, 20 s each
    sudo python3 bench/bench_users.py --past-ceiling        # flash crowd and DNS past the ceiling:
                                                            # relief off / advise / enforce vs the ideal
                                                            # (flash 1,000 req/s, ceiling 16,384; DNS 3,000/s, 32,768)
    sudo python3 bench/bench_users.py --quick               # a smoke run (1 run, 4 s each)

Arms (tests/helpers/lab.py): "none" (no agent, nf_conntrack_max = --table), "ctguard" (the
packaged policy, only its paths moved, `python3 -m ctguard run`), "ideal" (max preset to
1,048,576). Each round runs every arm once, in a rotated order, in fresh namespaces. Completed
work and p99 are reported per round as ratios to that round's ideal, then as the median and the
spread (min-max) over the rounds. The ctguard CPU is the daemon's and its children's utime +
stime during the load (/proc/PID/stat). The kernel lock is held for each scenario, so other
test runs on the machine wait (and make this wait).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from helpers import lab  # noqa: E402


def scenarios(a) -> dict:
    d = a.duration
    return {
        "flash": lambda arm, **kw: lab.flash_crowd(arm, rate=a.flash_rate, duration=d, table=a.table, **kw),
        "dns": lambda arm, **kw: lab.dns(arm, rate=a.dns_rate, duration=d, table=a.table, **kw),
        "dns-local": lambda arm, **kw: lab.dns(arm, rate=a.dns_rate, duration=d, table=a.table, local=True, **kw),
        "dead": lambda arm, **kw: lab.dead_upstream(arm, rate=a.dead_rate, duration=d, table=a.table, **kw),
        "syn": lambda arm, **kw: lab.syn_flood(arm, rate=a.syn_rate, duration=d, table=a.table, **kw),
        "cgnat": lambda arm, **kw: lab.cgnat_mix(arm, rate=a.cgnat_rate, duration=d, table=a.table, **kw),
    }


def arms(a, scenario: str) -> list[tuple[str, str, dict]]:
    if a.past_ceiling:
        ceiling = a.ceiling or (a.flash_ceiling if scenario == "flash" else a.dns_ceiling)
        return [("ideal", "ideal", {}),
                *[(f"relief {m}", "ctguard", {"ceiling": ceiling, "overrides": {"relief": {"mode": m}}})
                  for m in a.relief.split(",")]]
    return [("none", "none", {}), ("ctguard", "ctguard", {"ceiling": a.ceiling or 1_048_576}), ("ideal", "ideal", {})]


def p99(o: lab.Outcome) -> float | None:
    """The users' p99: DNS answers (timeouts at the timeout), HTTP the probe's connect-to-close."""
    if o.users.kind == "dns":
        return o.users.p99_ms
    return o.probe.p99_ms if o.probe else o.users.p99_ms


def fmt_spread(xs: list[float], digits: int = 2) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    med = statistics.median(xs)
    if len(xs) == 1:
        return f"{med:.{digits}f}"
    return f"{med:.{digits}f} ({min(xs):.{digits}f}-{max(xs):.{digits}f})"


def n(x) -> str:
    return f"{x:,.0f}" if isinstance(x, (int, float)) else str(x)


def table(results: dict, order: list[str]) -> str:
    head = ("| scenario | arm | completed (median) | x ideal (median, spread) | errors + timeouts | p99 ms | "
            "p99 x ideal | gw drop | gw early_drop | final max | ctguard CPU s | of it daemon + children | long-lived cuts | long-lived min s left |")
    out = [head, "|---|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for scen, rounds in results.items():
        for label in order:
            rows = [r[label] for r in rounds if label in r]
            if not rows:
                continue
            ideals = [r.get("ideal") for r in rounds if label in r]
            ratio = [o.users.completed / i.users.completed if i and i.users.completed else None for o, i in zip(rows, ideals)]
            pr = [(p99(o) / p99(i)) if i and p99(i) and p99(o) is not None else None for o, i in zip(rows, ideals)]
            cuts = [o.longlived.cuts for o in rows if o.longlived]
            out.append("| " + " | ".join([
                scen, label,
                n(statistics.median(o.users.completed for o in rows)),
                fmt_spread(ratio),
                n(statistics.median(o.users.errors + o.users.timeouts for o in rows)),
                fmt_spread([p99(o) for o in rows], 1),
                fmt_spread(pr),
                " / ".join(n(o.kernel.of("gateway").drop) for o in rows),
                " / ".join(n(o.kernel.of("gateway").early_drop) for o in rows),
                " / ".join(n(o.kernel.final_max) for o in rows),
                " / ".join(f"{o.agent.cpu_s:.2f}" for o in rows) if rows[0].agent else "-",
                cpu_split(rows),
                " / ".join(map(str, cuts)) if cuts else "-",
                " / ".join(str(o.longlived.min_timeout_left) for o in rows if o.longlived) or "-",
            ]) + " |")
    return "\n".join(out)


def notes(results: dict) -> str:
    """What ctguard said: its relief lines and its bundles' verdicts (first round of each arm)."""
    out = []
    for scen, rounds in results.items():
        for label, o in rounds[0].items():
            if not o.agent:
                continue
            out.append(f"- **{scen} / {label}**: status `{o.agent.status[:220]}`")
            for line in o.agent.relief[:3]:
                out.append(f"  - relief: `{line[:260]}`")
            for bid, verdict, finds in o.agent.bundles[:2]:
                out.append(f"  - bundle {bid}: findings {', '.join(finds) or '-'}; verdict: {verdict[:300]}")
            if o.longlived:
                out.append(f"  - long-lived flow: {o.longlived}")
            shape = o.get("states")
            if shape:
                out.append(f"  - gateway table at 3/4 of the run: {shape}, {o.get('sources')} sources")
    return "\n".join(out)


def cpu_split(rows: list) -> str:
    """The daemon's own CPU and its children's (captures, relief's trims), per round."""
    if not rows[0].agent or not rows[0].agent.cpu_split:
        return "-"
    return " / ".join("+".join(f"{v:.2f}" for _, v in o.agent.cpu_split) for o in rows)


# Builtins where the daemon's main thread waits rather than works (cProfile counts wall time).
WAITS = re.compile(r"'(poll|select|sleep|wait|epoll_wait|recv_into)' |built-in method (time\.sleep|select\.select)>")


def profiles(folder: Path, top: int = 12) -> str:
    """Where each profiled daemon's main thread (the loop; cProfile sees only it) spent its busy
    time: the waits left out, its functions by own time, then ctguard's by cumulative time."""
    import pstats

    out = []
    for path in sorted(folder.glob("*.prof")):
        st = pstats.Stats(str(path))
        rows = list(st.stats.items())
        waiting = sum(v[2] for (_f, _l, fn), v in rows if WAITS.search(fn))
        busy = max(st.total_tt - waiting, 1e-9)

        def where(file: str, line: int, func: str) -> str:
            name = file.split("/src/", 1)[-1] if "/src/" in file else Path(file).name
            return f"`{name}:{line} {func}`"

        out.append(f"#### {path.stem}: main thread busy {busy:.2f} s, waiting {waiting:.2f} s (under cProfile)")
        out.append("")
        out.append("| own s | share of busy | calls | function |")
        out.append("|---:|---:|---:|---|")
        for (file, line, func), (_cc, nc, tt, _ct, _callers) in sorted(
                ((k, v) for k, v in rows if not WAITS.search(k[2])), key=lambda kv: -kv[1][2])[:top]:
            out.append(f"| {tt:.3f} | {tt / busy:.0%} | {nc:,} | {where(file, line, func)} |")
        out.append("")
        out.append("| cumulative s | share of busy | calls | ctguard function |")
        out.append("|---:|---:|---:|---|")
        # What holds the loop's waits (the run, the command) is left out: it is not work.
        ours = [(k, v) for k, v in rows if "/ctguard/" in k[0] and not k[2].startswith("<") and v[3] <= busy]
        for (file, line, func), (_cc, nc, _tt, ct, _callers) in sorted(ours, key=lambda kv: -kv[1][3])[:top]:
            out.append(f"| {ct:.3f} | {min(ct / busy, 1):.0%} | {nc:,} | {where(file, line, func)} |")
        out.append("")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=20)
    ap.add_argument("--table", type=int, default=8192, help="nf_conntrack_max at the start (none, ctguard)")
    ap.add_argument("--ceiling", type=int, default=None,
                    help="[bump] ceiling for ctguard (default: the packaged policy's 1,048,576; "
                         "--past-ceiling: --flash-ceiling / --dns-ceiling)")
    ap.add_argument("--scenarios", default=None, help="comma list of flash,dns,dns-local,dead,syn,cgnat")
    ap.add_argument("--past-ceiling", action="store_true",
                    help="flash and dns with the ceiling below what the load needs at default timeouts")
    ap.add_argument("--relief", default="off,advise,enforce", help="relief modes for --past-ceiling")
    ap.add_argument("--flash-ceiling", type=int, default=16384,
                    help="--past-ceiling: the flash crowd's ceiling. One client host reuses ~32k "
                         "ephemeral ports (connect() prefers even ones) towards one server, so the crowd "
                         "holds at most ~32k TIME_WAIT entries: 16,384 cannot hold it at 120 s, can at 10 s")
    ap.add_argument("--dns-ceiling", type=int, default=32768,
                    help="--past-ceiling: the DNS scenario's ceiling (3,000/s x 30 s = 90,000 entries at "
                         "the default nf_conntrack_udp_timeout; 30,000 at 10 s, 92%% of it; 15,000 at relief's 5 s)")
    ap.add_argument("--flash-rate", type=float, default=0, help="wrk requests/s (0: closed loop, as fast as it goes)")
    ap.add_argument("--dns-rate", type=float, default=3000)
    ap.add_argument("--dead-rate", type=float, default=2000)
    ap.add_argument("--syn-rate", type=float, default=5000)
    ap.add_argument("--cgnat-rate", type=float, default=5000)
    ap.add_argument("--longlived", type=float, default=None,
                    help="run the VPN-like UDP flow beside each scenario, a packet every N s "
                         "(--past-ceiling default: 10 s; its lowest remaining timeout shows the "
                         "udp_timeout_stream in force: at 30 s, a 60 s keepalive would be cut)")
    ap.add_argument("--json", type=Path, default=None, help="write every outcome here")
    ap.add_argument("--quick", action="store_true", help="1 run of 4 s per scenario and arm (smoke)")
    ap.add_argument("--profile", type=Path, default=None,
                    help="run each ctguard daemon under cProfile, its files in this folder, and print where its "
                         "own CPU went (cProfile slows the daemon: its CPU figures are not the unprofiled ones)")
    a = ap.parse_args()
    # SIGTERM/SIGINT unwind through the lab's `finally` blocks: namespaces deleted, servers
    # stopped, nf_conntrack_max, hashsize and timeouts restored.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _f: (_ for _ in ()).throw(SystemExit(128 + signum)))
    if a.quick:
        a.runs, a.duration = 1, 4
    if a.past_ceiling:
        if a.flash_rate == 0:
            a.flash_rate = 1000
        if a.longlived is None:
            a.longlived = 10.0
        names = (a.scenarios or "flash,dns").split(",")
    else:
        names = (a.scenarios or "flash,dns,dns-local,dead,syn,cgnat").split(",")
    why = lab.lab_ready()
    if why:
        print(f"bench_users: cannot run: {why}", file=sys.stderr)
        return 1
    scen = scenarios(a)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')}, kernel {lab.os.uname().release}, {lab.os.cpu_count()} cores; "
          f"{' '.join(sys.argv[1:]) or '(defaults)'}", flush=True)
    results: dict[str, list[dict]] = {}
    for name in names:
        results[name] = []
        spec = arms(a, name)
        for r in range(a.runs):
            order = spec[r % len(spec):] + spec[:r % len(spec)]
            got = {}
            for label, arm, kw in order:
                kw = dict(kw)
                if a.longlived:
                    kw["longlived"] = a.longlived
                if a.profile and arm == "ctguard":
                    a.profile.mkdir(parents=True, exist_ok=True)
                    kw["profile"] = a.profile / f"{name}-{label.replace(' ', '-')}-{r + 1}.prof"
                t0 = time.monotonic()
                o = scen[name](arm, **kw)
                got[label] = o
                print(f"  [{name} run {r + 1} {label} {time.monotonic() - t0:.0f}s] {lab.summary(o)}", flush=True)
            results[name].append(got)
    print()
    print(table(results, [s[0] for s in arms(a, names[0])]))
    print()
    print(notes(results))
    if a.profile:
        print()
        print(profiles(a.profile))
    if a.json:
        a.json.write_text(json.dumps({k: [{lbl: dataclasses.asdict(o) for lbl, o in r.items()} for r in v]
                                      for k, v in results.items()}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
