"""Issue 24: the diagnosis tells causes apart, tells each once, ranks it before its consequences,
and suggests only rules that are safe to paste (each checked with `nft -c`).

Every row is a bundle built in code from a few numbers, in the shapes the collectors write
(evidence.toml's table, sysctl, cpu_stats, host, rules, network, listening; timeline.json's
columns; the manifest's decision and incident), named for the incident it stands for.
"""

from __future__ import annotations

import re

import pytest

from ctguard.core.diagnose import FINDING_IDS, BundleData, diagnose, facts, verdict
from helpers.causes import CASES, all_rules, bundle, nft_blocks, series

@pytest.mark.parametrize("name", list(CASES))
def test_the_top_finding_names_the_cause(name: str) -> None:
    data, top, must_not, severity = CASES[name]
    found = diagnose(data)
    ids = [f.id for f in found]
    if top is None:
        assert ids == [], ids
        assert verdict(data).startswith("Healthy")
        return
    assert ids and ids[0] == top, (name, ids)
    assert not (must_not & set(ids)), (name, ids)
    assert found[0].severity == severity, (name, found[0].severity)
    assert len(ids) == len(set(ids)), "one finding per id"
    assert all(f.id in FINDING_IDS for f in found)
    # Causes before consequences; within each, critical before warning before info.
    kinds = [f.tier for f in found]
    assert kinds == sorted(kinds, key=lambda k: 0 if k == "cause" else 1), kinds


def test_a_gateway_finding_speaks_of_its_clients_and_cuts_none_off() -> None:
    for name in ("NAT flash crowd: TIME_WAIT through the gateway", "DNS through the NAT past the ceiling",
                 "dead upstream behind a NAT gateway"):
        found = diagnose(CASES[name][0])
        assert "clients behind ctgt-gw" in found[0].summary or "clients behind ctgt-gw" in found[0].action, name
        for f in found:
            assert "saddr 10.91." not in f.rule, (name, f.id, f.rule)


def test_dns_through_nat_says_each_query_holds_an_entry() -> None:
    f = diagnose(CASES["DNS through the NAT past the ceiling"][0])[0]
    assert "each DNS query through the NAT holds an entry for nf_conntrack_udp_timeout" in f.summary
    assert "udp/53" in f.summary and "10.92.0.2" in f.summary
    assert "users lost" in f.summary and "refused" in f.summary


def test_the_insert_race_is_not_a_bigger_table() -> None:
    f = diagnose(CASES["Kubernetes node: the UDP insert race at 19% fill"][0])[0]
    assert "NodeLocal DNSCache" in f.action and "single-request-reopen" in f.action and "clash" in f.action
    assert "size the table" not in f.action and "bigger table does not help" in f.action


def test_old_drops_are_history() -> None:
    found = diagnose(CASES["twelve drops from months ago on a 15% table"][0])
    assert [f.severity for f in found] == ["info"]


def test_unreachable_names_the_destination_and_port() -> None:
    f = diagnose(CASES["dead upstream behind a NAT gateway"][0])[0]
    assert "10.92.0.2" in f.summary and "tcp/81" in f.summary
    assert "hook forward" in f.rule and "ct state new ip daddr 10.92.0.2 tcp dport 81" in f.rule


def test_the_live_service_beside_the_dead_port_is_not_refused() -> None:
    # From the lab's dead upstream: the same server answers tcp/80 (wrk's TIME_WAIT) and drops tcp/81.
    f = diagnose(CASES["dead port beside a live web server on the same destination"][0])[0]
    assert "tcp/81" in f.summary and "tcp/80" not in f.summary
    assert "dport 81" in f.rule and "dport 80" not in f.rule


def test_a_local_service_that_does_not_answer_is_not_a_remote_dependency() -> None:
    f = diagnose(CASES["this host's own service does not answer"][0])[0]
    assert "own address" in f.summary and "ss -lntup" in f.action and f.rule == ""


def test_the_attack_is_the_guards_judgement() -> None:
    f = diagnose(CASES["spoofed flood, judged by the guard"][0])[0]
    assert "the guard judged it so" in f.summary and "attack-shaped growth" in f.evidence["guard_judgement"]


def test_severity_follows_what_users_lost() -> None:
    quiet = CASES["NAT flash crowd: TIME_WAIT through the gateway"][0]
    tl = {**quiet.timeline, "namespaces": [series(7, [300, 7800, 7800])]}
    calm = BundleData(quiet.manifest, quiet.evidence, tl, {})
    assert diagnose(calm)[0].severity == "warning" and diagnose(quiet)[0].severity == "critical"


def test_peaks_agree_between_the_verdict_and_the_dump() -> None:
    # The timeline's last sample held 886 entries, the dump at capture 6,337: the verdict says 6,337.
    tl = {"namespaces": [series(7, [100, 500, 886], 8192)]}
    data = bundle(entries=6337, protos={"tcp": 6337}, states={"TIME_WAIT": 6000, "ESTABLISHED": 337},
                  timeline=tl)
    assert facts(data).largest == (6337, 8192)
    assert "6,337 entries at its peak, 77% of the max of 8,192 in force then" in verdict(data)


def test_an_open_incident_says_so() -> None:
    text = verdict(CASES["DNS through the NAT past the ceiling"][0])
    assert "Incident incident-1000 was still open when this bundle was taken" in text


def test_every_nft_rule_limits_new_flows_only_and_spares_the_management_path() -> None:
    blocks = [(n, i, b) for n, i, r in all_rules() for b in nft_blocks(r)]
    assert {i for _n, i, _b in blocks} >= {"unreachable-destination", "no-track-candidate", "top-source-dominant"}
    for name, fid, block in blocks:
        for line in block.splitlines():
            if re.search(r"\b(drop|reject)\b", line) and "policy" not in line:
                assert "ct state new" in line, (name, fid, line)
        if "hook input" in block and " drop" in block:
            assert block.index("tcp dport { 22, 10250 } accept") < block.index("ct count"), (name, block)
        if "notrack" in block:
            assert "hook prerouting priority raw" in block and "hook output priority raw" in block
            assert "udp dport" in block and "udp sport" in block, "both directions"


def test_every_sysctl_rule_names_a_real_key() -> None:
    known = {"nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream", "nf_conntrack_tcp_timeout_time_wait",
             "nf_conntrack_tcp_timeout_established"}
    for name, fid, rule in all_rules():
        for key in re.findall(r"sysctl -w net\.netfilter\.(\w+)=\d+", rule):
            assert key in known, (name, fid, key)


def test_advised_relief_is_not_told_as_acted() -> None:
    data = CASES["DNS through the NAT past the ceiling"][0]
    ev = [{"t": 1002.5, "kind": "relief", "netns": 7, "text": "udp 30 -> 10 s", "action": "ShortenTimeout",
           "advise": True}]
    tl = {**data.timeline, "events": list(data.timeline["events"]) + ev}
    text = verdict(BundleData(data.manifest, data.evidence, tl, {}))
    assert "Relief acted" not in text and 'mode = "advise", or classes not in [relief] enforce: nothing changed' in text


def test_the_guards_word_that_it_is_an_outage_wins_over_the_dump() -> None:
    """The daemon's guard knew the host (internal clients retrying one dead upstream): its word,
    recorded in the bump's reason, is not overruled by a host-less reading of the dump (the lab's
    dead upstream: every SYN_SENT from 200 internal clients)."""
    data = CASES["spoofed flood, judged by the guard"][0]      # an attack-shaped dump
    assert "attack-shape" in [f.id for f in diagnose(data)]
    decision = {"summary": "bump", "actions": [{"kind": "SetMax", "old": 16384, "new": 32768, "trigger": "growth",
                                                 "reason": "growing 3110/s; an outage, not an attack: 90% of 1386 "
                                                           "sampled entries unanswered; bumped within the ceiling"}]}
    manifest = {**data.manifest, "decision": decision}
    timeline = {**(data.timeline or {}), "events": [e for e in (data.timeline or {}).get("events", [])
                                                   if "attack" not in str(e.get("text", "")) and e.get("reason") != "guard"]}
    found = [f.id for f in diagnose(BundleData(manifest=manifest, evidence=data.evidence, timeline=timeline,
                                               policy=data.policy))]
    assert "attack-shape" not in found, found
