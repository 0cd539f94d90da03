"""Helpers for tests that touch the real kernel.

Rules they keep: every value changed is restored and every namespace created is deleted,
even on failure; traffic only flows between namespaces the test created; tests that need
root are skipped with a reason otherwise. A file lock serialises tests (and benchmarks)
that change or depend on the global `nf_conntrack_max`, so two test runs on one machine
do not fight over it.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PROC_MAX = Path("/proc/sys/net/netfilter/nf_conntrack_max")
HASHSIZE = Path("/sys/module/nf_conntrack/parameters/hashsize")
LOCK_PATH = Path("/run/lock/ctguard-tests.lock")

IS_ROOT = os.geteuid() == 0


def kernel_ready() -> str | None:
    """None when kernel tests can run here, else the reason they cannot."""
    if not IS_ROOT:
        return "needs root (writes nf_conntrack_max and creates network namespaces)"
    if shutil.which("ip") is None or shutil.which("nft") is None:
        return "needs iproute2 and nftables"
    if not PROC_MAX.exists():
        subprocess.run(["modprobe", "nf_conntrack"], check=False, capture_output=True)
        if not PROC_MAX.exists():
            return "nf_conntrack is not available in this kernel"
    return None


needs_kernel = pytest.mark.skipif(kernel_ready() is not None, reason=str(kernel_ready()))


@contextlib.contextmanager
def kernel_lock() -> Iterator[None]:
    LOCK_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(LOCK_PATH, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def saved_kernel_values() -> Iterator[None]:
    """Hold the lock; restore nf_conntrack_max and hashsize on the way out, whatever happens."""
    with kernel_lock():
        old_max = PROC_MAX.read_text().strip()
        old_hash = HASHSIZE.read_text().strip()
        try:
            yield
        finally:
            # hashsize first: shrinking max before the table empties is harmless either way.
            HASHSIZE.write_text(old_hash)
            PROC_MAX.write_text(old_max)


def set_max(value: int) -> None:
    PROC_MAX.write_text(str(value))


def get_max() -> int:
    return int(PROC_MAX.read_text())


def get_buckets() -> int:
    return int(HASHSIZE.read_text())


_pair_ids = itertools.count(1)


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True)


@dataclass
class NetnsPair:
    """Two namespaces joined by a veth pair; `receiver` tracks connections (a `ct state new` rule)."""

    sender: str
    receiver: str
    sender_addr: str
    receiver_addr: str

    @property
    def receiver_inode(self) -> int:
        return os.stat(f"/run/netns/{self.receiver}").st_ino

    def exec(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", ns, *args, check=check)

    def flood_udp(self, flows: int, rate: float = 0.0, first_port: int = 1) -> None:
        """Send one datagram per new flow (distinct destination ports, then source ports)."""
        self.exec(self.sender, sys.executable, "-c", FLOOD_SCRIPT, self.receiver_addr, str(flows), str(rate), str(first_port))

    def flood_syn(self, flows: int, sources: int = 4096, dport: int = 9) -> None:
        """Half-open TCP: one SYN per flow from `sources` spoofed addresses in 10.232.0.0/16.

        Nothing answers (no listener, and the receiver has no route back to those sources), so
        every entry stays SYN_SENT and unreplied: the shape of a spoofed SYN flood. The packets
        only cross this pair's veth; rp_filter is off in the receiver so they reach conntrack.
        """
        for key in ("all", "default"):
            self.exec(self.receiver, "sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=0")
        self.exec(self.receiver, "sh", "-c", "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done")
        self.exec(self.sender, "ip", "route", "replace", "10.232.0.0/16", "dev",
                  self.exec(self.sender, "ip", "-o", "link", "show", "type", "veth").stdout.split(":")[1].strip().split("@")[0])
        self.exec(self.sender, sys.executable, "-c", _SYN_FLOOD, self.receiver_addr, str(flows), str(sources), str(dport))

    def count(self) -> int:
        out = self.exec(self.receiver, "cat", "/proc/sys/net/netfilter/nf_conntrack_count").stdout
        return int(out)

    def drops(self) -> int:
        """Kernel's per-CPU `drop` counters of the receiver, summed."""
        text = self.exec(self.receiver, "cat", "/proc/net/stat/nf_conntrack").stdout.split("\n")
        header = text[0].split()
        col = header.index("drop")
        return sum(int(line.split()[col], 16) for line in text[1:] if line.strip())


# One datagram per flow; the destination port walks 1..65535 and each wrap opens a new
# socket so the source port changes and the tuples stay distinct. With rate > 0 the sender
# paces itself to that many flows per second; with a start time (CLOCK_MONOTONIC, argv 5)
# it waits for it, so several senders start together. It prints what it did as JSON. The
# one flood script for tests, benchmarks and the system test (which runs it in a container).
FLOOD_SCRIPT = r"""
import json, socket, sys, time
dst, n, rate, port = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
start_at = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
while time.monotonic() < start_at:
    time.sleep(min(0.01, max(0.0, start_at - time.monotonic())))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
start = time.monotonic()
errors = 0
for i in range(n):
    if port > 65535:
        s.close(); s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); port = 1
    try:
        s.sendto(b"x", (dst, port))
    except OSError:
        errors += 1
    port += 1
    if rate and i % 32 == 0:
        ahead = start + i / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
print(json.dumps({"start": start, "end": time.monotonic(), "sent": n, "errors": errors}))
"""


# Raw IPv4 + TCP SYN packets with spoofed sources; the checksum is computed, the kernel fills
# the IP checksum and id (IP_HDRINCL with those fields zero).
_SYN_FLOOD = r"""
import socket, struct, sys
dst, n, sources, dport = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
daddr = socket.inet_aton(dst)
def csum(b):
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while t >> 16: t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF
for i in range(n):
    src = i % sources
    saddr = bytes((10, 232, (src >> 8) & 0xFF, src & 0xFF))
    sport = 1024 + (i // sources) % 60000
    tcp = struct.pack("!HHIIBBHHH", sport, dport, i, 0, 5 << 4, 0x02, 64240, 0, 0)
    c = csum(saddr + daddr + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", c) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0, saddr, daddr)
    try:
        s.sendto(ip + tcp, (dst, 0))
    except OSError:
        pass
"""


@contextlib.contextmanager
def netns_pair(prefix: str = "ctgt") -> Iterator[NetnsPair]:
    """Create two namespaces on a veth pair; always delete them afterwards."""
    tag = f"{prefix}{os.getpid() % 10000}{next(_pair_ids)}{secrets.token_hex(2)}"
    a, b = f"{tag}a", f"{tag}b"
    third = 200 + (os.getpid() + next(_pair_ids)) % 50
    a_addr, b_addr = f"10.231.{third}.1", f"10.231.{third}.2"
    created: list[str] = []
    try:
        for ns in (a, b):
            run("ip", "netns", "add", ns)
            created.append(ns)
        veth_a, veth_b = f"v{tag}a"[:15], f"v{tag}b"[:15]
        run("ip", "link", "add", veth_a, "netns", a, "type", "veth", "peer", "name", veth_b, "netns", b)
        for ns, dev, addr in ((a, veth_a, a_addr), (b, veth_b, b_addr)):
            run("ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            run("ip", "-n", ns, "link", "set", dev, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
        nft = (
            "table inet ctgtest {\n"
            "  chain pre { type filter hook prerouting priority 0; ct state new counter; }\n"
            "}\n"
        )
        subprocess.run(["ip", "netns", "exec", b, "nft", "-f", "-"], input=nft, text=True, check=True, capture_output=True)
        yield NetnsPair(a, b, a_addr, b_addr)
    finally:
        for ns in created:
            run("ip", "netns", "del", ns, check=False)
