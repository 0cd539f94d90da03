"""The relief trim child's plan for each entry and the requests it writes (ctguard.host.trim)."""

from __future__ import annotations

import socket

import pytest

from ctguard.host.trim import parse_caps, plan_entry, request

# --- the trim child's plan for one entry ---------------------------------------------------------

# (what, remaining s, cap, previous, new remaining: 0 deletes, None leaves it)
@pytest.mark.parametrize("what, remaining, cap, previous, new", [
    ("made after the step (at most cap left): never touched, it may await its answer", 5, 5, 30, None),
    ("idle 24 s under 30 s (6 left): expired under 5 s -> deleted (it would count until the GC reaps it)",
     6, 5, 30, 0),
    ("idle 10 s (20 left): deleted", 20, 5, 30, 0),
    ("idle 1 s (29 left): 4 s left, as under 5 s", 29, 5, 30, 4),
    ("idle 0 s (30 left): the full new value", 30, 5, 30, 5),
    ("a periodic pass (previous = cap): a cap only", 20, 10, 10, 10),
    ("from a longer older value: still never above the cap", 100, 10, 15, 10),
])
def test_the_trim_ages_each_entry_as_the_new_timeout_would_have(what, remaining, cap, previous, new):
    assert plan_entry(remaining, cap, previous) == new, what


def test_the_caps_on_the_command_line():
    assert parse_caps(["udp=5/30", "tcp_time_wait=10"]) == {"udp": (5, 30), "tcp_time_wait": (10, 10)}


def test_an_update_is_what_conntrack_u_sends_and_a_delete_what_conntrack_d_sends():
    src, dst = socket.inet_aton("10.91.1.5"), socket.inet_aton("10.92.0.2")
    # nlmsghdr (IPCTNL_MSG_CT_NEW, REQUEST|ACK, seq 9), nfgenmsg AF_INET, CTA_TUPLE_ORIG {IP {src, dst},
    # PROTO {17, 40000, 53}}, CTA_TIMEOUT 7 (big-endian): the bytes pyroute2's nfct_msg encodes for
    # NFCTSocket.entry("set"), nested attributes flagged NLA_F_NESTED.
    assert request(4, 17, src, dst, 40000, 53, 0, 7, 9).hex() == (
        "5000000000010500090000000000000002000000340001801400018008000100"
        "0a5b0105080002000a5c00021c0002800500010011000000060002009c400000"
        "06000300003500000800070000000007")
    gone = request(4, 17, src, dst, 40000, 53, 0, 0, 10)
    assert gone[4:6] == (0x0102).to_bytes(2, "little") and len(gone) == 72      # IPCTNL_MSG_CT_DELETE, no timeout
    zoned = request(6, 6, bytes(16), bytes(15) + b"\1", 1, 2, 3, 5, 11)
    assert zoned.endswith(bytes.fromhex("06001200000300000800070000000005"))    # CTA_ZONE 3, then CTA_TIMEOUT 5
