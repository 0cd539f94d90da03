"""The kernel's table-full lines as the loop takes them: the journald follower (and its
/dev/kmsg tap), the lines written while ctguard was down, and the saved cursor."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ctguard.core.model import Instant, TableFull
from ctguard.host import journal

log = logging.getLogger(__name__)

CURSOR_EVERY = 5.0          # seconds between journal-cursor saves while lines keep coming


class KernelLines:
    def __init__(self, state_dir: Callable[[], str], now: Callable[[], Instant]) -> None:
        self.state_dir = state_dir
        self.now = now
        self.follower: journal.JournalFollower | None = None
        self._cursor_at = -1e9
        self._cursor_saved: str | None = None

    def open(self) -> list[TableFull] | None:
        """Start following; the lines written while ctguard was not running (history, not to
        act on), or None without journald."""
        self.follower = journal.open_follower(cursor=journal.load_cursor(self.state_dir()))
        if self.follower is None:
            return None
        return [self._event(e) for e in self.follower.read_events()]

    def fileno(self) -> int:
        assert self.follower is not None
        return self.follower.fileno()

    def timeout(self) -> float | None:
        return self.follower.timeout() if self.follower is not None else None

    def read(self) -> list[TableFull]:
        if self.follower is None:
            return []
        try:
            raw = self.follower.read_events()
        except Exception as exc:  # the journal must never take the loop down
            log.warning("reading the journal failed: %s", exc)
            return []
        cursor = self.follower.cursor
        if cursor and cursor != self._cursor_saved and time.monotonic() - self._cursor_at >= CURSOR_EVERY:
            self.save_cursor()
        return [self._event(e) for e in raw]

    def save_cursor(self) -> None:
        cursor = self.follower.cursor if self.follower else None
        if not cursor or cursor == self._cursor_saved:
            return
        try:
            journal.save_cursor(self.state_dir(), cursor)
            self._cursor_saved = cursor
            self._cursor_at = time.monotonic()
        except OSError as exc:
            log.warning("cannot save the journal cursor in %s: %s", self.state_dir(), exc)

    def close(self) -> None:
        if self.follower is not None:
            self.save_cursor()
            self.follower.close()

    def _event(self, ev: journal.TableFullEvent) -> TableFull:
        return TableFull(self.now(), ev.netns, ev.suppressed, ev.backlog)
