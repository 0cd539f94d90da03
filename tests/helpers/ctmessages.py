"""Hand-built ctnetlink messages (nlmsghdr + nfgenmsg + attributes, as the kernel lays them out)
for the decoder's tests, and a hypothesis strategy of entries."""

from __future__ import annotations

import socket
import struct

from hypothesis import strategies as st

from ctguard.host.ctnetlink import Entry

NESTED = 0x8000


def nla(kind: int, payload: bytes, nested: bool = False) -> bytes:
    head = struct.pack("=HH", 4 + len(payload), kind | (NESTED if nested else 0))
    return head + payload + b"\0" * (-len(payload) % 4)


def tuple_attr(e: Entry, *, swap: bool = False, icmp: bool = False) -> bytes:
    v6 = e.family == 6
    src = nla(3 if v6 else 1, e.src)
    dst = nla(4 if v6 else 2, e.dst)
    ip = nla(1, dst + src if swap else src + dst, nested=True)
    proto = nla(1, bytes([e.proto]))
    if icmp:
        proto += nla(4, struct.pack(">H", 77)) + nla(5, b"\x08") + nla(6, b"\x00")
    else:
        if e.sport is not None:
            proto += nla(2, struct.pack(">H", e.sport))
        if e.dport is not None:
            proto += nla(3, struct.pack(">H", e.dport))
    return nla(1, ip + nla(2, proto, nested=True), nested=True)


def message(e: Entry, *, swap: bool = False, icmp: bool = False, extra: bytes = b"") -> bytes:
    reply = nla(2, nla(1, nla(1, e.dst) + nla(2, e.src), nested=True), nested=True)
    attrs = tuple_attr(e, swap=swap, icmp=icmp) + reply + nla(3, struct.pack(">I", e.status))
    attrs += nla(7, struct.pack(">I", 120))  # CTA_TIMEOUT: skipped by length
    if e.mark:
        attrs += nla(8, struct.pack(">I", e.mark))
    if e.tcp_state is not None:
        tcp = nla(1, bytes([e.tcp_state])) + nla(2, b"\x07")
        attrs += nla(4, nla(1, tcp, nested=True), nested=True)
    if e.zone:
        attrs += nla(18, struct.pack(">H", e.zone))
    attrs += extra
    family = socket.AF_INET6 if e.family == 6 else socket.AF_INET
    body = struct.pack("=BBH", family, 0, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), 0x100, 2, 1, 0) + body


DONE = struct.pack("=IHHIIi", 20, 3, 2, 1, 0, 0)


entries = st.builds(
    lambda fam, proto, sport, dport, state, status, mark, zone, a, b: Entry(
        fam, proto, a[: 4 if fam == 4 else 16], b[: 4 if fam == 4 else 16],
        sport if proto in (6, 17) else None, dport if proto in (6, 17) else None,
        state if proto == 6 else None, status, mark, zone,
    ),
    st.sampled_from([4, 6]),
    st.sampled_from([6, 17, 47]),
    st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 9),
    st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 65535),
    st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16),
)


