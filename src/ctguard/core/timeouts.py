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
    "udp": (10, 5),                  # a DNS/NTP answer with one retry arrives within 5 s
    "udp_stream": (30, 10),          # replied UDP (QUIC, VPN): outlive a keepalive gap of 10 s
    "tcp_syn_sent": (10, 5),         # SYN retransmits at 1 s and 3 s: both still fit in 5 s
    "tcp_syn_recv": (10, 5),         # the SYN-ACK's own retransmits at 1 s and 3 s
    "tcp_time_wait": (10, 2),        # late segments of a closed connection: 2 s (2x a LAN MSL guess)
    "tcp_close_wait": (15, 5),       # the application's close after the peer's FIN
    "tcp_fin_wait": (15, 5),         # the peer's FIN after ours
    "tcp_unacknowledged": (30, 10),  # data in flight: a few retransmission timeouts
    "tcp_established": (None, 600),  # only when named: an idle SSH session must survive 10 min
}


def sysctl_name(key: str) -> str:
    """The sysctl a relief key names: udp -> nf_conntrack_udp_timeout, udp_stream ->
    nf_conntrack_udp_timeout_stream, tcp_syn_sent -> nf_conntrack_tcp_timeout_syn_sent."""
    proto, _, rest = key.partition("_")
    return f"nf_conntrack_{proto}_timeout" + (f"_{rest}" if rest else "")
