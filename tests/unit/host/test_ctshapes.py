"""Learned message shapes: a batch read in C counts exactly what the general decoder counts."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from ctguard.host.ctnetlink import Aggregator, Entry, ends_dump, iter_entries
from ctguard.host.ctshapes import Shapes, learn
from helpers.ctmessages import DONE, entries, message, nla

A = b"\x0a\x00\x00\x01"
B = b"\x0a\x00\x00\x02"
UDP = Entry(4, 17, A, B, 4000, 53, None, 0x8, 0, 0)
TCP = Entry(4, 6, A, B, 4001, 443, 3, 0xE, 0x2A, 0)


def general(batches: list[bytes]):
    agg = Aggregator(top=50)
    for raw in batches:
        agg.feed(iter_entries(raw))
    return agg.result(cut_short=False, seconds=0, expected=None)


def by_shapes(batches: list[bytes]) -> tuple[object, int]:
    """The aggregate through feed_batch, and how many batches the learned shapes read."""
    agg = Aggregator(top=50)
    fast = 0
    for raw in batches:
        if agg.shapes.read(raw, len(raw)) is not None:
            fast += 1
        agg.feed_batch(memoryview(raw), len(raw))
    return agg.result(cut_short=False, seconds=0, expected=None), fast


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(entries, min_size=1, max_size=12), min_size=1, max_size=6))
def test_shapes_count_what_the_general_decoder_counts(batches: list[list[Entry]]) -> None:
    raws = [b"".join(message(e) for e in batch) for batch in batches]
    raws[-1] += DONE
    got, _ = by_shapes(raws)
    assert got == general(raws)


def test_the_second_batch_teaches_and_the_next_are_read_by_shape() -> None:
    first = b"".join(message(e) for e in (UDP, TCP) * 3)
    later = b"".join(message(e) for e in (TCP, UDP) * 5)
    batches = [first, later, later, later + DONE]
    got, fast = by_shapes(batches)
    # A one-batch table never compiles a shape; the second batch taught both, the last two used them.
    assert fast == 2
    assert got == general(batches)
    assert got.by_proto == {"udp": 18, "tcp": 18} and got.by_tcp_state == {"ESTABLISHED": 18}
    assert [(h.key, h.count) for h in got.marks.rows] == [("0x2a", 18)]


def test_a_batch_with_a_new_shape_goes_the_general_way_and_teaches_it() -> None:
    shapes = Shapes()
    assert shapes.teach(message(UDP)) and not shapes.teach(message(UDP))
    icmp = Entry(4, 1, A, B, None, None, None, 0, 0, 7)
    mixed = message(UDP) + message(icmp, icmp=True) + message(UDP)
    assert shapes.read(mixed, len(mixed)) is None
    assert not shapes.study(mixed, len(mixed), learn=False) and len(shapes.known) == 1
    assert not shapes.study(mixed, len(mixed)) and len(shapes.known) == 2
    batch = shapes.read(mixed, len(mixed))
    assert batch is not None and not batch.done
    assert sorted(batch.zones) == [b"", b"", b"\x00\x07"]
    assert sorted(batch.ports) == [b"", b"\x11\x00\x35", b"\x11\x00\x35"]


def test_a_batch_cut_inside_a_message_is_not_read_by_shape() -> None:
    shapes = Shapes()
    shapes.teach(message(UDP))
    whole = message(UDP) * 3
    assert shapes.read(whole, len(whole)) is not None
    assert shapes.read(whole, len(whole) - 4) is None


def test_a_message_without_status_or_with_bad_lengths_is_not_learned() -> None:
    body = struct.pack("=BBH", 2, 0, 0) + nla(7, struct.pack(">I", 5))
    bare = struct.pack("=IHHII", 16 + len(body), 0x100, 2, 1, 0) + body
    assert learn(bare) is None
    m = bytearray(message(UDP))
    m[0] += 4  # claims more than it holds
    assert learn(bytes(m)) is None


def test_an_interrupted_dump_is_noticed_on_both_paths() -> None:
    m = bytearray(message(UDP))
    struct.pack_into("=H", m, 6, 0x12)  # NLM_F_MULTI | NLM_F_DUMP_INTR
    agg = Aggregator()
    for _ in range(2):
        agg.feed_batch(memoryview(message(UDP)), len(message(UDP)))
    assert not agg.interrupted
    raw = bytes(m) + message(UDP)
    assert agg.shapes.read(raw, len(raw)) is not None
    agg.feed_batch(memoryview(raw), len(raw))
    assert agg.interrupted
    slow = Aggregator()
    slow.feed_batch(memoryview(bytes(m)), len(m))
    assert slow.interrupted


def test_the_end_of_the_dump_is_found_at_a_message_boundary_only() -> None:
    assert ends_dump(DONE, len(DONE))
    assert ends_dump(message(UDP) + DONE, len(message(UDP)) + 20)
    assert not ends_dump(message(UDP), len(message(UDP)))
    # A message whose last 20 bytes look like NLMSG_DONE's head is not the end.
    fake = nla(9, DONE)
    body = struct.pack("=BBH", 2, 0, 0) + fake
    tricky = struct.pack("=IHHII", 16 + len(body), 0x100, 2, 1, 0) + body
    assert tricky[-20:-14] == DONE[:6]
    assert not ends_dump(tricky, len(tricky))
