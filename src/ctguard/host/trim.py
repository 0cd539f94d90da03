"""The relief trim child: cap the remaining timeout of existing entries in one namespace.

Lowering a timeout sysctl only affects entries created or refreshed afterwards (500
unreplied UDP entries made under a 600 s timeout still had 591 s left after the namespace's
timeout went to 5 s), so relief also shortens the entries already there: an update of each
entry's CTA_TIMEOUT over ctnetlink, what `conntrack -U --timeout N` does, through pyroute2's
conntrack socket (NFCTSocket.entry("set", tuple_orig=..., timeout=N); present in pyroute2
0.7.2, Debian 12's, and later).

Only entries that were never answered, answered once and done, or are already closing are
touched: UDP held by nf_conntrack_udp_timeout (unanswered, or answered within its first 2 s:
a DNS or NTP exchange; never an ASSURED stream), half-open TCP (SYN_SENT, SYN_RECV) that is not
assured, TCP picked up mid-stream and never answered, LAST_ACK and TIME_WAIT; an entry whose
remaining time is already at or below the cap is left (a cap never lengthens). Bounded:
at most --max-entries changed and --budget seconds spent per pass. The dump is decoded by
ctguard's own ctnetlink reader (pyroute2's generic parser reads ~15,000 entries/s here).

Runs as `python3 -m ctguard.host.trim --netns-path P --timeout udp=10 ...` (a child of the
daemon, so pyroute2's ~20 MB never lands in the daemon) and prints one JSON line.
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
from ctguard.host import procs
from ctguard.host.netns import setns

NLM_F_ACK = 0x4
_ERRNO = struct.Struct("=i")


def key_of(proto: int, status: int, tcp_state: int | None) -> str | None:
    """The relief timeout key an entry is held by (core.timeouts.classify, the kernel's own
    rules), if a trim may touch it: never an assured TCP connection nor a UDP stream."""
    key = classify(proto, tcp_state, status)
    if key not in TRIMMABLE:
        return None
    if key in ("tcp_syn_sent", "tcp_syn_recv") and status & ct.IPS_ASSURED:
        return None
    return key


def select(caps: dict[str, int], limit: int, deadline: float) -> tuple[list[tuple], int, bool]:
    """Dump the table (ctguard.host.ctnetlink decodes it); return (entries to cap, entries seen, cut short)."""
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
                family, proto, src, dst, sport, dport, tcp_state, status, _mark, _zone, timeout = e
                key = key_of(proto, status, tcp_state)
                cap = caps.get(key) if key else None
                if cap is None or timeout is None or timeout <= cap:
                    continue
                chosen.append((family, proto, src, dst, sport, dport, cap))
            if len(chosen) >= limit or time.monotonic() >= deadline:
                return chosen[:limit], seen, True
    except socket.timeout:
        return chosen[:limit], seen, True
    finally:
        sock.close()
    return chosen, seen, False


BATCH = 128     # update requests sent per write; the kernel answers each with an ack


def update(chosen: list[tuple], deadline: float) -> tuple[int, int, int, bool]:
    """Set each chosen entry's CTA_TIMEOUT; (changed, gone, failed, cut short).

    Each request is pyroute2's own conntrack message (nfct_msg with CTA_TUPLE_ORIG and
    CTA_TIMEOUT, IPCTNL_MSG_CT_NEW without NLM_F_CREATE: an update, as NFCTSocket.entry("set")
    sends it). They go out BATCH at a time on one socket and the acks are counted after,
    instead of one round trip each: NFCTSocket.entry() measured 0.59 ms per entry here
    (1,700/s), a batch ~0.23 ms (4,300/s), most of it pyroute2 encoding the message.
    """
    # Here, not at the top: pyroute2 takes ~210 ms and ~20 MB to import (python3 -X importtime),
    # paid only by a trim that has entries to change.
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple, nfct_msg

    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, ct.NETLINK_NETFILTER)
    sock.bind((0, 0))
    sock.settimeout(5.0)
    changed = gone = failed = 0
    seq = 0
    try:
        for first in range(0, len(chosen), BATCH):
            if time.monotonic() >= deadline:
                return changed, gone, failed, True
            batch = []
            for family, proto, src, dst, sport, dport, cap in chosen[first:first + BATCH]:
                af = socket.AF_INET6 if family == 6 else socket.AF_INET
                tup = NFCTAttrTuple(family=af, saddr=socket.inet_ntop(af, src), daddr=socket.inet_ntop(af, dst),
                                    proto=proto, sport=sport, dport=dport)
                msg = nfct_msg.create_from(tuple_orig=tup, timeout=cap)
                msg["nfgen_family"] = af
                seq += 1
                msg["header"]["type"] = (ct.NFNL_SUBSYS_CTNETLINK << 8) | ct.IPCTNL_MSG_CT_NEW
                msg["header"]["flags"] = ct.NLM_F_REQUEST | NLM_F_ACK
                msg["header"]["sequence_number"] = seq
                msg.encode()
                batch.append(bytes(msg.data))
            sock.send(b"".join(batch))
            acked = 0
            while acked < len(batch):
                data = sock.recv(1 << 20)
                off = 0
                while off + 16 <= len(data):
                    length, kind = ct.NLMSG_HEADER.unpack_from(data, off)[:2]
                    if length < 16:
                        break
                    if kind == ct.NLMSG_ERROR:
                        (code,) = _ERRNO.unpack_from(data, off + 16)
                        acked += 1
                        if code == 0:
                            changed += 1
                        elif -code == errno.ENOENT:
                            gone += 1       # expired or deleted since the dump
                        else:
                            failed += 1
                    off += (length + 3) & ~3
    finally:
        sock.close()
    return changed, gone, failed, False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ctguard.host.trim")
    ap.add_argument("--netns-path", default="")
    ap.add_argument("--timeout", action="append", default=[], help="KEY=SECONDS")
    ap.add_argument("--max-entries", type=int, default=50_000)
    ap.add_argument("--budget", type=float, default=2.0)
    args = ap.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget
    caps = {}
    for item in args.timeout:
        k, _, v = item.partition("=")
        caps[k] = int(v)
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
        changed, gone, failed, cut2 = update(chosen, deadline)
    except OSError as exc:
        print(json.dumps({"error": f"{exc}"}))
        return 1
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seen": seen, "matched": len(chosen), "changed": changed, "gone": gone, "failed": failed,
                      "cut_short": cut or cut2, "seconds": round(time.monotonic() - start, 3), "max_rss_kb": rss_kb}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
