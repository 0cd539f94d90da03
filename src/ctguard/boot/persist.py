"""The persistent files: /etc/sysctl.d (max, applied by systemd-sysctl at boot) and
/etc/modprobe.d (hashsize, applied when the module loads). Written atomically with a header
saying who wrote them, when and why; read back at start to re-apply a max the kernel lost."""

from __future__ import annotations

import re
import time
from pathlib import Path

from ctguard.store.files import atomic_write, read_text_nofollow

_MAX_LINE = re.compile(r"^\s*net\.netfilter\.nf_conntrack_max\s*=\s*(\d+)\s*$", re.M)
_BUCKETS_LINE = re.compile(r"^\s*net\.netfilter\.nf_conntrack_buckets\s*=\s*(\d+)\s*$", re.M)
_HASHSIZE = re.compile(r"^\s*options\s+nf_conntrack\b.*\bhashsize=(\d+)", re.M)


def _header(reason: str, now: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now))
    reason = " ".join(reason.split())  # one line, whatever the reason held
    return (
        f"# Written by ctguard on {stamp}: {reason}\n"
        "# ctguard rewrites this file; change /etc/ctguard/policy.toml ([persist]) instead of editing it.\n"
        "# Once ctguard is removed or purged this file stays, on purpose (lowering the limit could drop\n"
        "# connections): keep it as this host's sizing, or delete it to have the kernel's default at the\n"
        "# next boot (then run update-initramfs -u if nf_conntrack is in the initramfs).\n"
    )


def sysctl_text(max_value: int, buckets: int | None, reason: str, now: float) -> str:
    lines = [_header(reason, now), f"net.netfilter.nf_conntrack_max = {max_value}\n"]
    if buckets:
        # Writable from the host namespace on current kernels; the modprobe option covers a
        # module loaded before systemd-sysctl runs.
        lines.append(f"net.netfilter.nf_conntrack_buckets = {buckets}\n")
    return "".join(lines)


def modprobe_text(buckets: int, reason: str, now: float) -> str:
    return _header(reason, now) + f"options nf_conntrack hashsize={buckets}\n"


def write(sysctl_file: Path, modprobe_file: Path, max_value: int, buckets: int | None,
          reason: str, now: float) -> list[Path]:
    """Write both files (modprobe only when buckets are managed); return what was written."""
    written = []
    sysctl_file.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(sysctl_file, sysctl_text(max_value, buckets, reason, now), 0o644)
    written.append(sysctl_file)
    if buckets:
        modprobe_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(modprobe_file, modprobe_text(buckets, reason, now), 0o644)
        written.append(modprobe_file)
    return written


def read_persisted_max(sysctl_file: Path) -> int | None:
    try:
        text = read_text_nofollow(sysctl_file, limit=1 << 16)
    except OSError:
        return None
    found = _MAX_LINE.findall(text)
    return int(found[-1]) if found else None


def read_persisted_buckets(sysctl_file: Path, modprobe_file: Path) -> int | None:
    """Buckets ctguard's files set at the next boot (the modprobe option, else the sysctl line)."""
    for path, pattern in ((modprobe_file, _HASHSIZE), (sysctl_file, _BUCKETS_LINE)):
        try:
            text = read_text_nofollow(path, limit=1 << 16)
        except OSError:
            continue
        found = pattern.findall(text)
        if found:
            return int(found[-1])
    return None
