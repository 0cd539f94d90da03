"""A running daemon rereads the drop-ins on reload (SIGHUP)."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest


def test_reload_rereads_the_drop_ins(tmp_path: Path) -> None:
    from helpers.daemon import Running
    from helpers.kernelenv import needs_kernel, saved_kernel_values
    from helpers.policy import write_policy
    from helpers.wait import wait_for

    if needs_kernel.args[0]:
        pytest.skip(needs_kernel.kwargs["reason"])
    p = write_policy(tmp_path, "[bump]\nceiling = 2147483647")
    dropins = tmp_path / "policy.d"
    dropins.mkdir()
    with saved_kernel_values(), Running(p) as daemon:
        moved = tmp_path / "from-drop-in.prom"
        (dropins / "50-host.toml").write_text(f'[metrics]\ntextfile = "{moved}"\n')
        daemon.proc.send_signal(signal.SIGHUP)
        assert wait_for(moved.exists, 5), daemon.output()
        # A bad drop-in on reload: the whole reload is refused (the good drop-in's new value
        # too) and the daemon goes on with the last good policy.
        elsewhere = tmp_path / "not-applied.prom"
        (dropins / "50-host.toml").write_text(f'[metrics]\ntextfile = "{elsewhere}"\n')
        (dropins / "60-bad.toml").write_text("[bump]\nceiling = 'x'\n")
        daemon.proc.send_signal(signal.SIGHUP)
        before = moved.stat().st_mtime_ns
        assert wait_for(lambda: moved.stat().st_mtime_ns > before, 5), "still writing metrics where the drop-in said"
        before = moved.stat().st_mtime_ns
        assert wait_for(lambda: moved.stat().st_mtime_ns > before, 5)
        assert not elsewhere.exists() and daemon.proc.poll() is None, daemon.output()
