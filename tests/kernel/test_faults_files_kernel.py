"""File faults that need root: a full disk (a real 64 KiB tmpfs) and a namespace vanishing mid-sample."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctguard.boot import persist
from ctguard.core.model import History, Instant, KernelLimits, NamespaceReading, Sample
from ctguard.daemon.metrics import render, write
from ctguard.store.files import atomic_write
from ctguard.store.state import StateStore
from helpers.kernelenv import IS_ROOT, needs_kernel, run

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root to mount a tmpfs")


@contextlib.contextmanager
def tiny_disk(tmp_path: Path, size_kib: int = 64) -> Iterator[Path]:
    mnt = tmp_path / "disk"
    mnt.mkdir()
    run("mount", "-t", "tmpfs", "-o", f"size={size_kib}k,mode=0755", "ctguard-test", str(mnt))
    try:
        yield mnt
    finally:
        run("umount", "-l", str(mnt), check=False)


def fill(disk: Path) -> None:
    try:
        with open(disk / "filler", "wb") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
    except OSError as exc:
        assert exc.errno == errno.ENOSPC


@needs_root
def test_full_disk_leaves_every_previous_file_whole(tmp_path: Path) -> None:
    with tiny_disk(tmp_path) as disk:
        sysctl, modprobe = disk / "sysctl.d/90-ctguard.conf", disk / "modprobe.d/ctguard.conf"
        persist.write(sysctl, modprobe, 16384, 4096, "first", 1.8e9)
        store = StateStore(disk / "state")
        store.save_history(History(persisted_max=16384, bumps_total=1))
        sample = Sample(Instant(1.8e9, 1.0, "b"), KernelLimits(16384, 4096, 256, 1 << 30, 1 << 29),
                        (NamespaceReading(1, "host", 5, (("drop", 0),)),))
        write(str(disk / "ctguard.prom"), render(sample, History(), 65536))
        before = {p: p.read_bytes() for p in (sysctl, modprobe, disk / "state/state.json", disk / "ctguard.prom")}
        fill(disk)
        big = "x" * 200_000   # cannot fit whatever is left
        for target in before:
            with pytest.raises(OSError) as info:
                atomic_write(target, big)
            assert info.value.errno == errno.ENOSPC
        for path, content in before.items():
            assert path.read_bytes() == content, path
        assert StateStore(disk / "state").load_history().persisted_max == 16384
        leftovers = [p for p in disk.rglob("*ctguard-tmp*")]
        assert leftovers == [], "no temporary file left behind"


@needs_kernel
def test_a_namespace_vanishing_mid_sample(tmp_path: Path) -> None:
    from ctguard.host.clock import Clock
    from ctguard.host.kernel import Kernel
    from ctguard.host.netns import NamespaceRef, StatReaders, discover
    from ctguard.host.observe import Observer

    name = f"ctgv{os.getpid()}"
    run("ip", "netns", "add", name)
    try:
        obs = Observer(Kernel(), Clock())
        assert any(n.name == name for n in obs.sample().namespaces)
        run("ip", "netns", "del", name)
        obs.sample()                                  # still readable through the kept fd, or dropped: no crash
        obs.rediscover()
        assert all(n.name != name for n in obs.sample().namespaces)
        obs.close()
        # Discovered, then gone before its reader was opened: a problem noted, the rest read.
        ghost = NamespaceRef(1, "ghost", "/run/netns/does-not-exist", None)
        readers = StatReaders()
        problems = readers.refresh([*discover(), ghost])
        assert any("ghost" in p for p in problems)
        readings, failed = readers.read()
        assert any(r.name == "host" for r in readings) and failed == []
        readers.close()
    finally:
        run("ip", "netns", "del", name, check=False)
