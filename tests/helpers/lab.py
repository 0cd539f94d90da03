"""The real-traffic lab (issue 21): what users behind a NAT gateway see while its conntrack
table fills, with no agent, with ctguard, and with a table preset large ("ideal").

Topology (three network namespaces the lab creates, deleted afterwards)::

    client 10.91.0.2/16 (+ N more 10.91.1.x "internal hosts")
      |  veth
    gateway 10.91.0.1/16 | 10.92.0.1/24 (+ a SNAT pool 10.92.0.100..)  ip_forward=1,
      |  veth            nftables: snat/masquerade out of the server side  <- the table of interest
    server 10.92.0.2/24  (nginx, unbound, UDP echo; drops SYNs to port 81 and UDP to 20000-49999)

Only the gateway has a conntrack table (its NAT rules need one; the client and the server have
no rule that needs one), except in the "local" DNS variant where unbound runs in the gateway
itself (the input path of the same table). Every packet stays inside these namespaces.

NAT: `nat_pool=0` is plain `masquerade` (one public address). With one address a gateway can
hold at most 64,512 flows to one destination address and port, which a DNS load through it
meets before the table does (3,000 queries/s x 30 s of nf_conntrack_udp_timeout = 90,000), so
the DNS scenarios SNAT to a pool of addresses as a CGNAT does (`nat_pool`, default 4).

Every scenario is ONE call (`flash_crowd`, `dns`, `dead_upstream`, `syn_flood`, `cgnat_mix`,
`udp_race`) with its rate, duration, table size (`table`, the nf_conntrack_max it starts at)
and `ceiling`, and an `arm`:

- "none": no agent, nf_conntrack_max = table;
- "ctguard": nf_conntrack_max = table and `python3 -m ctguard run` with the packaged
  `etc/ctguard/policy.toml`, only its paths moved into the lab's temporary folder, `[bump]
  ceiling = ceiling`, plus `overrides` written as a drop-in (`policy.d/50-lab.toml`, e.g.
  `{"relief": {"mode": "enforce"}}`). The daemon runs in its own mount and PID namespaces and
  sees the host's and the lab's network namespaces only (other sessions' tests are invisible
  to it), and no journald socket, so its entries are lines in its log, read back here;
- "ideal": nf_conntrack_max = `IDEAL` (1,048,576).

It returns an `Outcome` (frozen): what users saw (`users`: completed requests or answered
queries, errors, timeouts, p50/p99 latency; and for HTTP `probe`, one new connection every
50 ms timed from connect() to the last byte, since wrk times a request from its write, after
the connect, and so never shows a SYN stalled by a full table), what the kernel counted
(`kernel`: drop, early_drop, insert_failed, clash_resolve per namespace from each namespace's
/proc/net/stat/nf_conntrack, peak count, final max), the long-lived UDP flow's fate
(`longlived`) and, for the ctguard arm, what ctguard did (`agent`: its CPU seconds during the
load, daemon and children, bumps, relief, its `status`, its bundles' verdicts and findings).

Kernel values: the lab holds the tests' lock (`kernelenv.saved_kernel_values`) for the whole
scenario and restores nf_conntrack_max, hashsize and the host namespace's conntrack timeouts;
the lab's namespaces (and their timeouts) are deleted; every server is stopped; pid files,
configs and logs live in a temporary folder.

Tools and why:

- HTTP: nginx (`nginx-light`) and wrk with `-H 'Connection: close'` (a new TCP connection per
  request; the server closes, so each request leaves a TIME_WAIT entry in the gateway for
  nf_conntrack_tcp_timeout_time_wait, 120 s). wrk is closed-loop; `rate` > 0 paces it with a
  Lua `delay()` of connections/rate per connection (0: as fast as it goes).
- DNS: unbound answering a static local zone. The clients are a small Python stub
  (`DNS_CLIENT`), not dnsperf: dnsperf keeps one UDP socket per "client" (`-c`, default 1)
  for its whole run, so every query of a client shares one 5-tuple and one conntrack entry
  (checked: `dnsperf -c 1 -Q 2000 -l 10` through the gateway: 19,994 queries, 1 entry in the
  gateway, not 19,994; `-c 100`: 100 entries),
  while a stub resolver opens a new socket, a new source port, for every lookup. The stub
  picks its source address among the client's internal hosts and its port from 1024-65535.
  A query answered within its first 2 s is held by nf_conntrack_udp_timeout (30 s), not
  udp_timeout_stream: only a flow answered and then used again after 2 s becomes a stream.
- Dead upstream: `DEAD_UPSTREAM`, real connect()s from many internal addresses to the
  server's port 81, where the server drops every SYN; each attempt is given up after
  `give_up` s (the kernel retransmits the SYN meanwhile) and retried on a new connection, so
  each attempt is a new SYN_SENT entry for nf_conntrack_tcp_timeout_syn_sent (120 s).
- Spoofed SYN flood: raw IPv4 from sources in 10.93.0.0/16 to nginx's port 80. The server
  answers (SYN-ACK, cookies once its queue is full), the gateway routes the answers to the
  client side where nothing owns those addresses: the gateway holds SYN_RECV entries
  (nf_conntrack_tcp_timeout_syn_recv, 60 s).
- CGNAT mix: unanswered UDP from many internal sources (raw, 10.91.64.0/18) to the server's
  dropped ports (P2P/QUIC probes: UNREPLIED for nf_conntrack_udp_timeout, 30 s, early-drop
  victims), beside a paced wrk and DNS stubs.
- Long-lived UDP flow (`longlived=` on any scenario): a VPN-like peer pair (client 51820 ->
  server 51820, an echo that survives EPERM) exchanging a packet at 0 s and 3 s (so the entry
  is a stream, ASSURED, nf_conntrack_udp_timeout_stream 120 s) and then every `interval` s
  (60 in the benchmark, shorter in tests). The gateway's entry is looked up by its exact
  tuple (`conntrack -G`) every second: `cuts` counts lookups that found it gone or with a
  new id (recreated), `remapped` the times the server saw a new NAT source port.
- UDP insert race (`udp_race`): two threads pinned to two CPUs send an A and an AAAA query
  from ONE new socket at the same instant (glibc's parallel lookups), so the first packets of
  one tuple reach conntrack on two CPUs at once (veth hands a packet to the receiving
  namespace on the sender's CPU, so two pinned senders race in the gateway's conntrack).
  Reproduced here: 902 clashes in 5,000 rounds (`clashres`), 0 `insert_failed`, 0 answers
  lost, kernel 6.18, 2 CPUs. This kernel resolves a UDP clash (the second entry is merged into
  the first, or, with NAT, inserted beside it with a short timeout) instead of dropping the
  packet, which older kernels (before 5.6) counted as insert_failed and dropped: the race
  still happens, users no longer pay for it. Its counters are pinned by the kernel test.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from helpers import kernelenv
from helpers.wait import wait_for

_HERE = Path(__file__).resolve().parent

ROOT = _HERE.parent.parent
SRC = ROOT / "src"
PACKAGED_POLICY = ROOT / "etc" / "ctguard" / "policy.toml"
IDEAL = 1_048_576
NETFILTER = Path("/proc/sys/net/netfilter")

CLIENT_ADDR = "10.91.0.2"
GW_IN = "10.91.0.1"
GW_OUT = "10.92.0.1"
SERVER_ADDR = "10.92.0.2"
POOL_BASE = 100            # SNAT pool 10.92.0.100..
HOSTS_BASE = "10.91.1."    # extra internal hosts in the client namespace
SPOOF_SYN_NET = (10, 93)   # spoofed SYN sources 10.93.0.0/16 (routed back to the client side)
UNANSWERED_NET = (10, 91, 64)  # raw unanswered UDP from 10.91.64.0/18 (internal side)
VPN_PORT = 51820
DEAD_PORT = 81
DNS_NAME = "www.lab"

TOOLS = ("ip", "nft", "nginx", "wrk", "unbound", "conntrack", "unshare")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def lab_ready() -> str | None:
    """None when the lab can run here, else why not."""
    why = kernelenv.kernel_ready()
    if why:
        return why
    miss = missing_tools()
    if miss:
        return "needs " + ", ".join(miss) + " (apt-get install nginx-light wrk unbound conntrack)"
    return None


# ----------------------------------------------------------------------------- results

@dataclass(frozen=True)
class Counters:
    """One namespace's /proc/net/stat/nf_conntrack, every CPU summed (after minus before)."""
    drop: int = 0
    early_drop: int = 0
    insert_failed: int = 0
    clash_resolve: int = 0
    invalid: int = 0
    insert: int = 0

    @staticmethod
    def read(text: str) -> "Counters":
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if not lines:
            return Counters()
        head = lines[0].split()
        tot = dict.fromkeys(head, 0)
        for ln in lines[1:]:
            for k, v in zip(head, ln.split()):
                if k != "entries":
                    tot[k] += int(v, 16)
        return Counters(tot.get("drop", 0), tot.get("early_drop", 0), tot.get("insert_failed", 0),
                        tot.get("clashres", 0), tot.get("invalid", 0), tot.get("insert", 0))

    def __sub__(self, o: "Counters") -> "Counters":
        return Counters(*(a - b for a, b in zip(self.astuple(), o.astuple())))

    def astuple(self) -> tuple[int, ...]:
        return (self.drop, self.early_drop, self.insert_failed, self.clash_resolve, self.invalid, self.insert)


@dataclass(frozen=True)
class KernelView:
    counters: tuple[tuple[str, Counters], ...]   # (role, deltas) for client, gateway, server
    peak_count: int          # the gateway's entries, sampled every 50 ms
    final_count: int
    start_max: int
    final_max: int
    peak_max: int

    def of(self, role: str) -> Counters:
        return dict(self.counters)[role]

    @property
    def drop(self) -> int:
        return sum(c.drop for _, c in self.counters)

    @property
    def early_drop(self) -> int:
        return sum(c.early_drop for _, c in self.counters)

    @property
    def insert_failed(self) -> int:
        return sum(c.insert_failed for _, c in self.counters)


@dataclass(frozen=True)
class UsersView:
    kind: str                # "http" (wrk), "http-probe", "dns"
    attempted: int
    completed: int           # requests answered 2xx/3xx, or queries answered
    errors: int              # socket errors, non-2xx, send errors
    timeouts: int
    p50_ms: float | None
    p99_ms: float | None     # DNS and probe: unanswered counted at the timeout

    @property
    def success(self) -> float:
        return self.completed / self.attempted if self.attempted else 0.0


@dataclass(frozen=True)
class LongLivedView:
    interval: float
    sent: int
    answered: int
    polls: int
    cuts: int                # lookups that found the gateway's entry gone or recreated (new id)
    min_timeout_left: int | None   # the lowest remaining timeout seen on the entry (s)
    remapped: int            # times the server saw a new source (NAT mapping) for the flow


@dataclass(frozen=True)
class AgentView:
    cpu_s: float             # daemon + children (reaped and live), during the load
    bumps: tuple[int, ...]   # distinct nf_conntrack_max values the daemon set, in order
    events: tuple[tuple[str, int], ...]   # ctguard's own entries (stderr lines) by kind
    relief: tuple[str, ...]  # its relief lines (shortened/advised/trimmed/restored)
    status: str              # `ctguard status` headline after the load
    bundles: tuple[tuple[str, str, tuple[str, ...]], ...]   # (id, verdict, finding ids)
    timeouts_left_changed: tuple[str, ...]   # gateway timeouts not back to the original after stop
    log_tail: str
    cpu_split: tuple[tuple[str, float], ...] = ()   # cpu_s as (daemon, its children), during the load

    def count(self, kind: str) -> int:
        return dict(self.events).get(kind, 0)


@dataclass(frozen=True)
class Outcome:
    scenario: str
    arm: str
    rate: float
    duration: float
    table: int
    ceiling: int
    users: UsersView
    kernel: KernelView
    probe: UsersView | None = None
    others: tuple[UsersView, ...] = ()     # side loads (e.g. the DNS stubs of the CGNAT mix)
    longlived: LongLivedView | None = None
    agent: AgentView | None = None
    extra: tuple[tuple[str, object], ...] = ()

    def get(self, key: str, default=None):
        return dict(self.extra).get(key, default)


# ----------------------------------------------------------------------------- scripts
# Small programs run inside the lab's namespaces (`ip netns exec NS python3 -c SCRIPT ...`).
# Each waits for a common start time (CLOCK_MONOTONIC) and prints one JSON line.

_PCT = r"""
def pct(xs, q):
    if not xs: return None
    xs = sorted(xs); return xs[min(len(xs) - 1, int(q * len(xs)))]
"""

# A stub resolver at `rate` lookups/s: every lookup a new UDP socket (a new source port) bound to
# one of the internal hosts' addresses, one query, its answer or the timeout, close.
DNS_CLIENT = _PCT + r"""
import json, os, random, resource, select, socket, struct, sys, time
server, rate, duration, timeout, addrs, start_at = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), sys.argv[5].split(","), float(sys.argv[6])
qtype = int(sys.argv[7]) if len(sys.argv) > 7 else 1
_h = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; resource.setrlimit(resource.RLIMIT_NOFILE, (_h, _h))
name = b"".join(bytes([len(p)]) + p.encode() for p in "www.lab".split(".")) + b"\0"
ep = select.epoll()
pending = {}      # fd -> (sock, sent_at, id)
order = []        # (sent_at, fd) in send order, for timeouts
lat = []; sent = answered = errors = timeouts = wrong = 0
while time.monotonic() < start_at: time.sleep(0.005)
t0 = time.monotonic(); i = 0; oi = 0
end = t0 + duration
while True:
    now = time.monotonic()
    if now >= end and not pending: break
    if now >= end + timeout + 0.5: break
    while now < end and t0 + i / rate <= now:
        i += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setblocking(False)
        qid = random.getrandbits(16)
        try:
            s.bind((random.choice(addrs), random.randint(1024, 65535)))
        except OSError:
            s.bind((random.choice(addrs), 0))
        try:
            s.sendto(struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", qtype, 1), (server, 53))
        except OSError:
            errors += 1; s.close(); sent += 1; continue
        sent += 1
        pending[s.fileno()] = (s, now, qid); order.append((now, s.fileno(), s)); ep.register(s.fileno(), select.EPOLLIN)
    for fd, _ in ep.poll(0.002):
        ent = pending.pop(fd, None)
        if ent is None: continue
        s, at, qid = ent
        try:
            data = s.recv(2048)
            if len(data) >= 12 and struct.unpack("!H", data[:2])[0] == qid and (data[3] & 0x0F) == 0:
                answered += 1; lat.append((time.monotonic() - at) * 1000)
            else:
                wrong += 1
        except OSError:
            errors += 1
        ep.unregister(fd); s.close()
    now = time.monotonic()
    while oi < len(order) and order[oi][0] + timeout <= now:
        at, fd, s = order[oi]; oi += 1
        ent = pending.get(fd)
        if ent is not None and ent[0] is s:
            del pending[fd]; timeouts += 1; ep.unregister(fd); s.close()
full = lat + [timeout * 1000] * timeouts
print(json.dumps({"sent": sent, "answered": answered, "errors": errors + wrong, "timeouts": timeouts,
                  "p50": pct(full, 0.5), "p99": pct(full, 0.99), "elapsed": time.monotonic() - t0}))
"""

# One HTTP/1.1 request per new TCP connection every 1/rate s, timed from connect() to the
# server's close; a request not done within `timeout` counts as a timeout at that value.
HTTP_PROBE = _PCT + r"""
import errno, json, select, socket, sys, time
server, port, rate, duration, timeout, start_at = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
req = b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n"
ep = select.epoll(); conns = {}
lat = []; sent = ok = errors = timeouts = 0
while time.monotonic() < start_at: time.sleep(0.005)
t0 = time.monotonic(); i = 0; end = t0 + duration
while True:
    now = time.monotonic()
    if now >= end and not conns: break
    while now < end and t0 + i / rate <= now:
        i += 1; sent += 1
        s = socket.socket(); s.setblocking(False)
        r = s.connect_ex((server, port))
        if r not in (0, errno.EINPROGRESS):
            errors += 1; s.close(); continue
        conns[s.fileno()] = [s, now, b"", False]
        ep.register(s.fileno(), select.EPOLLOUT)
    for fd, ev in ep.poll(0.005):
        c = conns.get(fd)
        if c is None: continue
        s = c[0]
        if not c[3]:
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                errors += 1; ep.unregister(fd); s.close(); del conns[fd]; continue
            try: s.send(req)
            except OSError:
                errors += 1; ep.unregister(fd); s.close(); del conns[fd]; continue
            c[3] = True; ep.modify(fd, select.EPOLLIN); continue
        try:
            d = s.recv(65536)
        except OSError:
            errors += 1; ep.unregister(fd); s.close(); del conns[fd]; continue
        if d:
            c[2] += d; continue
        if c[2].startswith(b"HTTP/1.1 2") or c[2].startswith(b"HTTP/1.1 3"):
            ok += 1; lat.append((time.monotonic() - c[1]) * 1000)
        else:
            errors += 1
        ep.unregister(fd); s.close(); del conns[fd]
    now = time.monotonic()
    for fd in [fd for fd, c in conns.items() if now - c[1] > timeout]:
        timeouts += 1; ep.unregister(fd); conns[fd][0].close(); del conns[fd]
full = lat + [timeout * 1000] * timeouts
print(json.dumps({"sent": sent, "answered": ok, "errors": errors, "timeouts": timeouts,
                  "p50": pct(full, 0.5), "p99": pct(full, 0.99)}))
"""

# Clients retrying a dead upstream: `rate` connect()s/s from the internal hosts to SERVER:81
# (the server drops the SYNs), each given up after `give_up` s and retried on a new socket.
DEAD_UPSTREAM = r"""
import errno, json, random, resource, socket, sys, time
server, port, rate, duration, give_up, addrs, start_at = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), sys.argv[6].split(","), float(sys.argv[7])
_h = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; resource.setrlimit(resource.RLIMIT_NOFILE, (_h, _h))
open_ = []; sent = connected = errors = 0
while time.monotonic() < start_at: time.sleep(0.005)
t0 = time.monotonic(); i = 0
while time.monotonic() < t0 + duration:
    now = time.monotonic()
    while t0 + i / rate <= now:
        i += 1; sent += 1
        s = socket.socket(); s.setblocking(False)
        try:
            s.bind((random.choice(addrs), 0))
            r = s.connect_ex((server, port))
            if r == 0: connected += 1
            elif r != errno.EINPROGRESS: errors += 1
        except OSError:
            errors += 1
        open_.append((now, s))
    while open_ and open_[0][0] + give_up <= now:
        open_.pop(0)[1].close()
    time.sleep(0.002)
for _, s in open_: s.close()
print(json.dumps({"sent": sent, "connected": connected, "errors": errors}))
"""

# Raw IPv4 packets from many source addresses: "syn" (TCP SYN to dport) or "udp" (one datagram
# to a random port in dport..dport+span). `base` a.b[.c]: sources base.x.y (count of them).
RAW_FLOOD = r"""
import json, random, socket, struct, sys, time
kind, dst, dport, span, rate, duration, base, count, start_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]), [int(x) for x in sys.argv[7].split(".")], int(sys.argv[8]), float(sys.argv[9])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
daddr = socket.inet_aton(dst)
def csum(b):
    if len(b) % 2: b += b"\0"
    t = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while t >> 16: t = (t & 0xFFFF) + (t >> 16)
    return ~t & 0xFFFF
def src(k):
    if len(base) == 2: return bytes((base[0], base[1], (k >> 8) & 0xFF, k & 0xFF))
    return bytes((base[0], base[1], base[2] + ((k >> 8) & 0x3F), k & 0xFF))
while time.monotonic() < start_at: time.sleep(0.005)
t0 = time.monotonic(); i = 0; sent = errors = 0
while True:
    now = time.monotonic()
    if now >= t0 + duration: break
    n = int((now - t0) * rate) - i
    for _ in range(max(0, min(n, 512))):
        saddr = src(i % count); sport = 1024 + (i // count * 7919 + i) % 64000
        if kind == "syn":
            p = dport; proto = 6
            seg = struct.pack("!HHIIBBHHH", sport, p, random.getrandbits(32), 0, 5 << 4, 0x02, 64240, 0, 0)
            c = csum(saddr + daddr + struct.pack("!BBH", 0, 6, len(seg)) + seg)
            seg = seg[:16] + struct.pack("!H", c) + seg[18:]
        else:
            p = dport + random.randrange(span); proto = 17
            seg = struct.pack("!HHHH", sport, p, 8 + 8, 0) + b"probe..."
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(seg), 0, 0, 64, proto, 0, saddr, daddr)
        try:
            s.sendto(ip + seg, (dst, 0)); sent += 1
        except OSError:
            errors += 1
        i += 1
    time.sleep(0.001)
print(json.dumps({"sent": sent, "errors": errors, "rate": sent / max(1e-9, time.monotonic() - t0)}))
"""

# UDP echo that answers with the source it saw; survives EPERM (a full table refusing a reply).
UDP_ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, peer = s.recvfrom(2048)
    try:
        s.sendto(data + (" %s:%d" % peer).encode(), peer)
    except OSError:
        pass
"""

# The VPN-like peer: a packet at 0 s and 3 s (the entry becomes a stream), then every `interval` s.
LONGLIVED = r"""
import json, socket, sys, time
src, server, port, interval, duration, start_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((src, port)); s.settimeout(1.0)
while time.monotonic() < start_at: time.sleep(0.005)
t0 = time.monotonic(); times = [0.0, 3.0]
while times[-1] + interval < duration: times.append(times[-1] + interval)
sent = answered = 0; seen = []
for k, at in enumerate(times):
    while time.monotonic() < t0 + at: time.sleep(min(0.2, max(0.0, t0 + at - time.monotonic())))
    try:
        s.sendto(b"keepalive %d" % k, (server, port)); sent += 1
        data = s.recv(2048); answered += 1
        peer = data.split()[-1].decode()
        if not seen or seen[-1] != peer: seen.append(peer)
    except OSError:
        pass
print(json.dumps({"sent": sent, "answered": answered, "sources": seen}))
"""

# Parallel A and AAAA from one socket (glibc's lookups), from two threads pinned to two CPUs
# released together, `rounds` times, each round a new socket (a new tuple).
UDP_RACE = r"""
import json, os, socket, struct, sys, threading, time
server, rounds, src = sys.argv[1], int(sys.argv[2]), sys.argv[3]
name = b"\x03www\x03lab\x00"
ncpu = os.cpu_count() or 1
cur = [None]; answers = 0; sent = 0; errors = 0
go = [threading.Barrier(3) for _ in range(2)]
def worker(cpu, qtype):
    global sent, errors
    os.sched_setaffinity(0, {cpu % ncpu})
    pkt = struct.pack("!HHHHHH", qtype, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", qtype, 1)
    for r in range(rounds):
        go[0].wait()
        try:
            cur[0].sendto(pkt, (server, 53)); sent += 1
        except OSError:
            errors += 1
        go[1].wait()
ts = [threading.Thread(target=worker, args=(0, 1)), threading.Thread(target=worker, args=(1, 28))]
for t in ts: t.start()
lost = 0
for r in range(rounds):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((src, 0)); s.settimeout(0.2)
    cur[0] = s
    go[0].wait(); go[1].wait()
    got = 0
    for _ in range(2):
        try: s.recv(2048); got += 1
        except OSError: break
    answers += got; lost += 2 - got; s.close()
for t in ts: t.join()
print(json.dumps({"rounds": rounds, "sent": sent, "answers": answers, "lost": lost, "errors": errors}))
"""

_DELAY_LUA = "function delay()\n  return {ms}\nend\n"


# ----------------------------------------------------------------------------- the lab

def _run(*args: str, check: bool = True, input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, input=input)


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class Lab:
    """Three namespaces client -> gateway (NAT) -> server, servers started on demand.

    A context manager: on the way out every process it started is stopped (SIGTERM, then
    SIGKILL), every namespace deleted, and the temporary folder removed (kept with `keep=True`).
    It does not take the kernel lock itself: `scenario()` does (with the kernel values).
    """

    def __init__(self, hosts: int = 200, nat_pool: int = 4, keep: bool = False) -> None:
        self.tag = f"lab{os.getpid() % 100000}{random.randrange(16 ** 3):03x}"
        self.client, self.gw, self.server = f"{self.tag}c", f"{self.tag}g", f"{self.tag}s"
        self.names = (self.client, self.gw, self.server)
        self.hosts = [CLIENT_ADDR] + [f"{HOSTS_BASE}{i}" for i in range(1, hosts)]
        self.nat_pool = nat_pool
        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix=f"ctguard-{self.tag}-"))
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.anchor: dict[str, int] = {}
        self._created: list[str] = []

    # -- set-up / tear-down
    def __enter__(self) -> "Lab":
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        for ns in self.names:
            _run("ip", "netns", "add", ns)
            self._created.append(ns)
        cg, gc, gs, sg = (f"{self.tag}{x}"[:15] for x in ("C", "Gc", "Gs", "S"))
        _run("ip", "link", "add", cg, "netns", self.client, "type", "veth", "peer", "name", gc, "netns", self.gw)
        _run("ip", "link", "add", gs, "netns", self.gw, "type", "veth", "peer", "name", sg, "netns", self.server)
        self.dev = {"client": cg, "gw_in": gc, "gw_out": gs, "server": sg}
        batch = {self.client: [f"addr add {CLIENT_ADDR}/16 dev {cg}"]
                 + [f"addr add {a}/16 dev {cg}" for a in self.hosts[1:]]
                 + [f"link set {cg} up", "link set lo up", f"route add default via {GW_IN}"],
                 self.gw: [f"addr add {GW_IN}/16 dev {gc}", f"addr add {GW_OUT}/24 dev {gs}"]
                 + [f"addr add 10.92.0.{POOL_BASE + i}/24 dev {gs}" for i in range(self.nat_pool)]
                 + [f"link set {gc} up", f"link set {gs} up", "link set lo up",
                    f"route add {SPOOF_SYN_NET[0]}.{SPOOF_SYN_NET[1]}.0.0/16 via {CLIENT_ADDR}"],
                 self.server: [f"addr add {SERVER_ADDR}/24 dev {sg}", f"link set {sg} up", "link set lo up"]}
        for ns, cmds in batch.items():
            _run("ip", "-n", ns, "-batch", "-", input="\n".join(cmds) + "\n")
        sysctls = {self.client: ["net.ipv4.ip_local_port_range=1024 65535"],
                   self.gw: ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0",
                             "net.ipv4.conf.default.rp_filter=0", f"net.ipv4.conf.{gc}.rp_filter=0"],
                   self.server: ["net.core.somaxconn=8192", "net.ipv4.tcp_max_syn_backlog=8192"]}
        for ns, kv in sysctls.items():
            for one in kv:
                _run("ip", "netns", "exec", ns, "sysctl", "-qw", one)
        nat = (f"snat ip to 10.92.0.{POOL_BASE}-10.92.0.{POOL_BASE + self.nat_pool - 1}"
               if self.nat_pool > 1 else "masquerade")
        if self.nat_pool == 1:
            nat = f"snat ip to 10.92.0.{POOL_BASE}"
        self.nft(self.gw, f"""table ip lab {{
  chain post {{ type nat hook postrouting priority srcnat; policy accept; oifname "{gs}" {nat}; }}
}}""")
        self.nft(self.server, f"""table inet lab {{
  chain in {{ type filter hook input priority 0; policy accept;
    tcp dport {DEAD_PORT} tcp flags syn drop
    udp dport 20000-49999 drop
  }}
}}""")
        for ns in self.names:
            p = self.spawn(ns, ["sleep", "infinity"], name=f"anchor-{ns}")
            self.anchor[ns] = p.pid

    def close(self) -> None:
        for name, p in reversed(self.procs):
            if p.poll() is None:
                try:
                    p.terminate()
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
                except ProcessLookupError:
                    pass
        self.procs.clear()
        for ns in self._created:
            _run("ip", "netns", "del", ns, check=False)
        self._created.clear()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers
    def nft(self, ns: str, rules: str) -> None:
        _run("ip", "netns", "exec", ns, "nft", "-f", "-", input=rules)

    def exec(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return _run("ip", "netns", "exec", ns, *args, check=check)

    def spawn(self, ns: str, argv: list[str], name: str, stdout=None) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "w")
        p = subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdin=subprocess.DEVNULL,
                             stdout=stdout if stdout is not None else log, stderr=log, text=True)
        log.close()
        p.logpath = self.dir / f"{name}.log"
        self.procs.append((name, p))
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def py(self, ns: str, script: str, args: list, name: str) -> subprocess.Popen:
        return self.spawn(ns, [sys.executable, "-c", script, *map(str, args)], name=name, stdout=subprocess.PIPE)

    @staticmethod
    def result(p: subprocess.Popen, timeout: float = 120) -> dict:
        out, _ = p.communicate(timeout=timeout)
        lines = [ln for ln in (out or "").splitlines() if ln.startswith("{")]
        if not lines:
            tail = p.logpath.read_text()[-1500:] if getattr(p, "logpath", None) and p.logpath.exists() else ""
            raise RuntimeError(f"no result from {p.args[:6]} (exit {p.returncode}): {tail}")
        return json.loads(lines[-1])

    def stat(self, ns: str) -> str:
        return Path(f"/proc/{self.anchor[ns]}/net/stat/nf_conntrack").read_text()

    def count(self, ns: str | None = None) -> int:
        lines = self.stat(ns or self.gw).splitlines()
        return int(lines[1].split()[0], 16) if len(lines) > 1 else 0

    def counters(self) -> dict[str, Counters]:
        return {role: Counters.read(self.stat(ns)) for role, ns in
                (("client", self.client), ("gateway", self.gw), ("server", self.server))}

    def timeouts(self, ns: str) -> dict[str, str]:
        out = self.exec(ns, "sh", "-c", "cd /proc/sys/net/netfilter && grep . nf_conntrack_*timeout*").stdout
        return dict(line.split(":", 1) for line in out.splitlines() if ":" in line)

    # -- servers
    def start_nginx(self, ns: str | None = None, addr: str = SERVER_ADDR) -> None:
        ns = ns or self.server
        d = self.dir / "nginx"
        d.mkdir(exist_ok=True)
        conf = d / "nginx.conf"
        conf.write_text(f"""worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  keepalive_timeout 0;
  server {{ listen {addr}:80 backlog=8192; location / {{ return 200 "ok\\n"; }} }}
}}
""")
        self.spawn(ns, ["nginx", "-p", str(d), "-c", str(conf), "-g", "daemon off;"], name="nginx")
        self._wait_tcp(ns if ns != self.server else self.client, addr, 80, "nginx")

    def start_unbound(self, ns: str | None = None, addr: str = SERVER_ADDR, threads: int = 1) -> None:
        ns = ns or self.server
        d = self.dir / "unbound"
        d.mkdir(exist_ok=True)
        conf = d / "unbound.conf"
        conf.write_text(f"""server:
  interface: {addr}
  port: 53
  do-daemonize: no
  username: ""
  chroot: ""
  directory: "{d}"
  pidfile: "{d}/unbound.pid"
  use-syslog: no
  logfile: ""
  verbosity: 0
  num-threads: {threads}
  so-reuseport: yes
  so-rcvbuf: 8m
  so-sndbuf: 8m
  do-ip6: no
  do-tcp: no
  access-control: 0.0.0.0/0 allow
  module-config: "iterator"
  ratelimit: 0
  ip-ratelimit: 0
  local-zone: "lab." static
  local-data: "{DNS_NAME}. 60 IN A {SERVER_ADDR}"
  local-data: "{DNS_NAME}. 60 IN AAAA fd00::2"
remote-control:
  control-enable: no
""")
        self.spawn(ns, ["unbound", "-d", "-c", str(conf)], name="unbound")
        src_ns = self.client
        for _ in range(100):
            r = self.exec(src_ns, sys.executable, "-c", _DNS_ONCE, addr, check=False)
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"unbound did not answer: {(self.dir / 'unbound.log').read_text()[-2000:]}")

    def start_echo(self, port: int = VPN_PORT) -> None:
        self.spawn(self.server, [sys.executable, "-c", UDP_ECHO, SERVER_ADDR, str(port)], name="echo")

    def _wait_tcp(self, ns: str, addr: str, port: int, what: str) -> None:
        probe = f"import socket; socket.create_connection(('{addr}', {port}), 0.5).close()"
        for _ in range(100):
            if self.exec(self.client, sys.executable, "-c", probe, check=False).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{what} did not come up on {addr}:{port}")


_DNS_ONCE = r"""
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(0.3)
s.sendto(struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\x03www\x03lab\x00" + struct.pack("!HH", 1, 1), (sys.argv[1], 53))
assert s.recv(512)[:2] == b"\x00\x07"
"""


# ----------------------------------------------------------------------------- the arms

def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def lab_policy(folder: Path, ceiling: int, overrides: dict | None = None) -> Path:
    """The packaged policy with only its paths moved into `folder`, and a drop-in with the
    ceiling and `overrides` ({"relief": {"mode": "enforce"}, ...})."""
    text = PACKAGED_POLICY.read_text()
    # The packaged file sets nothing (every key commented out with its default): the paths move
    # in a drop-in of their own, read before the lab's overrides.
    paths = {"state": {"dir": f"{folder}/state"}, "evidence": {"dir": f"{folder}/bundles"},
             "persist": {"sysctl_file": f"{folder}/etc/sysctl.d/90-ctguard.conf",
                         "modprobe_file": f"{folder}/etc/modprobe.d/ctguard.conf"},
             "metrics": {"textfile": f"{folder}/metrics/ctguard.prom"},
             "control": {"socket": f"{folder}/run/control.sock"}}
    for sect, kv in paths.items():
        for key, default in kv.items():
            if not re.search(rf"^#?{key} = ", text, re.M):
                raise RuntimeError(f"the packaged policy has no [{sect}] {key}: update lab_policy()")
    for sub in ("metrics", "run", "etc/sysctl.d", "etc/modprobe.d"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(folder / "run", 0o700)
    (folder / "policy.d").mkdir(exist_ok=True)
    (folder / "policy.d" / "40-lab-paths.toml").write_text(
        "".join(f"[{sect}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in kv.items()) for sect, kv in paths.items()))
    p = folder / "policy.toml"
    p.write_text(text)
    tables = {"bump": {"ceiling": ceiling}}
    for sect, kv in (overrides or {}).items():
        if isinstance(kv, dict):
            tables.setdefault(sect, {}).update(kv)
        else:
            tables[sect] = kv
    body = [f"{k} = {_toml_value(v)}" for k, v in tables.items() if not isinstance(v, dict)]   # e.g. mode
    for sect, kv in ((s, kv) for s, kv in tables.items() if isinstance(kv, dict)):
        body.append(f"[{sect}]")
        body += [f"{k} = {_toml_value(v)}" for k, v in kv.items()]
    (folder / "policy.d" / "50-lab.toml").write_text("\n".join(body) + "\n")
    return p


# Run inside `unshare --mount --pid --fork --mount-proc`: show the daemon only the lab's
# /run/netns entries, and no journald socket (its entries then go to its stderr, the log).
_ISOLATE = r"""
import os, subprocess, sys
i = sys.argv.index("--")
view, names, cmd = sys.argv[1], sys.argv[2:i], sys.argv[i + 1:]
os.makedirs(view, exist_ok=True)
subprocess.run(["mount", "-t", "tmpfs", "ctguard-lab", view], check=True)
for n in names:
    open(os.path.join(view, n), "w").close()
    subprocess.run(["mount", "--bind", "/run/netns/" + n, os.path.join(view, n)], check=True)
subprocess.run(["mount", "--rbind", view, "/run/netns"], check=True)
if os.path.isdir("/run/systemd/journal"):
    subprocess.run(["mount", "-t", "tmpfs", "no-journal", "/run/systemd/journal"], check=True)
os.execvp(cmd[0], cmd)
"""


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it dies (prctl(2))."""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _descendants(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for k in kids.get(p, []):
            out.append(k)
            todo.append(k)
    return out


def cpu_parts(pid: int) -> dict[str, float]:
    """utime+stime in seconds: of `pid` itself ("daemon"), and of its reaped children and live
    descendants ("children": its captures and relief's trims)."""
    tck = os.sysconf("SC_CLK_TCK")
    parts = {"daemon": 0.0, "children": 0.0}
    for i, p in enumerate([pid] + _descendants(pid)):
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parts["daemon" if i == 0 else "children"] += (int(f[11]) + int(f[12])) / tck
        if i == 0:
            parts["children"] += (int(f[13]) + int(f[14])) / tck
    return parts


def tree_cpu(pid: int) -> float:
    """utime+stime of `pid`, its reaped children and its live descendants, in seconds."""
    return sum(cpu_parts(pid).values())


class Agent:
    """`python3 -m ctguard run --policy P` for the lab (isolated, see _ISOLATE)."""

    def __init__(self, lab: Lab, ceiling: int, overrides: dict | None, profile: Path | None = None) -> None:
        self.lab = lab
        self.folder = lab.dir / "ctguard"
        self.policy = lab_policy(self.folder, ceiling, overrides)
        self.log = self.folder / "daemon.log"
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        for k in ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC", "PYTHONDONTWRITEBYTECODE"):
            env.pop(k, None)
        self._logf = open(self.log, "w")
        # --kill-child and PR_SET_PDEATHSIG: a lab killed mid-run takes its daemon with it (a daemon
        # orphaned here went on moving the global nf_conntrack_max under other tests' locks).
        cmd = ["unshare", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child=SIGTERM", sys.executable, "-c", _ISOLATE,
               str(self.folder / "netns-view"), *lab.names, "--", sys.executable,
               # cProfile writes its file when the daemon returns from SIGTERM (the main thread only).
               *(["-m", "cProfile", "-o", str(profile)] if profile else []),
               "-m", "ctguard", "run", "--policy", str(self.policy)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._logf, env=env, preexec_fn=_die_with_parent)
        self.pid = self._daemon_pid()
        self.metrics = self.folder / "metrics" / "ctguard.prom"
        if not wait_for(lambda: self.metrics.exists() or self.proc.poll() is not None, 30):
            self.stop()
            raise RuntimeError(f"ctguard took no sample within 30 s: {self.log.read_text()[-2000:]}")
        if self.proc.poll() is not None:
            self.stop()
            raise RuntimeError(f"ctguard exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")

    def _daemon_pid(self) -> int:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        for _ in range(1000):
            kids = path.read_text().split() if path.exists() else []
            if kids:
                return int(kids[0])
            time.sleep(0.01)
        raise RuntimeError("unshare did not start the daemon")

    def cpu(self) -> float:
        return sum(self.cpu_parts().values())

    def cpu_parts(self) -> dict[str, float]:
        try:
            return cpu_parts(self.pid)
        except OSError:
            return {"daemon": 0.0, "children": 0.0}

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(SRC)}
        return subprocess.run([sys.executable, "-m", "ctguard", *args, "--policy", str(self.policy)],
                              capture_output=True, text=True, env=env, timeout=timeout)

    def captures_done(self, timeout: float) -> None:
        """Wait (bounded) until the daemon has no child left (a capture or a trim)."""
        wait_for(lambda: not _descendants(self.pid), timeout, 0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGTERM)
            except (ProcessLookupError, AttributeError):
                self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._logf.close()

    def view(self, cpu_s: float, bumps: tuple[int, ...], timeouts_before: dict[str, str],
             capture_wait: float) -> AgentView:
        self.captures_done(capture_wait)
        st = self.ctl("status")
        headline = (st.stdout.strip().splitlines() or [""])[0]
        bundles = []
        lst = self.ctl("bundles", "list", "--json")
        try:
            items = json.loads(lst.stdout) if lst.returncode == 0 else []
        except json.JSONDecodeError:
            items = []
        if isinstance(items, dict):
            items = items.get("bundles", [])
        for b in items[:4]:
            bid = b.get("id") if isinstance(b, dict) else str(b)
            sh = self.ctl("bundles", "show", bid, "--json")
            try:
                js = json.loads(sh.stdout)
                bundles.append((bid, js.get("verdict", ""), tuple(f.get("id", "") for f in js.get("findings", []))))
            except json.JSONDecodeError:
                bundles.append((bid, f"(show failed: {sh.stderr.strip()[:200]})", ()))
        self.stop()
        changed = ()
        try:
            after = self.lab.timeouts(self.lab.gw)
            changed = tuple(f"{k}={after[k]} (was {v})" for k, v in timeouts_before.items() if after.get(k) != v)
        except subprocess.CalledProcessError:
            pass
        text = self.log.read_text(errors="replace")
        kinds: dict[str, int] = {}
        relief = []
        for line in text.splitlines():
            m = re.search(r"\[([a-z][a-z0-9-]*) MESSAGE_ID=", line)
            k = m.group(1) if m else "other"
            kinds[k] = kinds.get(k, 0) + 1
            if "relief" in line:
                relief.append(line.strip()[:300])
        return AgentView(cpu_s, bumps, tuple(sorted(kinds.items())), tuple(relief[:40]), headline,
                         tuple(bundles), changed, text[-3000:])


# ----------------------------------------------------------------------------- scenario runner

class _Sampler(threading.Thread):
    """The gateway's entry count and the global max every 50 ms."""

    def __init__(self, lab: Lab) -> None:
        super().__init__(daemon=True)
        self.lab = lab
        self.peak = 0
        self.maxes: list[int] = []
        self.series: list[tuple[float, int, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        t0 = time.monotonic()
        while not self._halt.is_set():
            try:
                c = self.lab.count()
                m = kernelenv.get_max()
            except (OSError, ValueError, IndexError):
                break
            self.peak = max(self.peak, c)
            if not self.maxes or self.maxes[-1] != m:
                self.maxes.append(m)
            self.series.append((round(time.monotonic() - t0, 2), c, m))
            self._halt.wait(0.05)

    def stop(self) -> None:
        self._halt.set()
        self.join(2)


class _LongLivedWatch(threading.Thread):
    """Looks the long-lived flow's gateway entry up by its exact tuple once a second."""

    def __init__(self, lab: Lab) -> None:
        super().__init__(daemon=True)
        self.lab = lab
        self.polls = self.cuts = 0
        self.min_left: int | None = None
        self.last_id: str | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            r = self.lab.exec(self.lab.gw, "conntrack", "-G", "-p", "udp", "-s", CLIENT_ADDR, "-d", SERVER_ADDR,
                              "--sport", str(VPN_PORT), "--dport", str(VPN_PORT), "-o", "id", check=False)
            self.polls += 1
            m = re.search(r"id=(\d+)", r.stdout)
            if not m:
                if self.last_id != "gone":
                    self.cuts += 1
                self.last_id = "gone"
            else:
                if self.last_id is not None and self.last_id != m.group(1):
                    self.cuts += 1 if self.last_id != "gone" else 0
                self.last_id = m.group(1)
                left = int(r.stdout.split()[2])
                self.min_left = left if self.min_left is None else min(self.min_left, left)
            self._halt.wait(1.0)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def _host_timeouts() -> dict[Path, str]:
    return {p: p.read_text() for p in NETFILTER.glob("nf_conntrack_*timeout*")}


@contextlib.contextmanager
def scenario(arm: str, table: int, ceiling: int, overrides: dict | None = None, hosts: int = 200,
             nat_pool: int = 4, keep: bool = False, profile: Path | None = None) -> Iterator["Run"]:
    """The lock, the kernel values saved, a fresh lab; yields a `Run` that starts the arm."""
    if arm not in ("none", "ctguard", "ideal"):
        raise ValueError(f"unknown arm {arm!r}")
    t0 = time.monotonic()
    with kernelenv.saved_kernel_values():
        lock_wait = time.monotonic() - t0
        host = _host_timeouts()
        try:
            with Lab(hosts=hosts, nat_pool=nat_pool, keep=keep) as lab:
                run = Run(lab, arm, table, ceiling, overrides)
                run.lock_wait = lock_wait
                run.profile = profile
                try:
                    yield run
                finally:
                    run.close()
        finally:
            for p, v in host.items():
                if p.read_text() != v:
                    p.write_text(v)


class Run:
    def __init__(self, lab: Lab, arm: str, table: int, ceiling: int, overrides: dict | None) -> None:
        self.lab, self.arm, self.table, self.ceiling, self.overrides = lab, arm, table, ceiling, overrides
        self.agent: Agent | None = None
        self.ll_proc: subprocess.Popen | None = None
        self.ll_watch: _LongLivedWatch | None = None
        self.ll_interval = 0.0
        self.profile: Path | None = None   # cProfile output of the daemon (the ctguard arm)
        self.cpu_split: dict[str, float] = {}

    def start_arm(self) -> None:
        """Set the table and start the agent; call after the servers are up (and warm)."""
        self.gw_timeouts = self.lab.timeouts(self.lab.gw)
        kernelenv.set_max(IDEAL if self.arm == "ideal" else self.table)
        if self.arm == "ctguard":
            self.agent = Agent(self.lab, self.ceiling, self.overrides, self.profile)

    def start_longlived(self, interval: float, duration: float) -> None:
        self.lab.start_echo()
        self.ll_interval = interval
        start_at = time.monotonic() + 0.3
        self.ll_proc = self.lab.py(self.lab.client, LONGLIVED,
                                   [CLIENT_ADDR, SERVER_ADDR, VPN_PORT, interval, duration, start_at], "longlived")
        time.sleep(3.6)    # two packets: the entry is a stream before the load begins
        self.ll_watch = _LongLivedWatch(self.lab)
        self.ll_watch.start()

    def measure(self, load) -> tuple[dict, KernelView, float]:
        """Run `load()` (it starts and waits for the traffic) with the sampler and counters."""
        before = self.lab.counters()
        start_max = kernelenv.get_max()
        sampler = _Sampler(self.lab)
        sampler.start()
        parts0 = self.agent.cpu_parts() if self.agent else {}
        try:
            res = load()
        finally:
            sampler.stop()
        parts = self.agent.cpu_parts() if self.agent else {}
        self.cpu_split = {k: round(parts[k] - parts0.get(k, 0.0), 2) for k in parts}
        cpu = sum(self.cpu_split.values())
        after = self.lab.counters()
        kv = KernelView(tuple((r, after[r] - before[r]) for r in after), sampler.peak, self.lab.count(),
                        start_max, kernelenv.get_max(), max(sampler.maxes or [start_max]))
        self.series = sampler.series
        return res, kv, cpu

    def finish_longlived(self) -> LongLivedView | None:
        if self.ll_proc is None:
            return None
        res = Lab.result(self.ll_proc, timeout=self.ll_interval + 30)
        self.ll_watch.stop()
        w = self.ll_watch
        return LongLivedView(self.ll_interval, res["sent"], res["answered"], w.polls, w.cuts, w.min_left,
                             max(0, len(res["sources"]) - 1))

    def agent_view(self, cpu: float, kv: KernelView, capture_wait: float = 15) -> AgentView | None:
        if self.agent is None:
            return None
        bumps = tuple(m for m in dict.fromkeys(x[2] for x in self.series) if m != self.table)
        v = self.agent.view(cpu, bumps, self.gw_timeouts, capture_wait)
        self.agent = None
        return dataclasses.replace(v, cpu_split=tuple(self.cpu_split.items()))

    def close(self) -> None:
        if self.ll_watch is not None:
            self.ll_watch.stop()
        if self.agent is not None:
            self.agent.stop()


# ----------------------------------------------------------------------------- wrk

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else float("nan")


def parse_wrk(out: str) -> UsersView:
    req = re.search(r"(\d+) requests in", out)
    completed = int(req.group(1)) if req else 0
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    connect, read, write, timeout = (int(x) for x in errs.groups()) if errs else (0, 0, 0, 0)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    bad = int(non2xx.group(1)) if non2xx else 0
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    return UsersView("http", completed + connect + read + write + timeout, completed - bad,
                     connect + read + write + bad, timeout,
                     _ms(p50.group(1)) if p50 else None, _ms(p99.group(1)) if p99 else None)


def _users(kind: str, r: dict) -> UsersView:
    return UsersView(kind, r["sent"], r["answered"], r["errors"], r["timeouts"], r["p50"], r["p99"])


def _wrk(lab: Lab, conns: int, rate: float, duration: float, threads: int = 2) -> subprocess.Popen:
    argv = ["wrk", "-t", str(threads), "-c", str(conns), "-d", f"{max(1, int(round(duration)))}s", "--latency", "--timeout", "5s",
            "-H", "Connection: close"]
    if rate > 0:
        lua = lab.dir / "delay.lua"
        lua.write_text(_DELAY_LUA.format(ms=max(1, int(round(1000 * conns / rate)))))
        argv += ["-s", str(lua)]
    return lab.spawn(lab.client, argv + [f"http://{SERVER_ADDR}/"], name="wrk", stdout=subprocess.PIPE)


def _probe(lab: Lab, duration: float, start_at: float, rate: float = 20, timeout: float = 5) -> subprocess.Popen:
    return lab.py(lab.client, HTTP_PROBE, [SERVER_ADDR, 80, rate, duration, timeout, start_at], "probe")


def _finish(run: Run, scenario_name: str, rate: float, duration: float, users: UsersView, kv: KernelView,
            cpu: float, probe: UsersView | None = None, others: tuple = (), extra: dict | None = None,
            capture_wait: float = 15) -> Outcome:
    ll = run.finish_longlived()
    agent = run.agent_view(cpu, kv, capture_wait)
    extra = {**(extra or {}), "lock_wait_s": round(run.lock_wait, 1)}
    return Outcome(scenario_name, run.arm, rate, duration, run.table, run.ceiling, users, kv, probe, others, ll,
                   agent, tuple(extra.items()))


# ----------------------------------------------------------------------------- scenarios

def flash_crowd(arm: str, rate: float = 0, duration: float = 20, table: int = 8192, ceiling: int = 1_048_576,
                connections: int = 200, overrides: dict | None = None, longlived: float | None = None,
                probe: bool = True, capture_wait: float = 15, keep: bool = False,
                profile: Path | None = None) -> Outcome:
    """nginx in the server, wrk in the client, a new TCP connection per request, through the NAT."""
    with scenario(arm, table, ceiling, overrides, keep=keep, profile=profile) as run:
        lab = run.lab
        lab.start_nginx()
        if longlived:
            run.start_longlived(longlived, duration + 3.6)
        run.start_arm()

        def load():
            start_at = time.monotonic() + 0.3
            pr = _probe(lab, duration, start_at) if probe else None
            w = _wrk(lab, connections, rate, duration)
            out, _ = w.communicate(timeout=duration + 60)
            (lab.dir / "wrk.out").write_text(out)
            return parse_wrk(out), (_users("http-probe", Lab.result(pr)) if pr else None)

        (users, pv), kv, cpu = run.measure(load)
        return _finish(run, "flash-crowd", rate, duration, users, kv, cpu, probe=pv, capture_wait=capture_wait)


def dns(arm: str, rate: float = 3000, duration: float = 20, table: int = 8192, ceiling: int = 1_048_576,
        local: bool = False, timeout: float = 2.0, overrides: dict | None = None, longlived: float | None = None,
        nat_pool: int = 4, clients: int = 2, capture_wait: float = 15, keep: bool = False,
        profile: Path | None = None) -> Outcome:
    """unbound answering a local zone, stub clients with a new source port per query; through the
    NAT to the server, or `local`: unbound in the gateway itself (its input path)."""
    with scenario(arm, table, ceiling, overrides, nat_pool=nat_pool, keep=keep, profile=profile) as run:
        lab = run.lab
        addr = GW_IN if local else SERVER_ADDR
        lab.start_unbound(lab.gw if local else lab.server, addr)
        if longlived:
            run.start_longlived(longlived, duration + 3.6)
        run.start_arm()
        addrs = ",".join(lab.hosts)

        def load():
            start_at = time.monotonic() + 0.5
            ps = [lab.py(lab.client, DNS_CLIENT, [addr, rate / clients, duration, timeout, addrs, start_at], f"dns{i}")
                  for i in range(clients)]
            rs = [Lab.result(p, duration + timeout + 60) for p in ps]
            return _merge_dns(rs)

        users, kv, cpu = run.measure(load)
        return _finish(run, "dns-local" if local else "dns-nat", rate, duration, users, kv, cpu,
                       capture_wait=capture_wait)


def _merge_dns(rs: list[dict]) -> UsersView:
    """Several stub processes: sums, and the percentiles of the slowest (a bound, not a merge)."""
    return UsersView("dns", sum(r["sent"] for r in rs), sum(r["answered"] for r in rs),
                     sum(r["errors"] for r in rs), sum(r["timeouts"] for r in rs),
                     max((r["p50"] for r in rs if r["p50"] is not None), default=None),
                     max((r["p99"] for r in rs if r["p99"] is not None), default=None))


def dead_upstream(arm: str, rate: float = 2000, duration: float = 20, table: int = 8192,
                  ceiling: int = 1_048_576, give_up: float = 3.0, web_rate: float = 500,
                  overrides: dict | None = None, longlived: float | None = None, capture_wait: float = 15,
                  keep: bool = False, profile: Path | None = None) -> Outcome:
    """Internal clients retrying a dead upstream through the NAT (SYN_SENT from many sources to one
    destination), beside users of a live web server (wrk paced at `web_rate` and the probe)."""
    with scenario(arm, table, ceiling, overrides, keep=keep, profile=profile) as run:
        lab = run.lab
        lab.start_nginx()
        if longlived:
            run.start_longlived(longlived, duration + 3.6)
        run.start_arm()
        extra: dict = {}

        def load():
            start_at = time.monotonic() + 0.3
            dead = lab.py(lab.client, DEAD_UPSTREAM,
                          [SERVER_ADDR, DEAD_PORT, rate, duration, give_up, ",".join(lab.hosts[1:]), start_at], "dead")
            pr = _probe(lab, duration, start_at)
            w = _wrk(lab, 50, web_rate, duration) if web_rate else None
            time.sleep(max(0.0, start_at + duration * 0.75 - time.monotonic()))
            extra.update(_shape(lab))
            out = w.communicate(timeout=duration + 60)[0] if w else ""
            d = Lab.result(dead, duration + 30)
            extra["dead_attempts"] = d["sent"]
            extra["dead_connected"] = d["connected"]
            return (parse_wrk(out) if w else None), _users("http-probe", Lab.result(pr))

        (users, pv), kv, cpu = run.measure(load)
        return _finish(run, "dead-upstream", rate, duration, users or pv, kv, cpu, probe=pv, extra=extra,
                       capture_wait=capture_wait)


def syn_flood(arm: str, rate: float = 5000, duration: float = 20, table: int = 8192, ceiling: int = 1_048_576,
              sources: int = 4096, web_rate: float = 500, overrides: dict | None = None,
              longlived: float | None = None, capture_wait: float = 15, keep: bool = False,
              profile: Path | None = None) -> Outcome:
    """Spoofed-source SYN flood (raw, from `sources` addresses) at nginx through the gateway,
    beside users of the same web server."""
    with scenario(arm, table, ceiling, overrides, keep=keep, profile=profile) as run:
        lab = run.lab
        lab.start_nginx()
        if longlived:
            run.start_longlived(longlived, duration + 3.6)
        run.start_arm()
        extra: dict = {}

        def load():
            start_at = time.monotonic() + 0.3
            fl = lab.py(lab.client, RAW_FLOOD, ["syn", SERVER_ADDR, 80, 1, rate, duration,
                                                f"{SPOOF_SYN_NET[0]}.{SPOOF_SYN_NET[1]}", sources, start_at], "synflood")
            pr = _probe(lab, duration, start_at)
            w = _wrk(lab, 50, web_rate, duration) if web_rate else None
            time.sleep(max(0.0, start_at + duration * 0.75 - time.monotonic()))
            extra.update(_shape(lab))
            out = w.communicate(timeout=duration + 60)[0] if w else ""
            f = Lab.result(fl, duration + 30)
            extra["flood_sent"] = f["sent"]
            extra["flood_rate"] = round(f["rate"])
            return (parse_wrk(out) if w else None), _users("http-probe", Lab.result(pr))

        (users, pv), kv, cpu = run.measure(load)
        return _finish(run, "syn-flood", rate, duration, users or pv, kv, cpu, probe=pv, extra=extra,
                       capture_wait=capture_wait)


def cgnat_mix(arm: str, rate: float = 5000, duration: float = 20, table: int = 8192, ceiling: int = 1_048_576,
              web_rate: float = 1000, dns_rate: float = 500, overrides: dict | None = None,
              longlived: float | None = None, capture_wait: float = 15, keep: bool = False,
              profile: Path | None = None) -> Outcome:
    """A CGNAT-like mix: `rate` unanswered UDP flows/s from many internal sources (P2P/QUIC
    probes to dropped ports), beside web users (wrk paced at `web_rate`) and DNS stubs."""
    with scenario(arm, table, ceiling, overrides, keep=keep, profile=profile) as run:
        lab = run.lab
        lab.start_nginx()
        lab.start_unbound()
        if longlived:
            run.start_longlived(longlived, duration + 3.6)
        run.start_arm()
        extra: dict = {}

        def load():
            start_at = time.monotonic() + 0.5
            base = ".".join(map(str, UNANSWERED_NET))
            fl = lab.py(lab.client, RAW_FLOOD, ["udp", SERVER_ADDR, 20000, 30000, rate, duration, base, 8192,
                                                start_at], "udpflood")
            dn = lab.py(lab.client, DNS_CLIENT, [SERVER_ADDR, dns_rate, duration, 2.0, ",".join(lab.hosts), start_at],
                        "dns")
            w = _wrk(lab, 100, web_rate, duration)
            time.sleep(max(0.0, start_at + duration * 0.75 - time.monotonic()))
            extra.update(_shape(lab))
            out = w.communicate(timeout=duration + 60)[0]
            f = Lab.result(fl, duration + 30)
            extra["flood_sent"] = f["sent"]
            return parse_wrk(out), _users("dns", Lab.result(dn, duration + 30))

        (users, dv), kv, cpu = run.measure(load)
        return _finish(run, "cgnat-mix", rate, duration, users, kv, cpu, others=(dv,), extra=extra,
                       capture_wait=capture_wait)


def udp_race(arm: str = "ideal", rounds: int = 20000, table: int = IDEAL) -> Outcome:
    """Parallel A and AAAA from one socket through the NAT, two threads on two CPUs per round.

    What it shows on this 2-core VM (kernel 6.18): see `Outcome.kernel.of("gateway")`:
    `clash_resolve` (clashres) counts the rounds where both packets created an entry at once and
    the kernel merged them (since 5.x UDP clashes are resolved, not dropped: the loser is
    attached to the winner's entry), `insert_failed` those it could not resolve (with NAT, when
    the two packets got different mappings). The users' view is `lost` answers.
    """
    with scenario(arm, table, IDEAL) as run:
        lab = run.lab
        lab.start_unbound()
        run.start_arm()

        def load():
            p = lab.py(lab.client, UDP_RACE, [SERVER_ADDR, rounds, CLIENT_ADDR], "race")
            return Lab.result(p, 600)

        r, kv, cpu = run.measure(load)
        users = UsersView("dns", r["sent"], r["answers"], r["errors"], r["lost"], None, None)
        return _finish(run, "udp-race", 0, 0, users, kv, cpu, extra={"rounds": rounds})


def _shape(lab: Lab) -> dict:
    """The gateway table's states and distinct original sources (a dump, taken once)."""
    r = lab.exec(lab.gw, "conntrack", "-L", check=False)
    states: dict[str, int] = {}
    sources: set[str] = set()
    dsts: dict[str, int] = {}
    for line in r.stdout.splitlines():
        f = line.split()
        if len(f) < 4:
            continue
        st = f[3] if f[0] == "tcp" else ("UNREPLIED" if "[UNREPLIED]" in line else "REPLIED") + "-" + f[0]
        states[st] = states.get(st, 0) + 1
        m = re.search(r"src=(\S+) dst=(\S+)", line)
        if m:
            sources.add(m.group(1))
            dsts[m.group(2)] = dsts.get(m.group(2), 0) + 1
    top = max(dsts.items(), key=lambda kv: kv[1]) if dsts else ("", 0)
    return {"states": dict(sorted(states.items(), key=lambda kv: -kv[1])), "sources": len(sources),
            "top_destination": top[0], "top_destination_entries": top[1], "entries_dumped": sum(states.values())}


def summary(o: Outcome) -> str:
    u, k = o.users, o.kernel
    s = (f"{o.scenario}/{o.arm}: {u.kind} {u.completed}/{u.attempted} done, {u.errors} err, {u.timeouts} timeouts, "
         f"p50 {u.p50_ms} p99 {u.p99_ms} ms | gw drop {k.of('gateway').drop} early {k.of('gateway').early_drop} "
         f"insert_failed {k.of('gateway').insert_failed} clashres {k.of('gateway').clash_resolve} "
         f"peak {k.peak_count} max {k.start_max}->{k.final_max}")
    if o.probe and o.probe is not u:
        s += f" | probe {o.probe.completed}/{o.probe.attempted} p99 {o.probe.p99_ms}"
    for x in o.others:
        s += f" | {x.kind} {x.completed}/{x.attempted} p99 {x.p99_ms}"
    if o.longlived:
        s += f" | longlived cuts {o.longlived.cuts} min_left {o.longlived.min_timeout_left}"
    if o.agent:
        split = ", ".join(f"{k} {v:.2f}" for k, v in o.agent.cpu_split)
        s += (f" | ctguard cpu {o.agent.cpu_s:.2f}s{f' ({split})' if split else ''} bumps {o.agent.bumps}"
              f" status {o.agent.status!r}")
    return s
