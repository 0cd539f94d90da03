"""The table-full matcher and the follower's bookkeeping, without a journald."""

from __future__ import annotations

import datetime
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctguard.host.journal import (
    TableFullMatch, journald_available, load_cursor, match_kernel_line, open_follower, save_cursor,
)

REAL = [
    ("nf_conntrack: table full, dropping packet", TableFullMatch(netns=None)),
    ("nf_conntrack: nf_conntrack: table full, dropping packet", TableFullMatch(netns=None)),
    (
        "nf_conntrack: nf_conntrack: table full in netns 4026532246, dropping packet",
        TableFullMatch(netns=4026532246),
    ),
    ("nf_conntrack: table full in netns 4026531840, dropping packet", TableFullMatch(netns=4026531840)),
    ("net_ratelimit: 1481 callbacks suppressed", TableFullMatch(suppressed=1481)),
    ("net_ratelimit: 1 callbacks suppressed", TableFullMatch(suppressed=1)),
    # console copies sometimes carry trailing newline / whitespace
    ("nf_conntrack: table full, dropping packet\n", TableFullMatch()),
    (b"nf_conntrack: table full, dropping packet", TableFullMatch()),
]

NEAR_MISSES = [
    "nf_conntrack: table fullish",
    "nf_conntrack: table fullish, dropping packet",
    "xnf_conntrack: table full, dropping packet",
    "nf_conntrack: table full in netns abc, dropping packet",
    "nf_conntrack: table full in netns , dropping packet",
    "nf_conntrack: table full in netns 0, dropping packet",
    "nf_conntrack: table full in netns -5, dropping packet",
    "nf_conntrack: table full, dropping packets",
    "nf_conntrack: table full, dropping packet x",
    "nf_conntrack: table full dropping packet",
    "nf_conntrack: nf_conntrack: nf_conntrack: table full, dropping packet",
    "nf_conntrack:table full, dropping packet",
    "NF_CONNTRACK: TABLE FULL, DROPPING PACKET",
    "user said: nf_conntrack: table full, dropping packet",
    "[ 12.345] nf_conntrack: table full, dropping packet",  # journald never keeps this prefix
    "nf_conntrack: table full, dropping packet; nf_conntrack: table full, dropping packet",
    "net_ratelimit: 0 callbacks suppressed",
    "net_ratelimit: many callbacks suppressed",
    "net_ratelimit: 12 callbacks suppressed!",
    "foo_ratelimit: 12 callbacks suppressed",
    "net_ratelimit: -3 callbacks suppressed",
    "nf_conntrack: expectation table full",
    "nf_conntrack: falling back to vmalloc.",
    "",
]


@pytest.mark.parametrize(("line", "expected"), REAL)
def test_every_kernel_wording_matches(line: str, expected: TableFullMatch) -> None:
    assert match_kernel_line(line) == expected


@pytest.mark.parametrize("line", NEAR_MISSES)
def test_near_misses_do_not_match(line: str) -> None:
    assert match_kernel_line(line) is None


def test_match_is_frozen_and_counts_drops() -> None:
    m = match_kernel_line("net_ratelimit: 7 callbacks suppressed")
    assert m is not None and m.drops == 7
    assert TableFullMatch().drops == 1
    with pytest.raises(AttributeError):
        m.suppressed = 3  # type: ignore[misc]


def test_very_long_lines_are_refused_cheaply() -> None:
    assert match_kernel_line("nf_conntrack: table full, dropping packet" + " " * 10_000) is None


WORDINGS = [
    "nf_conntrack: table full, dropping packet",
    "nf_conntrack: nf_conntrack: table full, dropping packet",
    "nf_conntrack: nf_conntrack: table full in netns {n}, dropping packet",
]


@given(st.sampled_from(WORDINGS), st.integers(min_value=1, max_value=2**64 - 1))
def test_property_every_real_wording_matches(template: str, inode: int) -> None:
    m = match_kernel_line(template.format(n=inode))
    assert m is not None
    assert m.suppressed == 0
    assert m.netns == (inode if "{n}" in template else None)


@st.composite
def mutated(draw: st.DrawFn) -> str:
    """A real wording with one edit that changes what it says (not mere trailing whitespace)."""
    base = draw(st.sampled_from(WORDINGS)).format(n=draw(st.integers(min_value=1, max_value=2**32)))
    kind = draw(st.sampled_from(["insert", "delete", "replace", "prefix", "suffix"]))
    alphabet = st.characters(blacklist_categories=("Cs",), blacklist_characters=" \t\n\r\x0b\x0c")
    if kind == "prefix":
        return draw(st.text(alphabet, min_size=1, max_size=5)) + base
    if kind == "suffix":
        return base + draw(st.text(alphabet, min_size=1, max_size=5))
    i = draw(st.integers(min_value=0, max_value=len(base) - 1))
    if kind == "delete":
        return base[:i] + base[i + 1 :]
    ch = draw(alphabet)
    if kind == "insert":
        return base[:i] + ch + base[i:]
    return base[:i] + ch + base[i + 1 :]


@settings(max_examples=500)
@given(mutated())
def test_property_no_false_positive_on_mutations(line: str) -> None:
    m = match_kernel_line(line)
    if m is None:
        return
    # A mutation may land on another real wording (deleting "nf_conntrack: " from the
    # doubled form, or a digit edit inside the inode); anything matched must still be one.
    canonical = {w.split(" in netns")[0] for w in WORDINGS}
    if m.netns is None:
        assert line.strip() in canonical
    else:
        assert line.strip() in {w.format(n=m.netns) for w in WORDINGS if "{n}" in w} | {
            f"nf_conntrack: table full in netns {m.netns}, dropping packet"
        }


@given(st.text(max_size=120))
def test_property_random_text_never_matches_unless_real(line: str) -> None:
    m = match_kernel_line(line)
    if m is not None:
        assert "table full" in line or "callbacks suppressed" in line


# -- cursor file ------------------------------------------------------------------------------


def test_cursor_round_trip(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert load_cursor(state) is None
    cur = "s=2be6;i=178;b=1b37;m=11973d6f;t=6611aae303afa;x=ebf6"
    save_cursor(state, cur)
    assert load_cursor(state) == cur
    assert (state / "journal.cursor").stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700


def test_damaged_cursor_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "journal.cursor").write_text("garbage\nmore\n")
    assert load_cursor(tmp_path) is None
    (tmp_path / "journal.cursor").write_text("")
    assert load_cursor(tmp_path) is None


def test_cursor_symlink_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("s=1;i=2\n")
    (tmp_path / "journal.cursor").symlink_to(target)
    assert load_cursor(tmp_path) is None


# -- no journald -------------------------------------------------------------------------------


def test_open_follower_without_journald_returns_none_and_says_so(tmp_path: Path, caplog) -> None:
    missing = [tmp_path / "run-log-journal", tmp_path / "var-log-journal"]
    assert not journald_available(tmp_path / "no-socket-dir", missing)
    caplog.set_level("WARNING")
    assert open_follower(socket_dir=tmp_path / "no-socket-dir", journal_dirs=missing) is None
    assert sum("sampling alone" in r.getMessage() for r in caplog.records) == 1


# -- follower logic on a fake reader (the real one is exercised in tests/kernel/test_journal_live.py)


class FakeReader:
    """Enough of systemd.journal.Reader to drive the follower: entries are appended by the test."""

    def __init__(self, entries: list[dict]) -> None:
        self.entries = entries
        self.pos = -1
        self.matches: list[str] = []

    def add_match(self, *args: str, **kw: str) -> None:
        self.matches += list(args) + [f"{k}={v}" for k, v in kw.items()]

    def _ok(self, e: dict) -> bool:
        # Same field: OR; different fields: AND (as sd-journal does).
        by_field: dict[str, set[str]] = {}
        for m in self.matches:
            k, v = m.split("=", 1)
            by_field.setdefault(k, set()).add(v)
        return all(str(e.get(k)) in vs for k, vs in by_field.items())

    def seek_tail(self) -> None:
        self.pos = len(self.entries)

    def seek_cursor(self, c: str) -> None:
        for i, e in enumerate(self.entries):
            if e["__CURSOR"] >= c:
                self.pos = i - 1
                return
        self.pos = len(self.entries) - 1

    def test_cursor(self, c: str) -> bool:
        return 0 <= self.pos < len(self.entries) and self.entries[self.pos]["__CURSOR"] == c

    def get_next(self, skip: int = 1) -> dict:
        step = 1 if skip > 0 else -1
        p = self.pos + step
        while 0 <= p < len(self.entries):
            if self._ok(self.entries[p]):
                self.pos = p
                return dict(self.entries[p])
            p += step
        # Like sd-journal: running off the end leaves the position on the last entry, so
        # entries appended later are the next ones.
        self.pos = len(self.entries) - 1 if step > 0 else -1
        return {}

    def get_previous(self, skip: int = 1) -> dict:
        return self.get_next(-skip)

    def process(self) -> int:
        return 0

    def fileno(self) -> int:
        return -1  # nothing to watch

    def get_events(self) -> int:
        return 1

    def reliable_fd(self) -> bool:
        return True

    def close(self) -> None:
        pass


BOOT = uuid.UUID(int=7)


def entry(i: int, message: str, transport: str = "kernel", facility: int = 0, src_mono: float = 0.0) -> dict:
    return {
        "__CURSOR": f"c{i:06d}",
        "_TRANSPORT": transport,
        "SYSLOG_FACILITY": facility,
        "MESSAGE": message,
        "__REALTIME_TIMESTAMP": datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)
        + datetime.timedelta(seconds=i),
        "__MONOTONIC_TIMESTAMP": (datetime.timedelta(seconds=100 + i), BOOT),
        "_SOURCE_MONOTONIC_TIMESTAMP": datetime.timedelta(seconds=src_mono or 100 + i),
    }


FULL = "nf_conntrack: nf_conntrack: table full in netns 42, dropping packet"


def follower(entries: list[dict], cursor: str | None = None):
    from ctguard.host.journal import JournalFollower

    reader = FakeReader(entries)
    return JournalFollower(cursor=cursor, reader_factory=lambda: reader, watched_dirs=()), reader


def test_fake_follower_filters_transport_and_facility() -> None:
    entries: list[dict] = []
    f, _ = follower(entries)
    entries += [
        entry(1, FULL, transport="syslog"),
        entry(2, FULL, transport="journal"),
        entry(3, FULL, transport="stdout"),
        entry(4, FULL, facility=1),  # a root write to /dev/kmsg
        entry(5, FULL),
    ]
    evs = f.read_events()
    assert [e.netns for e in evs] == [42]
    assert evs[0].backlog is False and evs[0].cursor == "c000005"
    assert f.cursor == "c000005"


def test_fake_follower_resumes_after_cursor_with_backlog() -> None:
    entries = [entry(i, FULL) for i in range(1, 6)]
    f, _ = follower(entries, cursor="c000003")
    evs = f.read_events()
    # 3 itself is not repeated; 4 and 5 were written while "down": backlog.
    assert [e.cursor for e in evs] == ["c000004", "c000005"]
    assert all(e.backlog for e in evs)
    entries.append(entry(6, FULL))
    evs = f.read_events()
    assert [(e.cursor, e.backlog) for e in evs] == [("c000006", False)]


def test_fake_follower_vacuumed_cursor_returns_following_lines() -> None:
    entries = [entry(i, FULL) for i in (5, 6)]
    f, _ = follower(entries, cursor="c000003")  # entry 3 no longer exists
    assert [e.cursor for e in f.read_events()] == ["c000005", "c000006"]


def test_fake_follower_at_tail_without_cursor_skips_history() -> None:
    entries = [entry(i, FULL) for i in range(1, 4)]
    f, _ = follower(entries)
    assert f.read_events() == []
    assert f.cursor == "c000003"


def test_suppressed_lines_are_attributed_only_after_table_full() -> None:
    entries: list[dict] = []
    f, _ = follower(entries)
    entries.append(entry(1, "net_ratelimit: 50 callbacks suppressed", src_mono=10))
    assert f.read_events() == []  # nothing conntrack-related before it
    entries.append(entry(2, FULL, src_mono=20))
    entries.append(entry(3, "net_ratelimit: 1481 callbacks suppressed", src_mono=25))
    entries.append(entry(4, "net_ratelimit: 9 callbacks suppressed", src_mono=500))  # too late
    evs = f.read_events()
    assert [(e.netns, e.suppressed, e.drops) for e in evs] == [(42, 0, 1), (42, 1481, 1481)]


def test_backlog_is_bounded(monkeypatch) -> None:
    import ctguard.host.journal as j

    monkeypatch.setattr(j, "BACKLOG_LIMIT", 100)
    entries = [entry(i, FULL) for i in range(1, 1002)]
    f, _ = follower(entries, cursor="c000001")
    evs = f.read_events()
    assert len(evs) <= 101
    assert sum(e.drops for e in evs) == 1000
    assert evs[-1].cursor == "c001001"


@pytest.mark.parametrize("name, printed, same_boot, backlog", [
    # The follower opens at CLOCK_MONOTONIC 200 with no cursor; journald hands each line over late.
    ("printed 5 s before ctguard followed (the lab's arm before)", 195.0, True, True),
    ("printed within the start-up slack", 199.5, True, False),
    ("printed after", 201.0, True, False),
    ("another boot's clock says nothing about now", 195.0, False, False),
])
def test_a_line_printed_before_following_began_is_history(monkeypatch, name, printed, same_boot, backlog) -> None:
    import ctguard.host.journal as j

    monkeypatch.setattr(j, "_current_boot_id", lambda: BOOT.hex if same_boot else uuid.UUID(int=8).hex)
    entries: list[dict] = []
    reader = FakeReader(entries)
    f = j.JournalFollower(reader_factory=lambda: reader, watched_dirs=(), clock=lambda: 200.0)
    entries.append(entry(1, FULL, src_mono=printed))
    (ev,) = f.read_events()
    assert ev.backlog is backlog, name
