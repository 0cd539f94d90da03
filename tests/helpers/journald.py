"""A real systemd-journald for tests.

tests/conftest.py makes the fixture known to every test; ask for it by name::

    def test_x(journald): ...

The `journald` fixture (session scope) makes sure a journald is running: when one already
answers on /run/systemd/journal/socket it is used as it is; otherwise the fixture starts
`/lib/systemd/systemd-journald` and stops it afterwards — only if it started it, and only if
no other test session (holding the shared "users" lock) is still using it.

Test sessions on this machine run concurrently, so starting is serialised with a lock file
and every user holds a shared lock on a second file for as long as it needs journald.
Restarting journald (for the "survives a restart" tests) is only done by a session that
started journald itself and is its only user; `Journald.can_restart()` says whether that
is so, and the test skips with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers.wait import wait_for

JOURNALD = Path("/lib/systemd/systemd-journald")
SOCKET = Path("/run/systemd/journal/socket")
START_LOCK = Path("/run/lock/ctguard-journald.lock")
USERS_LOCK = Path("/run/lock/ctguard-journald.users")
LOG_FILE = Path("/run/lock/ctguard-journald.log")


def journald_answers(sock: Path = SOCKET) -> bool:
    """True when a journald is bound to the native socket (connect fails with ECONNREFUSED otherwise)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        s.connect(str(sock))
        return True
    except OSError:
        return False
    finally:
        s.close()


def journald_unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to start systemd-journald and read the system journal"
    if journald_answers():
        return None
    if not JOURNALD.exists():
        return f"no journald running and {JOURNALD} is not installed"
    return None


def journald_pids() -> list[int]:
    """PIDs of running systemd-journald processes (the comm name is cut to 15 characters)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # Only the main instance (no namespace argument): namespaced instances do not read kmsg.
        if comm == "systemd-journal" and len([c for c in cmdline if c]) == 1:
            pids.append(int(entry.name))
    return pids


@dataclass
class Journald:
    """Handle on the journald the tests use."""

    owned: bool = False
    proc: subprocess.Popen[bytes] | None = None
    _users_fh: object | None = field(default=None, repr=False)

    # -- lifecycle --------------------------------------------------------------------------

    def _spawn(self) -> None:
        LOG_FILE.parent.mkdir(parents=True, exist_ok=True)
        with open(LOG_FILE, "ab") as logf:
            # A new session: a Ctrl-C on pytest must not kill journald before the fixture
            # has a chance to stop it cleanly.
            self.proc = subprocess.Popen(
                [str(JOURNALD)], stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, start_new_session=True
            )
        if not wait_for(journald_answers, 10, interval=0.02):
            self._terminate()
            raise RuntimeError(f"systemd-journald did not come up within 10 s; see {LOG_FILE}")
        self.owned = True

    def _terminate(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def start(self) -> None:
        USERS_LOCK.parent.mkdir(parents=True, exist_ok=True)
        with open(START_LOCK, "w") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            try:
                if not journald_answers():
                    self._spawn()
                fh = open(USERS_LOCK, "w")
                fcntl.flock(fh, fcntl.LOCK_SH)
                self._users_fh = fh
            finally:
                fcntl.flock(lk, fcntl.LOCK_UN)

    def _only_user(self) -> bool:
        """Drop our shared lock and try for the exclusive one: succeeds when nobody else uses journald.

        On success the caller holds the exclusive lock (released by `_rejoin`).
        """
        fh = self._users_fh
        if fh is None:
            return False
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def _rejoin(self) -> None:
        if self._users_fh is not None:
            fcntl.flock(self._users_fh, fcntl.LOCK_SH)

    def stop(self) -> None:
        with open(START_LOCK, "w") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            try:
                if self.owned and self._only_user():
                    self._terminate()
                    self.owned = False
                # else: another session still uses it; it stays running (harmless).
                if self._users_fh is not None:
                    self._users_fh.close()  # type: ignore[attr-defined]
                    self._users_fh = None
            finally:
                fcntl.flock(lk, fcntl.LOCK_UN)

    # -- operations for tests ---------------------------------------------------------------

    def can_restart(self) -> str | None:
        """None when this session may restart journald, else why not."""
        if not self.owned or self.proc is None:
            return "journald was started outside this test session; restarting it is not ours to do"
        return None

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[bool]:
        """Hold journald for ourselves (yields False when other sessions use it)."""
        with open(START_LOCK, "w") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            try:
                ok = self._only_user()
                try:
                    yield ok
                finally:
                    self._rejoin()
            finally:
                fcntl.flock(lk, fcntl.LOCK_UN)

    def restart(self) -> None:
        """Stop our journald and start a fresh one (the caller checked `can_restart`)."""
        reason = self.can_restart()
        if reason:
            pytest.skip(reason)
        with self.exclusive() as alone:
            if not alone:
                pytest.skip("another test session is using journald; not restarting it under them")
            self._terminate()
            self._spawn()

    @staticmethod
    def rotate() -> None:
        subprocess.run(["journalctl", "--rotate"], check=True, capture_output=True)

    @staticmethod
    def vacuum_files(n: int = 1) -> None:
        subprocess.run(["journalctl", f"--vacuum-files={n}"], check=True, capture_output=True)

    @staticmethod
    def sync() -> None:
        """Ask journald to write everything out (so journalctl/readers see it now)."""
        subprocess.run(["journalctl", "--sync"], check=False, capture_output=True)


@pytest.fixture(scope="session")
def journald() -> Iterator[Journald]:
    reason = journald_unavailable_reason()
    if reason:
        pytest.skip(reason)
    if shutil.which("journalctl") is None:
        pytest.skip("journalctl is not installed")
    handle = Journald()
    handle.start()
    try:
        yield handle
    finally:
        handle.stop()


def journal_entries(**match: str) -> list[dict]:
    from systemd import journal

    r = journal.Reader()
    r.this_boot()
    for k, v in match.items():
        r.add_match(**{k: v})
    r.seek_head()
    return list(r)


# The daemon's sd_notify messages, received the way systemd would (NOTIFY_SOCKET).
class NotifySocket:
    def __init__(self, folder: Path) -> None:
        self.path = str(folder / "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def drain(self, until, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                pass
            if until(self.messages):
                return True
        return until(self.messages)
