"""sd_notify for ctguard.service (`Type=notify`), through the sdnotify package.

Everything is a no-op when NOTIFY_SOCKET is unset (ctguard run by hand, in a test, in a
container without systemd), so the daemon can call these unconditionally.

The watchdog: systemd sets WATCHDOG_USEC (and WATCHDOG_PID) when the unit has
`WatchdogSec=`; the daemon asks `watchdog_interval()` how often to ping and calls
`watchdog()` from its loop *after* a completed cycle, so a stuck loop stops the pings and
systemd restarts the service. Pinging from a timer thread would defeat that.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

import sdnotify

log = logging.getLogger(__name__)


def _clean(text: str, limit: int = 400) -> str:
    """One line, latin-1 safe, bounded.

    A newline would start a new `KEY=value` assignment in the datagram (a STATUS text built
    from a namespace name could otherwise send `READY=1` or `STOPPING=1`), and sdnotify
    encodes with latin-1, which raises (silently swallowed) on anything else.
    """
    one_line = " ".join(text.split())
    safe = one_line.encode("latin-1", errors="replace").decode("latin-1")
    return safe[:limit]


def _connect(name: str) -> socket.socket | None:
    addr = "\0" + name[1:] if name.startswith("@") else name
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(addr)
    except OSError:
        sock.close()
        return None
    return sock


def _monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """READY / STATUS / WATCHDOG / RELOADING / STOPPING to systemd; silent without NOTIFY_SOCKET."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._socket_name = env.get("NOTIFY_SOCKET") or None
        self._watchdog_usec = self._parse_watchdog(env)
        self._sd: sdnotify.SystemdNotifier | None = None
        self._status_sent: str | None = None      # the STATUS= systemd holds
        self._status_at = -1e9                     # monotonic time it was sent
        self._status_held: str | None = None       # a changed line held by the interval, sent by flush_status
        if self._socket_name:
            self._sd = sdnotify.SystemdNotifier()
            if environ is not None:
                # sdnotify reads os.environ itself; honour the mapping we were given instead.
                self._sd.socket = _connect(self._socket_name)
            if self._sd.socket is None:
                log.warning(
                    "NOTIFY_SOCKET=%s is set but cannot be reached: systemd will not hear READY "
                    "or watchdog pings (is ctguard running under the unit that set it?)",
                    self._socket_name,
                )
                self._sd = None

    @staticmethod
    def _parse_watchdog(env: Mapping[str, str]) -> int | None:
        raw = env.get("WATCHDOG_USEC")
        if not raw:
            return None
        try:
            usec = int(raw)
        except ValueError:
            log.warning("WATCHDOG_USEC=%r is not a number; not sending watchdog pings", raw)
            return None
        if usec <= 0:
            return None
        pid = env.get("WATCHDOG_PID")
        # The watchdog is meant for another process (we were forked/exec'd by the one it is for).
        if pid and pid.strip() != str(os.getpid()):
            return None
        return usec

    @property
    def enabled(self) -> bool:
        return self._sd is not None

    def _send(self, *lines: str) -> None:
        if self._sd is None:
            return
        self._sd.notify("\n".join(lines))

    def ready(self, status: str | None = None) -> None:
        """READY=1 (after the first sample, and again after a reload)."""
        if status is None:
            self._send("READY=1")
        else:
            self._send("READY=1", f"STATUS={_clean(status)}")
            self._status_sent, self._status_at, self._status_held = _clean(status), time.monotonic(), None

    # STATUS= goes to PID 1 when it changes, at most once per STATUS_INTERVAL seconds: the loop
    # calls status() every turn (10 a second under pressure), and a line that changes faster
    # than anyone reads `systemctl status` is sent on the first turn after the interval.
    STATUS_INTERVAL = 1.0

    def status(self, text: str) -> None:
        line = _clean(text)
        now = time.monotonic()
        if line == self._status_sent:
            self._status_held = None
            return
        if now - self._status_at < self.STATUS_INTERVAL:
            # Held, not dropped: a calm host's next turn may be seconds away (ctguard.core.ticks),
            # so the loop sends it once the interval is over (status_timeout, flush_status).
            self._status_held = line
            return
        self._send(f"STATUS={line}")
        self._status_sent, self._status_at, self._status_held = line, now, None

    def status_timeout(self) -> float | None:
        """Seconds until a held STATUS= line may be sent, or None when none is held."""
        if self._status_held is None:
            return None
        return max(0.0, self._status_at + self.STATUS_INTERVAL - time.monotonic())

    def flush_status(self) -> None:
        """Send the held STATUS= line once the interval is over."""
        if self._status_held is not None and time.monotonic() - self._status_at >= self.STATUS_INTERVAL:
            self.status(self._status_held)

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises), or None."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def watchdog(self) -> None:
        """WATCHDOG=1, only when systemd asked for a watchdog (for this process)."""
        if self._watchdog_usec is not None:
            self._send("WATCHDOG=1")

    def reloading(self) -> None:
        """RELOADING=1 with MONOTONIC_USEC (systemd >= 253 requires it for Type=notify-reload)."""
        self._send("RELOADING=1", f"MONOTONIC_USEC={_monotonic_usec()}")

    def stopping(self, status: str | None = None) -> None:
        if status is None:
            self._send("STOPPING=1")
        else:
            self._send("STOPPING=1", f"STATUS={_clean(status)}")
            self._status_sent, self._status_at, self._status_held = _clean(status), time.monotonic(), None

    def extend_timeout(self, seconds: float) -> None:
        """EXTEND_TIMEOUT_USEC: a slow start or stop (e.g. a capture finishing) needs more time."""
        self._send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")
