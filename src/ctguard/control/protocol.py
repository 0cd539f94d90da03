"""The control socket: how `ctguard status`, `bump`, `capture` (and `timeline`, `reload`) talk to
the running daemon.

One request per connection, one JSON object per line each way:

    client -> daemon   {"cmd": "<name>", "args": {...}}\n
    daemon -> client   {"ok": true, "result": {...}}\n   or   {"ok": false, "error": "<what to do>"}\n

then the daemon closes the connection. The socket is a Unix stream socket at `[control] socket`
(default /run/ctguard/control.sock), in a folder of mode 0700, itself 0600: root only. The
daemon serves it from its own selector: accepted connections are non-blocking and registered
in the same selector, a client that has not sent its line within CLIENT_DEADLINE is dropped, so
no client can hold up the loop and no thread is started per client.

The daemon builds the handler table (`{"status": fn, ...}`); a handler takes the request's
`args` (with the caller's credentials added under `peer`) and returns the `result` mapping, or
raises ControlError with advice for the operator. Another command is one more table entry.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import selectors
import socket
import stat
import struct
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctguard.config.policy import PolicyError, dropin_files
from ctguard.store.files import ensure_private_dir

log = logging.getLogger(__name__)

DEFAULT_SOCKET = Path("/run/ctguard/control.sock")
MAX_REQUEST = 64 << 10      # bytes: a request is a command name and a few arguments
MAX_ANSWER = 16 << 20       # bytes a client accepts (status with thousands of namespaces)
MAX_CLIENTS = 16            # connections held at once; more are closed at once (root only anyway)
CLIENT_DEADLINE = 1.0       # seconds a client has to send its line and take its answer

Handler = Callable[[Mapping[str, Any]], Mapping[str, Any]]


class ControlError(Exception):
    """The daemon answered {"ok": false}, or its answer could not be had; str() says what to do.

    `code` is the answer's optional machine-readable "code" (e.g. OTHER_POLICY)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


OTHER_POLICY = "other-policy"   # the daemon on this socket runs another policy file than the caller named


class ControlDenied(ControlError):
    """The socket exists but this user may not connect (it is root's)."""


class ControlBusy(ControlError):
    """Another ctguard daemon already serves this socket path."""


# -- client ---------------------------------------------------------------------------------

def request(path: Path | str, cmd: str, args: Mapping[str, Any] | None = None,
            timeout: float = 2.0) -> Mapping[str, Any] | None:
    """Ask the daemon at `path`. The result mapping; None when no daemon answers there (no
    socket, or nobody listening: the caller then acts directly and says so); ControlError when
    the daemon refused (its advice is the message) or did not answer properly in `timeout`."""
    path = str(path)
    line = json.dumps({"cmd": cmd, "args": dict(args or {})}).encode() + b"\n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            return None
        except PermissionError:
            raise ControlDenied(f"{path} is root's: run this as root to reach the daemon") from None
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
                return None
            raise ControlError(f"cannot reach the daemon at {path}: {exc.strerror or exc}") from None
        deadline = time.monotonic() + timeout
        try:
            sock.sendall(line)
            chunks: list[bytes] = []
            size = 0
            while True:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_ANSWER:
                    raise ControlError(f"the daemon at {path} sent more than {MAX_ANSWER} bytes")
                if chunk.endswith(b"\n"):
                    break
        except TimeoutError:
            raise ControlError(f"the daemon at {path} did not answer {cmd!r} within {timeout:g} s; "
                               "see `journalctl -u ctguard`") from None
        except OSError as exc:
            raise ControlError(f"the daemon at {path} closed the connection: {exc.strerror or exc}") from None
    finally:
        sock.close()
    raw = b"".join(chunks)
    if not raw:
        raise ControlError(f"the daemon at {path} closed the connection without an answer to {cmd!r}")
    try:
        answer = json.loads(raw)
    except ValueError:
        raise ControlError(f"the daemon at {path} sent something that is not JSON") from None
    if not isinstance(answer, dict) or "ok" not in answer:
        raise ControlError(f"the daemon at {path} sent an answer without \"ok\"")
    if not answer["ok"]:
        code = answer.get("code")
        raise ControlError(str(answer.get("error") or "the daemon refused without saying why"),
                           code if isinstance(code, str) else None)
    result = answer.get("result", {})
    return result if isinstance(result, dict) else {"value": result}


def socket_for(policy_path: Path | str) -> Path:
    """The socket named by a policy file and its drop-ins, even when they have other problems
    (a reload was rejected, the daemon still runs the old policy): the last `[control] socket`
    string found in the files that are TOML, else the default."""

    try:
        files = [Path(policy_path), *dropin_files(policy_path)]
    except PolicyError:
        files = [Path(policy_path)]
    found = DEFAULT_SOCKET
    for f in files:
        try:
            doc = tomllib.loads(f.read_text(encoding="utf-8", errors="replace"))
        except (OSError, ValueError):
            continue
        section = doc.get("control")
        value = section.get("socket") if isinstance(section, dict) else None
        if isinstance(value, str) and value.startswith("/"):
            found = Path(value)
    return found


# -- server ---------------------------------------------------------------------------------

@dataclass
class _Client:
    sock: socket.socket
    deadline: float
    peer: dict[str, int]
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytes = b""


class ControlServer:
    """Serves the control socket from the caller's selector.

    `attach(selector, tag)` registers the listening socket (and later each client) with
    `tag` as the key's data; the loop calls `ready(key.fileobj)` for every such key it gets,
    `timeout()` to bound its select, and `close()` at the end.
    """

    def __init__(self, path: Path | str, handlers: Mapping[str, Handler],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = Path(path)
        self.handlers = handlers
        self.clock = clock
        self._clients: dict[int, _Client] = {}
        self._sel: selectors.BaseSelector | None = None
        self._tag: Any = None
        folder = ensure_private_dir(self.path.parent, 0o700)
        # The lock says which daemon owns the path: a second daemon (or a test's) must not
        # unlink a live socket from under the first; a stale socket (crash) has no lock holder.
        self._lock_fd = os.open(folder / f".{self.path.name}.lock",
                                os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise ControlBusy(f"another ctguard daemon serves {self.path}") from None
        try:
            try:
                st = os.lstat(self.path)
            except FileNotFoundError:
                pass
            else:
                if not stat.S_ISSOCK(st.st_mode):
                    raise ControlError(f"{self.path} exists and is not a socket; remove it or set [control] socket")
                os.unlink(self.path)
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
            old_umask = os.umask(0o177)     # never a moment when the socket is more open than 0600
            try:
                self._sock.bind(str(self.path))
            finally:
                os.umask(old_umask)
            os.chmod(self.path, 0o600)
            self._sock.listen(MAX_CLIENTS)
            self._ino = os.stat(self.path).st_ino
        except BaseException:
            os.close(self._lock_fd)
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def attach(self, selector: selectors.BaseSelector, tag: Any = "control") -> None:
        self._sel = selector
        self._tag = tag
        selector.register(self._sock, selectors.EVENT_READ, tag)

    def timeout(self) -> float | None:
        """Seconds until the next client deadline (the loop's select must wake by then)."""
        if not self._clients:
            return None
        return max(0.0, min(c.deadline for c in self._clients.values()) - self.clock())

    def ready(self, fileobj: Any) -> None:
        """The selector says `fileobj` (the listening socket or a client) can be served."""
        if fileobj is self._sock or fileobj == self._sock.fileno():
            self._accept()
        else:
            fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
            client = self._clients.get(fd)
            if client is not None:
                self._serve(client)
        self.expire()

    def expire(self) -> None:
        now = self.clock()
        for client in [c for c in self._clients.values() if c.deadline <= now]:
            log.debug("control client pid %s dropped: nothing complete within %s s", client.peer.get("pid"),
                      CLIENT_DEADLINE)
            self._drop(client)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("control socket %s: accept failed: %s", self.path, exc)
                return
            conn.setblocking(False)
            if len(self._clients) >= MAX_CLIENTS:
                conn.close()
                continue
            client = _Client(conn, self.clock() + CLIENT_DEADLINE, _peer(conn))
            self._clients[conn.fileno()] = client
            if self._sel is not None:
                self._sel.register(conn, selectors.EVENT_READ, self._tag)

    def _serve(self, client: _Client) -> None:
        if client.outbox:
            self._flush(client)
            return
        try:
            chunk = client.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not chunk:
            self._drop(client)
            return
        client.inbox += chunk
        if b"\n" not in client.inbox:
            if len(client.inbox) > MAX_REQUEST:
                self._answer(client, {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"})
            return
        line = bytes(client.inbox.split(b"\n", 1)[0])
        self._answer(client, self.dispatch(line, client.peer))

    def dispatch(self, line: bytes, peer: Mapping[str, int] | None = None) -> dict[str, Any]:
        """One request line -> the answer object (also used by tests without a socket)."""
        try:
            req = json.loads(line)
        except ValueError:
            return {"ok": False, "error": 'not JSON: send {"cmd": "<name>", "args": {...}} on one line'}
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"ok": False, "error": 'send {"cmd": "<name>", "args": {...}} on one line'}
        cmd = req["cmd"]
        args = req.get("args") or {}
        if not isinstance(args, dict):
            return {"ok": False, "error": f"{cmd}: args must be a JSON object"}
        handler = self.handlers.get(cmd)
        if handler is None:
            return {"ok": False, "error": f"unknown command {cmd!r} (known: {', '.join(sorted(self.handlers))})"}
        try:
            result = handler({**args, "peer": dict(peer or {})})
        except ControlError as exc:
            return {"ok": False, "error": str(exc), **({"code": exc.code} if exc.code else {})}
        except Exception as exc:  # a handler's bug must not take the daemon down
            log.exception("control command %r failed", cmd)
            return {"ok": False, "error": f"{cmd} failed inside the daemon: {exc!r}; see `journalctl -u ctguard`"}
        return {"ok": True, "result": dict(result)}

    def _answer(self, client: _Client, answer: Mapping[str, Any]) -> None:
        try:
            client.outbox = json.dumps(answer, default=str).encode() + b"\n"
        except (TypeError, ValueError) as exc:
            client.outbox = json.dumps({"ok": False, "error": f"answer not serialisable: {exc}"}).encode() + b"\n"
        client.deadline = self.clock() + CLIENT_DEADLINE
        if self._sel is not None:
            self._sel.modify(client.sock, selectors.EVENT_WRITE, self._tag)
        self._flush(client)

    def _flush(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.outbox)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        client.outbox = client.outbox[sent:]
        if not client.outbox:
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        self._clients.pop(client.sock.fileno(), None)
        if self._sel is not None:
            try:
                self._sel.unregister(client.sock)
            except (KeyError, ValueError):
                pass
        client.sock.close()

    def close(self) -> None:
        for client in list(self._clients.values()):
            self._drop(client)
        if self._sel is not None:
            try:
                self._sel.unregister(self._sock)
            except (KeyError, ValueError):
                pass
        self._sock.close()
        try:
            # Only our own socket: a daemon started after us may have taken the path over.
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._lock_fd)


def _peer(conn: socket.socket) -> dict[str, int]:
    """The connecting process's pid, uid and gid (SO_PEERCRED), for the journal's record."""

    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
    except OSError:
        return {}
    return {"pid": pid, "uid": uid, "gid": gid}
