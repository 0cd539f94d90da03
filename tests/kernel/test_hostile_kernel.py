"""Hostile neighbours against a real daemon: a local non-root user (setpriv as nobody) gets no
lever on ctguard (it runs as root). The checks that need neither root nor the kernel:
tests/unit/cli/test_hostile.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from helpers.daemon import Running, ctguard
from helpers.kernelenv import IS_ROOT, get_max, needs_kernel, saved_kernel_values, set_max
from helpers.policy import write_policy


def as_nobody(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv],
                          capture_output=True, text=True, timeout=30)


needs_root_and_setpriv = pytest.mark.skipif(not IS_ROOT or shutil.which("setpriv") is None,
                                            reason="needs root and setpriv to act as another user")


@needs_root_and_setpriv
@needs_kernel
def test_another_user_cannot_read_a_bundle_or_the_state() -> None:
    # A folder anyone may traverse, so only the bundle's own modes stand in the way.
    base = Path(tempfile.mkdtemp(prefix="ctguard-hostile-"))
    try:
        os.chmod(base, 0o755)
        policy = write_policy(base)
        res = ctguard("capture", "--reason", "hostile", "--policy", str(policy))
        assert res.returncode == 0, res.stderr
        bundle = Path(res.stdout.strip().splitlines()[-1])
        assert (bundle.stat().st_mode & 0o777) == 0o700
        manifest = bundle / "manifest.toml"
        denied = as_nobody("cat", str(manifest))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr
        listing = as_nobody("ls", str(bundle))
        assert listing.returncode != 0
        for f in bundle.iterdir():
            assert (f.stat().st_mode & 0o077) == 0, f
    finally:
        shutil.rmtree(base, ignore_errors=True)


@needs_root_and_setpriv
@needs_kernel
def test_another_user_cannot_signal_the_daemon(tmp_policy: Path) -> None:
    policy = tmp_policy
    with Running(policy) as daemon:
        for sig in ("HUP", "TERM", "KILL"):
            res = as_nobody("kill", f"-{sig}", str(daemon.proc.pid))
            assert res.returncode != 0
        time.sleep(0.5)
        assert daemon.proc.poll() is None


@needs_kernel
def test_planted_symlinks_are_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    policy = write_policy(tmp_path, "[bump]\nceiling = 65536")
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state/state.json").symlink_to(victim)
    (tmp_path / "etc/sysctl.d").mkdir(parents=True)
    (tmp_path / "etc/sysctl.d/90-ctguard.conf").symlink_to(victim)
    with saved_kernel_values():
        set_max(4096)
        res = ctguard("bump", "--to", "8192", "--policy", str(policy))
        assert get_max() == 8192, res.stderr
        assert "symlink" in res.stdout + res.stderr
    assert victim.read_text() == "precious\n"
    assert (tmp_path / "state/state.json").is_symlink()


@needs_kernel
def test_forged_journal_fields_from_a_user_do_not_count(tmp_path: Path) -> None:
    """Even root-written /dev/kmsg lines carry a user facility; see test_daemon_journal too."""
    from ctguard.host.journal import match_kernel_line

    assert match_kernel_line("nf_conntrack: table full, dropping packet") is not None
    assert match_kernel_line("myapp: nf_conntrack: table full, dropping packet") is None
