"""The diagnosis core, table-tested: one bundle's numbers in, the findings that must (and must not) fire.

Bundles are built from a few numbers by `bundle()`, in the shapes the real collectors write
(evidence.toml's table/sysctl/cpu_stats/host/rules, timeline.json's columns), so a row reads
like the incident it stands for.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from ctguard.core.diagnose import FINDING_IDS, BundleData, diagnose, facts, verdict
from helpers.paths import REPO


def rows(pairs: list[tuple[str, int]], exact: bool = True, tracked: int | None = None) -> dict[str, Any]:
    return {"exact": exact, "capacity": 4096, "tracked": tracked if tracked is not None else len(pairs),
            "rows": [{"key": k, "count": c, "error": 0} for k, c in pairs]}


def series(name: str, inode: int, entries: list[int], max_: int = 4096, *, drop: list[int] | None = None,
           invalid: list[int] | None = None, t0: float = 1000.0, unit: str = "") -> dict[str, Any]:
    n = len(entries)
    return {"inode": inode, "name": name, "unit": unit, "container": "", "t": [t0 + i for i in range(n)],
            "entries": entries, "max": [max_] * n, "drop": drop or [0] * n, "early_drop": [0] * n,
            "insert_failed": [0] * n, "invalid": invalid or [0] * n}


def bundle(*, entries: int = 0, count: int | None = None, max_: int = 4096, buckets: int | None = None,
           protos: dict[str, int] | None = None, states: dict[str, int] | None = None, unreplied: int = 0,
           sources: dict[str, Any] | None = None, dests: dict[str, Any] | None = None,
           dports: dict[str, Any] | None = None, totals: dict[str, int] | None = None,
           role: str = "server", roles: list[str] | None = None, raised: list[dict[str, Any]] | None = None,
           nat: dict[str, int] | None = None, timeline: dict[str, Any] | None = None,
           policy: dict[str, Any] | None = None, netns_path: str = "/run/netns/app",
           listening: dict[str, Any] | None = None) -> BundleData:
    evidence = {
        "table": {"entries": entries, "unreplied": unreplied, "assured": 0, "by_proto": protos or {},
                  "by_tcp_state": states or {}, "top_sources": sources or rows([]),
                  "top_destinations": dests or rows([]), "top_dports": dports or rows([])},
        "sysctl": {"sysctl": {"nf_conntrack_count": str(entries if count is None else count),
                              "nf_conntrack_max": str(max_)},
                   "hashsize": buckets if buckets is not None else max_ // 4},
        "cpu_stats": {"totals": totals or {}},
        "host": {"role": role, "roles": roles or [role], "raised_timeouts": raised or []},
        "rules": ({"nat_verdict": "this host does NAT / masquerade (nft masquerade x1)", "nft_nat": nat} if nat
                  else {"nat_verdict": "this host does no NAT / masquerade (checked nft)"}),
        "memory": {"bytes": {"MemTotal": 8 << 30}},
        "slab": {"slab": {"objsize": 256}},
        **({"listening": listening} if listening is not None else {}),
    }
    manifest = {"id": "20260101T000000Z-bump", "reason": "bump", "netns": {"path": netns_path, "inode": 7}}
    return BundleData(manifest, evidence, timeline, policy or {})


UDP_TIMEOUT = {"name": "nf_conntrack_udp_timeout", "value": 300, "default": 30, "entries": 3000}
EST_TIMEOUT = {"name": "nf_conntrack_tcp_timeout_established", "value": 2592000, "default": 432000}
BUMPED = {"namespaces": [series("app", 7, [100, 2000, 3900, 3900])],
          "events": [{"t": 1002.0, "kind": "bump", "old": 4096, "new": 8192, "netns": 7}]}

# name -> (bundle, ids that must fire, ids that must not)
CASES: dict[str, tuple[BundleData, set[str], set[str]]] = {
    "empty table": (bundle(), set(), set(FINDING_IDS)),
    "healthy busy table": (
        bundle(entries=1000, protos={"tcp": 900, "udp": 100}, states={"ESTABLISHED": 800, "TIME_WAIT": 100},
               dests=rows([("10.0.0.1", 900)]), dports=rows([("udp/53", 900)])),
        set(), set(FINDING_IDS)),
    "healthy with a healthy timeline": (
        bundle(entries=500, protos={"udp": 500}, timeline={"namespaces": [series("app", 7, [400, 450, 500])]}),
        set(), set(FINDING_IDS)),
    "SYN storm to one dead destination": (
        bundle(entries=3800, protos={"tcp": 3800}, states={"SYN_SENT": 3700, "ESTABLISHED": 100}, unreplied=3700,
               sources=rows([("10.1.0.2", 3800)]), dests=rows([("10.9.9.9", 3700), ("10.0.0.1", 100)]),
               dports=rows([("tcp/443", 3700)]), timeline=BUMPED),
        {"tcp-syn-sent-dominant", "protocol-dominant"},
        {"attack-shape", "tcp-time-wait-churn", "udp-timeout-raised", "top-destination-dominant",
         "top-source-dominant"}),
    "TIME_WAIT churn": (
        bundle(entries=3600, protos={"tcp": 3600}, states={"TIME_WAIT": 3000, "ESTABLISHED": 600},
               dports=rows([("tcp/80", 3000)]), timeline=BUMPED),
        {"tcp-time-wait-churn"}, {"tcp-syn-sent-dominant", "attack-shape"}),
    "UDP with a raised timeout": (
        bundle(entries=3500, protos={"udp": 3400, "tcp": 100}, raised=[UDP_TIMEOUT], timeline=BUMPED),
        {"udp-timeout-raised", "protocol-dominant"}, {"tcp-syn-sent-dominant"}),
    "UDP at the default timeout": (
        bundle(entries=3500, protos={"udp": 3400, "tcp": 100}, timeline=BUMPED),
        {"protocol-dominant"}, {"udp-timeout-raised"}),
    "raised established timeout on a NAT gateway": (
        bundle(entries=3700, protos={"tcp": 3700}, states={"ESTABLISHED": 3500}, unreplied=1500,
               role="NAT gateway", raised=[EST_TIMEOUT], nat={"masquerade": 1}, timeline=BUMPED),
        {"tcp-established-timeout-raised-nat", "host-role"}, {"server-does-nat"}),
    "raised established timeout on a plain server": (
        bundle(entries=3700, protos={"tcp": 3700}, states={"ESTABLISHED": 3500}, unreplied=1500,
               raised=[EST_TIMEOUT], timeline=BUMPED),
        set(), {"tcp-established-timeout-raised-nat"}),
    "spoofed SYN flood": (
        bundle(entries=3900, protos={"tcp": 3900}, states={"SYN_RECV": 3800, "ESTABLISHED": 100}, unreplied=3800,
               sources=rows([("10.232.0.1", 1)] * 20, exact=False, tracked=4096), timeline=BUMPED),
        {"attack-shape"}, {"top-source-dominant"}),
    "invalid climbing with drops": (
        bundle(entries=3000, protos={"tcp": 1500, "udp": 1500},
               timeline={"namespaces": [series("app", 7, [3000, 4000, 4096], drop=[0, 10, 50], invalid=[0, 500, 900])]}),
        {"attack-shape", "kernel-drops"}, set()),
    "one namespace holds most of the table": (
        bundle(entries=3600, protos={"udp": 1800, "tcp": 1800},
               timeline={"namespaces": [series("app", 7, [100, 3600, 3600], unit="app.service"),
                                        series("host", 1, [200, 210, 220])],
                         "events": [{"t": 1001.0, "kind": "bump", "old": 4096, "new": 8192}]}),
        {"namespace-dominant"}, set()),
    "namespaces sharing the table": (
        bundle(entries=3600, protos={"udp": 1800, "tcp": 1800},
               timeline={"namespaces": [series("a", 7, [100, 1800, 1800]), series("b", 8, [100, 1800, 1800])],
                         "events": [{"t": 1001.0, "kind": "bump", "old": 4096, "new": 8192}]}),
        set(), {"namespace-dominant"}),
    "buckets too few": (
        bundle(entries=3900, max_=65536, buckets=1024, protos={"udp": 2000, "tcp": 1900}, timeline=BUMPED),
        {"buckets-too-few"}, set()),
    "max at the ceiling": (
        bundle(entries=3900, max_=1048576, protos={"udp": 2000, "tcp": 1900}, timeline=BUMPED,
               policy={"bump": {"ceiling": 1048576}}),
        {"max-near-cap"}, set()),
    "refused at the ceiling": (
        bundle(entries=3900, protos={"udp": 2000, "tcp": 1900},
               timeline={"namespaces": [series("app", 7, [3000, 3900])],
                         "events": [{"t": 1001.0, "kind": "refusal", "reason": "ceiling", "old": 4096, "new": 8192}],
                         "ceiling": 4096, "upper_bound": 4096, "upper_bound_by": "ceiling"}),
        {"max-near-cap"}, set()),
    "kernel drops": (
        bundle(entries=4096, protos={"udp": 4096},
               timeline={"namespaces": [series("app", 7, [4000, 4096, 4096], drop=[0, 100, 1234])],
                         "events": [{"t": 1001.0, "kind": "kernel", "text": "table full"}]}),
        {"kernel-drops"}, set()),
    "a server that does NAT after all": (
        bundle(entries=3900, protos={"udp": 2000, "tcp": 1900}, nat={"masquerade": 1}, timeline=BUMPED,
               netns_path="(ctguard's own)"),
        {"server-does-nat"}, {"host-role", "no-track-candidate"}),
    "busy local DNS with no NAT": (
        bundle(entries=3800, protos={"udp": 3800}, dports=rows([("udp/53", 3500)]),
               dests=rows([("192.0.2.53", 3500)]), timeline=BUMPED, listening={"udp_ports": [53]}),
        {"no-track-candidate"}, {"top-destination-dominant", "udp-answered-once"}),
    "busy local DNS behind NAT": (
        bundle(entries=3800, protos={"udp": 3800}, dports=rows([("udp/53", 3500)]), nat={"dnat": 1},
               timeline=BUMPED),
        set(), {"no-track-candidate"}),
    "one destination most flows go to, no cause": (
        bundle(entries=4000, protos={"tcp": 4000}, states={"ESTABLISHED": 4000},
               sources=rows([(f"10.0.0.{i}", 200) for i in range(20)]),
               dests=rows([("10.5.0.9", 3500), ("10.5.0.10", 500)]), dports=rows([("tcp/443", 4000)]),
               timeline=BUMPED),
        {"top-destination-dominant"}, {"top-source-dominant", "tcp-time-wait-churn", "tcp-syn-sent-dominant"}),
    "no dominant talker": (
        bundle(entries=3900, protos={"udp": 2000, "tcp": 1900},
               sources=rows([(f"10.0.0.{i}", 20) for i in range(20)]),
               dests=rows([(f"10.1.0.{i}", 20) for i in range(20)]), timeline=BUMPED),
        set(), {"top-source-dominant", "top-destination-dominant", "protocol-dominant"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_findings(name: str) -> None:
    data, must, must_not = CASES[name]
    found = diagnose(data)
    ids = [f.id for f in found]
    assert must <= set(ids), (name, ids)
    assert not (must_not & set(ids)), (name, ids)
    for f in found:
        assert re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", f.id) and f.id in FINDING_IDS
        assert f.severity in ("critical", "warning", "info")
        assert f.summary and f.action and f.evidence
        assert "\n" not in f.summary
    # ranked: critical, warning, info
    order = {"critical": 0, "warning": 1, "info": 2}
    assert [order[f.severity] for f in found] == sorted(order[f.severity] for f in found)


def test_syn_storm_names_the_destination_and_says_fix_retries() -> None:
    f = next(x for x in diagnose(CASES["SYN storm to one dead destination"][0]) if x.id == "tcp-syn-sent-dominant")
    assert "10.9.9.9" in f.summary and "tcp/443" in f.summary
    assert "retries" in f.action and f.evidence["syn_sent"] == 3700


def test_top_source_rule_is_scoped_and_marked_as_a_suggestion() -> None:
    # (issue 24: a source flooding this host's own service; the SYN storm's source is part of its story)
    data = bundle(entries=3800, protos={"tcp": 3800}, states={"ESTABLISHED": 3800},
                  sources=rows([("10.1.0.2", 3800)]), dports=rows([("tcp/443", 3800)]), timeline=BUMPED)
    f = next(x for x in diagnose(data) if x.id == "top-source-dominant")
    assert "ip saddr 10.1.0.2 ct count over" in f.rule and "suggestion" in f.rule
    assert f.as_json()["rule_note"] == "a suggestion: ctguard never applies it"


def test_notrack_rule_is_scoped_to_the_service_seen() -> None:
    f = next(x for x in diagnose(CASES["busy local DNS with no NAT"][0]) if x.id == "no-track-candidate")
    assert "ip daddr 192.0.2.53 udp dport 53 notrack" in f.rule
    assert "ip saddr 192.0.2.53 udp sport 53 notrack" in f.rule
    assert "suggestion" in f.rule


def test_udp_timeout_finding_says_how_to_revert() -> None:
    f = next(x for x in diagnose(CASES["UDP with a raised timeout"][0]) if x.id == "udp-timeout-raised")
    assert "net.netfilter.nf_conntrack_udp_timeout=30" in f.action
    assert f.evidence["timeouts"] == {"nf_conntrack_udp_timeout": 300}


def test_namespace_finding_names_the_unit() -> None:
    f = next(x for x in diagnose(CASES["one namespace holds most of the table"][0]) if x.id == "namespace-dominant")
    assert "app (app.service)" in f.summary and f.evidence["inode"] == 7


def test_kernel_drops_counts_the_window_not_the_lifetime() -> None:
    f = next(x for x in diagnose(CASES["kernel drops"][0]) if x.id == "kernel-drops")
    assert f.evidence["drop"] == 1234 and f.evidence["table_full_lines"] == 1 and f.severity == "critical"


def test_drops_without_a_timeline_use_the_totals() -> None:
    data = bundle(entries=4000, protos={"udp": 4000}, totals={"drop": 77, "early_drop": 3})
    f = next(x for x in diagnose(data) if x.id == "kernel-drops")
    assert f.evidence["drop"] == 77 and "since the namespace was created" in f.summary


def test_fill_is_against_the_max_in_force_when_sampled() -> None:
    # 3,900 entries at max 4,096, bumped to 65,536 afterwards: the peak is 95%, not 6%.
    tl = {"namespaces": [{**series("app", 7, [100, 3900, 3900]), "max": [4096, 4096, 65536]}],
          "events": [{"t": 1002.0, "kind": "bump", "old": 4096, "new": 65536}]}
    data = bundle(entries=1400, max_=65536, protos={"udp": 1400}, timeline=tl)
    f = facts(data)
    assert f.peak is not None and f.peak.peak == 3900 and f.peak.peak_max == 4096
    assert "95% of the max of 4,096 in force then" in verdict(data)


def test_verdict_says_what_ctguard_did_and_what_the_kernel_dropped() -> None:
    data = CASES["kernel drops"][0]
    text = verdict(data)
    assert "UDP (100%) filled app" in text and "dropped 1,234 new flows" in text and "1 table-full line" in text
    bumped = verdict(CASES["SYN storm to one dead destination"][0])
    assert "raised nf_conntrack_max 4,096 -> 8,192 (1 bump)" in bumped
    assert "Top finding:" in bumped


def test_healthy_and_empty_verdicts() -> None:
    assert verdict(bundle()).startswith("The table was empty")
    assert verdict(CASES["healthy busy table"][0]).startswith("Healthy")


def test_every_finding_id_is_documented() -> None:
    doc = (REPO / "docs" / "findings.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9-]+)` \|", doc, re.M))
    assert documented == set(FINDING_IDS)


def test_verdict_mentions_relief() -> None:
    tl = {"namespaces": [series("app", 7, [100, 3900, 3900])],
          "events": [{"t": 1001.0, "kind": "relief", "text": "udp 300 -> 30"}]}
    text = verdict(bundle(entries=3900, protos={"udp": 3900}, timeline=tl))
    assert "Relief acted 1 time(s) on timeouts (udp 300 -> 30)" in text
