"""The daemon's file writes (state, peaks, relief, metrics): a failure is said once, and its
recovery once, not every turn; and while the kernel rehashes, writes wait.

An fsync waits for a running hash-table resize (ctguard.daemon.resize), so the state and peak
files written in those seconds are held back and written when the resize is done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class Saver:
    def __init__(self, default_where: Callable[[], str]) -> None:
        self._default_where = default_where
        self._failing: dict[str, str] = {}          # file kind -> the error last said about it
        self._held: dict[str, Callable[[], Any]] = {}   # kind -> the write held during a resize

    def save(self, what: str, write: Callable[[], Any], where: str | None = None) -> None:
        """Write now; a failure is logged once per distinct error."""
        try:
            write()
        except OSError as exc:
            said = f"{exc.strerror or exc} ({exc.filename or where or self._default_where()})"
            if self._failing.get(what) != said:
                log.warning("cannot write the %s file: %s; the previous file is unchanged, ctguard goes on "
                            "and will say when it can write again", what, said)
                self._failing[what] = said
        else:
            if self._failing.pop(what, None) is not None:
                log.info("the %s file is written again", what)

    def save_or_hold(self, what: str, write: Callable[[], Any], hold: bool) -> None:
        """Write now, or (`hold`: the kernel is rehashing) when `flush_held` is called."""
        if hold:
            self._held[what] = write
        else:
            self.save(what, write)

    def flush_held(self) -> None:
        held, self._held = self._held, {}
        for what, write in held.items():
            self.save(what, write)
