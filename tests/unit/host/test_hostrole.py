"""Host role and raised timeouts, from prepared /proc, /sys and /etc trees."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctguard.host import hostrole


def tree(tmp: Path, forward: str = "0", bridges: tuple[str, ...] = (), cni: tuple[str, ...] = ()) -> dict:
    proc, sysr, etc = tmp / "proc", tmp / "sys", tmp / "etc"
    (proc / "sys/net/ipv4").mkdir(parents=True)
    (proc / "sys/net/ipv4/ip_forward").write_text(forward + "\n")
    (proc / "sys/net/netfilter").mkdir(parents=True)
    for b in bridges:
        (sysr / "class/net" / b / "bridge").mkdir(parents=True)
    (sysr / "class/net/eth0").mkdir(parents=True)
    for c in cni:
        (etc / "cni/net.d").mkdir(parents=True, exist_ok=True)
        (etc / "cni/net.d" / c).write_text("{}")
    return {"proc_root": proc, "sys_root": sysr, "etc_root": etc}


MASQ = json.dumps({"nftables": [{"rule": {"expr": [{"match": {}}, {"masquerade": None}]}},
                                {"rule": {"expr": [{"dnat": {"addr": "10.0.0.1"}}]}}]})
EMPTY = json.dumps({"nftables": [{"metainfo": {}}]})


@pytest.mark.parametrize(
    "kw, ruleset, procs, role, also",
    [
        ({}, EMPTY, set(), "server", ()),
        ({"forward": "1"}, EMPTY, set(), "router", ()),
        ({"forward": "1"}, MASQ, set(), "NAT gateway", ()),
        ({"bridges": ("docker0",)}, EMPTY, {"dockerd"}, "container host", ()),
        ({"forward": "1", "bridges": ("cni0",), "cni": ("10-flannel.conflist",)}, MASQ, {"kubelet", "kube-proxy"},
         "Kubernetes node", ("NAT gateway", "container host")),
        ({}, None, set(), "server", ()),
    ],
)
def test_detect(tmp_path: Path, kw, ruleset, procs, role, also) -> None:
    r = hostrole.detect(**tree(tmp_path, **kw), nft_ruleset=ruleset, processes=procs)
    assert r.role == role, r
    assert set(also) <= set(r.roles)
    if ruleset is None:
        assert any("NAT rules" in u for u in r.unknown)


def test_nat_rule_counts() -> None:
    assert hostrole.nat_rule_counts(MASQ) == {"masquerade": 1, "snat": 0, "dnat": 1}
    assert hostrole.nat_rule_counts("not json") == {"masquerade": 0, "snat": 0, "dnat": 0}


def test_raised_timeouts_with_the_entries_they_hold(tmp_path: Path) -> None:
    t = tree(tmp_path)
    nf = t["proc_root"] / "sys/net/netfilter"
    (nf / "nf_conntrack_tcp_timeout_established").write_text("864000\n")
    (nf / "nf_conntrack_udp_timeout").write_text("30\n")
    (nf / "nf_conntrack_udp_timeout_stream").write_text("3600\n")
    (nf / "nf_conntrack_generic_timeout").write_text("60\n")
    raised = hostrole.raised_timeouts(t["proc_root"], by_proto={"udp": 500, "tcp": 900},
                                      by_tcp_state={"ESTABLISHED": 800})
    assert [(r.name, r.entries) for r in raised] == [("nf_conntrack_tcp_timeout_established", 800),
                                                      ("nf_conntrack_udp_timeout_stream", 500)]
    assert "x2" in raised[0].line() and "holding about 800 entries" in raised[0].line()
    assert hostrole.raised_timeouts(t["proc_root"])[0].entries is None


def test_recommend_reads_the_peaks_the_daemon_recorded(tmp_path: Path, tmp_policy: Path) -> None:
    """`ctguard recommend --json` over a state folder as the daemon leaves it."""
    import time as _time

    from ctguard.store.state import Peak, StateStore
    from helpers.daemon import ctguard

    policy = tmp_policy
    now = int(_time.time()) // 60 * 60
    peaks = [Peak(now - 60 * i, 20000 + 10 * (i % 50), 65536, 0) for i in range(1, 181)]
    peaks[5] = Peak(peaks[5].minute, 40000, 65536, 3)           # a storm with drops: 3x
    StateStore(tmp_path / "state").save_peaks(peaks)
    res = ctguard("recommend", "--json", "--policy", str(policy))
    assert res.returncode == 0, res.stderr
    advice = json.loads(res.stdout)
    assert advice["enough_history"] and advice["minutes_recorded"] == 180
    assert advice["factor"] == 3 and advice["drops_seen"] == 3
    assert advice["p99_peak"] == 20490
    # 3 x 20,490 = 62,464, but never below the kernel's boot default on this machine (issue 11),
    # and saying so; buckets never below the live ones.
    want = max(62464, advice["boot_default"])
    assert advice["recommended_max"] == want and advice["sysctl_line"] == f"net.netfilter.nf_conntrack_max = {want}"
    assert advice["recommended_buckets"] >= max(15616, advice["current_buckets"])
    if want > 62464:
        assert any("boot default" in w for w in advice["why"])
    text = ctguard("recommend", "--policy", str(policy)).stdout
    assert f"Recommended nf_conntrack_max = {want} (3x the peak 20490)" in text
    assert "do not edit that file" in text and "drop-in" in text
