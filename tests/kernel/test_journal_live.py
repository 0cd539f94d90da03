"""The follower against a real journald and real kernel table-full lines (root only)."""

from __future__ import annotations

import select
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctguard.host.journal import JournalFollower, TableFullEvent, load_cursor, save_cursor
from helpers.kernelenv import NetnsPair, kernel_ready, netns_pair, saved_kernel_values, set_max

pytestmark = pytest.mark.skipif(kernel_ready() is not None, reason=str(kernel_ready()))

SMALL_MAX = 2048


class Flooder:
    """Keeps the receiver's table full and makes the kernel say so again on demand.

    The kernel prints at most `net.core.message_burst` (10) table-full lines per
    `net.core.message_cost` (5 s) window, shared with every other rate-limited network
    message on the machine (other test sessions too), so one flood may print nothing:
    `flood_until_seen` floods again with fresh ports until the follower hears a line.
    """

    def __init__(self, pair: NetnsPair) -> None:
        self.pair = pair
        self.port = 1

    def flood(self, flows: int = 2 * SMALL_MAX) -> None:
        self.pair.flood_udp(flows, first_port=self.port)
        self.port = (self.port + flows) % 60000 + 1

    def flood_until_seen(self, follower: JournalFollower, timeout: float = 20.0) -> list[TableFullEvent]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.flood()
            evs = wait_events(follower, self.pair.receiver_inode, min(2.0, deadline - time.monotonic()))
            if evs:
                return evs
            time.sleep(1.0)
        pytest.fail(f"no kernel table-full line for netns {self.pair.receiver_inode} reached the follower in {timeout} s")


def wait_events(follower: JournalFollower, netns: int, timeout: float) -> list[TableFullEvent]:
    """Wait on the follower's fd (as the daemon's selector does) for events of `netns`."""
    deadline = time.monotonic() + timeout
    got: list[TableFullEvent] = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        ready, _, _ = select.select([follower.fileno()], [], [], remaining)
        if not ready:
            break  # only the fd may wake us: a dead fd must fail the test, not be papered over
        got += [e for e in follower.read_events() if e.netns == netns]
        if got:
            # Collect the rest of this burst too (same journald write batch).
            got += [e for e in follower.read_events() if e.netns == netns]
            return got
    return got


@pytest.fixture
def flooded(journald) -> Iterator[Flooder]:  # noqa: F811
    with saved_kernel_values(), netns_pair("ctgj") as pair:
        set_max(SMALL_MAX)
        yield Flooder(pair)


def journal_has(marker: str, timeout: float = 5.0) -> bool:
    """True once an entry containing `marker` is readable by any reader (used to wait for forged lines)."""
    from systemd import journal as sdjournal

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = sdjournal.Reader(flags=sdjournal.SYSTEM)
        try:
            r.add_match(MESSAGE=marker)
            r.seek_tail()
            if r.get_previous():
                return True
        finally:
            r.close()
        time.sleep(0.05)
    return False


def test_real_table_full_line_is_seen_within_a_second(flooded: Flooder) -> None:
    f = JournalFollower()
    try:
        assert f.read_events() == [] or True  # history before now is not returned as new
        evs = flooded.flood_until_seen(f)
        first = evs[0]
        seen_at = time.monotonic()
        assert first.netns == flooded.pair.receiver_inode
        assert first.backlog is False
        assert first.suppressed == 0
        assert "table full" in first.message
        # `monotonic` is the kernel's printk time on this boot: comparable with time.monotonic().
        assert 0 <= seen_at - first.monotonic < 1.0, f"line at {first.monotonic}, seen at {seen_at}"
        assert f.cursor == evs[-1].cursor or f.cursor is not None
    finally:
        f.close()


def test_forged_lines_never_count(journald, flooded: Flooder) -> None:  # noqa: F811
    from systemd import journal as sdjournal

    # With the /dev/kmsg fast path on, so both sources are held to the kernel facility.
    f = JournalFollower(kmsg=Path("/dev/kmsg"))
    try:
        f.read_events()
        inode = flooded.pair.receiver_inode
        text = f"nf_conntrack: nf_conntrack: table full in netns {inode}, dropping packet"
        # syslog transport, claiming the kernel facility
        subprocess.run(["logger", "-p", "kern.warning", text], check=True)
        subprocess.run(["logger", "-p", "kern.warning", "nf_conntrack: table full, dropping packet"], check=True)
        # the journal API, even claiming the kernel's fields (journald overrides _TRANSPORT)
        sdjournal.send(text, PRIORITY="4", SYSLOG_FACILITY="0", SYSLOG_IDENTIFIER="kernel", _TRANSPORT="kernel")
        # stdout transport
        subprocess.run(["systemd-cat", "-t", "kernel", "-p", "warning", "echo", text], check=False)
        # a (root) write to /dev/kmsg: kernel transport, but the kernel forces a user facility
        Path("/dev/kmsg").write_text(f"<4>nf_conntrack: {text}\n")
        Path("/dev/kmsg").write_text(f"<0>nf_conntrack: {text}\n")
        marker = f"ctguard-test-marker-{uuid.uuid4().hex}"
        sdjournal.send(marker)
        assert journal_has(marker)
        time.sleep(0.6)  # journald's change notification lags up to ~0.5 s
        assert [e for e in f.read_events() if e.netns == inode or e.netns is None] == []
    finally:
        f.close()


def test_cursor_resume_returns_lines_written_while_down_as_backlog(flooded: Flooder, tmp_path: Path) -> None:
    inode = flooded.pair.receiver_inode
    f1 = JournalFollower()
    seen_before = flooded.flood_until_seen(f1)
    save_cursor(tmp_path, f1.cursor or "")
    f1.close()
    old_cursors = {e.cursor for e in seen_before}

    # "ctguard is down": the kernel keeps talking; wait until a plain reader sees a new line.
    from systemd import journal as sdjournal

    probe = sdjournal.Reader(flags=sdjournal.SYSTEM)
    probe.add_match(_TRANSPORT="kernel")
    probe.seek_cursor(load_cursor(tmp_path))
    probe.get_next()
    deadline = time.monotonic() + 20
    written_while_down = []
    while time.monotonic() < deadline and not written_while_down:
        flooded.flood()
        time.sleep(0.7)
        probe.process()
        while e := probe.get_next():
            if str(inode) in str(e.get("MESSAGE", "")):
                written_while_down.append(e["__CURSOR"])
        if not written_while_down:
            time.sleep(1.0)
    probe.close()
    assert written_while_down, "the kernel printed no table-full line while the follower was down"

    f2 = JournalFollower(cursor=load_cursor(tmp_path))
    try:
        evs = [e for e in f2.read_events() if e.netns == inode]
        assert evs, "lines written while down were lost"
        assert all(e.backlog for e in evs)
        assert not ({e.cursor for e in evs} & old_cursors), "old lines were replayed"
        assert set(written_while_down) <= {e.cursor for e in evs}
        live = flooded.flood_until_seen(f2)
        assert all(not e.backlog for e in live)
    finally:
        f2.close()


def test_survives_rotation_and_vacuum(journald, flooded: Flooder) -> None:  # noqa: F811
    f = JournalFollower()
    try:
        flooded.flood_until_seen(f)
        journald.rotate()
        evs = flooded.flood_until_seen(f)
        assert evs and not evs[0].backlog
        cursor = f.cursor
        journald.rotate()
        journald.vacuum_files(1)
        evs = flooded.flood_until_seen(f)
        assert evs
        # A follower started from a cursor whose file was vacuumed away does not replay
        # and does not crash.
        g = JournalFollower(cursor=cursor)
        try:
            replayed = [e for e in g.read_events() if e.cursor == cursor]
            assert replayed == []
        finally:
            g.close()
    finally:
        f.close()


def test_survives_journald_restart(journald, flooded: Flooder) -> None:  # noqa: F811
    reason = journald.can_restart()
    if reason:
        pytest.skip(reason)
    f = JournalFollower()
    try:
        flooded.flood_until_seen(f)
        journald.restart()
        evs = flooded.flood_until_seen(f)
        assert evs and evs[0].netns == flooded.pair.receiver_inode and not evs[0].backlog
    finally:
        f.close()


def test_kmsg_fast_path_reports_each_line_once(flooded: Flooder) -> None:
    f = JournalFollower(kmsg=Path("/dev/kmsg"))
    try:
        if f._kmsg is None:
            pytest.skip("/dev/kmsg is not readable here")
        start_cursor = f.cursor
        evs = flooded.flood_until_seen(f)
        assert evs[0].source == "kmsg"
        assert time.monotonic() - evs[0].monotonic < 1.0
        # journald's copies arrive up to ~0.5 s later: they move the cursor but are not new events.
        deadline = time.monotonic() + 3
        dupes = []
        while time.monotonic() < deadline:
            select.select([f.fileno()], [], [], 0.2)
            dupes += [e for e in f.read_events() if e.netns == flooded.pair.receiver_inode
                      and (e.monotonic, e.message) in {(x.monotonic, x.message) for x in evs}]
        assert dupes == []
        assert f.cursor != start_cursor  # the journal's copies were read (and deduplicated)
    finally:
        f.close()


def test_fd_stays_the_same_across_reopen(journald) -> None:  # noqa: F811
    f = JournalFollower(kmsg=Path("/dev/kmsg"))
    try:
        fd = f.fileno()
        f.reopen()
        assert f.fileno() == fd
        assert f.read_events() == [] or True
    finally:
        f.close()
