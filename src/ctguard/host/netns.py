"""Which network namespaces exist, and each one's conntrack counters.

The count is per namespace but the limit is global, so every namespace is sampled. A
namespace is found through a process (`/proc/PID/ns/net`) or a bind mount under
`/run/netns` (which may have no process at all). For each one ctguard opens that
namespace's `net/stat/nf_conntrack` once and re-reads it with pread: the open file stays
bound to its namespace, so a sample costs one pread per namespace (~3 us) and never a
setns. Discovery (the /proc scan) runs only every few seconds, or when /run/netns changes.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000

from ctguard.host import procs
from ctguard.host.cgroups import labels_of
from ctguard.host.kernel import parse_stat_columns, parse_stat_entries
from ctguard.core.model import SAMPLED_COUNTERS, NamespaceReading


@dataclass(frozen=True)
class NamespaceRef:
    inode: int
    name: str           # "host", the /run/netns name, or "pid:N (comm)"
    path: str           # a file that names the namespace: /run/netns/NAME or /proc/PID/ns/net
    pid: int | None
    unit: str | None = None         # systemd unit of a process inside, where one was seen
    container: str | None = None    # e.g. "docker:3f2a1b...", "k8s-pod:<uid>", "machine:name"


class NetnsError(OSError):
    pass


def _ns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def named(run_netns: str | Path = "/run/netns") -> list[NamespaceRef]:
    """The namespaces bound under /run/netns (`ip netns add`, CNI plugins), by name."""
    try:
        names = sorted(os.listdir(run_netns))
    except OSError:
        names = []
    out = []
    for name in names:
        path = os.path.join(run_netns, name)
        ino = _ns_inode(path)
        if ino is not None:
            out.append(NamespaceRef(ino, name, path, None))
    return out


def discover(proc_root: str | Path = "/proc", run_netns: str | Path = "/run/netns",
             self_inode: int | None = None, bound: list[NamespaceRef] | None = None) -> list[NamespaceRef]:
    """Every network namespace reachable through a process or a /run/netns bind mount
    (`bound`: those of /run/netns when the caller knows them unchanged, see `named`)."""
    proc = Path(proc_root)
    host_inode = self_inode if self_inode is not None else _ns_inode(str(proc / "self/ns/net"))
    found: dict[int, NamespaceRef] = {}
    if host_inode is not None:
        found[host_inode] = NamespaceRef(host_inode, "host", str(proc / "self/ns/net"), None)
    for ref in named(run_netns) if bound is None else bound:
        if ref.inode not in found:
            found[ref.inode] = ref
    try:
        all_pids = procs.pids(proc)
    except OSError:
        all_pids = []
    for pid in all_pids:
        path = f"{proc}/{pid}/ns/net"
        ino = _ns_inode(path)
        if ino is None:
            continue
        known = found.get(ino)
        if known is None:
            unit, container = labels_of(proc, pid)
            found[ino] = NamespaceRef(ino, f"pid:{pid} ({procs.comm(proc, pid) or '?'})", path, pid, unit, container)
        elif known.pid is None and known.name != "host":
            # A /run/netns namespace with a process in it: keep its name, learn who runs there.
            unit, container = labels_of(proc, pid)
            found[ino] = NamespaceRef(ino, known.name, known.path, None, unit, container)
    return list(found.values())


def resolve(spec: str, proc_root: str | Path = "/proc", run_netns: str | Path = "/run/netns") -> NamespaceRef:
    """A namespace from the command line: a name under /run/netns, an inode number, or a PID.

    Names are plain components (no '/', no '..'), so a value can never reach outside
    /run/netns; an inode is looked up among the namespaces that exist.
    """
    spec = spec.strip()
    if not spec:
        raise NetnsError(22, "empty namespace")
    if not spec.isdigit():
        if "/" in spec or spec in (".", "..") or spec.startswith(".") or "\0" in spec:
            raise NetnsError(22, f"{spec!r} is not a namespace name (a name under {run_netns}, an inode or a PID)")
        path = os.path.join(run_netns, spec)
        if os.path.islink(path):
            raise NetnsError(40, f"{path} is a symlink; ctguard refuses to follow it")
        ino = _ns_inode(path)
        if ino is None:
            raise NetnsError(2, f"no network namespace named {spec!r} under {run_netns} (see `ip netns list`)")
        return NamespaceRef(ino, spec, path, None)
    number = int(spec)
    if number > 2**32:
        raise NetnsError(22, f"{spec} is neither a PID nor a namespace inode")
    pid_path = f"{proc_root}/{number}/ns/net"
    if number < 2**22 and os.path.exists(pid_path):
        ino = _ns_inode(pid_path)
        if ino is not None:
            return NamespaceRef(ino, f"pid:{number}", pid_path, number)
    for ref in discover(proc_root, run_netns):
        if ref.inode == number:
            return ref
    raise NetnsError(2, f"no network namespace with inode or PID {spec}")


def setns(fd: int) -> None:
    if hasattr(os, "setns"):
        os.setns(fd, CLONE_NEWNET)  # type: ignore[attr-defined]
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def run_in_netns(netns_path: str | None, fn: Callable[[], T]) -> T:
    """Call `fn()` inside the namespace at `netns_path` (None: right here) and return its result.

    setns() changes only the calling thread, so `fn` runs in a short-lived thread: the
    daemon's own threads never leave their namespace, while sockets and files `fn` opens stay
    bound to the target namespace after the thread is gone, and processes it starts run there.
    Needs CAP_SYS_ADMIN.

    Why not pyroute2.netns.setns: importing it costs about 20 MB of RSS (13 MB -> 34 MB,
    measured for the evidence capture) for one system call. os.setns exists from Python 3.12
    (Debian 13 has 3.13); on 3.11 the same call goes through libc with ctypes.
    """
    if netns_path is None:
        return fn()
    fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
    outcome: list[tuple[bool, object]] = []

    def body() -> None:
        try:
            setns(fd)
            outcome.append((True, fn()))
        except BaseException as exc:  # handed back to the caller's thread
            outcome.append((False, exc))

    try:
        worker = threading.Thread(target=body, name="ctguard-netns", daemon=True)
        worker.start()
        worker.join()
    finally:
        os.close(fd)
    ok, value = outcome[0]
    if ok:
        return value  # type: ignore[return-value]
    raise value  # type: ignore[misc]


def netns_inode(netns_path: str | None, proc_root: str = "/proc") -> int:
    return os.stat(netns_path if netns_path else f"{proc_root}/self/ns/net").st_ino


def open_in_namespace(ns_path: str, relative: str) -> int:
    """Open `/proc/thread-self/<relative>` as seen from inside the namespace at `ns_path`."""
    try:
        return run_in_netns(ns_path, lambda: os.open(f"/proc/thread-self/{relative}", os.O_RDONLY | os.O_CLOEXEC))
    except OSError as exc:
        raise NetnsError(exc.errno or 5, f"cannot enter namespace {ns_path}: {exc.strerror or exc}") from None


class StatReaders:
    """One open `net/stat/nf_conntrack` per namespace, refreshed from discovery."""

    def __init__(self, proc_root: str | Path = "/proc") -> None:
        self.proc_root = Path(proc_root)
        self._open: dict[int, tuple[NamespaceRef, int]] = {}
        # inode -> (the file's bytes at the last read, the reading made of them): a namespace whose
        # file has not changed (an idle one: same count, same counters) is not parsed again.
        self._last: dict[int, tuple[bytes, NamespaceReading]] = {}
        # inode -> bytes up to the end of the first CPU row (the count), from the last full read
        self._head: dict[int, int] = {}

    @property
    def refs(self) -> list[NamespaceRef]:
        return [ref for ref, _ in self._open.values()]

    def _forget(self, ino: int) -> None:
        os.close(self._open.pop(ino)[1])
        self._last.pop(ino, None)
        self._head.pop(ino, None)

    def refresh(self, refs: list[NamespaceRef]) -> list[str]:
        """Open readers for new namespaces, close those gone; return problems (not fatal)."""
        problems = []
        wanted = {r.inode: r for r in refs}
        for ino in list(self._open):
            if ino not in wanted:
                self._forget(ino)
        for ino, ref in wanted.items():
            if ino in self._open:
                continue
            try:
                fd = self._open_ref(ref)
            except OSError as exc:
                problems.append(f"namespace {ref.name} ({ino}): {exc}")
                continue
            self._open[ino] = (ref, fd)
        return problems

    def _open_ref(self, ref: NamespaceRef) -> int:
        if ref.name == "host":
            return os.open(self.proc_root / "self/net/stat/nf_conntrack", os.O_RDONLY | os.O_CLOEXEC)
        if ref.pid is not None:
            fd = os.open(self.proc_root / str(ref.pid) / "net/stat/nf_conntrack", os.O_RDONLY | os.O_CLOEXEC)
            # The PID may have exited and been reused between discovery and open: check it
            # still names the same namespace, or we would sample someone else's table.
            if _ns_inode(ref.path) != ref.inode:
                os.close(fd)
                raise NetnsError(3, "process left the namespace during discovery")
            return fd
        return open_in_namespace(ref.path, "net/stat/nf_conntrack")

    def read(self) -> tuple[list[NamespaceReading], list[int]]:
        """(readings, inodes that could not be read); unreadable ones are closed for rediscovery."""
        readings = []
        failed = []
        last = self._last
        for ino, (ref, fd) in list(self._open.items()):
            try:
                data = os.pread(fd, 65536, 0)
                before = last.get(ino)
                if before is not None and before[0] == data:
                    readings.append(before[1])
                    continue
                count, stats = parse_stat_columns(data, SAMPLED_COUNTERS)
            except (OSError, ValueError):
                self._forget(ino)
                failed.append(ino)
                continue
            reading = NamespaceReading(ino, ref.name, count, stats, ref.unit or "", ref.container or "")
            last[ino] = (data, reading)
            first = data.find(b"\n", data.find(b"\n") + 1)
            if first > 0:
                self._head[ino] = first + 1
            readings.append(reading)
        return readings, failed

    def counts(self) -> dict[int, int]:
        """Each namespace's entry count only, for a tick between samples: the first data line's
        first field (every CPU line repeats it), read up to the end of that line (its length known
        from the last full read): ~3 us a namespace against ~20 us for the whole table. A namespace
        that cannot be read is left out; the next sample deals with it."""
        out = {}
        head = self._head
        for ino, (_, fd) in self._open.items():
            try:
                out[ino] = parse_stat_entries(os.pread(fd, head.get(ino, 512), 0))
            except (OSError, ValueError):
                continue
        return out

    def close(self) -> None:
        for _, fd in self._open.values():
            os.close(fd)
        self._open.clear()
        self._last.clear()
        self._head.clear()
