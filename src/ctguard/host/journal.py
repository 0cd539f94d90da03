"""Follow journald for the kernel's own `table full` lines.

Two parts:

* `match_kernel_line` — a pure matcher for every wording the kernel has used for the
  conntrack table-full message, plus the `net_ratelimit: N callbacks suppressed` line that
  stands in for the messages the kernel's rate limiter swallowed.
* `JournalFollower` — a `systemd.journal.Reader` that only ever sees entries the kernel
  itself wrote (`_TRANSPORT=kernel` *and* `SYSLOG_FACILITY=0`), whose fd sits in the
  daemon's selector, that resumes after a saved cursor (lines written while ctguard was down
  come back flagged `backlog=True`) and that survives rotation, vacuuming and a journald
  restart. Beside it, by default (`open_follower`), a `/dev/kmsg` tap gives the same lines
  ~0.3 s sooner than journald's change notification does; both sit behind one epoll fd and
  each kernel line is reported once.

Why both `_TRANSPORT=kernel` and `SYSLOG_FACILITY=0`: journald stamps `_TRANSPORT` itself, so
the journal API, syslog and stdout cannot claim `kernel`; but anything written to /dev/kmsg
also arrives with `_TRANSPORT=kernel`. The kernel forces such user writes to a non-zero
facility (LOG_USER unless another non-kernel one is given), so facility 0 means "printk from
kernel code". ctguard's own entries go through the journal API and can never match.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import select
import time
import selectors
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ctguard.store.files import atomic_write, ensure_private_dir, read_text_nofollow

log = logging.getLogger(__name__)

CURSOR_FILE = "journal.cursor"

# Where journald keeps its sockets and files. A host with none of these has no journald
# (a minimal container): ctguard then runs on sampling alone.
JOURNAL_SOCKET_DIR = Path("/run/systemd/journal")
RUNTIME_JOURNAL_DIR = Path("/run/log/journal")
PERSISTENT_JOURNAL_DIR = Path("/var/log/journal")

# The kernel prints (net/netfilter/nf_conntrack_core.c, via net_warn_ratelimited with
# pr_fmt "nf_conntrack: "):
#   old kernels:            "nf_conntrack: table full, dropping packet"
#   newer, host netns:      "nf_conntrack: nf_conntrack: table full, dropping packet"
#   newer, another netns:   "nf_conntrack: nf_conntrack: table full in netns 4026532246, dropping packet"
# journald stores MESSAGE without the kernel's "[ 123.456]" timestamp (checked on systemd
# 252 against a real line), so the pattern is anchored at both ends with no prefix allowance
# beyond whitespace a console copy might carry. Anchoring is what keeps near-misses out.
_TABLE_FULL_RE = re.compile(
    r"\A\s*nf_conntrack: (?:nf_conntrack: )?table full"
    r"(?: in netns (?P<netns>[1-9][0-9]{0,19}))?, dropping packet\s*\Z"
)
# lib/net_utils.c / net/core/utils.c: "%s: %d callbacks suppressed" with the function name.
_SUPPRESSED_RE = re.compile(r"\A\s*net_ratelimit: (?P<n>[1-9][0-9]{0,9}) callbacks suppressed\s*\Z")

# net_ratelimit's suppressed count is shared by every rate-limited network message, so it is
# only attributed to conntrack when a table-full line came shortly before it. The kernel's
# window is net.core.message_cost (5 s by default); the summary line is printed when the next
# window opens, so allow a few windows.
SUPPRESSED_ATTRIBUTION_WINDOW = 60.0

# Bound on backlog events kept in memory after a long outage; older ones are folded into a
# count on the first kept event rather than dropped silently.
BACKLOG_LIMIT = 10_000


@dataclass(frozen=True)
class TableFullMatch:
    """What one kernel line says.

    `suppressed == 0`: the line itself is a table-full message (one dropped packet at least);
    `netns` is the namespace inode when the kernel named one (None: the host namespace or a
    kernel that does not say). `suppressed > 0`: a net_ratelimit summary; that many more
    messages were swallowed.
    """

    netns: int | None = None
    suppressed: int = 0

    @property
    def drops(self) -> int:
        """Drops this line stands for (at least)."""
        return self.suppressed if self.suppressed else 1


def match_kernel_line(message: str | bytes) -> TableFullMatch | None:
    """Match one kernel MESSAGE; None for anything that is not a table-full or suppressed line."""
    if isinstance(message, bytes):
        message = message.decode("utf-8", errors="replace")
    if len(message) > 200:  # real lines are < 90 chars; do not run regexes over junk
        return None
    m = _TABLE_FULL_RE.match(message)
    if m:
        ns = m.group("netns")
        return TableFullMatch(netns=int(ns) if ns else None)
    m = _SUPPRESSED_RE.match(message)
    if m:
        return TableFullMatch(suppressed=int(m.group("n")))
    return None


@dataclass(frozen=True)
class TableFullEvent:
    """A matching kernel entry as the follower saw it.

    `realtime`: when journald received it (wall clock, UTC). `monotonic`: the kernel's own
    printk time (`_SOURCE_MONOTONIC_TIMESTAMP`, seconds since boot, comparable with
    `time.monotonic()` on the same boot) or journald's monotonic time when that is missing.
    `boot_id`: the boot the line belongs to (monotonic times from another boot mean nothing
    now). `backlog`: written while ctguard was not following; history, not an emergency.
    `suppressed`: for a net_ratelimit summary, how many messages it stands for; its `netns`
    is the one of the table-full line it followed.
    """

    realtime: datetime.datetime
    monotonic: float
    boot_id: str
    netns: int | None
    suppressed: int
    backlog: bool
    cursor: str
    message: str
    source: str = "journal"  # "journal", or "kmsg" for the fast path (see KmsgTap)

    @property
    def drops(self) -> int:
        return self.suppressed if self.suppressed else 1


def load_cursor(state_dir: Path | str) -> str | None:
    """The cursor saved by `save_cursor`, or None when there is none or it is unreadable."""
    path = Path(state_dir) / CURSOR_FILE
    try:
        text = read_text_nofollow(path, limit=4096).strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("cannot read journal cursor %s (%s); following from the end of the journal", path, exc)
        return None
    # A cursor is "s=...;i=...;b=...;m=...;t=...;x=..."; anything else is a damaged file.
    if not text or "\n" in text or "=" not in text:
        log.warning("journal cursor file %s is damaged; following from the end of the journal", path)
        return None
    return text


def save_cursor(state_dir: Path | str, cursor: str) -> None:
    """Persist `cursor` atomically in the state folder (created private when missing)."""
    folder = ensure_private_dir(Path(state_dir))
    atomic_write(folder / CURSOR_FILE, cursor + "\n", mode=0o600)


def journald_available(
    socket_dir: Path = JOURNAL_SOCKET_DIR,
    journal_dirs: Iterable[Path] = (RUNTIME_JOURNAL_DIR, PERSISTENT_JOURNAL_DIR),
) -> bool:
    """Does this host have a journald (its sockets) or at least journal files to read?"""
    return socket_dir.is_dir() or any(Path(d).is_dir() for d in journal_dirs)


ReaderFactory = Callable[[], Any]


def _default_reader() -> Any:
    # Here, not at the top: systemd.journal takes ~22 ms to import (python3 -X importtime), which
    # every `ctguard status` would pay; only the daemon's follower reads the journal.
    from systemd import journal as sdjournal

    # SYSTEM: kernel lines live in the system journal; no user journals to open and watch.
    return sdjournal.Reader(flags=sdjournal.SYSTEM)


def _current_boot_id() -> str:
    try:
        return uuid.UUID(Path("/proc/sys/kernel/random/boot_id").read_text().strip()).hex
    except (OSError, ValueError):
        return ""


def _seconds(value: Any) -> float | None:
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    return None


@dataclass(frozen=True)
class KmsgRecord:
    facility: int
    seq: int
    usec: int
    message: str


def parse_kmsg_record(raw: bytes) -> KmsgRecord | None:
    """One /dev/kmsg record: "prio,seq,usec,flags[,...];message\n[ KEY=value\n...]"."""
    head, sep, rest = raw.partition(b";")
    if not sep:
        return None
    parts = head.split(b",")
    if len(parts) < 4:
        return None
    try:
        prio, seq, usec = int(parts[0]), int(parts[1]), int(parts[2])
    except ValueError:
        return None
    message = rest.split(b"\n", 1)[0].decode("utf-8", errors="replace")
    return KmsgRecord(facility=prio >> 3, seq=seq, usec=usec, message=message)


class KmsgTap:
    """A low-latency early warning from /dev/kmsg, beside the journal.

    journald reads a kernel line within milliseconds, but only tells readers (inotify on its
    files) after its post-change timer: 250 ms, up to ~500 ms with sd-event's timer slack.
    /dev/kmsg wakes us as the kernel prints. Records here are unforgeable the same way as
    in the journal (userspace writes never get facility 0). The journal stays the record:
    it has the cursor, the backlog and the history; events seen here first are not reported
    again when journald's copy arrives (same kernel timestamp and text).

    Optional: needs CAP_SYSLOG (or kernel.dmesg_restrict=0) and a /dev/kmsg; without it the
    follower works from the journal alone.
    """

    def __init__(self, path: Path = Path("/dev/kmsg")) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            # Only what the kernel prints from now on: history comes from the journal.
            os.lseek(self.fd, 0, os.SEEK_END)
            # An unreadable /dev/kmsg (dmesg_restrict without CAP_SYSLOG) fails here, not later.
            self.read()
        except OSError:
            os.close(self.fd)
            raise

    def read(self) -> list[KmsgRecord]:
        out: list[KmsgRecord] = []
        for _ in range(100_000):  # bound one call even if the kernel talks without pause
            try:
                raw = os.read(self.fd, 8192)
            except BlockingIOError:
                break
            except BrokenPipeError:
                continue  # records we had not read were overwritten in the ring buffer; go on
            if not raw:
                break
            rec = parse_kmsg_record(raw)
            if rec is not None:
                out.append(rec)
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# A line printed this long before following began is history (the kernel's printk clock and
# CLOCK_MONOTONIC agree to well within this; a second also covers the start-up itself).
PRESTART_SLACK = 1.0

# Kernel lines seen recently, from either source, to report each line once.
DEDUP_KEEP = 4096


class JournalFollower:
    """Follows kernel-transport entries; see the module docstring.

    Daemon use::

        follower = open_follower(cursor=load_cursor(state_dir))
        selector.register(follower.fileno(), follower.events())
        ...on readiness, and on every sample tick as a safety net:
        for ev in follower.read_events(): ...
        save_cursor(state_dir, follower.cursor)   # when it changed, e.g. once per cycle

    `read_events()` never blocks. `fileno()` is an epoll set around the journal's inotify fd
    (readable when journal files change; `read_events()` calls `Reader.process()` to consume
    that, then reads every new entry) and, with `kmsg=Path("/dev/kmsg")`, the kernel's log
    device (read to EAGAIN). It is the same fd for the follower's whole life.

    Call `read_events()` on every sample tick too: it is cheap when nothing is new, it is
    where a journal that changed under us (folders recreated, journald moved to
    /var/log/journal) is noticed and reopened, and it covers file systems where sd-journal
    cannot rely on inotify (`timeout()` then says how often to call).
    """

    def __init__(
        self,
        cursor: str | None = None,
        reader_factory: ReaderFactory = _default_reader,
        watched_dirs: Iterable[Path] = (RUNTIME_JOURNAL_DIR, PERSISTENT_JOURNAL_DIR),
        kmsg: Path | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = reader_factory
        # When following began (CLOCK_MONOTONIC, the clock of the kernel's printk times): a
        # line the kernel printed before it is history even when journald hands it over later.
        self._opened = clock()
        self._watched_dirs = tuple(Path(d) for d in watched_dirs)
        self._cursor: str | None = cursor
        self._pending: list[TableFullEvent] = []
        # (kernel monotonic seconds, boot id, netns) of the last table-full line, for
        # attributing net_ratelimit summaries.
        self._last_full: tuple[float, str, int | None] | None = None
        self._reader: Any = None
        self._signature: tuple[object, ...] = ()
        self.reopens = 0
        self._seen: dict[tuple[str, int, str], None] = {}  # insertion-ordered: oldest first
        # One fd for the daemon whatever we watch inside: an epoll set holding the journal's
        # inotify fd and, when enabled, /dev/kmsg. It stays the same fd across reopen().
        self._epoll = select.epoll()
        self._journal_fd: int | None = None
        self._kmsg: KmsgTap | None = None
        self._boot_id = _current_boot_id()
        try:
            self._open(cursor, backlog=cursor is not None)
            if kmsg is not None:
                try:
                    self._kmsg = KmsgTap(kmsg)
                    self._epoll.register(self._kmsg.fd, select.EPOLLIN)
                except OSError as exc:
                    log.info("not reading %s for early warning (%s); the journal alone will do", kmsg, exc)
                    self._kmsg = None
        except BaseException:
            self._epoll.close()
            raise

    # -- opening and positioning ------------------------------------------------------------

    def _open(self, cursor: str | None, backlog: bool) -> None:
        reader = self._factory()
        reader.add_match(_TRANSPORT="kernel", SYSLOG_FACILITY="0")
        self._signature = self._dir_signature()
        positioned = False
        if cursor:
            try:
                reader.seek_cursor(cursor)
                positioned = True
            except (OSError, ValueError) as exc:
                log.warning("saved journal cursor is not usable (%s); following from the end", exc)
        if positioned:
            # After seek_cursor the next entry is the cursor's own when it still exists, or
            # the first one after where it was when it has been vacuumed away.
            first = reader.get_next()
            if first and not reader.test_cursor(cursor):
                self._take(first, backlog=backlog)
            # Drain everything already written now, so the live/backlog boundary is this
            # moment rather than whenever the daemon first calls read_events().
            self._drain(reader, backlog=backlog)
        else:
            reader.seek_tail()
            # seek_tail alone leaves the position *after* the end in a way that makes the next
            # get_next() misbehave on some systemd versions; stepping back onto the last
            # matching entry gives a defined position and its cursor.
            last = reader.get_previous()
            if last:
                self._cursor = last.get("__CURSOR", self._cursor)
        self._reader = reader
        self._watch_journal_fd()

    def _watch_journal_fd(self) -> None:
        if self._journal_fd is not None:
            try:
                self._epoll.unregister(self._journal_fd)
            except (OSError, ValueError):
                pass  # the old fd is already closed
        fd = int(self._reader.fileno())
        mask = int(self._reader.get_events()) or select.EPOLLIN
        if fd >= 0:
            self._epoll.register(fd, mask)
            self._journal_fd = fd

    def _dir_signature(self) -> tuple[object, ...]:
        """Identity of the journal folders and their per-machine subfolders.

        sd-journal's inotify watches are set on the folders that existed when it was opened:
        a folder created later (persistent storage switched on, /var/log/journal created by
        a flush) or replaced is never seen. A change here means: reopen.
        """
        sig: list[object] = []
        for d in self._watched_dirs:
            try:
                st = os.stat(d)
                subs = sorted((e.name, e.inode()) for e in os.scandir(d) if e.is_dir(follow_symlinks=False))
                sig.append((st.st_dev, st.st_ino, tuple(subs)))
            except OSError:
                sig.append(None)
        return tuple(sig)

    def reopen(self) -> None:
        """Close and reopen the reader after the current cursor (nothing is lost or replayed)."""
        old = self._reader
        self._reader = None
        if self._journal_fd is not None:
            try:
                self._epoll.unregister(self._journal_fd)
            except (OSError, ValueError):
                pass
            self._journal_fd = None
        try:
            old.close()
        except Exception:  # closing a broken reader must not stop the reopen
            pass
        self.reopens += 1
        # Entries after the cursor that appear on reopen were written while we were
        # following (just not seen), so they are live, not backlog.
        self._open(self._cursor, backlog=False)

    # -- selector integration ---------------------------------------------------------------

    def fileno(self) -> int:
        """The fd to register in the daemon's selector for reading (EVENT_READ).

        An epoll set holding the journal's inotify fd (added with the mask
        `Reader.get_events()` asks for) and /dev/kmsg when that is enabled. It becomes
        readable when either is; it stays the same fd across `reopen()`.
        """
        return self._epoll.fileno()

    def events(self) -> int:
        """selectors event mask for `fileno()`."""
        return selectors.EVENT_READ

    def timeout(self) -> float | None:
        """Longest the daemon may sleep before calling `read_events()` (None: no limit).

        journald's inotify fd is reliable on local file systems (None); on others sd-journal
        asks to be polled, and this says how often.
        """
        try:
            if self._reader.reliable_fd():
                return None
            t = self._reader.get_timeout_ms()
        except OSError:
            return None
        if t is None or t < 0:
            return None
        return max(t / 1000.0, 0.0)

    # -- reading ----------------------------------------------------------------------------

    @property
    def cursor(self) -> str | None:
        """Cursor of the last kernel entry read (matching or not); persist it with save_cursor."""
        return self._cursor

    def read_events(self) -> list[TableFullEvent]:
        """Events for kernel entries that arrived since the last call. Never blocks."""
        from systemd import journal as sdjournal   # (see _default_reader)

        # The epoll set is level-triggered: reading kmsg to EAGAIN and Reader.process()
        # (which consumes the inotify events) are what make it quiet again.
        if self._kmsg is not None:
            for rec in self._kmsg.read():
                if rec.facility == 0:
                    self._take_kernel(rec.message, rec.usec / 1e6, self._boot_id, None,
                                      cursor="", backlog=False, source="kmsg")
        if self._dir_signature() != self._signature:
            log.info("journal folders changed (journald restarted or storage moved); reopening the journal")
            self.reopen()
        try:
            state = self._reader.process()
        except OSError as exc:
            log.warning("journal reader failed (%s); reopening it", exc)
            self.reopen()
            state = sdjournal.INVALIDATE
        if state == sdjournal.INVALIDATE:
            # Files were added or removed (rotation, vacuum). sd-journal re-scans on its own;
            # reading on from the current position picks up the new files.
            log.debug("journal files changed (rotation or vacuum)")
        try:
            self._drain(self._reader, backlog=False)
        except OSError as exc:
            log.warning("reading the journal failed (%s); reopening it", exc)
            self.reopen()
            self._drain(self._reader, backlog=False)
        out, self._pending = self._pending, []
        return out

    def _drain(self, reader: Any, backlog: bool) -> None:
        while True:
            entry = reader.get_next()
            if not entry:
                return
            self._take(entry, backlog)

    def _take(self, entry: dict[str, Any], backlog: bool) -> None:
        cursor = entry.get("__CURSOR")
        if cursor:
            self._cursor = cursor
        # The reader's match already guarantees these; checked again because a match that
        # was lost (flush_matches elsewhere, a future refactor) must never let forged lines in.
        if entry.get("_TRANSPORT") != "kernel" or entry.get("SYSLOG_FACILITY") not in (0, "0"):
            return
        message = entry.get("MESSAGE", "")
        if not isinstance(message, (str, bytes)):  # a repeated field; the kernel never does this
            return
        mono_field = entry.get("__MONOTONIC_TIMESTAMP")
        boot_id = ""
        journal_mono: float | None = None
        if mono_field is not None:
            journal_mono = _seconds(mono_field[0])
            boot_id = getattr(mono_field[1], "hex", str(mono_field[1]))
        elif isinstance(entry.get("_BOOT_ID"), uuid.UUID):
            boot_id = entry["_BOOT_ID"].hex
        mono = _seconds(entry.get("_SOURCE_MONOTONIC_TIMESTAMP"))
        if mono is None:
            mono = journal_mono if journal_mono is not None else 0.0
        realtime = entry.get("__REALTIME_TIMESTAMP")
        if not isinstance(realtime, datetime.datetime):
            realtime = None
        self._take_kernel(message, mono, boot_id, realtime, cursor or "", backlog, "journal")

    def _take_kernel(
        self,
        message: str | bytes,
        mono: float,
        boot_id: str,
        realtime: datetime.datetime | None,
        cursor: str,
        backlog: bool,
        source: str,
    ) -> None:
        if isinstance(message, bytes):
            message = message.decode("utf-8", errors="replace")
        match = match_kernel_line(message)
        if match is None:
            return
        key = (boot_id, round(mono * 1e6), message)
        if key in self._seen:
            return  # already reported from the other source
        if (not backlog and source == "journal" and boot_id and boot_id == self._boot_id
                and mono < self._opened - PRESTART_SLACK):
            # Printed before ctguard followed, read late (journald lags under a burst of kernel
            # lines): the lab's arm before this one, not this moment (issue 24). The kmsg tap
            # starts at the end of the ring buffer: everything it reads is new.
            backlog = True
        self._seen[key] = None
        if len(self._seen) > DEDUP_KEEP:
            del self._seen[next(iter(self._seen))]
        if realtime is None:
            # kmsg carries only the monotonic time; wall clock now is within milliseconds.
            realtime = datetime.datetime.now(datetime.timezone.utc)
        realtime = realtime.astimezone(datetime.timezone.utc)
        netns = match.netns
        if match.suppressed:
            last = self._last_full
            if last is None or last[1] != boot_id or not (0 <= mono - last[0] <= SUPPRESSED_ATTRIBUTION_WINDOW):
                return  # some other network message was being rate-limited
            netns = last[2]
        else:
            self._last_full = (mono, boot_id, netns)
        event = TableFullEvent(
            realtime=realtime,
            monotonic=mono,
            boot_id=boot_id,
            netns=netns,
            suppressed=match.suppressed,
            backlog=backlog,
            cursor=cursor,
            message=message,
            source=source,
        )
        self._pending.append(event)
        if backlog and len(self._pending) > BACKLOG_LIMIT:
            self._fold_backlog()

    def _fold_backlog(self) -> None:
        # Keep memory bounded after a long outage: fold the oldest half into one event whose
        # `suppressed` carries their drop count (history only; the daemon counts it).
        half = len(self._pending) // 2
        old, keep = self._pending[:half], self._pending[half:]
        first = old[0]
        folded = TableFullEvent(
            realtime=first.realtime,
            monotonic=first.monotonic,
            boot_id=first.boot_id,
            netns=first.netns,
            suppressed=sum(e.drops for e in old),
            backlog=True,
            cursor=old[-1].cursor,
            message=f"{len(old)} earlier table-full lines folded",
        )
        self._pending = [folded, *keep]

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._kmsg is not None:
            self._kmsg.close()
            self._kmsg = None
        self._epoll.close()

    def __enter__(self) -> JournalFollower:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_follower(
    cursor: str | None = None,
    reader_factory: ReaderFactory = _default_reader,
    socket_dir: Path = JOURNAL_SOCKET_DIR,
    journal_dirs: Iterable[Path] = (RUNTIME_JOURNAL_DIR, PERSISTENT_JOURNAL_DIR),
    kmsg: Path | None = Path("/dev/kmsg"),
) -> JournalFollower | None:
    """A follower, or None (logged once, here) when this host has no journald to follow."""
    journal_dirs = tuple(journal_dirs)
    if not journald_available(socket_dir, journal_dirs):
        log.warning(
            "no journald on this host (neither %s nor %s exists): ctguard runs on sampling "
            "alone and hears about a full table at the next sample instead of at once",
            socket_dir,
            " nor ".join(str(d) for d in journal_dirs),
        )
        return None
    try:
        return JournalFollower(cursor=cursor, reader_factory=reader_factory, watched_dirs=journal_dirs, kmsg=kmsg)
    except ImportError as exc:
        log.warning("python3-systemd is not installed (%s): ctguard runs on sampling alone; "
                    "install python3-systemd to react to the kernel's table-full lines at once", exc)
        return None
    except OSError as exc:
        log.warning("cannot open the journal (%s): ctguard runs on sampling alone", exc)
        return None
