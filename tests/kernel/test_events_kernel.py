"""ctguard's own journal entries through a real journald (root: reads the system journal)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ctguard.host import events
from ctguard.host.events import EventLog
from helpers.paths import SRC

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to read the system journal")


def _find(message_id: str, marker: str, timeout: float = 5.0) -> dict | None:
    from systemd import journal as sdjournal

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = sdjournal.Reader(flags=sdjournal.SYSTEM)
        try:
            r.add_match(MESSAGE_ID=message_id)
            r.seek_tail()
            for _ in range(50):
                e = r.get_previous()
                if not e:
                    break
                if marker in str(e.get("MESSAGE", "")):
                    return e
        finally:
            r.close()
        time.sleep(0.05)
    return None


@needs_root
def test_entries_reach_journald_and_are_findable_by_id(journald) -> None:  # noqa: F811
    marker = uuid.uuid4().hex
    EventLog().emit("refused", f"bump refused (ceiling) {marker}", CTGUARD_NETNS=4026532246, CTGUARD_FILL=0.97,
                    CTGUARD_OLD_MAX=1048576, CTGUARD_NEW_MAX=2097152, CTGUARD_REASON="ceiling")
    e = _find(events.MESSAGE_ID_BUMP_REFUSED, marker)
    assert e is not None
    assert e["SYSLOG_IDENTIFIER"] == "ctguard"
    assert e["PRIORITY"] == events.LOG_ERR
    assert e["_TRANSPORT"] == "journal"
    assert e["CTGUARD_REASON"] == "ceiling" and e["CTGUARD_NEW_MAX"] == "2097152"
    out = subprocess.run(["journalctl", f"MESSAGE_ID={events.MESSAGE_ID_BUMP_REFUSED}", "CTGUARD_REASON=ceiling",
                          "-o", "cat", "--no-pager"], capture_output=True, text=True).stdout
    assert marker in out


@needs_root
def test_own_entries_never_trigger_the_follower(journald) -> None:  # noqa: F811
    from ctguard.host.journal import JournalFollower

    f = JournalFollower()
    try:
        f.read_events()
        marker = uuid.uuid4().hex
        log = EventLog()
        log.emit("table-full", "nf_conntrack: nf_conntrack: table full in netns 4026532246, dropping packet")
        log.emit("table-full", "nf_conntrack: table full, dropping packet")
        log.emit("stop", f"marker {marker}")
        assert _find(events.MESSAGE_ID_STOP, marker) is not None
        time.sleep(0.6)  # past journald's change-notification delay
        assert [e for e in f.read_events() if e.netns in (None, 4026532246) and not e.backlog] == []
    finally:
        f.close()


@needs_root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1)")
def test_real_fallback_without_journald_socket(tmp_path: Path) -> None:
    # A private mount namespace where /run/systemd/journal is an empty tmpfs: what a minimal
    # container looks like to systemd.journal.send.
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from ctguard.host.events import EventLog\n"
        "EventLog().emit('bump', 'raised nf_conntrack_max 1 -> 2', CTGUARD_NEW_MAX=2)\n"
    ) % SRC
    proc = subprocess.run(
        ["unshare", "-m", "sh", "-c",
         "mkdir -p /run/systemd/journal && mount -t tmpfs tmpfs /run/systemd/journal && exec \"$0\" -c \"$1\"",
         sys.executable, code],
        capture_output=True, text=True, timeout=30,
    )
    if proc.returncode != 0 and "mount" in proc.stderr:
        pytest.skip(f"cannot make a private mount namespace here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert any("cannot write to the journal" in line for line in lines)
    assert any(line.startswith("ctguard: warning: raised nf_conntrack_max 1 -> 2") for line in lines)
