"""The kernel's conntrack knobs and counters, all under a proc / sys root.

Tests point `Kernel` at a prepared tree; the daemon uses the real /proc and /sys. Every
write is read back, and a refused write raises `KernelWriteError` carrying advice the
operator can act on.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from ctguard.core.model import STAT_COUNTERS, KernelLimits
from ctguard.config.policy import KERNEL_UINT_LIMIT


class KernelWriteError(OSError):
    def __init__(self, what: str, value: int, err: int, advice: str) -> None:
        super().__init__(err, f"cannot set {what} to {value}: {os.strerror(err)}. {advice}")
        self.what = what
        self.value = value
        self.advice = advice


class ConntrackNotLoaded(RuntimeError):
    pass


def parse_stat_table(text: str) -> tuple[int, tuple[tuple[str, int], ...]]:
    """Parse /proc/net/stat/nf_conntrack: (entries, per-CPU counters summed).

    The first column, `entries`, is the namespace's count repeated on every CPU row; the
    others are per-CPU event counters in hex, summed here. Columns are found by name since
    kernels add, drop and reorder them.
    """
    lines = text.split("\n")
    header = lines[0].split()
    totals = [0] * len(header)
    entries = 0
    for line in lines[1:]:
        cells = line.split()
        if len(cells) != len(header):
            continue
        for i, cell in enumerate(cells):
            totals[i] += int(cell, 16)
        entries = int(cells[0], 16)
    stats = tuple((name, totals[i]) for i, name in enumerate(header) if name != "entries")
    return entries, stats


def parse_stat_columns(data: bytes, columns: tuple[str, ...]) -> tuple[int, tuple[tuple[str, int], ...]]:
    """`parse_stat_table` of the raw file for `columns` only (those the file has, in that order):
    the daemon's every-sample read, which needs four of some twenty columns."""
    lines = data.split(b"\n")
    header = lines[0].split()
    width = len(header)
    where = [(name, header.index(name.encode())) for name in columns if name.encode() in header]
    totals = [0] * len(where)
    entries = 0
    for line in lines[1:]:
        cells = line.split()
        if len(cells) != width:
            continue
        entries = int(cells[0], 16)
        for j, (_, i) in enumerate(where):
            totals[j] += int(cells[i], 16)
    return entries, tuple((name, totals[j]) for j, (name, _) in enumerate(where))


def parse_stat_entries(head: bytes) -> int:
    """The `entries` column of the first CPU row of /proc/net/stat/nf_conntrack (the start of
    the file is enough): the namespace's count, read without summing every CPU's counters."""
    start = head.index(b"\n") + 1
    return int(head[start:head.index(b" ", start)], 16)


def _advice(err: int, what: str) -> str:
    if err == errno.EROFS and what == "hashsize":
        # The unit makes /sys/module/nf_conntrack/parameters writable when ctguard starts; a module
        # loaded after that start is under the read-only /sys/module of the sandbox.
        return ("hashsize is read-only to ctguard: if nf_conntrack was loaded after ctguard started, its "
                "sandbox could not open the module's parameters; `systemctl restart ctguard` fixes it "
                "(in a container: raise it on the host)")
    if err in (errno.EROFS,):
        return (f"{what} is read-only here (a container, or ProtectKernelTunables=): raise the limit on the host, "
                "or make it writable for ctguard")
    if err in (errno.EPERM, errno.EACCES):
        return "ctguard needs root with CAP_NET_ADMIN (and /sys writable for hashsize) in the host's network namespace"
    if err == errno.EINVAL:
        return f"the kernel refused the value; it must be a positive integer <= {KERNEL_UINT_LIMIT}"
    if err == errno.ENOENT:
        return "nf_conntrack is not loaded: `modprobe nf_conntrack`"
    return "check the kernel log"


class _PreadFile:
    """A procfs/sysfs file kept open and re-read with pread: ~3 us instead of open+read+close."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def read(self) -> str:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.pread(self._fd, 65536, 0).decode()
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class KernelPaths:
    max: Path
    buckets: Path
    count: Path
    stat: Path
    hashsize: Path
    slabinfo: Path
    meminfo: Path
    osrelease: Path

    @classmethod
    def under(cls, proc_root: str | Path = "/proc", sys_root: str | Path = "/sys") -> "KernelPaths":
        proc, sys = Path(proc_root), Path(sys_root)
        nf = proc / "sys/net/netfilter"
        return cls(
            max=nf / "nf_conntrack_max",
            buckets=nf / "nf_conntrack_buckets",
            count=nf / "nf_conntrack_count",
            stat=proc / "net/stat/nf_conntrack",
            hashsize=sys / "module/nf_conntrack/parameters/hashsize",
            slabinfo=proc / "slabinfo",
            meminfo=proc / "meminfo",
            osrelease=proc / "sys/kernel/osrelease",
        )


class Kernel:
    """Reads and writes the global conntrack limits of the namespace ctguard runs in."""

    def __init__(self, proc_root: str | Path = "/proc", sys_root: str | Path = "/sys") -> None:
        self.paths = KernelPaths.under(proc_root, sys_root)
        self._max = _PreadFile(self.paths.max)
        self._buckets = _PreadFile(self.paths.buckets)
        self._meminfo = _PreadFile(self.paths.meminfo)
        self._slab_size: int | None = None
        self._slab_read = False
        self._release: str | None = None
        self._cannot: tuple[str, ...] | None = None

    def loaded(self) -> bool:
        return self.paths.max.exists()

    def read_max(self) -> int:
        return int(self._max.read())

    def read_max_or_none(self) -> int | None:
        """The max, or None where it cannot be read (policy warnings then skip what needs it)."""
        try:
            return self.read_max()
        except OSError:
            return None

    def read_buckets(self) -> int:
        return int(self._buckets.read())

    def slab_object_size(self) -> int | None:
        # The object size is fixed for the life of the module; read once (slabinfo is root-only
        # and costs ~1 ms to read in full).
        if not self._slab_read:
            self._slab_size = self._read_slab_size()
            self._slab_read = True
        return self._slab_size

    def _read_slab_size(self) -> int | None:
        try:
            with open(self.paths.slabinfo) as fh:
                for line in fh:
                    if line.startswith("nf_conntrack "):
                        return int(line.split()[3])
        except (OSError, ValueError, IndexError):
            return None
        return None

    def slab_bytes(self) -> int | None:
        """Bytes held by the nf_conntrack slab cache now (objects x object size); None when
        /proc/slabinfo is unreadable or the cache is merged into another (no line of its own)."""
        try:
            with open(self.paths.slabinfo) as fh:
                for line in fh:
                    if line.startswith("nf_conntrack "):
                        f = line.split()
                        return int(f[2]) * int(f[3])
        except (OSError, ValueError, IndexError):
            return None
        return None

    def meminfo(self) -> tuple[int, int]:
        total = avail = 0
        for line in self._meminfo.read().split("\n"):
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
            elif line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
        return total, avail

    def limits(self) -> KernelLimits:
        try:
            mx, buckets = self.read_max(), self.read_buckets()
        except FileNotFoundError:
            self.close()
            raise ConntrackNotLoaded("nf_conntrack is not loaded (no nf_conntrack_max); waiting for it") from None
        total, avail = self.meminfo()
        return KernelLimits(mx, buckets, self.slab_object_size(), total, avail, self.release(), self.probe())

    def release(self) -> str:
        """The running kernel's release (read once): its default sizes and bucket ratio depend on it."""
        if self._release is None:
            try:
                self._release = self.paths.osrelease.read_text().strip()
            except OSError:
                self._release = ""
        return self._release

    def probe(self) -> tuple[str, ...]:
        """What ctguard cannot change here, and why (probed once, without writing): containers and
        LXC mount /proc/sys and /sys read-only; outside the initial network namespace the kernel
        makes nf_conntrack_max and nf_conntrack_buckets read-only (mode 0444) and refuses hashsize."""
        if self._cannot is None:
            out = []
            for what, path in (("nf_conntrack_max", self.paths.max), ("hashsize", self.paths.hashsize)):
                try:
                    if path.exists() and not os.access(path, os.W_OK):
                        out.append(f"{what}: read-only here ({path}; a container, LXC, or not the initial "
                                   "network namespace)")
                except OSError as exc:   # pragma: no cover - access reports through its result
                    out.append(f"{what}: {exc.strerror}")
            self._cannot = tuple(out)
        return self._cannot

    def host_stats(self) -> tuple[int, tuple[tuple[str, int], ...]]:
        return parse_stat_table(self.paths.stat.read_text())

    def write_max(self, value: int) -> int:
        """Set nf_conntrack_max; return the value read back."""
        return self._write("nf_conntrack_max", self.paths.max, value, self.read_max, exact=True)

    def write_hashsize(self, value: int) -> int:
        """Resize the hash table; the kernel rounds up to fill whole pages, so read-back >= value."""
        return self._write("hashsize", self.paths.hashsize, value, lambda: int(self.paths.hashsize.read_text()), exact=False)

    def _write(self, what: str, path: Path, value: int, read_back, exact: bool) -> int:
        if not 0 < value <= KERNEL_UINT_LIMIT:
            raise KernelWriteError(what, value, errno.EINVAL, _advice(errno.EINVAL, what))
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, str(value).encode())
            finally:
                os.close(fd)
        except OSError as exc:
            err = exc.errno or errno.EIO
            raise KernelWriteError(what, value, err, _advice(err, str(path))) from None
        got = read_back()
        if (exact and got != value) or got < value:
            raise KernelWriteError(what, value, errno.EIO,
                                   f"the kernel holds {got} after the write; another agent may be writing {path}")
        return got

    def close(self) -> None:
        for f in (self._max, self._buckets, self._meminfo):
            f.close()


__all__ = ["Kernel", "KernelWriteError", "ConntrackNotLoaded", "parse_stat_table", "STAT_COUNTERS"]
