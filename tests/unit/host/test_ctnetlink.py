"""The hand-written ctnetlink decoder against hand-built messages (the real-dump test is in
tests/kernel/test_evidence_kernel.py), and the aggregation on top of it."""

from __future__ import annotations

import errno
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctguard.host.ctnetlink import Aggregator, Entry, decode_all, iter_entries
from helpers.ctmessages import DONE, entries, message

def test_ipv4_tcp_fast_path_and_general_path_agree() -> None:
    e = Entry(4, 6, bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]), 40000, 443, 3, 0x0E, 0x2A, 0)
    assert decode_all(message(e) + DONE) == [e]
    assert decode_all(message(e, swap=True) + DONE) == [e]  # unusual order: general path


def test_ipv6_icmp_mark_zone() -> None:
    v6 = Entry(6, 17, bytes(range(16)), bytes(range(16, 32)), 5353, 53, None, 0, 0, 3)
    icmp = Entry(4, 1, b"\x01\x02\x03\x04", b"\x05\x06\x07\x08", None, None, None, 2, 0, 0)
    got = decode_all(message(v6) + message(icmp, icmp=True) + DONE)
    assert got == [v6, icmp]


def test_done_ends_and_error_raises() -> None:
    e = Entry(4, 17, b"\x01\x01\x01\x01", b"\x02\x02\x02\x02", 1, 2, None, 0, 0, 0)
    items = list(iter_entries(memoryview(message(e) + DONE + message(e))))
    assert items[-1] is None and len(items) == 2
    err = struct.pack("=IHHIIi", 36, 2, 0, 1, 0, -errno.EPERM) + b"\0" * 16
    with pytest.raises(OSError) as info:
        list(iter_entries(err))
    assert info.value.errno == errno.EPERM
    with pytest.raises(OSError):
        list(iter_entries(struct.pack("=IHHII", 8, 0x100, 0, 0, 0)))


@settings(max_examples=150, deadline=None)
@given(st.lists(entries, max_size=30))
def test_decode_round_trip(batch: list[Entry]) -> None:
    raw = b"".join(message(e) for e in batch) + DONE
    assert decode_all(raw) == batch


def test_aggregator_totals() -> None:
    a = b"\x0a\x00\x00\x01"
    b = b"\x0a\x00\x00\x02"
    batch = (
        [Entry(4, 6, a, b, 1000 + i, 22, 1, 0x8, 0, 0) for i in range(3)]  # SYN_SENT, unreplied
        + [Entry(4, 6, b, a, 2000 + i, 443, 3, 0xE, 0, 0) for i in range(2)]  # ESTABLISHED, assured
        + [Entry(4, 17, a, b, 3000, 53, None, 0xA, 7, 0)]
        + [Entry(4, 1, a, b, None, None, None, 0xA, 0, 9)]
    )
    agg = Aggregator(top=3)
    assert agg.feed(iter_entries(b"".join(message(e) for e in batch) + DONE))
    r = agg.result(cut_short=False, seconds=0.1, expected=len(batch))
    assert r.entries == 7
    assert r.by_proto == {"tcp": 5, "udp": 1, "icmp": 1}
    assert r.by_tcp_state == {"SYN_SENT": 3, "ESTABLISHED": 2}
    assert r.unreplied == 3 and r.assured == 2
    assert [(h.key, h.count) for h in r.top_sources.rows] == [("10.0.0.1", 5), ("10.0.0.2", 2)]
    assert [(h.key, h.count) for h in r.top_dports.rows] == [("tcp/22", 3), ("tcp/443", 2), ("udp/53", 1)]
    assert [(h.key, h.count) for h in r.marks.rows] == [("0x7", 1)]
    assert [(h.key, h.count) for h in r.zones.rows] == [("9", 1)]


class FakeSock:
    """Stands in for the netlink socket: hands out prepared batches, one per recv.

    Why a fake: these tests need exact batch boundaries, a kernel error on demand and a budget
    cut after a known batch, which a live table cannot be made to give; the same code against the
    real kernel is tests/kernel/test_evidence_kernel.py."""

    def __init__(self, batches: list[bytes]) -> None:
        self.batches = list(batches)
        # The reader polls before each recv: a pipe with a byte never read is always readable.
        self._read, self._write = os.pipe()
        os.write(self._write, b"x")

    def fileno(self) -> int:
        return self._read

    def send(self, data: bytes) -> int:
        return len(data)

    def recv_into(self, buf: bytearray, size: int, flags: int = 0) -> int:
        data = self.batches.pop(0)
        buf[: len(data)] = data
        return len(data)

    def close(self) -> None:
        for fd in (self._read, self._write):
            os.close(fd)


def _batch(n: int, start: int = 0) -> bytes:
    return b"".join(
        message(Entry(4, 17, struct.pack("!I", 0x0A000000 + i), b"\x0a\xff\x00\x01", 1000, 53, None, 0, 0, 0))
        for i in range(start, start + n)
    )


def test_dump_table_streams_batches_through_the_reader() -> None:
    from ctguard.host.ctnetlink import dump_table

    sock = FakeSock([_batch(100), _batch(100, 100), _batch(10, 200) + DONE])
    r = dump_table(None, budget=10, top=3, sock=sock, expected=210)  # type: ignore[arg-type]
    assert r.entries == 210 and not r.cut_short
    assert r.top_destinations.rows[0].count == 210
    assert r.top_sources.exact and len(r.top_sources.rows) == 3


def test_dump_table_hands_kernel_errors_to_the_caller() -> None:
    from ctguard.host.ctnetlink import dump_table

    err = struct.pack("=IHHIIi", 36, 2, 0, 1, 0, -errno.EPERM) + b"\0" * 16
    with pytest.raises(OSError) as info:
        dump_table(None, budget=10, sock=FakeSock([err]))  # type: ignore[arg-type]
    assert info.value.errno == errno.EPERM


def test_dump_table_budget_zero_reads_one_batch_and_says_so() -> None:
    from ctguard.host.ctnetlink import dump_table

    sock = FakeSock([_batch(50), _batch(50, 50), _batch(50, 100) + DONE])
    r = dump_table(None, budget=0, sock=sock, expected=150)  # type: ignore[arg-type]
    assert r.cut_short and r.entries == 50
    assert r.notes and "50 of about 150 entries seen" in r.notes[0]
