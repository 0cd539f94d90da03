"""The relief trim child: age the existing entries of one namespace as the new timeouts would have.

Lowering a timeout sysctl only affects entries created or refreshed afterwards (500
unreplied UDP entries made under a 600 s timeout still had 591 s left after the namespace's
timeout went to 5 s), so relief also shortens the entries already there over ctnetlink: each
entry gets what it would have left had the new value been in force when it was last refreshed
(plan_entry), and one idle longer than that is deleted -- a plain cap kept the lab's table full
for a whole emergency value after each step.

Only entries that were never answered, answered once and done, or are already closing are
touched: UDP held by nf_conntrack_udp_timeout (unanswered, or answered within its first 2 s:
a DNS or NTP exchange; never an ASSURED stream), half-open TCP (SYN_SENT, SYN_RECV) that is not
assured, TCP picked up mid-stream and never answered, LAST_ACK and TIME_WAIT; an entry whose
remaining time is already at or below the cap is left (a trim never lengthens, and never
touches what may have been made after the step). Bounded: at most --max-entries changed and
--budget seconds spent per pass. The dump is decoded by ctguard's own ctnetlink reader, the
update and delete requests are written by it too (update()).

Runs as `python3 -m ctguard.host.trim --netns-path P --timeout udp=5/30 ...` (a child of the
daemon, so a slow pass never holds the loop) and prints one JSON line.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import socket
import struct
import sys
import time

from ctguard.core.relief import TRIMMABLE
from ctguard.core.timeouts import classify
from ctguard.host import ctnetlink as ct
from ctguard.host import ctwire as wire
from ctguard.host import procs
from ctguard.host.netns import setns



def key_of(proto: int, status: int, tcp_state: int | None) -> str | None:
    """The relief timeout key an entry is held by (core.timeouts.classify, the kernel's own
    rules), if a trim may touch it: never an assured TCP connection nor a UDP stream."""
    key = classify(proto, tcp_state, status)
    if key not in TRIMMABLE:
        return None
    if key in ("tcp_syn_sent", "tcp_syn_recv") and status & wire.IPS_ASSURED:
        return None
    return key


def plan_entry(remaining: int, cap: int, previous: int) -> int | None:
    """An entry's new remaining timeout (0: delete it), or None to leave it.

    A cap alone left the table full for a whole emergency value after each step: every entry
    made under the old timeout lived on for `cap` more seconds (measured in the lab: 8,192 of
    8,192 held from 17 s to 27 s). An entry with more than `cap` left was last refreshed under
    the value in force before the step (`previous`; under the new value it would have at most
    `cap` left), so it has been idle previous - remaining seconds; it gets what it would have
    left had the new value been in force then: remaining - (previous - cap), and an entry idle
    longer than `cap` is deleted, since the kernel would have expired it already (an expired
    entry still counts against nf_conntrack_max until the garbage collector reaps it). An entry
    with `cap` or less left is never touched: it may be one made after the step (an unanswered
    query still waiting for its answer)."""
    if remaining <= cap:
        return None
    shift = max(0, previous - cap)
    return max(0, min(cap, remaining - shift))


def select(caps: dict[str, tuple[int, int]], limit: int, deadline: float) -> tuple[list[tuple], int, bool]:
    """Dump the table (ctguard.host.ctnetlink decodes it); return (entries to change, entries
    seen, cut short). `caps`: key -> (cap, the value in force before the step)."""
    sock = ct.open_ctnetlink(None)      # this process is in the namespace already (main)
    sock.settimeout(max(0.1, deadline - time.monotonic()))
    sock.send(ct.dump_request(1))
    buf = bytearray(ct.RECV_BUFFER)
    chosen: list[tuple] = []
    seen = 0
    try:
        while True:
            n = sock.recv_into(buf, ct.RECV_BUFFER)
            if n == 0:
                break
            for e in ct.iter_entries(buf, n):
                if e is None:
                    return chosen, seen, False
                seen += 1
                family, proto, src, dst, sport, dport, tcp_state, status, _mark, zone, timeout = e
                key = key_of(proto, status, tcp_state)
                cap = caps.get(key) if key else None
                if cap is None or timeout is None or sport is None or dport is None:
                    continue
                new = plan_entry(timeout, *cap)
                if new is not None:
                    chosen.append((family, proto, src, dst, sport, dport, zone, new))
            if len(chosen) >= limit or time.monotonic() >= deadline:
                return chosen[:limit], seen, True
    except socket.timeout:
        return chosen[:limit], seen, True
    finally:
        sock.close()
    return chosen, seen, False


BATCH = 256     # requests sent per write; the kernel answers each with an ack
_PORTS = struct.Struct("=HHB3xHH2sxxHH2sxx")     # CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT


def _nla(kind: int, payload: bytes) -> bytes:
    return wire.NLA_HEADER.pack(4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def request(family: int, proto: int, src: bytes, dst: bytes, sport: int, dport: int, zone: int, timeout: int,
            seq: int) -> bytes:
    """One ctnetlink request for the entry with this original tuple (and zone): an update of its
    CTA_TIMEOUT (IPCTNL_MSG_CT_NEW without NLM_F_CREATE, what `conntrack -U --timeout` sends), or
    with `timeout` 0 its deletion (IPCTNL_MSG_CT_DELETE, what `conntrack -D` sends)."""
    v6 = family == 6
    ip = (_nla(wire.CTA_IP_V6_SRC if v6 else wire.CTA_IP_V4_SRC, src)
          + _nla(wire.CTA_IP_V6_DST if v6 else wire.CTA_IP_V4_DST, dst))
    ports = _PORTS.pack(5, wire.CTA_PROTO_NUM, proto, 6, wire.CTA_PROTO_SRC_PORT, sport.to_bytes(2, "big"),
                        6, wire.CTA_PROTO_DST_PORT, dport.to_bytes(2, "big"))
    body = _nla(wire.CTA_TUPLE_ORIG | wire.NLA_F_NESTED,
                _nla(wire.CTA_TUPLE_IP | wire.NLA_F_NESTED, ip) + _nla(wire.CTA_TUPLE_PROTO | wire.NLA_F_NESTED, ports))
    if zone:
        body += _nla(wire.CTA_ZONE, zone.to_bytes(2, "big"))
    kind = wire.IPCTNL_MSG_CT_NEW if timeout else wire.IPCTNL_MSG_CT_DELETE
    if timeout:
        body += _nla(wire.CTA_TIMEOUT, timeout.to_bytes(4, "big"))
    af = socket.AF_INET6 if v6 else socket.AF_INET
    return (wire.NLMSG_HEADER.pack(20 + len(body), (wire.NFNL_SUBSYS_CTNETLINK << 8) | kind,
                                   wire.NLM_F_REQUEST | wire.NLM_F_ACK, seq, 0)
            + struct.pack("=BBH", af, 0, 0) + body)


def update(chosen: list[tuple], deadline: float) -> tuple[int, int, int, int, bool]:
    """Set each chosen entry's CTA_TIMEOUT, or delete it (0); (changed, deleted, gone, failed, cut short).

    The requests are written here with struct, BATCH at a time on one socket, the acks counted
    after. Measured in the lab's gateway (kernel 6.18, 2 shared cores): pyroute2's nfct_msg
    encoding cost ~0.23 ms an entry (4,300/s: a 2 s pass was cut short at 5,716 of 7,703
    entries), most of it the library building the message; these few lines cost ~0.01 ms
    (bench/README.md, "Relief: users served past the ceiling").
    """
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, wire.NETLINK_NETFILTER)
    sock.bind((0, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.settimeout(5.0)
    changed = deleted = gone = failed = 0
    seq = 0
    try:
        for first in range(0, len(chosen), BATCH):
            if time.monotonic() >= deadline:
                return changed, deleted, gone, failed, True
            part = chosen[first:first + BATCH]
            batch = []
            for family, proto, src, dst, sport, dport, zone, new in part:
                seq += 1
                batch.append(request(family, proto, src, dst, sport, dport, zone, new, seq))
            sock.send(b"".join(batch))
            acked = 0
            while acked < len(batch):
                data = sock.recv(1 << 20)
                off = 0
                while off + 16 <= len(data):
                    length, kind, _flags, got_seq, _pid = wire.NLMSG_HEADER.unpack_from(data, off)
                    if length < 16:
                        break
                    if kind == wire.NLMSG_ERROR:
                        (code,) = wire.ERRNO.unpack_from(data, off + 16)
                        acked += 1
                        i = got_seq - (seq - len(part) + 1)
                        if code == 0:
                            if 0 <= i < len(part) and part[i][-1] == 0:
                                deleted += 1
                            else:
                                changed += 1
                        elif -code == errno.ENOENT:
                            gone += 1       # expired or deleted since the dump
                        else:
                            failed += 1
                    off += (length + 3) & ~3
    finally:
        sock.close()
    return changed, deleted, gone, failed, False


def parse_caps(items: list[str]) -> dict[str, tuple[int, int]]:
    """`KEY=CAP` or `KEY=CAP/PREVIOUS` (the value in force before the step; without it the cap
    alone, as a periodic pass between steps applies it) -> {key: (cap, previous)}."""
    caps = {}
    for item in items:
        k, _, v = item.partition("=")
        cap, _, prev = v.partition("/")
        caps[k] = (int(cap), int(prev) if prev else int(cap))
    return caps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ctguard.host.trim")
    ap.add_argument("--netns-path", default="")
    ap.add_argument("--timeout", action="append", default=[], help="KEY=SECONDS[/PREVIOUS]")
    ap.add_argument("--max-entries", type=int, default=50_000)
    ap.add_argument("--budget", type=float, default=2.0)
    args = ap.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget
    caps = parse_caps(args.timeout)
    # Behind the traffic: a trim pass is bounded, and late is better than in the way. A refusal
    # (an older unit's system-call filter) costs priority only, never the trim.
    procs.to_background(5)
    try:
        if args.netns_path:
            fd = os.open(args.netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns(fd)       # this child is single-threaded: the whole process moves
            finally:
                os.close(fd)
        chosen, seen, cut = select(caps, args.max_entries, deadline)
        changed, deleted, gone, failed, cut2 = update(chosen, deadline)
    except OSError as exc:
        print(json.dumps({"error": f"{exc}"}))
        return 1
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seen": seen, "matched": len(chosen), "changed": changed, "deleted": deleted, "gone": gone, "failed": failed,
                      "cut_short": cut or cut2, "seconds": round(time.monotonic() - start, 3), "max_rss_kb": rss_kb}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
