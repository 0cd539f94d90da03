"""Collectors against prepared /proc and /sys trees; failures are recorded, never fatal."""

from __future__ import annotations

import json
import os
import stat
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from ctguard.evidence import collect
from ctguard.evidence.bundle import capture

STAT = (
    "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart\n"
    "000000a0  00000001 00000000 00000000 00000010 00000000 00000000 00000000 00000000 00000002 00000003 00000000 00000000  00000000 00000000 00000000 00000005\n"
    "000000a0  00000000 00000000 00000000 00000001 00000000 00000000 00000000 00000000 0000000a 00000010 00000001 00000000  00000000 00000000 00000000 00000000\n"
)
SLAB = (
    "slabinfo - version: 2.1\n"
    "# name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables <limit> <batchcount> <sharedfactor> : slabdata <active_slabs> <num_slabs> <sharedavail>\n"
    "nf_conntrack_expect      0      0    208   19    1 : tunables    0    0    0 : slabdata      0      0      0\n"
    "nf_conntrack        1000   1024    320   25    2 : tunables    0    0    0 : slabdata     41     41      0\n"
)
SOCKSTAT = "sockets: used 7\nTCP: inuse 2 orphan 0 tw 1 alloc 3 mem 1\nUDP: inuse 1 mem 0\n"
IPTABLES = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j DROP\nCOMMIT\n*nat\n:POSTROUTING ACCEPT [0:0]\n-A POSTROUTING -o eth0 -j MASQUERADE\n-A PREROUTING -p tcp --dport 80 -j DNAT --to-destination 10.0.0.2\nCOMMIT\n"


def fake_tree(root: Path, *, slab: bool = True) -> tuple[Path, Path]:
    proc, sys_ = root / "proc", root / "sys"
    nf = proc / "sys" / "net" / "netfilter"
    nf.mkdir(parents=True)
    for name, value in {"nf_conntrack_max": "262144", "nf_conntrack_count": "160", "nf_conntrack_buckets": "65536",
                        "nf_conntrack_udp_timeout": "30", "nf_log": "ignored"}.items():
        (nf / name).write_text(value + "\n")
    (proc / "net" / "stat").mkdir(parents=True)
    (proc / "net" / "stat" / "nf_conntrack").write_text(STAT)
    (proc / "net" / "sockstat").write_text(SOCKSTAT)
    # Without slab_nomerge the nf_conntrack cache may be merged away: no line of its own.
    (proc / "slabinfo").write_text(SLAB if slab else SLAB.rsplit("nf_conntrack ", 1)[0])
    (proc / "meminfo").write_text("MemTotal:       4000000 kB\nMemFree:  1 kB\nMemAvailable:   3000000 kB\n")
    for pid, inode, comm, cgroup in (
        (1, 4026531840, "systemd", "0::/init.scope\n"),
        (410, 4026531840, "sshd", "0::/system.slice/ssh.service\n"),
        (977, 4026532300, "nginx", "0::/system.slice/docker-0123456789abcdef0123456789abcdef.scope\n"),
        (978, 4026532301, "pause", "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1b2c3d4e_5f60_7182_93a4_b5c6d7e8f901.slice/cri-containerd-fedcba9876543210fedcba.scope\n"),
    ):
        d = proc / str(pid)
        (d / "ns").mkdir(parents=True)
        os.symlink(f"net:[{inode}]", d / "ns" / "net")  # readlink works on a dangling link
        (d / "comm").write_text(comm + "\n")
        (d / "cgroup").write_text(cgroup)
    hs = sys_ / "module" / "nf_conntrack" / "parameters"
    hs.mkdir(parents=True)
    (hs / "hashsize").write_text("65536\n")
    return proc, sys_


def test_collectors_read_a_prepared_tree(tmp_path: Path) -> None:
    proc, sys_ = fake_tree(tmp_path)
    ctx = collect.Context(proc_root=proc, sys_root=sys_, netns_run_dir=tmp_path / "run-netns")
    got = {r.name: r for r in collect.run_all(collect.NAMESPACE_COLLECTORS + collect.HOST_COLLECTORS[:3], ctx)}
    assert all(r.error is None for r in got.values()), {k: r.error for k, r in got.items()}
    s = got["sysctl"].data
    assert s["hashsize"] == 65536
    assert s["sysctl"] == {"nf_conntrack_max": "262144", "nf_conntrack_count": "160", "nf_conntrack_buckets": "65536",
                           "nf_conntrack_udp_timeout": "30"}
    assert b"net.netfilter.nf_conntrack_max = 262144" in got["sysctl"].files["sysctl.txt"]
    totals = got["cpu_stats"].data["totals"]
    assert totals["entries"] == 0xA0  # the same count on every line, not a sum
    assert totals["drop"] == 0x13 and totals["insert_failed"] == 0xC and totals["search_restart"] == 5
    assert len(got["cpu_stats"].data["per_cpu"]) == 2
    assert got["sockstat"].data["sockstat.TCP"] == {"inuse": 2, "orphan": 0, "tw": 1, "alloc": 3, "mem": 1}
    assert got["slab"].data["slab"] == {"active_objs": 1000, "num_objs": 1024, "objsize": 320,
                                         "active_bytes": 320000, "bytes": 327680}
    assert got["memory"].data["bytes"] == {"MemTotal": 4096000000, "MemAvailable": 3072000000}
    spaces = {ns["inode"]: ns for ns in got["namespaces"].data["namespaces"]}
    assert spaces[4026531840]["processes"] == 2
    assert spaces[4026531840]["units"] == ["init.scope", "ssh.service"]
    assert spaces[4026532300]["containers"] == ["docker:0123456789ab"]
    assert "k8s-pod:1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901" in spaces[4026532301]["containers"]
    assert "containerd:fedcba987654" in spaces[4026532301]["containers"]


def test_missing_sources_are_recorded_and_the_rest_goes_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    proc, sys_ = fake_tree(tmp_path, slab=False)
    (proc / "net" / "sockstat").unlink()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    nft = bin_dir / "nft"
    nft.write_text("#!/bin/sh\necho 'netlink: Error: Operation not permitted' >&2\nexit 1\n")
    nft.chmod(0o755)
    ipt = bin_dir / "iptables-save"
    ipt.write_text("#!/bin/sh\nexec /bin/cat <<'EOF'\n" + IPTABLES + "EOF\n")
    ipt.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    cfg = SimpleNamespace(dir=tmp_path / "bundles", keep=5, max_bytes=1 << 30, top=5, budget=5.0)
    path = capture(cfg, reason="fake tree", netns_path=None, policy_text="[bump]\nceiling = 1\n",
                   decision={"why": "test"}, proc_root=proc, sys_root=sys_)
    manifest = tomllib.loads((path / "manifest.toml").read_text())
    ev = tomllib.loads((path / "evidence.toml").read_text())
    cols = manifest["collectors"]
    assert not cols["slab"]["ok"] and "nf_conntrack" in cols["slab"]["error"] and "slab_nomerge" in cols["slab"]["error"]
    assert not cols["sockstat"]["ok"] and "does not exist" in cols["sockstat"]["error"]
    assert cols["sysctl"]["ok"] and cols["cpu_stats"]["ok"] and cols["memory"]["ok"] and cols["policy"]["ok"]
    # nft failed, iptables-save answered: the verdict still comes, the nft problem is kept.
    assert cols["rules"]["ok"]
    assert ev["rules"]["nat_verdict"] == "this host does NAT / masquerade (iptables DNAT x1, MASQUERADE x1)"
    assert "Operation not permitted" in ev["rules"]["errors"][0]
    assert (path / "iptables-save.txt").read_text() == IPTABLES
    assert json.loads((path / "decision.json").read_text()) == {"why": "test"}
    assert "netns" in manifest and "error" in manifest["netns"]  # no self/ns/net in the fake tree
    for f in path.iterdir():
        assert stat.S_IMODE(os.lstat(f).st_mode) == 0o600


def test_nothing_available_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    ctx = collect.Context(proc_root=tmp_path / "nope", sys_root=tmp_path / "nope")
    got = {r.name: r for r in collect.run_all(collect.NAMESPACE_COLLECTORS + collect.NAMESPACE_SLOW_COLLECTORS
                                             + collect.HOST_COLLECTORS, ctx)}
    assert "modprobe nf_conntrack" in (got["sysctl"].error or "")
    assert got["cpu_stats"].error and got["memory"].error and got["slab"].error
    assert got["rules"].error is None
    assert got["rules"].data["nat_verdict"].startswith("unknown")
    assert got["policy"].error is None


def test_nat_verdicts() -> None:
    ruleset = {"nftables": [
        {"metainfo": {"version": "1.1"}},
        {"chain": {"family": "ip", "table": "nat", "name": "post", "type": "nat"}},
        {"rule": {"family": "ip", "table": "nat", "chain": "post", "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "eth0"}}, {"masquerade": None}]}},
        {"rule": {"family": "ip", "table": "nat", "chain": "pre", "expr": [{"dnat": {"addr": "10.0.0.2"}}]}},
    ]}
    raw = json.dumps(ruleset).encode()
    assert collect.nft_nat_rules(raw) == {"masquerade": 1, "dnat": 1}
    assert collect.nft_nat_rules(b'{"nftables": [{"chain": {"name": "dnat", "comment": "\\"snat\\": no"}}]}') == {}
    # Chunk boundaries anywhere: every split of the stream counts each statement once.
    for cut in range(1, len(raw)):
        counter = collect.NftNatCounter()
        counter.feed(raw[:cut])
        counter.feed(raw[cut:])
        assert counter.found == {"masquerade": 1, "dnat": 1}, cut
    text = IPTABLES.encode()
    for cut in range(1, len(text)):
        ipt = collect.IptablesNatCounter()
        ipt.feed(text[:cut])
        ipt.feed(text[cut:])
        ipt.close()
        assert ipt.found == {"MASQUERADE": 1, "DNAT": 1}, cut
    assert collect.iptables_nat_rules(IPTABLES) == {"MASQUERADE": 1, "DNAT": 1}
    assert collect.nat_verdict({}, {}) == "this host does no NAT / masquerade (checked nft and iptables-save)"
    assert collect.nat_verdict({"masquerade": 2}, None) == "this host does NAT / masquerade (nft masquerade x2)"
    assert collect.nat_verdict(None, None).startswith("unknown")


def test_parse_stat_rejects_ragged_lines() -> None:
    with pytest.raises(collect.CollectorError):
        collect.parse_stat("entries drop\n00000001\n")


def test_a_hanging_tool_is_killed_at_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    nft = tmp_path / "nft"
    nft.write_text("#!/bin/sh\nexec /bin/sleep 30\n")
    nft.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    ctx = collect.Context(deadline=time.monotonic() + 0.3)
    start = time.monotonic()
    got = collect.run_collector("rules", collect.rules, ctx)
    assert time.monotonic() - start < 3
    assert got.error is not None and "within the capture budget" in got.error


def test_journald_absent_is_recorded(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "systemd", None)  # import fails as on a host without python3-systemd
    got = collect.run_collector("journal", collect.journal, collect.Context())
    assert got.error is not None and "kernel journal lines not collected" in got.error


def test_big_ruleset_keeps_only_the_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ipt = tmp_path / "iptables-save"
    # ~6 MB of rules, the NAT rule at the very end (past what is kept).
    ipt.write_text(
        "#!/bin/sh\n/usr/bin/yes -- '-A INPUT -s 10.0.0.1/32 -j ACCEPT' | /usr/bin/head -c 6000000\n"
        "printf '\\n*nat\\n-A POSTROUTING -o eth0 -j MASQUERADE\\nCOMMIT\\n'\n"
    )
    ipt.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    got = collect.run_collector("rules", collect.rules, collect.Context())
    assert got.error is None, got.error
    assert got.data["iptables_nat"] == {"MASQUERADE": 1}
    assert len(got.files["iptables-save.txt"]) == collect.MAX_FILE
    assert "kept the first" in got.data["iptables_save_truncated"]
