"""Conntrack timeouts: the kernel's defaults, what each holds, and the keys relief may shorten.

The one home of these facts: the policy validates `[relief.timeouts]` against them, relief
decides with them, the host role reports raised ones by them.
"""

from __future__ import annotations

# Kernel defaults (net/netfilter/nf_conntrack_proto_*.c, v5.x-v6.x), in seconds.
DEFAULT_TIMEOUTS: dict[str, int] = {
    "nf_conntrack_tcp_timeout_syn_sent": 120,
    "nf_conntrack_tcp_timeout_syn_recv": 60,
    "nf_conntrack_tcp_timeout_established": 432000,
    "nf_conntrack_tcp_timeout_fin_wait": 120,
    "nf_conntrack_tcp_timeout_close_wait": 60,
    "nf_conntrack_tcp_timeout_last_ack": 30,
    "nf_conntrack_tcp_timeout_time_wait": 120,
    "nf_conntrack_tcp_timeout_close": 10,
    "nf_conntrack_tcp_timeout_max_retrans": 300,
    "nf_conntrack_tcp_timeout_unacknowledged": 300,
    "nf_conntrack_udp_timeout": 30,
    "nf_conntrack_udp_timeout_stream": 120,
    "nf_conntrack_icmp_timeout": 30,
    "nf_conntrack_icmpv6_timeout": 30,
    "nf_conntrack_generic_timeout": 600,
}

# Which entries a timeout keeps alive: (protocol, TCP state or None, "unreplied"/"assured"/None).
HOLDS: dict[str, tuple[str, str | None]] = {
    "nf_conntrack_tcp_timeout_syn_sent": ("tcp", "SYN_SENT"),
    "nf_conntrack_tcp_timeout_syn_recv": ("tcp", "SYN_RECV"),
    "nf_conntrack_tcp_timeout_established": ("tcp", "ESTABLISHED"),
    "nf_conntrack_tcp_timeout_fin_wait": ("tcp", "FIN_WAIT"),
    "nf_conntrack_tcp_timeout_close_wait": ("tcp", "CLOSE_WAIT"),
    "nf_conntrack_tcp_timeout_last_ack": ("tcp", "LAST_ACK"),
    "nf_conntrack_tcp_timeout_time_wait": ("tcp", "TIME_WAIT"),
    "nf_conntrack_tcp_timeout_close": ("tcp", "CLOSE"),
    "nf_conntrack_udp_timeout": ("udp", None),
    "nf_conntrack_udp_timeout_stream": ("udp", None),
    "nf_conntrack_icmp_timeout": ("icmp", None),
    "nf_conntrack_icmpv6_timeout": ("icmpv6", None),
}

# [relief.timeouts]: the sysctl's name without `nf_conntrack_` and `_timeout` -> (default
# emergency value, hard floor), seconds. The floor is what the policy can never go below, and
# why: the kernel defaults are udp 30, udp_stream 120, tcp_syn_sent 120, tcp_syn_recv 60,
# tcp_time_wait 120, tcp_close_wait 60, tcp_fin_wait 120, tcp_unacknowledged 300,
# tcp_established 432000.
RELIEF_TIMEOUTS: dict[str, tuple[int | None, int]] = {
    # An entry udp_timeout holds saw all its packets within its first 2 s or was never answered
    # (a later packet makes it a stream, udp_stream): a DNS/NTP exchange that is over, or a
    # query a stub gives up on after its 5 s timeout. 10 s was not enough past a ceiling:
    # 3,000 queries/s hold 30,000 entries at 10 s, 92% of a 32,768 ceiling, 15,000 at 5 s.
    "udp": (5, 5),                   # floor: a DNS/NTP answer with one retry arrives within 5 s
    "udp_stream": (30, 10),          # replied UDP (QUIC, VPN): outlive a keepalive gap of 10 s
    "tcp_syn_sent": (10, 5),         # SYN retransmits at 1 s and 3 s: both still fit in 5 s
    "tcp_syn_recv": (10, 5),         # the SYN-ACK's own retransmits at 1 s and 3 s
    "tcp_time_wait": (10, 2),        # late segments of a closed connection: 2 s (2x a LAN MSL guess)
    "tcp_close_wait": (15, 5),       # the application's close after the peer's FIN
    "tcp_fin_wait": (15, 5),         # the peer's FIN after ours
    "tcp_last_ack": (10, 5),         # our FIN's ACK: a few retransmissions of the last FIN
    "tcp_unacknowledged": (30, 10),  # picked up mid-stream, never answered (loose pickup, ACK floods)
    "tcp_established": (None, 600),  # only when named: an idle SSH session must survive 10 min
}


# [relief] enforce's default: the classes relief writes when `mode = "enforce"` (the packaged
# default); the others it only advises. Unanswered, half-open and closing entries: none is a live
# flow, and the lab (bench/README.md) showed relief on them never broke one. Not udp_stream nor
# tcp_established (live flows: VPN, QUIC, idle sessions), nor tcp_unacknowledged: on a host with
# asymmetric routing every live connection is "never answered", and no lab scenario covers that.
ENFORCE_CLASSES: tuple[str, ...] = ("udp", "tcp_syn_sent", "tcp_syn_recv", "tcp_time_wait", "tcp_fin_wait",
                                    "tcp_close_wait", "tcp_last_ack")

def sysctl_name(key: str) -> str:
    """The sysctl a relief key names: udp -> nf_conntrack_udp_timeout, udp_stream ->
    nf_conntrack_udp_timeout_stream, tcp_syn_sent -> nf_conntrack_tcp_timeout_syn_sent."""
    proto, _, rest = key.partition("_")
    return f"nf_conntrack_{proto}_timeout" + (f"_{rest}" if rest else "")


# --- Which timeout the kernel applies to an entry ------------------------------------------------
#
# What a table dump shows of an entry (protocol, TCP state, the status bits IPS_SEEN_REPLY and
# IPS_ASSURED) is enough to tell the timeout that holds it. The kernel's rules, each beside the
# source it comes from (net/netfilter/, Linux 6.1 = Debian 12 and 6.12 = Debian 13):
#
# UDP (nf_conntrack_proto_udp.c, nf_conntrack_udp_packet):
#   - never answered: refreshed with timeouts[UDP_CT_UNREPLIED] = nf_conntrack_udp_timeout.
#   - answered: nf_conntrack_in() sets IPS_SEEN_REPLY only *after* the protocol handler ran
#     (nf_conntrack_core.c: `if (ctinfo == IP_CT_ESTABLISHED_REPLY && !test_and_set_bit(
#     IPS_SEEN_REPLY_BIT, ...))` follows nf_conntrack_handle_packet), so the answer itself is
#     refreshed with udp_timeout too: a query answered once (DNS, NTP) is SEEN_REPLY, not
#     ASSURED, and held by nf_conntrack_udp_timeout -- on every kernel.
#   - since commit d535c8a69c19 ("udp: only extend timeout to stream mode after 2s"): a later
#     packet extends to timeouts[UDP_CT_REPLIED] = nf_conntrack_udp_timeout_stream only when it
#     comes more than 2 s after the first (`time_after(jiffies, ct->proto.udp.stream_ts)`,
#     stream_ts = first packet + 2*HZ); within 2 s it gets udp_timeout again. IPS_ASSURED is set
#     with the switch to the stream timeout (`stream = true` in that branch, then `if (stream &&
#     !test_and_set_bit(IPS_ASSURED_BIT, ...))`; Linux 6.1 and later). So ASSURED UDP is a
#     stream held by nf_conntrack_udp_timeout_stream.
#   - before d535c8a69c19 (Debian 11's 5.10) any packet after the answer switched to the stream
#     timeout and set ASSURED: the same rule (ASSURED = stream) holds there too.
#   - d535c8a69c19 itself, before the `stream` test (a few 5.19-6.0 kernels), also set ASSURED on
#     a third packet within 2 s while keeping udp_timeout: such an entry has at most udp_timeout
#     left; counted as a stream (relief never cuts a stream by mistake, and it dies soon).
# TCP (nf_conntrack_proto_tcp.c, nf_conntrack_tcp_packet): `timeout = timeouts[new_state]`, the
#   state's own sysctl (SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK,
#   TIME_WAIT, CLOSE), except:
#   - `if (!test_bit(IPS_SEEN_REPLY_BIT, &ct->status)) ... if (new_state ==
#     TCP_CONNTRACK_ESTABLISHED && timeout > timeouts[TCP_CONNTRACK_UNACK]) timeout =
#     timeouts[TCP_CONNTRACK_UNACK]`: an ESTABLISHED entry never answered -- picked up
#     mid-stream (nf_conntrack_tcp_loose = 1, the default): asymmetric routing, a flushed
#     table, or a spoofed ACK flood -- is held by nf_conntrack_tcp_timeout_unacknowledged.
#     A dump shows it (state ESTABLISHED without SEEN_REPLY): this is the state
#     `tcp_unacknowledged` relieves.
#   - IP_CT_TCP_FLAG_DATA_UNACKNOWLEDGED in either direction's flags, or retrans >=
#     nf_conntrack_tcp_max_retrans (-> max_retrans), or a zero window: an answered connection
#     with data in flight. A dump carries those flags (CTA_PROTOINFO_TCP_FLAGS_*) but these are
#     live connections relief never cuts, so they are counted as ESTABLISHED.
#   - SYN_SENT2 (simultaneous open) has its own slot, timeouts[TCP_CONNTRACK_SYN_SENT2] (2 min
#     in tcp_timeouts[], like SYN_SENT's default), but no sysctl writes it:
#     nf_conntrack_standalone.c nf_conntrack_standalone_init_tcp_sysctl() points the sysctls at
#     SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT, CLOSE_WAIT, LAST_ACK, TIME_WAIT, CLOSE, RETRANS
#     and UNACK only. Lowering nf_conntrack_tcp_timeout_syn_sent does not touch it, so it is not
#     mapped to tcp_syn_sent (relief would count entries it cannot free); NONE likewise.
# ICMP / ICMPv6 (nf_conntrack_proto_icmp.c / _icmpv6.c): nf_conntrack_icmp(v6)_timeout.
# Anything else (GRE, SCTP, DCCP, ... have their own tables; the rest): generic_timeout.

TCP_NONE, TCP_SYN_SENT, TCP_SYN_RECV, TCP_ESTABLISHED, TCP_FIN_WAIT, TCP_CLOSE_WAIT, TCP_LAST_ACK, \
    TCP_TIME_WAIT, TCP_CLOSE, TCP_SYN_SENT2 = range(10)       # enum tcp_conntrack
SEEN_REPLY = 1 << 1          # IPS_SEEN_REPLY
ASSURED = 1 << 2             # IPS_ASSURED
TCP_KEYS = {TCP_SYN_SENT: "tcp_syn_sent", TCP_SYN_RECV: "tcp_syn_recv", TCP_ESTABLISHED: "tcp_established",
            TCP_FIN_WAIT: "tcp_fin_wait", TCP_CLOSE_WAIT: "tcp_close_wait", TCP_LAST_ACK: "tcp_last_ack",
            TCP_TIME_WAIT: "tcp_time_wait", TCP_CLOSE: "tcp_close"}
# The classes an entry can be in (a timeout key each, named like the sysctl, as in [relief.timeouts]).
CLASSES = ("udp", "udp_stream", *TCP_KEYS.values(), "tcp_unacknowledged", "icmp", "icmpv6", "generic")


def classify(proto: int, tcp_state: int | None, status: int) -> str | None:
    """The timeout key that holds one entry by the kernel's rules above, or None (a TCP state
    with no sysctl of its own)."""
    if proto == 17 or proto == 136:          # UDP, UDP-Lite (same tables)
        if not status & ASSURED:
            return "udp"                     # unanswered, or answered within its first 2 s
        return "udp_stream"                  # ASSURED: the stream timeout (see above)
    if proto == 6:
        if tcp_state == TCP_ESTABLISHED and not status & SEEN_REPLY:
            return "tcp_unacknowledged"
        return TCP_KEYS.get(tcp_state)       # type: ignore[arg-type]
    if proto == 1:
        return "icmp"
    if proto == 58:
        return "icmpv6"
    return "generic"


def classes(by_proto: dict[str, int], by_tcp_state: dict[str, int], udp_assured: int | None,
            tcp_unreplied_established: int = 0) -> dict[str, int]:
    """Entries per class from a table's aggregate counts (what ctnetlink.Aggregator keeps):
    the same rules as classify(), summed. `udp_assured` None (an older breakdown) counts every
    UDP entry as held by udp_timeout."""
    udp = by_proto.get("udp", 0) + by_proto.get("udplite", 0)
    stream = min(udp, udp_assured or 0)
    out = {"udp": udp - stream, "udp_stream": stream}
    names = {"SYN_SENT": TCP_SYN_SENT, "SYN_RECV": TCP_SYN_RECV, "ESTABLISHED": TCP_ESTABLISHED,
             "FIN_WAIT": TCP_FIN_WAIT, "CLOSE_WAIT": TCP_CLOSE_WAIT, "LAST_ACK": TCP_LAST_ACK,
             "TIME_WAIT": TCP_TIME_WAIT, "CLOSE": TCP_CLOSE}
    for state, n in by_tcp_state.items():
        num = names.get(state)
        if num is not None:
            out[TCP_KEYS[num]] = out.get(TCP_KEYS[num], 0) + n
    loose = min(tcp_unreplied_established, out.get("tcp_established", 0))
    if loose:
        out["tcp_established"] -= loose
        out["tcp_unacknowledged"] = loose
    out["icmp"] = by_proto.get("icmp", 0)
    out["icmpv6"] = by_proto.get("icmpv6", 0)
    known = {"udp", "udplite", "tcp", "icmp", "icmpv6"}
    out["generic"] = sum(n for p, n in by_proto.items() if p not in known)
    return {k: v for k, v in out.items() if v}
