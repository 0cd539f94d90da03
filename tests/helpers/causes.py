"""Bundles built in code, one per cause the diagnosis tells apart (issue 24): shared by the
diagnosis tests and the views' tests."""

from __future__ import annotations

import re
from typing import Any

from ctguard.core.diagnose import FINDING_IDS, BundleData, diagnose


GW_CLIENTS = [(f"10.91.1.{i}", 40) for i in range(1, 21)]


def rows(pairs: list[tuple[str, int]], exact: bool = True, tracked: int | None = None) -> dict[str, Any]:
    return {"exact": exact, "capacity": 4096, "tracked": tracked if tracked is not None else len(pairs),
            "rows": [{"key": k, "count": c, "error": 0} for k, c in pairs]}


def series(inode: int, entries: list[int], max_: int = 8192, *, drop: list[int] | None = None,
           insert_failed: list[int] | None = None, name: str = "ctgt-gw") -> dict[str, Any]:
    n = len(entries)
    return {"inode": inode, "name": name, "unit": "", "container": "", "t": [1000.0 + i for i in range(n)],
            "entries": entries, "max": [max_] * n, "drop": drop or [0] * n, "early_drop": [0] * n,
            "insert_failed": insert_failed or [0] * n, "invalid": [0] * n}


def bundle(*, entries: int, max_: int = 8192, protos: dict[str, int] | None = None,
           states: dict[str, int] | None = None, unreplied: int = 0, assured: int = 0,
           sources: dict[str, Any] | None = None, dests: dict[str, Any] | None = None,
           dports: dict[str, Any] | None = None, totals: dict[str, int] | None = None,
           role: str = "server", nat: dict[str, int] | None = None, forwards: bool | None = False,
           netns: str = "/run/netns/app", listening: list[int] | None = None,
           raised: list[dict[str, Any]] | None = None, timeline: dict[str, Any] | None = None,
           decision: dict[str, Any] | None = None, incident: dict[str, Any] | None = None,
           addresses: list[str] | None = None) -> BundleData:
    evidence: dict[str, Any] = {
        "table": {"entries": entries, "unreplied": unreplied, "assured": assured, "by_proto": protos or {},
                  "by_tcp_state": states or {}, "top_sources": sources or rows([]),
                  "top_destinations": dests or rows([]), "top_dports": dports or rows([])},
        "sysctl": {"sysctl": {"nf_conntrack_count": str(entries), "nf_conntrack_max": str(max_)},
                   "hashsize": max_ // 4},
        "cpu_stats": {"totals": totals or {}},
        "host": {"role": role, "roles": [role], "seen": ["no NAT, no forwarding"], "raised_timeouts": raised or []},
        "rules": ({"nat_verdict": "this host does NAT / masquerade (nft masquerade x1)", "nft_nat": nat} if nat
                  else {"nat_verdict": "this host does no NAT / masquerade (checked nft)"}),
        "memory": {"bytes": {"MemTotal": 8 << 30}},
        "slab": {"slab": {"objsize": 256}},
    }
    if forwards is not None:
        evidence["network"] = {"forwarding": {"ipv4": forwards, "ipv6": False}, "verdict": "",
                               "interfaces": [{"name": "eth0", "addresses": addresses or []}]}
    if listening is not None:
        evidence["listening"] = {"udp_ports": listening, "tcp_ports": [22]}
    manifest: dict[str, Any] = {"id": "20260101T000000Z-bump", "reason": "bump", "netns": {"path": netns, "inode": 7}}
    if decision is not None:
        manifest["decision"] = decision
    if incident is not None:
        manifest["incident"] = incident
    return BundleData(manifest, evidence, timeline, {})


def bumped(entries: list[int], max_: int = 8192, **kw: Any) -> dict[str, Any]:
    return {"namespaces": [series(7, entries, max_, **kw)],
            "events": [{"t": 1001.0, "kind": "bump", "old": 4096, "new": max_, "netns": 7}]}


GATEWAY = {"role": "server", "nat": {"masquerade": 1}, "forwards": True, "netns": "/run/netns/ctgt-gw"}

# name -> (bundle, the top finding, ids that must not fire, severity of the top finding)
CASES: dict[str, tuple[BundleData, str | None, set[str], str | None]] = {
    "healthy table": (
        bundle(entries=2000, protos={"tcp": 1500, "udp": 500}, states={"ESTABLISHED": 1400, "TIME_WAIT": 100},
               timeline={"namespaces": [series(7, [1900, 2000, 1950])]}),
        None, set(FINDING_IDS), None),
    "capacity: full with drops, no one cause": (
        bundle(entries=8100, protos={"tcp": 4000, "udp": 4100}, states={"ESTABLISHED": 3900, "TIME_WAIT": 100},
               assured=7000,
               sources=rows([(f"10.0.{i}.1", 80) for i in range(40)]),
               dests=rows([(f"10.1.{i}.1", 80) for i in range(40)]),
               timeline={"namespaces": [series(7, [6000, 8100, 8192], drop=[0, 300, 900])],
                         "events": [{"t": 1001.0, "kind": "kernel", "text": "table full"}]}),
        "kernel-drops", {"insert-race", "attack-shape", "top-source-dominant"}, "critical"),
    "Kubernetes node: the UDP insert race at 19% fill": (
        bundle(entries=1550, protos={"udp": 1200, "tcp": 350}, unreplied=100, assured=300,
               dports=rows([("udp/53", 1100)]), role="Kubernetes node", nat={"masquerade": 3}, netns="(ctguard's own)",
               timeline={"namespaces": [series(7, [1500, 1520, 1550], drop=[0, 200, 400],
                                               insert_failed=[0, 200, 400], name="host")]}),
        "insert-race", {"kernel-drops", "udp-answered-once", "tcp-time-wait-churn"}, "critical"),
    "twelve drops from months ago on a 15% table": (
        bundle(entries=1230, protos={"tcp": 1000, "udp": 230}, states={"ESTABLISHED": 1000},
               totals={"drop": 12, "early_drop": 0, "insert_failed": 0}),
        "drops-history", {"kernel-drops"}, "info"),
    "dead upstream behind a NAT gateway": (
        bundle(entries=7000, protos={"tcp": 7000}, states={"SYN_SENT": 6800, "ESTABLISHED": 200}, unreplied=6800,
               sources=rows(GW_CLIENTS, tracked=200), dests=rows([("10.92.0.2", 6900)]),
               dports=rows([("tcp/81", 6800), ("tcp/80", 200)]), timeline=bumped([500, 7000, 7000]), **GATEWAY),
        "unreachable-destination", {"top-source-dominant", "top-destination-dominant", "tcp-syn-sent-dominant",
                                    "attack-shape"}, "warning"),
    "dead port beside a live web server on the same destination": (
        bundle(entries=1683, protos={"tcp": 1683}, states={"SYN_SENT": 1363, "TIME_WAIT": 300, "ESTABLISHED": 20},
               unreplied=1363, sources=rows(GW_CLIENTS, tracked=200), dests=rows([("10.92.0.2", 1683)]),
               dports=rows([("tcp/81", 1363), ("tcp/80", 320)]), timeline=bumped([1, 1683, 1683]), **GATEWAY),
        "unreachable-destination", {"top-destination-dominant"}, "warning"),
    "unanswered UDP to two dead servers": (
        bundle(entries=6000, protos={"udp": 6000}, unreplied=5800, sources=rows(GW_CLIENTS, tracked=150),
               dests=rows([("192.0.2.10", 3000), ("192.0.2.11", 2800)]), dports=rows([("udp/5353", 5800)]),
               timeline=bumped([100, 6000, 6000]), **GATEWAY),
        "unreachable-destination", {"top-destination-dominant", "udp-answered-once"}, "warning"),
    "this host's own service does not answer": (
        bundle(entries=6000, protos={"tcp": 6000}, states={"SYN_SENT": 5900}, unreplied=5900,
               sources=rows([(f"10.0.0.{i}", 50) for i in range(50)]), dests=rows([("192.0.2.5", 5900)]),
               dports=rows([("tcp/8080", 5900)]), addresses=["192.0.2.5/24"], timeline=bumped([1, 6000, 6000])),
        "unreachable-destination", {"top-destination-dominant", "attack-shape"}, "warning"),
    "NAT flash crowd: TIME_WAIT through the gateway": (
        bundle(entries=7800, protos={"tcp": 7800}, states={"TIME_WAIT": 7000, "ESTABLISHED": 800},
               sources=rows([("10.91.0.2", 3800)] + GW_CLIENTS, tracked=201), dests=rows([("10.92.0.2", 7800)]),
               dports=rows([("tcp/80", 7800)]),
               timeline=bumped([300, 7800, 7800], drop=[0, 0, 50]), **GATEWAY),
        "tcp-time-wait-churn", {"top-source-dominant", "top-destination-dominant", "server-does-nat"}, "critical"),
    "DNS through the NAT past the ceiling": (
        bundle(entries=32000, max_=32768, protos={"udp": 31500, "tcp": 500}, unreplied=600, assured=100,
               sources=rows(GW_CLIENTS, tracked=200), dests=rows([("10.92.0.2", 31500)]),
               dports=rows([("udp/53", 31500)]),
               timeline={"namespaces": [series(7, [1000, 20000, 32000, 32768], 32768, drop=[0, 0, 4000, 15000])],
                         "events": [{"t": 1002.0, "kind": "refusal", "reason": "ceiling", "old": 32768,
                                     "new": 65536, "netns": 7}], "ceiling": 32768, "upper_bound": 32768,
                         "upper_bound_by": "ceiling"},
               incident={"id": "incident-1000", "started": 1000.0, "peak_count": 32768, "peak_fill": 1.0},
               **GATEWAY),
        "udp-answered-once", {"no-track-candidate", "top-source-dominant"}, "critical"),
    "raised UDP timeout": (
        bundle(entries=7000, protos={"udp": 6900, "tcp": 100}, unreplied=200,
               raised=[{"name": "nf_conntrack_udp_timeout", "value": 300, "default": 30}],
               timeline=bumped([100, 7000, 7000])),
        "udp-timeout-raised", {"udp-answered-once"}, "warning"),
    "spoofed flood, judged by the guard": (
        bundle(entries=8000, protos={"tcp": 8000}, states={"SYN_RECV": 7900}, unreplied=7900,
               sources=rows([("203.0.113.1", 2)] * 20, exact=False, tracked=4096), dests=rows([("10.92.0.2", 8000)]),
               timeline=bumped([100, 8000, 8000]),
               decision={"actions": [{"action": "SetMax", "old": 8192, "new": 262144, "clipped_by": "guard",
                                      "reason": "fill 98% reached act; attack-shaped growth: 97% of 2000 sampled "
                                                "entries unanswered or half-open, from 1900 or more sources; "
                                                "8192 -> 262144"}]}),
        "attack-shape", {"unreachable-destination", "top-destination-dominant"}, "critical"),
    "a local DNS server answering, no NAT": (
        bundle(entries=7000, protos={"udp": 7000}, assured=0, dests=rows([("192.0.2.53", 6900)]),
               dports=rows([("udp/53", 6900)]), listening=[53], timeline=bumped([100, 7000, 7000])),
        "no-track-candidate", {"udp-answered-once", "top-destination-dominant"}, "warning"),
    "a host resolving through a remote server": (
        bundle(entries=7000, protos={"udp": 7000}, assured=0, dests=rows([("192.0.2.53", 6900)]),
               dports=rows([("udp/53", 6900)]), listening=[68], timeline=bumped([100, 7000, 7000])),
        "udp-answered-once", {"no-track-candidate"}, "warning"),
    "a router forwarding DNS": (
        bundle(entries=7000, protos={"udp": 7000}, dests=rows([("192.0.2.53", 6900)]),
               dports=rows([("udp/53", 6900)]), listening=[53], forwards=True, timeline=bumped([100, 7000, 7000])),
        "udp-answered-once", {"no-track-candidate"}, "warning"),
    "one source hammering this host's service": (
        bundle(entries=7000, protos={"tcp": 7000}, states={"ESTABLISHED": 7000},
               sources=rows([("198.51.100.7", 6500)]), dports=rows([("tcp/443", 7000)]),
               timeline=bumped([100, 7000, 7000])),
        "top-source-dominant", set(), "warning"),
}


def all_rules() -> list[tuple[str, str, str]]:
    out = []
    for name, (data, _top, _no, _sev) in CASES.items():
        for f in diagnose(data):
            if f.rule:
                out.append((name, f.id, f.rule))
    return out


def nft_blocks(rule: str) -> list[str]:
    return re.findall(r"nft -f - <<'EOF'\n(.*?)\nEOF", rule, re.S)
