"""The files the next boot reads (sysctl.d, modprobe.d), written against a prepared tree."""

from __future__ import annotations

from pathlib import Path

from ctguard.boot import persist


def test_persist_files(tmp_path: Path) -> None:
    sysctl, modprobe = tmp_path / "sysctl.d/90-ctguard.conf", tmp_path / "modprobe.d/ctguard.conf"
    persist.write(sysctl, modprobe, 65536, 16384, "bump\nwith newline", 1_800_000_000)
    text = sysctl.read_text()
    assert text.startswith("# Written by ctguard on 2027-01-15 08:00:00 UTC: bump with newline\n")
    assert "net.netfilter.nf_conntrack_max = 65536\n" in text
    assert "options nf_conntrack hashsize=16384\n" in modprobe.read_text()
    assert persist.read_persisted_max(sysctl) == 65536
    assert persist.read_persisted_max(tmp_path / "absent") is None
