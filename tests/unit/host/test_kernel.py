"""The kernel adapter against a prepared /proc and /sys tree: parsing the stat table, limits, writes read back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ctguard.core.model import KernelLimits
from ctguard.host.kernel import Kernel, KernelWriteError, parse_stat_entries, parse_stat_table

STAT = """entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
00000abc  00000000 00000001 00000000 00000002 00000000 00000000 00000000 00000000 00000000 0000000a 00000001 00000000  00000000 00000000 00000000 00000003
00000abc  00000000 00000001 00000000 00000003 00000000 00000000 00000000 00000000 00000001 00000010 00000000 00000000  00000000 00000000 00000000 00000000
"""


def fake_tree(tmp_path: Path) -> Kernel:
    nf = tmp_path / "proc/sys/net/netfilter"
    nf.mkdir(parents=True)
    (nf / "nf_conntrack_max").write_text("8192\n")
    (nf / "nf_conntrack_buckets").write_text("2048\n")
    (tmp_path / "proc/net/stat").mkdir(parents=True)
    (tmp_path / "proc/net/stat/nf_conntrack").write_text(STAT)
    (tmp_path / "proc/meminfo").write_text("MemTotal:       16384000 kB\nMemFree: 1 kB\nMemAvailable:    8192000 kB\n")
    (tmp_path / "proc/slabinfo").write_text("slabinfo - version: 2.1\nnf_conntrack         100    120    256   16    1 : x\n")
    params = tmp_path / "sys/module/nf_conntrack/parameters"
    params.mkdir(parents=True)
    (params / "hashsize").write_text("2048\n")
    return Kernel(tmp_path / "proc", tmp_path / "sys")


def test_parse_stat_table_sums_cpus_and_reads_entries() -> None:
    entries, stats = parse_stat_table(STAT)
    d = dict(stats)
    assert entries == 0xABC
    assert d["drop"] == 0x1A and d["invalid"] == 5 and d["search_restart"] == 3 and d["insert_failed"] == 1
    assert "entries" not in d


def test_parse_stat_entries_reads_the_first_row_only() -> None:
    assert parse_stat_entries(STAT.encode()) == 0xABC
    assert parse_stat_entries(STAT.encode()[:300]) == 0xABC, "a tick reads only the start of the file"


def test_kernel_reads_limits_from_a_tree(tmp_path: Path) -> None:
    k = fake_tree(tmp_path)
    lim = k.limits()
    assert lim == KernelLimits(8192, 2048, 256, 16384000 * 1024, 8192000 * 1024)
    assert k.host_stats()[0] == 0xABC


def test_kernel_write_reads_back(tmp_path: Path) -> None:
    k = fake_tree(tmp_path)
    assert k.write_max(16384) == 16384
    assert k.write_hashsize(4096) == 4096
    with pytest.raises(KernelWriteError, match="positive integer"):
        k.write_max(2**32)
    with pytest.raises(KernelWriteError, match="positive integer"):
        k.write_max(0)


def test_kernel_write_failure_carries_advice(tmp_path: Path) -> None:
    k = fake_tree(tmp_path)
    os.unlink(tmp_path / "sys/module/nf_conntrack/parameters/hashsize")
    (tmp_path / "sys/module/nf_conntrack/parameters/hashsize").mkdir()
    with pytest.raises(KernelWriteError) as info:
        k.write_hashsize(4096)
    assert "cannot set hashsize to 4096" in str(info.value)


def test_a_read_only_hashsize_is_blamed_on_a_late_module_load_first() -> None:
    """Issue 25: under the unit, a hashsize that is read-only usually means nf_conntrack was loaded
    after ctguard started (the sandbox could not open its parameters): a restart fixes it."""
    import errno

    from ctguard.host import kernel

    assert "systemctl restart ctguard" in kernel._advice(errno.EROFS, "hashsize")
    assert "a container" in kernel._advice(errno.EROFS, "nf_conntrack_max")
