"""The tick's count-only read of a real namespace (host/netns.py StatReaders); the adapters
against prepared trees are in tests/unit/host/."""

from __future__ import annotations

import pytest


def test_tick_counts_match_the_full_sample() -> None:
    """A tick's count-only read of a namespace holding 300 flows gives the count the full sample
    parses, from the same open file (UDP entries live 30 s: the count holds still meanwhile)."""
    from ctguard.host.netns import NamespaceRef, StatReaders
    from helpers.kernelenv import kernel_ready, netns_pair

    if kernel_ready() is not None:
        pytest.skip(str(kernel_ready()))
    with netns_pair() as pair:
        pair.flood_udp(300)
        ino = pair.receiver_inode
        readers = StatReaders()
        try:
            assert readers.refresh([NamespaceRef(ino, pair.receiver, f"/run/netns/{pair.receiver}", None)]) == []
            readings, failed = readers.read()
            counts = readers.counts()
        finally:
            readers.close()
        assert not failed and counts == {ino: readings[0].count} and counts[ino] >= 290
