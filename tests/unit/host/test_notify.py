"""Notifier against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctguard.host.notify import Notifier


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


def recv_all(sock: socket.socket) -> list[str]:
    out = []
    sock.settimeout(0.2)
    try:
        while True:
            out.append(sock.recv(4096).decode("latin-1"))
    except (TimeoutError, socket.timeout):
        pass
    return out


def test_sequence_ready_status_reloading_stopping(notify_socket: socket.socket) -> None:
    n = Notifier()
    assert n.enabled
    n.ready()
    n.status("worst netns web 71% of 262144, last action bump 131072->262144")
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.ready("policy reloaded")
    n.stopping()
    got = recv_all(notify_socket)
    assert got[0] == "READY=1"
    assert got[1] == "STATUS=worst netns web 71% of 262144, last action bump 131072->262144"
    lines = got[2].split("\n")
    assert lines[0] == "RELOADING=1"
    key, value = lines[1].split("=")
    assert key == "MONOTONIC_USEC" and before <= int(value) <= after
    assert got[3] == "READY=1\nSTATUS=policy reloaded"
    assert got[4] == "STOPPING=1"
    assert len(got) == 5


def test_watchdog_only_when_asked(notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    n = Notifier()
    assert n.watchdog_interval() is None
    n.watchdog()
    assert recv_all(notify_socket) == []

    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier()
    assert n.watchdog_interval() == 10.0
    n.watchdog()
    assert recv_all(notify_socket) == ["WATCHDOG=1"]


def test_watchdog_for_another_pid_is_not_ours(notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")
    n = Notifier()
    assert n.watchdog_interval() is None
    n.watchdog()
    assert recv_all(notify_socket) == []


@pytest.mark.parametrize("bad", ["", "0", "-5", "soon"])
def test_bad_watchdog_usec_disables_pings(notify_socket, monkeypatch, bad: str) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", bad)
    assert Notifier().watchdog_interval() is None


def test_status_cannot_inject_assignments(notify_socket: socket.socket) -> None:
    n = Notifier()
    n.status("netns evil\nREADY=1\nSTOPPING=1 ünïcode ☃")
    got = recv_all(notify_socket)
    assert len(got) == 1
    assert "\n" not in got[0]
    assert got[0].startswith("STATUS=netns evil READY=1 STOPPING=1 ünïcode ?")


def test_noop_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    n = Notifier()
    assert not n.enabled
    n.ready()
    n.status("x")
    n.watchdog()
    n.reloading()
    n.stopping()


def test_unreachable_socket_is_reported_not_fatal(tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    caplog.set_level("WARNING")
    n = Notifier()
    assert not n.enabled
    n.ready()
    assert any("cannot be reached" in r.getMessage() for r in caplog.records)


def test_abstract_socket_and_explicit_environ(tmp_path: Path) -> None:
    name = f"@ctguard-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name[1:])
    try:
        n = Notifier(environ={"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "4000000"})
        n.ready()
        n.watchdog()
        assert n.watchdog_interval() == 2.0
        assert recv_all(sock) == ["READY=1", "WATCHDOG=1"]
    finally:
        sock.close()


def test_status_is_sent_when_it_changes_at_most_once_a_second(notify_socket: socket.socket) -> None:
    """Issue 25: the loop reports every turn (10/s under pressure); PID 1 hears a STATUS= line only
    when it changed, and no more than once per Notifier.STATUS_INTERVAL."""
    n = Notifier()
    n.STATUS_INTERVAL = 0.3
    n.status("a")
    n.status("a")            # unchanged: nothing
    n.status("b")            # changed, but within the interval: held
    time.sleep(0.35)
    n.status("b")            # the next turn after the interval sends it
    n.status("b")
    assert recv_all(notify_socket) == ["STATUS=a", "STATUS=b"]


def test_a_held_status_is_sent_when_the_interval_is_over(notify_socket: socket.socket) -> None:
    """A calm host's turns may be 5 s apart (issue 21 item 5): a changed line held by the interval
    is sent by the loop's flush once the interval is over, not at the next turn."""
    n = Notifier()
    n.STATUS_INTERVAL = 0.3
    assert n.status_timeout() is None
    n.status("a")
    n.status("b")            # held
    assert 0.0 < n.status_timeout() <= 0.3
    n.flush_status()         # too early: still held
    time.sleep(0.35)
    assert n.status_timeout() == 0.0
    n.flush_status()
    n.flush_status()
    assert n.status_timeout() is None
    n.status("c")
    n.status("b")            # back to what PID 1 holds: nothing held
    assert n.status_timeout() is None
    assert recv_all(notify_socket) == ["STATUS=a", "STATUS=b"]
