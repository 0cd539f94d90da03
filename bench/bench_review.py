#!/usr/bin/env python3
"""Incident review costs: diagnosis and HTML report of a 1,000,000-entry bundle, and the
flight recorder's memory for 50 namespaces over 15 minutes.

    python3 bench/bench_review.py [--entries 1000000] [--namespaces 50] [--minutes 15] [--quick]

Needs no root and no kernel: the bundle is built the way a capture builds it (the real
ctnetlink Aggregator fed 1,000,000 decoded entries, the real FlightRecorder fed 15 minutes of
samples), then read back as `bundles show` / `bundles report` read it.

Part 1, review of one bundle (milliseconds, best of --rounds):
  parse       read and parse the bundle's files (manifest/evidence TOML, timeline JSON): the baseline
  diagnose    ctguard.core.diagnose.diagnose() + verdict() on the parsed data
  show        the whole `bundles show` text (load + diagnose + render)
  report      the whole `bundles report` HTML (load + diagnose + render)
  goal: diagnose + report under 1 s

Part 2, the flight recorder (50 namespaces, 15 minutes):
  calm        every namespace sampled once a second
  pressure    the same, plus one namespace under pressure sampled 10 times a second throughout
  memory is what tracemalloc sees allocated by the recorder; the baseline keeps the same samples
  as Python objects (a deque of per-namespace tuples), the naive way; goal: under 5 MB.
  us/turn is FlightRecorder.record() per daemon turn (all namespaces).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
import tracemalloc
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import tomli_w  # noqa: E402

from ctguard.core.diagnose import diagnose, verdict  # noqa: E402
from ctguard.evidence.bundle import table_to_toml  # noqa: E402
from ctguard.host.ctnetlink import Aggregator  # noqa: E402
from ctguard.evidence.report import render  # noqa: E402
from ctguard.evidence.review import load, render_text  # noqa: E402
from ctguard.core.model import Capture, Instant, KernelLimits, NamespaceReading, Outcome, Refuse, Sample, SetMax  # noqa: E402
from ctguard.daemon.recorder import FlightRecorder  # noqa: E402


def sample(t: float, counts: list[int], kmax: int, drops: int) -> Sample:
    spaces = tuple(NamespaceReading(4026532000 + i, f"ns{i}", c, (("drop", drops if i == 0 else 0), ("invalid", 0)),
                                    unit=f"app{i}.service") for i, c in enumerate(counts))
    return Sample(Instant(t, t), KernelLimits(kmax, kmax // 4, 320, 8 << 30, 4 << 30), spaces)


def feed(recorder: FlightRecorder | None, namespaces: int, minutes: float, pressure: bool, t0: float = 1.78e9,
         naive: deque | None = None) -> tuple[int, float]:
    """15 minutes of samples; with `pressure`, namespace 0 floods (25,000 new flows/s, then drops
    at a full table) and every namespace is sampled 10 times a second. Returns (turns, seconds
    spent in FlightRecorder.record)."""
    turns = 0
    spent = 0.0
    step = 0.1 if pressure else 1.0
    kmax = 262144
    rng = random.Random(1)
    base = [rng.randrange(100, 5000) for _ in range(namespaces)]
    for k in range(int(minutes * 60 / step)):
        t = t0 + k * step
        counts = [b + rng.randrange(0, 50) for b in base]
        if pressure:
            counts[0] = min(kmax, 1000 + k * 2500)
        s = sample(t, counts, kmax, drops=max(0, 1000 + k * 2500 - kmax) if pressure else 0)
        if recorder is not None:
            t1 = time.perf_counter()
            recorder.record(s, pressure)
            spent += time.perf_counter() - t1
        if naive is not None:
            naive.append((t, kmax, tuple((ns.inode, ns.count, *(v for _, v in ns.stats)) for ns in s.namespaces)))
            while naive and naive[0][0] < t - minutes * 60:
                naive.popleft()
        turns += 1
    return turns, spent


def recorder_memory(namespaces: int, minutes: float, pressure: bool) -> tuple[float, float, float, int, float, float, float]:
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    rec = FlightRecorder()
    turns, spent = feed(rec, namespaces, minutes, pressure)
    per_turn = spent / turns * 1e6
    used = tracemalloc.get_traced_memory()[0] - before
    points = sum(len(s.t) for s in rec.series.values())
    tracemalloc.stop()
    t = time.perf_counter()
    window = rec.window(ceiling=1048576, upper=1048576, upper_by="ceiling")
    window_ms = (time.perf_counter() - t) * 1000
    t = time.perf_counter()
    text = json.dumps(window, separators=(",", ":"))
    json_ms = (time.perf_counter() - t) * 1000
    del rec
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    naive: deque = deque()
    feed(None, namespaces, minutes, pressure, naive=naive)
    naive_used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return used / 1e6, naive_used / 1e6, per_turn, points, window_ms, json_ms, len(text) / 1e6


def build_bundle(folder: Path, entries: int, namespaces: int, minutes: float) -> tuple[Path, float]:
    """A bundle as a capture writes it, from `entries` decoded entries (UDP flood from many sources)."""
    t = time.perf_counter()
    agg = Aggregator(top=20)
    rng = random.Random(7)
    dst = bytes([10, 0, 0, 2])

    def gen():
        for i in range(entries):
            src = (rng.randrange(1 << 24) | (172 << 24)).to_bytes(4, "big") if i % 3 else bytes([10, 1, 0, 7])
            proto = 17 if i % 10 else 6
            yield (4, proto, src, dst, 40000 + i % 20000, 53 if i % 4 == 0 else 1000 + i % 5000,
                   1 if proto == 6 else None, 0, 0, 0, None)
        yield None

    agg.feed(gen())
    table = agg.result(cut_short=False, seconds=1.0, expected=entries)
    built = time.perf_counter() - t
    rec = FlightRecorder()
    feed(rec, namespaces, minutes, pressure=True)
    now = 1.78e9 + minutes * 60
    rec.note(now - 300, "bump", "262144 -> 524288 (fill)", 4026532000, old=262144, new=524288, reason="fill")
    rec.note(now - 100, "refusal", "ceiling", 4026532000, old=1048576, new=2097152, reason="ceiling")
    path = folder / "20260101T000000Z-bump"
    path.mkdir(parents=True)
    evidence = {
        "table": table_to_toml(table),
        "sysctl": {"sysctl": {"nf_conntrack_count": str(entries), "nf_conntrack_max": "1048576",
                              "nf_conntrack_udp_timeout": "300"}, "hashsize": 262144},
        "cpu_stats": {"totals": {"drop": 12345, "early_drop": 10, "insert_failed": 0, "invalid": 5}},
        "host": {"role": "server", "roles": ["server"], "raised_timeouts": [
            {"name": "nf_conntrack_udp_timeout", "value": 300, "default": 30, "entries": table.by_proto.get("udp", 0)}]},
        "rules": {"nat_verdict": "this host does no NAT / masquerade (checked nft)"},
        "memory": {"bytes": {"MemTotal": 8 << 30}},
    }
    manifest = {"id": path.name, "created": "2026-01-01T00:00:00Z", "reason": "bump", "host": "bench",
                "netns": {"path": "/run/netns/ns0", "inode": 4026532000}, "seconds": 5.0, "budget": 15.0,
                "files": ["evidence.toml", "timeline.json", "manifest.toml"]}
    (path / "evidence.toml").write_text(tomli_w.dumps(evidence))
    (path / "manifest.toml").write_text(tomli_w.dumps(manifest))
    (path / "timeline.json").write_text(json.dumps(rec.window(ceiling=1048576, upper=1048576, upper_by="ceiling")))
    return path, built


def best(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--namespaces", type=int, default=50)
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="a tiny run (10,000 entries, 1 minute)")
    a = ap.parse_args()
    if a.quick:
        a.entries, a.minutes, a.rounds = 10_000, 1.0, 1
    folder = Path(tempfile.mkdtemp(prefix="ctguard-bench-review-"))
    try:
        path, built = build_bundle(folder, a.entries, a.namespaces, a.minutes)
        sizes = {p.name: p.stat().st_size for p in path.iterdir()}
        _, data = load(folder, path.name)

        def parse() -> None:
            import tomllib
            for name in ("manifest.toml", "evidence.toml"):
                tomllib.loads((path / name).read_text())
            json.loads((path / "timeline.json").read_text())

        base = best(parse, a.rounds)
        diag = best(lambda: verdict(data, diagnose(data)), a.rounds)
        show = best(lambda: render_text(*load(folder, path.name)), a.rounds)
        rep = best(lambda: render(*load(folder, path.name)), a.rounds)
        html = render(*load(folder, path.name))
        print(f"# review of one bundle: {a.entries:,} entries (aggregated in {built:.1f} s, not timed), "
              f"timeline {a.namespaces} namespaces x {a.minutes:g} min; files "
              + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(sizes.items())))
        print(f"{'what':<24} {'ms':>9} {'x parse':>8}")
        for what, ms in (("parse (baseline)", base), ("diagnose + verdict", diag), ("bundles show (all)", show),
                         ("bundles report (all)", rep), ("diagnose + report", diag + rep)):
            print(f"{what:<24} {ms:>9.1f} {ms / base:>8.2f}")
        print(f"report size {len(html) / 1e6:.2f} MB; goal diagnose + report < 1000 ms: "
              f"{'met' if diag + rep < 1000 else 'NOT met'}")
        print()
        print(f"# flight recorder: {a.namespaces} namespaces x {a.minutes:g} min")
        print(f"{'case':<10} {'MB':>7} {'naive MB':>9} {'naive/ours':>10} {'us/turn':>8} {'points':>8} "
              f"{'copy ms':>8} {'JSON ms':>8} {'JSON MB':>8}")
        for case, pressure in (("calm", False), ("pressure", True)):
            mb, naive, per_turn, points, wms, jms, wmb = recorder_memory(a.namespaces, a.minutes, pressure)
            print(f"{case:<10} {mb:>7.2f} {naive:>9.2f} {naive / mb:>10.1f} {per_turn:>8.0f} {points:>8} "
                  f"{wms:>8.1f} {jms:>8.1f} {wmb:>8.2f}")
        print("copy: window(), JSON: its serialisation; both in the daemon's loop at a capture, after the bump")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
