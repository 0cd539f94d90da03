"""The nf_conntrack_*_timeout sysctls of ONE network namespace.

They are per namespace (a write inside one changes that one only), so each access runs in a
short-lived thread that entered the namespace (netns.run_in_netns); every write is read back.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable

from ctguard.core.timeouts import RELIEF_TIMEOUTS, sysctl_name
from ctguard.host.netns import run_in_netns

SYSCTL_DIR = "/proc/sys/net/netfilter"


class TimeoutChanged(Exception):
    """The value is not the one ctguard wrote: someone else changed it."""

    def __init__(self, found: int) -> None:
        super().__init__(found)
        self.found = found


def sysctl_path(key: str, sysctl_dir: str = SYSCTL_DIR) -> str:
    if key not in RELIEF_TIMEOUTS:
        raise ValueError(f"not a relief timeout: {key!r}")
    return f"{sysctl_dir}/{sysctl_name(key)}"


def read_timeouts(netns_path: str | None, keys: Iterable[str], sysctl_dir: str = SYSCTL_DIR) -> dict[str, int]:
    """The current values of `keys` in the namespace at `netns_path` (None: ctguard's own)."""
    keys = list(keys)

    def read() -> dict[str, int]:
        out = {}
        for k in keys:
            try:
                with open(sysctl_path(k, sysctl_dir)) as fh:
                    out[k] = int(fh.read())
            except FileNotFoundError:
                continue        # an older kernel without this timeout
        return out

    return run_in_netns(netns_path, read)


def write_timeout(netns_path: str | None, key: str, value: int, expect: int | None = None,
                  sysctl_dir: str = SYSCTL_DIR) -> int:
    """Set one timeout in one namespace and return the value read back. With `expect`, only
    when the namespace still holds `expect` (else TimeoutChanged with what it holds)."""
    path = sysctl_path(key, sysctl_dir)

    def write() -> int:
        with open(path) as fh:
            found = int(fh.read())
        if expect is not None and found != expect:
            raise TimeoutChanged(found)
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)   # (O_TRUNC: a test's plain file)
        try:
            os.write(fd, str(value).encode())
        finally:
            os.close(fd)
        with open(path) as fh:
            got = int(fh.read())
        if got != value:
            raise OSError(errno.EIO, f"{path} holds {got} after writing {value}")
        return got

    return run_in_netns(netns_path, write)
