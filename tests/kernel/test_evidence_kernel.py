"""Evidence bundles against the real kernel: known flows in, exact counts out.

The receiver namespace gets a table whose every entry the test put there: UDP from two sources
(one marked by an nft rule), TCP held ESTABLISHED to a listening socket, TCP stuck in SYN_SENT
(the receiver's RSTs are dropped before conntrack sees them), and ICMP echo in conntrack zone 7.
IPv6 is off in both namespaces so neighbour discovery adds nothing.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import subprocess
import sys
import tarfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from ctguard.evidence.bundle import capture, export, list_bundles
from ctguard.evidence.review import show
from ctguard.host.ctnetlink import _HDR, RECV_BUFFER, Aggregator, decode_all, dump_table, iter_entries, open_ctnetlink
from helpers.kernelenv import NetnsPair, get_max, needs_kernel, netns_pair, saved_kernel_values, set_max
from helpers.wait import wait_for

pytestmark = needs_kernel    # the `kernel` marker: tests/conftest.py, by folder

UDP_MAIN = 300  # sender_addr -> receiver, dports 1..300
UDP_EXTRA = 50  # extra source -> receiver udp/5353, marked 0x2a
TCP_EST = 5  # -> receiver tcp/8000, a listening socket, held open
TCP_SYN = 4  # -> receiver tcp/9, RSTs dropped: stay SYN_SENT
ICMP = 3  # echo with ids 1..3, zone 7

LISTENER = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8000)); s.listen(64)
print("ready", flush=True)
held = []
s.settimeout(30)
try:
    while True:
        held.append(s.accept()[0])
except OSError:
    pass
"""

CLIENTS = r"""
import socket, sys, time
dst, n_est, n_syn = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for _ in range(n_est):
    c = socket.create_connection((dst, 8000), timeout=5); held.append(c)
for _ in range(n_syn):
    c = socket.socket(); c.setblocking(False)
    try:
        c.connect((dst, 9))
    except BlockingIOError:
        pass
    held.append(c)
print("ready", flush=True)
time.sleep(60)
"""

EXTRA_UDP = r"""
import socket, sys
src, dst, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
for i in range(n):
    # Explicit source ports: port 0 may hand out the same ephemeral port twice, which would
    # make two sends one flow and the exact count off by one.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((src, 40000 + i))
    s.sendto(b"x", (dst, 5353)); s.close()
"""

PING = r"""
import socket, struct, sys, time
dst, n = sys.argv[1], int(sys.argv[2])
def csum(b):
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b)); t = (t & 0xFFFF) + (t >> 16); t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(2)
for ident in range(1, n + 1):
    body = struct.pack("!BBHHH", 8, 0, 0, ident, 1) + b"ctguard!"
    pkt = body[:2] + struct.pack("!H", csum(body)) + body[4:]
    s.sendto(pkt, (dst, 0))
    s.recv(1024)
"""


@dataclass(frozen=True)
class Known:
    pair: NetnsPair
    extra_src: str
    netns_path: str

    @property
    def total(self) -> int:
        return UDP_MAIN + UDP_EXTRA + TCP_EST + TCP_SYN + ICMP


def _veth(ns: str) -> str:
    out = subprocess.run(["ip", "-n", ns, "-o", "link", "show", "type", "veth"], capture_output=True, text=True, check=True)
    return out.stdout.split(":")[1].strip().split("@")[0]


@contextlib.contextmanager
def known_flows() -> Iterator[Known]:
    """A receiver namespace holding exactly the flows listed at the top of this file."""
    procs: list[subprocess.Popen[str]] = []
    with saved_kernel_values():
        if get_max() < 65536:
            set_max(65536)  # others may have lowered it; our fill is small
        with netns_pair(prefix="ctge") as pair:
            try:
                third = pair.sender_addr.split(".")[2]
                extra = f"10.233.{third}.1"
                for ns in (pair.sender, pair.receiver):
                    pair.exec(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
                    pair.exec(ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
                pair.exec(pair.receiver, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=300")
                subprocess.run(["ip", "-n", pair.sender, "addr", "add", f"{extra}/32", "dev", _veth(pair.sender)], check=True)
                subprocess.run(["ip", "-n", pair.receiver, "route", "add", f"{extra}/32", "dev", _veth(pair.receiver)], check=True)
                nft = (
                    "table inet ctgevidence {\n"
                    "  chain raw_pre { type filter hook prerouting priority -300; icmp type echo-request ct zone set 7; }\n"
                    "  chain raw_out { type filter hook output priority -300;\n"
                    "    icmp type echo-reply ct zone set 7;\n"
                    "    tcp sport 9 tcp flags & rst == rst drop; }\n"
                    "  chain setmark { type filter hook prerouting priority 10; udp dport 5353 ct mark set 0x2a; }\n"
                    "  chain post { type nat hook postrouting priority 100; oifname \"ctg-nowhere0\" masquerade; }\n"
                    "}\n"
                )
                subprocess.run(["ip", "netns", "exec", pair.receiver, "nft", "-f", "-"], input=nft, text=True, check=True)
                listener = subprocess.Popen(["ip", "netns", "exec", pair.receiver, sys.executable, "-c", LISTENER],
                                            stdout=subprocess.PIPE, text=True)
                procs.append(listener)
                assert listener.stdout is not None and listener.stdout.readline().strip() == "ready"
                pair.flood_udp(UDP_MAIN)
                pair.exec(pair.sender, sys.executable, "-c", EXTRA_UDP, extra, pair.receiver_addr, str(UDP_EXTRA))
                pair.exec(pair.sender, sys.executable, "-c", PING, pair.receiver_addr, str(ICMP))
                clients = subprocess.Popen(["ip", "netns", "exec", pair.sender, sys.executable, "-c", CLIENTS,
                                            pair.receiver_addr, str(TCP_EST), str(TCP_SYN)],
                                           stdout=subprocess.PIPE, text=True)
                procs.append(clients)
                assert clients.stdout is not None and clients.stdout.readline().strip() == "ready"
                known = Known(pair, extra, f"/run/netns/{pair.receiver}")
                assert wait_for(lambda: pair.count() == known.total, 5), f"table holds {pair.count()}, expected {known.total}"
                yield known
            finally:
                for p in procs:
                    p.kill()
                    p.wait()


def _cfg(tmp_path: Path, **kw) -> SimpleNamespace:
    values = dict(dir=tmp_path / "bundles", keep=50, max_bytes=1 << 30, top=5, budget=15.0)
    values.update(kw)
    return SimpleNamespace(**values)


def test_bundle_counts_known_flows_exactly(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    with known_flows() as k:
        path = capture(cfg, reason="bump refused: ceiling", netns_path=k.netns_path, policy_text="mode = \"observe\"\n",
                       decision={"action": "capture", "fill": 0.91, "ceiling": 1048576})
        pair = k.pair
        inode = pair.receiver_inode

    manifest = tomllib.loads((path / "manifest.toml").read_text())
    ev = tomllib.loads((path / "evidence.toml").read_text())
    t = ev["table"]
    assert t["entries"] == k.total and t["expected"] == k.total and not t["cut_short"]
    assert t["by_family"] == {"ipv4": k.total}
    assert t["by_proto"] == {"udp": UDP_MAIN + UDP_EXTRA, "tcp": TCP_EST + TCP_SYN, "icmp": ICMP}
    assert t["by_tcp_state"] == {"ESTABLISHED": TCP_EST, "SYN_SENT": TCP_SYN}
    assert t["unreplied"] == UDP_MAIN + UDP_EXTRA + TCP_SYN
    assert t["assured"] == TCP_EST

    def rows(name: str) -> list[tuple[str, int, int]]:
        return [(r["key"], r["count"], r["error"]) for r in t[name]["rows"]]

    assert t["top_sources"]["exact"]
    assert rows("top_sources") == [(pair.sender_addr, UDP_MAIN + TCP_EST + TCP_SYN + ICMP, 0), (k.extra_src, UDP_EXTRA, 0)]
    assert rows("top_destinations") == [(pair.receiver_addr, k.total, 0)]
    top_ports = rows("top_dports")
    assert top_ports[:3] == [("udp/5353", UDP_EXTRA, 0), ("tcp/8000", TCP_EST, 0), ("tcp/9", TCP_SYN, 0)]
    assert all(count == 1 for _key, count, _err in top_ports[3:])
    assert rows("marks") == [("0x2a", UDP_EXTRA, 0)]
    assert rows("zones") == [("7", ICMP, 0)]

    # Namespace-local sysctls and counters, the NAT verdict, the rest of the playbook.
    assert ev["sysctl"]["sysctl"]["nf_conntrack_udp_timeout"] == "300"
    assert ev["sysctl"]["sysctl"]["nf_conntrack_count"] == str(k.total)
    assert ev["cpu_stats"]["totals"]["entries"] == k.total
    assert ev["rules"]["nat_verdict"].startswith("this host does NAT / masquerade")
    assert ev["memory"]["bytes"]["MemTotal"] > 0
    assert any(ns["inode"] == inode for ns in ev["namespaces"]["namespaces"])
    assert manifest["netns"]["inode"] == inode
    assert manifest["reason"] == "bump refused: ceiling"
    assert manifest["decision"] == {"action": "capture", "fill": 0.91, "ceiling": 1048576}
    assert not manifest["cut_short"]
    failed = {name: c.get("error") for name, c in manifest["collectors"].items() if not c["ok"]}
    assert set(failed) <= {"slab", "journal"}, failed  # those depend on the host's boot options / journald
    assert (path / "policy.toml").read_text() == "mode = \"observe\"\n"

    # 0700 folders, 0600 files.
    assert stat.S_IMODE(os.stat(cfg.dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    for f in path.iterdir():
        assert stat.S_IMODE(os.lstat(f).st_mode) == 0o600, f
    assert path.name.endswith("-bump-refused-ceiling")

    text = show(cfg.dir, path.name)
    assert f"Table at capture: {k.total:,} entries read" in text
    # issue 24: the namespace's role, forwarding and NAT are said once, as the namespace's own
    assert "; NAT: it does NAT (masquerade x1)." in text and "this host does NAT" not in text.split("Details:")[0]
    assert pair.sender_addr in text and "udp/5353" in text
    assert "fill = 0.91" in text

    out = export(cfg.dir, path.name, tmp_path)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert f"{path.name}/manifest.toml" in names and f"{path.name}/evidence.toml" in names


def test_cut_short_capture_says_how_far_it_got(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, budget=0.0)
    with saved_kernel_values():
        if get_max() < 65536:
            set_max(65536)
        with netns_pair(prefix="ctge") as pair:
            pair.exec(pair.receiver, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=300")
            pair.flood_udp(5000)
            assert wait_for(lambda: pair.count() == 5000, 5)
            path = capture(cfg, reason="tiny budget", netns_path=f"/run/netns/{pair.receiver}", policy_text="", decision=None)
    manifest = tomllib.loads((path / "manifest.toml").read_text())
    assert manifest["cut_short"] is True
    assert manifest["table"]["cut_short"] is True
    assert 0 < manifest["table"]["entries_seen"] < 5000
    assert manifest["table"]["expected"] == 5000
    assert any("of about 5000 entries seen" in note for note in manifest["cut_short_what"])
    assert "CUT SHORT" in show(cfg.dir, path.name)
    assert list_bundles(cfg.dir)[0].cut_short


def test_retention_keeps_newest_and_the_one_just_written(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, keep=2)
    with netns_pair(prefix="ctge") as pair:  # empty tables: no need for the shared lock
        paths = []
        for i in range(3):
            paths.append(capture(cfg, reason=f"r{i}", netns_path=f"/run/netns/{pair.receiver}", policy_text="", decision=None))
    names = [b.id for b in list_bundles(cfg.dir)]
    assert names == [p.name for p in paths[1:]]
    # A byte budget smaller than one bundle still keeps the bundle just written.
    cfg_small = _cfg(tmp_path, keep=50, max_bytes=1)
    newest = capture(cfg_small, reason="last", netns_path=None, policy_text="", decision=None)
    assert [b.id for b in list_bundles(cfg.dir)] == [newest.name]


def test_symlinked_evidence_dir_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "bundles").symlink_to(target)
    with pytest.raises(OSError):
        capture(_cfg(tmp_path), reason="x", netns_path=None, policy_text="", decision=None)
    assert list(target.iterdir()) == []


def test_decoder_on_a_recorded_real_dump() -> None:
    """Record the raw recv buffers of a real dump and decode them offline."""
    with known_flows() as k:
        sock = open_ctnetlink(k.netns_path)
        try:
            chunks = _raw_dump(sock)
        finally:
            sock.close()
        live = dump_table(k.netns_path, budget=10, top=5)
    entries = decode_all(b"".join(chunks))
    assert len(entries) == k.total == live.entries
    # The real messages read by the shapes learned from them count what the general decoder counts.
    fast, slow = Aggregator(top=5), Aggregator(top=5)
    for chunk in chunks:
        fast.shapes.study(chunk, len(chunk))
    assert len(fast.shapes.known) == 3  # UDP, TCP (established and SYN_SENT alike), ICMP in zone 7
    for chunk in chunks:
        assert fast.shapes.read(chunk, len(chunk)) is not None
        fast.feed_batch(memoryview(chunk), len(chunk))
        slow.feed(iter_entries(chunk))
    assert fast.result(cut_short=False, seconds=0, expected=None) == slow.result(cut_short=False, seconds=0, expected=None)
    assert live.by_proto == fast.result(cut_short=False, seconds=0, expected=None).by_proto
    by_proto: dict[int, int] = {}
    for e in entries:
        by_proto[e.proto] = by_proto.get(e.proto, 0) + 1
    assert by_proto == {17: UDP_MAIN + UDP_EXTRA, 6: TCP_EST + TCP_SYN, 1: ICMP}
    assert sorted(e.dport for e in entries if e.proto == 17 and e.mark == 0) == list(range(1, UDP_MAIN + 1))
    assert {e.zone for e in entries if e.proto == 1} == {7}
    assert {e.tcp_state for e in entries if e.proto == 6 and e.dport == 8000} == {3}
    assert {e.tcp_state for e in entries if e.proto == 6 and e.dport == 9} == {1}


def _raw_dump(sock) -> list[bytes]:
    """Every recv buffer of one dump, up to and including NLMSG_DONE."""
    sock.send(_HDR.pack(20, 0x0101, 0x301, 1, 0) + struct.pack("=BBH", 0, 0, 0))
    raw: list[bytes] = []
    while True:
        chunk = sock.recv(RECV_BUFFER)
        raw.append(chunk)
        off = 0
        while off + 16 <= len(chunk):
            length, kind = _HDR.unpack_from(chunk, off)[:2]
            if kind == 3:
                return raw
            off += (length + 3) & ~3


def test_netns_resolution_by_name_inode_and_pid() -> None:
    from ctguard.host.netns import NetnsError, resolve

    with kernel_free_pair() as pair:
        by_name = resolve(pair.receiver).path
        assert by_name == f"/run/netns/{pair.receiver}"
        assert os.stat(resolve(str(pair.receiver_inode)).path).st_ino == pair.receiver_inode
        assert os.stat(resolve(str(os.getpid())).path).st_ino == os.stat("/proc/self/ns/net").st_ino
        for bad in ("../etc", ".hidden", "no-such-ns-ctg", "4026999999"):
            with pytest.raises(NetnsError):
                resolve(bad)


@contextlib.contextmanager
def kernel_free_pair() -> Iterator[NetnsPair]:
    # Namespaces without filling any table: no need for the shared lock.
    with netns_pair(prefix="ctge") as pair:
        yield pair
