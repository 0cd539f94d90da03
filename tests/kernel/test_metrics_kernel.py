"""A host without node_exporter (no textfile folder): a real daemon says once that metrics are off,
never a write failure, and writes them when the folder appears."""

from __future__ import annotations

import time
from pathlib import Path

import pytest


def test_no_textfile_folder_means_metrics_off_said_once_then_on_when_it_appears(tmp_path: Path) -> None:
    from helpers.daemon import Running
    from helpers.kernelenv import kernel_ready, saved_kernel_values
    from helpers.policy import write_policy
    from helpers.wait import wait_for

    if kernel_ready():
        pytest.skip(str(kernel_ready()))
    policy = write_policy(tmp_path, "[watch]\ninterval = 0.2\nfast_interval = 0.2\n")
    folder = tmp_path / "node-exporter"
    textfile = folder / "ctguard.prom"
    policy.write_text(policy.read_text().replace(str(tmp_path / "ctguard.prom"), str(textfile)))
    log = tmp_path / "daemon.log"
    with saved_kernel_values():
        daemon = Running(policy)       # not `with`: that waits for a metrics file, which is the point here
        proc = daemon.proc
        try:
            assert wait_for(lambda: "metrics are off until" in log.read_text() or proc.poll() is not None, 20), log.read_text()
            time.sleep(1.5)   # several metrics periods with the folder still absent
            assert not folder.exists(), "ctguard must not create node_exporter's folder"
            folder.mkdir()
            assert wait_for(textfile.exists, 10), log.read_text()
        finally:
            daemon.stop()
    out = log.read_text()
    assert out.count("metrics are off until") == 1, out
    assert f"metrics are off until {folder} exists" in out
    assert f"{folder} exists: metrics are written to {textfile}" in out
    assert "cannot write the metrics" not in out, out
