"""A bundle folder as a real capture writes it (manifest, evidence.toml, timeline.json, text
attachments), with a UDP flood in its timeline: for the show, report and redact tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tomli_w

SOURCE = "198.51.100.7"
DEST = "203.0.113.9"
SOURCE6 = "2001:db8:77::1"
ADDRESSES = (SOURCE, DEST, SOURCE6, "192.0.2.44")


def timeline(t0: float = 1_780_000_000.0, seconds: int = 120) -> dict[str, Any]:
    t, entries, maxes, drop = [], [], [], []
    cur_max = 4096
    for i in range(seconds * 2):            # 2 points a second: calm then pressure
        when = t0 + i / 2
        n = 150 if i < 60 else min(cur_max, 7190, 150 + (i - 60) * 400)
        if i == 80:
            cur_max = 8192
        t.append(when)
        entries.append(n)
        maxes.append(cur_max)
        drop.append(0 if i < 70 else (i - 70) * 25)
    host = {"inode": 4026531840, "name": "host", "unit": "", "container": "", "t": t[::2],
            "entries": [40] * len(t[::2]), "max": maxes[::2], "drop": [0] * len(t[::2]),
            "early_drop": [0] * len(t[::2]), "insert_failed": [0] * len(t[::2]), "invalid": [0] * len(t[::2])}
    rx = {"inode": 4026532999, "name": "ctgt-rx", "unit": "flood.service", "container": "", "t": t,
          "entries": entries, "max": maxes, "drop": drop, "early_drop": [0] * len(t),
          "insert_failed": [0] * len(t), "invalid": [0] * len(t)}
    return {
        "format": 1, "window_seconds": 900, "from": t0, "to": t[-1], "ceiling": 65536,
        "upper_bound": 65536, "upper_bound_by": "ceiling",
        "limits": {"t": t[::10], "max": maxes[::10], "buckets": [m // 4 for m in maxes[::10]]},
        "namespaces": [host, rx],
        "events": [
            {"t": t0 + 35, "kind": "kernel", "netns": 4026532999, "text": "nf_conntrack: table full, dropping packet"},
            {"t": t0 + 40, "kind": "bump", "netns": 4026532999, "old": 4096, "new": 8192,
             "text": f"4096 -> 8192 (fill) from {SOURCE}"},
            {"t": t0 + 40.1, "kind": "capture", "netns": 4026532999, "text": "bump"},
            {"t": t0 + 60, "kind": "refusal", "netns": 4026532999, "reason": "ceiling", "old": 8192, "new": 16384,
             "text": "ceiling"},
        ],
    }


def write_bundle(folder: Path, name: str = "20260101T000000Z-bump", with_timeline: bool = True) -> Path:
    path = folder / name
    path.mkdir(parents=True, mode=0o700)
    top_src = {"exact": True, "capacity": 4096, "tracked": 3,
               "rows": [{"key": SOURCE, "count": 7000, "error": 0}, {"key": SOURCE6, "count": 150, "error": 0},
                        {"key": "192.0.2.44", "count": 40, "error": 0}]}
    top_dst = {"exact": True, "capacity": 4096, "tracked": 1, "rows": [{"key": DEST, "count": 7190, "error": 0}]}
    ports = {"exact": False, "capacity": 4096, "tracked": 4096,
             "rows": [{"key": f"udp/{p}", "count": 17, "error": 14} for p in range(1000, 1020)]}
    evidence = {
        "table": {"entries": 7190, "cut_short": False, "unreplied": 7100, "assured": 0,
                  "by_proto": {"udp": 7000, "tcp": 190}, "by_tcp_state": {"ESTABLISHED": 150, "TIME_WAIT": 40},
                  "top_sources": top_src, "top_destinations": top_dst, "top_dports": ports,
                  "marks": {"exact": True, "capacity": 1024, "tracked": 0, "rows": []},
                  "zones": {"exact": True, "capacity": 1024, "tracked": 0, "rows": []}},
        "sysctl": {"sysctl": {"nf_conntrack_count": "7190", "nf_conntrack_max": "8192",
                              "nf_conntrack_udp_timeout": "300"}, "hashsize": 2048},
        "cpu_stats": {"totals": {"drop": 4000, "early_drop": 0, "insert_failed": 0, "invalid": 3}},
        "host": {"role": "server", "roles": ["server"], "seen": ["no NAT"],
                 "raised_timeouts": [{"name": "nf_conntrack_udp_timeout", "value": 300, "default": 30,
                                      "entries": 7000}]},
        "rules": {"nat_verdict": "this host does no NAT / masquerade (checked nft)"},
        "memory": {"bytes": {"MemTotal": 4 << 30, "MemAvailable": 2 << 30}},
    }
    manifest = {
        "format": 1, "what": "ctguard evidence bundle", "id": name, "created": "2026-01-01T00:00:00Z",
        "reason": "bump", "host": "gw1", "netns": {"path": "/run/netns/ctgt-rx", "inode": 4026532999},
        "seconds": 0.4, "budget": 15.0, "cut_short": False, "cut_short_what": [],
        "files": ["evidence.toml", "journal-kernel.txt", "manifest.toml", "policy.toml"]
        + (["timeline.json"] if with_timeline else []),
        "collectors": {"sysctl": {"ok": True, "seconds": 0.01}},
        "decision": {"summary": "worst ctgt-rx 91% of max 4096", "worst_netns": 4026532999, "worst_fill": 0.91,
                     "rate": 4000.0,
                     "actions": [{"kind": "SetMax", "old": 4096, "new": 8192, "trigger": "fill",
                                  "reason": "fill 91.0% reached thresholds.act 85%; 4096 -> 8192"},
                                 {"kind": "Capture", "reason": "bump"}]},
    }
    if not with_timeline:
        manifest["timeline_note"] = "no timeline: no ctguard daemon answered (the flight recorder lives in the daemon)"
    (path / "manifest.toml").write_text(tomli_w.dumps(manifest))
    (path / "evidence.toml").write_text(tomli_w.dumps(evidence))
    (path / "policy.toml").write_text("[bump]\nceiling = 65536\n")
    (path / "journal-kernel.txt").write_text(
        f"2026-01-01T00:00:00 nf_conntrack: table full, dropping packet\nconn {SOURCE}:4000 -> {DEST}:53 [{SOURCE6}]:1\n")
    if with_timeline:
        (path / "timeline.json").write_text(json.dumps(timeline()))
    for f in path.iterdir():
        f.chmod(0o600)
    return path
