"""The control socket's protocol (ctguard.control.protocol) over a real Unix socket.

The server runs in a loop of its own here (a thread standing in for the daemon's loop); the
daemon's own use of it is tested in tests/kernel/test_control_daemon.py against a running `ctguard run`.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ctguard.control import protocol as control
from ctguard.control.protocol import ControlBusy, ControlError, ControlServer, request


@contextmanager
def serving(path: Path, handlers) -> Iterator[ControlServer]:
    """A ControlServer served from a selector loop, as the daemon serves it."""
    server = ControlServer(path, handlers)
    sel = selectors.DefaultSelector()
    server.attach(sel, "control")
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            timeout = server.timeout()
            for key, _ in sel.select(0.05 if timeout is None else min(0.05, timeout)):
                server.ready(key.fileobj)
            server.expire()

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield server
    finally:
        stop.set()
        t.join(5)
        server.close()
        sel.close()


def echo(args):
    return {"echo": {k: v for k, v in args.items() if k != "peer"}, "peer": args["peer"]}


def refuse(args):
    raise ControlError("do something else", "some-code")


def crash(args):
    raise RuntimeError("a bug")


HANDLERS = {"echo": echo, "refuse": refuse, "crash": crash}


def test_a_request_gets_its_answer_and_the_caller_is_known(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "control.sock"
    with serving(sock, HANDLERS):
        result = request(sock, "echo", {"to": 5})
        assert result["echo"] == {"to": 5}
        assert result["peer"] == {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}


def test_socket_and_folder_are_private(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "control.sock"
    with serving(sock, HANDLERS):
        assert stat.S_IMODE(os.stat(sock.parent).st_mode) == 0o700
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert not sock.exists(), "the socket is removed at stop"


def test_refusals_unknown_commands_and_bugs_are_answers_not_crashes(tmp_path: Path) -> None:
    sock = tmp_path / "control.sock"
    with serving(sock, HANDLERS):
        with pytest.raises(ControlError) as refused:
            request(sock, "refuse")
        assert str(refused.value) == "do something else" and refused.value.code == "some-code"
        with pytest.raises(ControlError, match="unknown command 'nope' .known: crash, echo, refuse"):
            request(sock, "nope")
        with pytest.raises(ControlError, match="failed inside the daemon"):
            request(sock, "crash")
        assert request(sock, "echo")["echo"] == {}, "still serving after a handler's bug"


def raw(sock: Path, data: bytes, shut: bool = True) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(sock))
    s.sendall(data)
    if shut:
        s.shutdown(socket.SHUT_WR)
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    s.close()
    return json.loads(out) if out else {}


@pytest.mark.parametrize("line,error", [
    (b"not json\n", "not JSON"),
    (b"[1, 2]\n", 'send {"cmd"'),
    (b'{"cmd": 3}\n', 'send {"cmd"'),
    (b'{"cmd": "echo", "args": [1]}\n', "args must be a JSON object"),
])
def test_malformed_requests_are_told_what_to_send(tmp_path: Path, line: bytes, error: str) -> None:
    sock = tmp_path / "control.sock"
    with serving(sock, HANDLERS):
        answer = raw(sock, line)
        assert answer["ok"] is False and error in answer["error"]


def test_the_wire_format_is_one_json_line_each_way(tmp_path: Path) -> None:
    sock = tmp_path / "control.sock"
    with serving(sock, HANDLERS):
        answer = raw(sock, b'{"cmd": "echo", "args": {"x": 1}}\n', shut=False)
        assert answer["ok"] is True and answer["result"]["echo"] == {"x": 1}


def test_a_silent_or_oversized_client_is_dropped_and_others_are_served(tmp_path: Path) -> None:
    sock = tmp_path / "control.sock"
    with serving(sock, HANDLERS):
        silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        silent.connect(str(sock))
        assert request(sock, "echo")["echo"] == {}, "a client that says nothing holds nobody up"
        silent.settimeout(control.CLIENT_DEADLINE + 3)
        assert silent.recv(10) == b"", "and is closed after the deadline"
        silent.close()
        big = raw(sock, b"x" * (control.MAX_REQUEST + 10))
        assert big["ok"] is False and "longer than" in big["error"]


def test_no_daemon_means_none(tmp_path: Path) -> None:
    assert request(tmp_path / "absent.sock", "status") is None
    # A socket file nobody listens on (a daemon that crashed): also None.
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "stale.sock"))
    s.close()
    assert request(tmp_path / "stale.sock", "status") is None


def test_a_stale_socket_is_replaced_and_a_live_one_is_not_taken_over(tmp_path: Path) -> None:
    sock = tmp_path / "control.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(sock))          # left behind by a crashed daemon
    s.close()
    with serving(sock, HANDLERS):
        with pytest.raises(ControlBusy):
            ControlServer(sock, HANDLERS)
        assert request(sock, "echo")["echo"] == {}, "the first daemon still owns its socket"


def test_a_path_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    path.write_text("precious")
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer(path, HANDLERS)
    assert path.read_text() == "precious"


def test_a_slow_handler_times_the_client_out_with_advice(tmp_path: Path) -> None:
    sock = tmp_path / "control.sock"

    def slow(args):
        time.sleep(0.5)
        return {}

    with serving(sock, {"slow": slow}):
        with pytest.raises(ControlError, match="did not answer 'slow' within 0.1 s"):
            request(sock, "slow", timeout=0.1)


def test_socket_for_reads_the_key_even_from_a_policy_with_other_problems(tmp_path: Path) -> None:
    p = tmp_path / "policy.toml"
    p.write_text('[control]\nsocket = "/run/x/c.sock"\n[bump]\nceiling = "lots"\n')
    assert control.socket_for(p) == Path("/run/x/c.sock")
    p.write_text("this is [not toml")
    assert control.socket_for(p) == control.DEFAULT_SOCKET
    assert control.socket_for(tmp_path / "missing.toml") == control.DEFAULT_SOCKET


def test_socket_for_follows_the_drop_ins(tmp_path: Path) -> None:
    p = tmp_path / "policy.toml"
    p.write_text('[control]\nsocket = "/run/a.sock"\n')
    (tmp_path / "policy.d").mkdir()
    (tmp_path / "policy.d" / "50-host.toml").write_text('[control]\nsocket = "/run/b.sock"\n[bump]\nceiling = "x"\n')
    assert control.socket_for(p) == Path("/run/b.sock")


def test_only_status_is_open_to_other_users(tmp_path: Path) -> None:
    """Issue 25: a member of ctguard-status reaches the socket (its mode says who may connect); the
    daemon then answers such a caller `status` and refuses every other command (SO_PEERCRED uid)."""
    from ctguard.control import protocol as control_mod

    calls = []
    handlers = {name: (lambda args, name=name: calls.append(name) or {"done": name})
                for name in ("status", "bump", "capture", "reload")}
    server = control_mod.ControlServer(tmp_path / "c" / "control.sock", handlers)
    try:
        other = {"pid": 1, "uid": 65534 if os.geteuid() != 65534 else 65533, "gid": 65534}
        assert server.dispatch(b'{"cmd": "status"}', other)["ok"] is True
        for cmd in ("bump", "capture", "reload", "nosuch"):
            answer = server.dispatch(json.dumps({"cmd": cmd}).encode(), other)
            assert answer["ok"] is False and answer["code"] == "denied" and "only root" in answer["error"], answer
        root = {"pid": 1, "uid": 0, "gid": 0}
        assert server.dispatch(b'{"cmd": "bump"}', root)["ok"] is True
        assert server.dispatch(b'{"cmd": "bump"}', {})["ok"] is False      # no credentials: status only
        assert calls == ["status", "bump"]
    finally:
        server.close()
