"""Dump a namespace's conntrack table over ctnetlink and aggregate it while it streams.

Only the attributes the evidence needs are decoded (original tuple, status, TCP state, mark,
zone); everything else is skipped by length. Nothing per entry is kept: exact totals go to small
dictionaries keyed by protocol / state, and the unbounded dimensions (sources, destinations,
destination ports, marks, zones) go to Misra-Gries summaries of fixed size (core.topk).

Two decoders, one result. The general one (`iter_entries`) walks each message's attributes in
the interpreter; it reads the first batch of every dump, any batch holding a message of a shape
not seen before, and relief's trim. The batches after that are read whole by the message shapes
the general one learned (`ctshapes`: one regular expression per shape, counted with
`collections.Counter`, both in C). Unit and real-kernel tests hold the two to the same result.

Why hand-written at all: pyroute2's generic message parser (NFCTSocket.dump(), which builds an
nla object tree per entry) measured 14,000-16,000 entries/s on the 2-vCPU test VM, so a
262,144-entry table would take ~17 s, longer than the whole default budget. The figures of this
module against the shell playbook's three `conntrack -L | awk | sort | uniq -c` pipelines are in
bench/capture.md.
"""

from __future__ import annotations

import errno
import os
import queue
import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from ctguard.host.netns import run_in_netns
from ctguard.core.topk import Frequent, HeavyHitter
from ctguard.host.ctshapes import Shapes
from ctguard.host.ctwire import (
    BE16 as _BE16, BE32 as _BE32, CT_NEW_TYPE, CTA_IP_V4_DST, CTA_IP_V4_SRC, CTA_IP_V6_DST, CTA_IP_V6_SRC,
    CTA_MARK, CTA_PROTO_DST_PORT, CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTOINFO, CTA_PROTOINFO_TCP,
    CTA_PROTOINFO_TCP_STATE, CTA_STATUS, CTA_TIMEOUT, CTA_TUPLE_IP, CTA_TUPLE_ORIG, CTA_TUPLE_PROTO, CTA_ZONE,
    DONE_HEAD, ERRNO as _ERRNO, IPCTNL_MSG_CT_GET, IPS_ASSURED, IPS_SEEN_REPLY, NETLINK_NETFILTER,
    NFNL_SUBSYS_CTNETLINK, NLA_HEADER as _NLA, NLA_TYPE_MASK, NLM_F_DUMP, NLM_F_REQUEST, NLMSG_DONE,
    NLMSG_ERROR, NLMSG_HEADER as _HDR,
)

PROTO_NAMES = {1: "icmp", 2: "igmp", 6: "tcp", 17: "udp", 33: "dccp", 47: "gre", 58: "icmpv6", 132: "sctp", 136: "udplite"}
# Protocols whose tuple carries ports (others have none or ICMP ids).
PORT_PROTOS = frozenset({6, 17, 33, 132, 136})
# enum tcp_conntrack, as `conntrack -L` names them.
TCP_STATES = (
    "NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
    "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2",
)

# The usual IPv4 original tuple, attribute headers included: IP nest {src, dst}, PROTO nest
# {num, sport, dport}. Checked field by field before it is trusted; anything else takes the
# general path.
_V4_TUPLE = struct.Struct("=HH HH4s HH4s HH HHB3x HH2s2x HHH2x")

# The kernel fills at most ~32 KiB per dump batch (SKB_WITH_OVERHEAD(32768)); 8x headroom, and
# a batch that would still not fit is reported (MSG_TRUNC), never silently cut.
RECV_BUFFER = 256 << 10


@dataclass(frozen=True)
class Entry:
    """One decoded conntrack entry (only what the evidence uses)."""

    family: int  # 4 or 6
    proto: int
    src: bytes
    dst: bytes
    sport: int | None
    dport: int | None
    tcp_state: int | None
    status: int
    mark: int
    zone: int
    timeout: int | None = field(default=None, compare=False)   # seconds left (relief's trim reads it)


def iter_entries(buf: memoryview | bytes, length: int | None = None) -> Iterator[tuple]:
    """Yield (family, proto, src, dst, sport, dport, tcp_state, status, mark, zone, timeout) per entry.

    `buf` holds whole netlink messages as returned by one recv. Raises OSError on NLMSG_ERROR,
    StopIteration semantics: a NLMSG_DONE ends the iteration and yields the sentinel `None`.
    """
    end_all = len(buf) if length is None else length
    off = 0
    hdr_from = _HDR.unpack_from
    nla_from = _NLA.unpack_from
    be32_from = _BE32.unpack_from
    be16_from = _BE16.unpack_from
    v4_from = _V4_TUPLE.unpack_from
    while off + 16 <= end_all:
        mlen, mtype, _flags, _seq, _pid = hdr_from(buf, off)
        if mlen < 16:
            raise OSError(errno.EPROTO, f"malformed netlink message (length {mlen})")
        if mtype == NLMSG_DONE:
            yield None  # type: ignore[misc]
            return
        if mtype == NLMSG_ERROR:
            (code,) = _ERRNO.unpack_from(buf, off + 16)
            if code:
                raise OSError(-code, f"conntrack dump refused by the kernel: {os.strerror(-code)}")
            off += (mlen + 3) & ~3
            continue
        if mtype != CT_NEW_TYPE:
            off += (mlen + 3) & ~3
            continue
        end = off + mlen
        family = buf[off + 16]
        a = off + 20
        proto = 0
        src = dst = b""
        sport = dport = tcp_state = None
        status = mark = zone = 0
        timeout = None
        while a + 4 <= end:
            alen, atype = nla_from(buf, a)
            if alen < 4:
                break
            t = atype & NLA_TYPE_MASK
            if t == CTA_TUPLE_ORIG:
                p = a + 4
                fast = v4_from(buf, p) if alen >= 52 and p + 48 <= end else None
                if (
                    fast is not None
                    and fast[0] == 20 and fast[1] & NLA_TYPE_MASK == CTA_TUPLE_IP
                    and fast[2] == 8 and fast[3] == CTA_IP_V4_SRC
                    and fast[5] == 8 and fast[6] == CTA_IP_V4_DST
                    and fast[8] == 28 and fast[9] & NLA_TYPE_MASK == CTA_TUPLE_PROTO
                    and fast[10] == 5 and fast[11] == CTA_PROTO_NUM
                    and fast[13] == 6 and fast[14] == CTA_PROTO_SRC_PORT
                    and fast[16] == 6 and fast[17] == CTA_PROTO_DST_PORT
                ):
                    src, dst, proto = bytes(fast[4]), bytes(fast[7]), fast[12]
                    sport = (buf[p + 36] << 8) | buf[p + 37]
                    dport = (buf[p + 44] << 8) | buf[p + 45]
                else:
                    proto, src, dst, sport, dport = _decode_tuple(buf, p, a + alen)
            elif t == CTA_STATUS:
                (status,) = be32_from(buf, a + 4)
            elif t == CTA_PROTOINFO:
                tcp_state = _decode_tcp_state(buf, a + 4, a + alen)
            elif t == CTA_TIMEOUT:
                (timeout,) = be32_from(buf, a + 4)
            elif t == CTA_MARK:
                (mark,) = be32_from(buf, a + 4)
            elif t == CTA_ZONE:
                (zone,) = be16_from(buf, a + 4)
            a += (alen + 3) & ~3
        yield (6 if family == socket.AF_INET6 else 4, proto, src, dst, sport, dport, tcp_state, status, mark, zone,
               timeout)
        off += (mlen + 3) & ~3


def _decode_tuple(buf, a: int, end: int) -> tuple[int, bytes, bytes, int | None, int | None]:
    proto, src, dst, sport, dport = 0, b"", b"", None, None
    while a + 4 <= end:
        alen, atype = _NLA.unpack_from(buf, a)
        if alen < 4:
            break
        t = atype & NLA_TYPE_MASK
        if t == CTA_TUPLE_IP:
            b, bend = a + 4, a + alen
            while b + 4 <= bend:
                blen, btype = _NLA.unpack_from(buf, b)
                if blen < 4:
                    break
                bt = btype & NLA_TYPE_MASK
                if bt in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    src = bytes(buf[b + 4 : b + blen])
                elif bt in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    dst = bytes(buf[b + 4 : b + blen])
                b += (blen + 3) & ~3
        elif t == CTA_TUPLE_PROTO:
            b, bend = a + 4, a + alen
            while b + 4 <= bend:
                blen, btype = _NLA.unpack_from(buf, b)
                if blen < 4:
                    break
                bt = btype & NLA_TYPE_MASK
                if bt == CTA_PROTO_NUM:
                    proto = buf[b + 4]
                elif bt == CTA_PROTO_SRC_PORT:
                    (sport,) = _BE16.unpack_from(buf, b + 4)
                elif bt == CTA_PROTO_DST_PORT:
                    (dport,) = _BE16.unpack_from(buf, b + 4)
                b += (blen + 3) & ~3
        a += (alen + 3) & ~3
    return proto, src, dst, sport, dport


def _decode_tcp_state(buf, a: int, end: int) -> int | None:
    while a + 4 <= end:
        alen, atype = _NLA.unpack_from(buf, a)
        if alen < 4:
            break
        if atype & NLA_TYPE_MASK == CTA_PROTOINFO_TCP:
            b, bend = a + 4, a + alen
            while b + 4 <= bend:
                blen, btype = _NLA.unpack_from(buf, b)
                if blen < 4:
                    break
                if btype & NLA_TYPE_MASK == CTA_PROTOINFO_TCP_STATE:
                    return buf[b + 4]
                b += (blen + 3) & ~3
        a += (alen + 3) & ~3
    return None


def format_addr(raw: bytes) -> str:
    if len(raw) == 4:
        return str(IPv4Address(raw))
    if len(raw) == 16:
        return str(IPv6Address(raw))
    return raw.hex() or "?"


def proto_name(num: int) -> str:
    return PROTO_NAMES.get(num, str(num))


def tcp_state_name(num: int | None) -> str:
    if num is None:
        return "UNKNOWN"
    return TCP_STATES[num] if num < len(TCP_STATES) else str(num)


@dataclass(frozen=True)
class Top:
    """A heavy-hitter summary ready for the manifest: rows plus the bound that qualifies them."""

    rows: tuple[HeavyHitter, ...]
    exact: bool
    capacity: int
    tracked: int  # distinct keys seen: exact while `exact`, else at least this many


@dataclass(frozen=True)
class TableBreakdown:
    entries: int  # entries seen (all of them unless cut_short)
    expected: int | None  # nf_conntrack_count when the dump started, for "how far it got"
    cut_short: bool
    seconds: float
    by_family: dict[str, int]
    by_proto: dict[str, int]
    by_tcp_state: dict[str, int]
    unreplied: int
    assured: int
    top_sources: Top
    top_destinations: Top
    top_dports: Top  # keys are "proto/port"
    marks: Top  # only entries with a mark set
    zones: Top  # only entries in a zone other than 0
    interrupted: bool = False  # the kernel flagged the dump as inconsistent (table changed meanwhile)
    notes: tuple[str, ...] = field(default_factory=tuple)
    # For relief's classes (core.timeouts.classes): UDP entries that are ASSURED (streams), and TCP
    # entries ESTABLISHED but never answered (picked up mid-stream: held by tcp_unacknowledged).
    udp_assured: int = 0
    tcp_unreplied_established: int = 0


def _present(column: Sequence[bytes]) -> Counter[bytes]:
    """The values of a column counted, without the b"" of entries whose shape has none."""
    counts = Counter(column)
    counts.pop(b"", None)
    return counts


class Aggregator:
    """Exact totals for the small dimensions, Misra-Gries summaries for the unbounded ones.

    Batches go through the learned message shapes (`ctshapes`, decoded and counted in C) and,
    when a batch is not wholly made of known shapes, through the general decoder, which teaches
    the shapes it meets.
    """

    def __init__(self, top: int = 20, capacity: int | None = None) -> None:
        self.top = top
        cap = capacity if capacity is not None else max(4096, 16 * top)
        self.entries = 0
        self.by_family: dict[int, int] = {}
        self.by_proto: dict[int, int] = {}
        self.by_tcp_state: dict[int | None, int] = {}
        self.unreplied = 0
        self.assured = 0
        self.udp_assured = 0
        self.tcp_unreplied_established = 0
        self.interrupted = False
        self.sources: Frequent[bytes] = Frequent(cap)
        self.destinations: Frequent[bytes] = Frequent(cap)
        self.dports: Frequent[int] = Frequent(cap)
        self.marks: Frequent[int] = Frequent(1024)
        self.zones: Frequent[int] = Frequent(1024)
        self.shapes = Shapes()
        self._batches = 0

    def feed_batch(self, buf: memoryview | bytes, n: int) -> bool:
        """Consume one recv's worth of messages; True when the end-of-dump marker was met."""
        batch = self.shapes.read(buf, n)
        self._batches += 1
        if batch is None:
            # A table of one batch is done before shapes would pay for their compiling.
            if self.shapes.study(buf, n, learn=self._batches > 1):
                self.interrupted = True
            return self.feed(iter_entries(buf, n))
        self.interrupted = self.interrupted or batch.interrupted
        for family, k in batch.families.items():
            key = 6 if family == socket.AF_INET6 else 4
            self.by_family[key] = self.by_family.get(key, 0) + k
        by_proto, by_state = self.by_proto, self.by_tcp_state
        for kind, k in Counter(batch.kinds).items():
            if not kind:
                continue
            p, st = kind[0], int.from_bytes(kind[-4:], "big")
            self.entries += k
            by_proto[p] = by_proto.get(p, 0) + k
            if p == 6:
                s = kind[1] if len(kind) == 6 else None
                by_state[s] = by_state.get(s, 0) + k
                if s == 3 and not st & IPS_SEEN_REPLY:
                    self.tcp_unreplied_established += k
            if not st & IPS_SEEN_REPLY:
                self.unreplied += k
            if st & IPS_ASSURED:
                self.assured += k
                if p == 17:
                    self.udp_assured += k
        self.sources.update(_present(batch.sources))
        self.destinations.update(_present(batch.destinations))
        ports: dict[int, int] = {}
        for key, k in _present(batch.ports).items():
            if key[0] in PORT_PROTOS:
                port = (key[0] << 16) | (key[1] << 8) | key[2]
                ports[port] = ports.get(port, 0) + k
        self.dports.update(ports)
        for column, summary in ((batch.marks, self.marks), (batch.zones, self.zones)):
            if len(column) > column.count(b"") + column.count(b"\0\0\0\0") + column.count(b"\0\0"):
                summary.update({int.from_bytes(v, "big"): k for v, k in _present(column).items() if any(v)})
        return batch.done

    def feed(self, entries: Iterator[tuple]) -> bool:
        """Consume decoded entries (the general path); True when the end-of-dump marker was met."""
        by_family, by_proto, by_state = self.by_family, self.by_proto, self.by_tcp_state
        srcs: dict[bytes, int] = {}
        dsts: dict[bytes, int] = {}
        ports: dict[int, int] = {}
        marks: dict[int, int] = {}
        zones: dict[int, int] = {}
        src_get, dst_get = srcs.get, dsts.get
        n = unreplied = assured = udp_assured = loose = 0
        done = False
        for e in entries:
            if e is None:
                done = True
                break
            family, proto, src, dst, _sport, dport, tcp_state, status, mark, zone, _timeout = e
            n += 1
            by_family[family] = by_family.get(family, 0) + 1
            by_proto[proto] = by_proto.get(proto, 0) + 1
            if proto == 6:
                by_state[tcp_state] = by_state.get(tcp_state, 0) + 1
                if tcp_state == 3 and not status & IPS_SEEN_REPLY:
                    loose += 1
            if not status & IPS_SEEN_REPLY:
                unreplied += 1
            if status & IPS_ASSURED:
                assured += 1
                if proto == 17:
                    udp_assured += 1
            srcs[src] = src_get(src, 0) + 1
            dsts[dst] = dst_get(dst, 0) + 1
            if dport is not None and proto in PORT_PROTOS:
                key = (proto << 16) | dport
                ports[key] = ports.get(key, 0) + 1
            if mark:
                marks[mark] = marks.get(mark, 0) + 1
            if zone:
                zones[zone] = zones.get(zone, 0) + 1
        self.sources.update(srcs)
        self.destinations.update(dsts)
        self.dports.update(ports)
        self.marks.update(marks)
        self.zones.update(zones)
        self.entries += n
        self.unreplied += unreplied
        self.assured += assured
        self.udp_assured += udp_assured
        self.tcp_unreplied_established += loose
        return done

    def result(self, *, cut_short: bool, seconds: float, expected: int | None, interrupted: bool = False,
               notes: tuple[str, ...] = ()) -> TableBreakdown:
        def top_of(ss: Frequent, fmt: Callable[[object], str], n: int) -> Top:
            rows = tuple(HeavyHitter(fmt(h.key), h.count, h.error) for h in ss.top(n))
            return Top(rows, ss.exact, ss.capacity, ss.tracked)

        def port_key(k: object) -> str:
            k = int(k)  # type: ignore[arg-type]
            return f"{proto_name(k >> 16)}/{k & 0xFFFF}"

        return TableBreakdown(
            entries=self.entries,
            expected=expected,
            cut_short=cut_short,
            seconds=seconds,
            by_family={f"ipv{k}": v for k, v in sorted(self.by_family.items())},
            by_proto={proto_name(k): v for k, v in sorted(self.by_proto.items(), key=lambda kv: -kv[1])},
            by_tcp_state={tcp_state_name(k): v for k, v in sorted(self.by_tcp_state.items(), key=lambda kv: -kv[1])},
            unreplied=self.unreplied,
            assured=self.assured,
            top_sources=top_of(self.sources, format_addr, self.top),  # type: ignore[arg-type]
            top_destinations=top_of(self.destinations, format_addr, self.top),  # type: ignore[arg-type]
            top_dports=top_of(self.dports, port_key, self.top),
            marks=top_of(self.marks, lambda k: f"0x{int(k):x}", self.top),  # type: ignore[arg-type]
            zones=top_of(self.zones, str, self.top),
            interrupted=interrupted,
            notes=notes,
            udp_assured=self.udp_assured,
            tcp_unreplied_established=self.tcp_unreplied_established,
        )


def dump_request(seq: int) -> bytes:
    """The request for a dump of the whole table."""
    # nfgenmsg family AF_UNSPEC: every family (conntrack -L shows only IPv4 unless told).
    return (_HDR.pack(20, (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
            + struct.pack("=BBH", socket.AF_UNSPEC, 0, 0))


def open_ctnetlink(netns_path: str | None) -> socket.socket:
    """A NETLINK_NETFILTER socket bound to the namespace at `netns_path` (None: ours)."""

    def make() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
        except BaseException:
            sock.close()
            raise
        return sock

    return run_in_netns(netns_path, make)


def ends_dump(buf: bytearray | bytes, n: int) -> bool:
    """True when this batch ends the dump: an error or NLMSG_DONE (the last message of the last
    batch: netlink_dump() in net/netlink/af_netlink.c puts it after the final entries, in the same
    skb when it fits, and sends nothing after it)."""
    if n < 16:
        return True
    length, kind = _HDR.unpack_from(buf, 0)[:2]
    if kind in (NLMSG_DONE, NLMSG_ERROR) or length < 16:
        return True
    if n < 20 or buf[n - 20 : n - 14] != DONE_HEAD:
        return False
    # What looks like NLMSG_DONE at the tail is confirmed at a message boundary (a walk, once a dump).
    off = 0
    while off + 16 <= n:
        length, kind = _HDR.unpack_from(buf, off)[:2]
        if kind in (NLMSG_DONE, NLMSG_ERROR) or length < 16:
            return True
        off += (length + 3) & ~3
    return False


class _Reader(threading.Thread):
    """Receives the dump into a small ring of buffers while the caller decodes.

    recv() releases the GIL, so the kernel's share of the dump (filling each 32 KiB batch,
    about a quarter of the time) overlaps with decoding on another CPU. The queue is bounded,
    so the memory is the ring (QUEUE + 2 buffers), never the table.
    """

    QUEUE = 4

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(name="ctguard-ctnetlink", daemon=True)
        self.sock = sock
        self.ring = [bytearray(RECV_BUFFER) for _ in range(self.QUEUE + 2)]
        self.batches: queue.Queue[tuple[int, int] | BaseException | None] = queue.Queue(self.QUEUE)
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            i = 0
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            while not self.stop.is_set():
                # Mid-dump a recv never waits (the kernel fills the next batch inside it); the
                # poll only matters if the end was missed here, so the decoder's stop is seen.
                if not poller.poll(250):
                    continue
                slot = i % len(self.ring)
                buf = self.ring[slot]
                n = self.sock.recv_into(buf, RECV_BUFFER, socket.MSG_TRUNC)
                if n > RECV_BUFFER:
                    raise OSError(errno.EMSGSIZE, f"a netlink batch of {n} bytes does not fit the {RECV_BUFFER}-byte buffer")
                self._put((slot, n))
                if n == 0 or ends_dump(buf, n):
                    break
                i += 1
        except BaseException as exc:  # handed to the decoding thread
            self._put(exc)
        finally:
            self._put(None)

    def _put(self, item: tuple[int, int] | BaseException | None) -> None:
        while True:
            try:
                self.batches.put(item, timeout=0.1)
                return
            except queue.Full:
                if self.stop.is_set():
                    return


def dump_table(
    netns_path: str | None,
    *,
    budget: float,
    top: int = 20,
    capacity: int | None = None,
    expected: int | None = None,
    progress: Callable[[int, float], None] | None = None,
    sock: socket.socket | None = None,
) -> TableBreakdown:
    """Dump and aggregate the table; stop once `budget` seconds are spent (after one batch at least).

    `progress(entries, seconds)` is called about twice a second.
    """
    start = time.monotonic()
    deadline = start + max(budget, 0.0)
    own = sock is None
    if sock is None:
        sock = open_ctnetlink(netns_path)
    agg = Aggregator(top=top, capacity=capacity)
    cut_short = False
    reader = _Reader(sock)
    try:
        sock.send(dump_request(int(time.time()) & 0x7FFFFFFF))
        reader.start()
        views = [memoryview(b) for b in reader.ring]
        next_report = start + 0.5
        while True:
            item = reader.batches.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            slot, n = item
            if agg.feed_batch(views[slot], n):
                break
            now = time.monotonic()
            if now >= deadline:
                cut_short = True
                break
            if progress is not None and now >= next_report:
                progress(agg.entries, now - start)
                next_report = now + 0.5
    finally:
        reader.stop.set()
        if own:
            # Closing mid-dump is how a dump is abandoned: the kernel frees its cursor.
            sock.close()
        if reader.is_alive():
            # It is at most one recv away from seeing `stop` (a dump never blocks mid-way).
            reader.join(timeout=5)
    seconds = time.monotonic() - start
    notes: list[str] = []
    if cut_short:
        how_far = f"{agg.entries} of about {expected}" if expected else f"{agg.entries}"
        notes.append(f"dump cut short after {seconds:.2f} s (budget {budget:.2f} s): {how_far} entries seen")
    if agg.interrupted:
        notes.append("the kernel flagged the dump as interrupted: the table changed while it was read")
    return agg.result(cut_short=cut_short, seconds=seconds, expected=expected, interrupted=agg.interrupted,
                      notes=tuple(notes))


def decode_all(raw: bytes) -> list[Entry]:
    """Decode a captured dump (concatenated recv buffers) into entries; for tests and debugging."""
    out = []
    for e in iter_entries(memoryview(raw)):
        if e is None:
            break
        out.append(Entry(*e))
    return out
