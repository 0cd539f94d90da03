"""Other writers of nf_conntrack_max, found among real processes (a process named kube-proxy
started here, with kube-proxy's flags and config file)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from ctguard.boot import writers
from ctguard.boot.writers import KubeProxy, conntrack_from_config

CONFIG = """apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
conntrack:
  maxPerCore: 0   # leave it to ctguard
  min: null
  tcpEstablishedTimeout: 24h0m0s
mode: iptables
"""


def test_config_block() -> None:
    assert conntrack_from_config(CONFIG) == {"maxPerCore": "0", "tcpEstablishedTimeout": "24h0m0s"}
    assert conntrack_from_config("mode: ipvs\n") == {}


@pytest.mark.parametrize("settings,cpus,sets", [
    ({}, 2, 131072),                                   # defaults: max(32768 x 2, 131072)
    ({}, 8, 262144),
    ({"maxPerCore": "0"}, 8, None),
    ({"maxPerCore": "1000", "min": "5000"}, 2, 5000),
])
def test_what_kube_proxy_sets(settings: dict, cpus: int, sets: int | None) -> None:
    assert KubeProxy(1, settings).max_it_sets(cpus) == sets


def start_kube_proxy(tmp_path: Path, *args: str) -> subprocess.Popen:
    script = tmp_path / "kube-proxy"     # the kernel names a script's process after the script
    # sleep is not the script's last command: Debian 13's dash would exec it in place of the script.
    script.write_text("#!/bin/sh\nsleep 30\n:\n")
    script.chmod(0o755)
    proc = subprocess.Popen([str(script), *args])
    deadline = time.monotonic() + 5
    # Popen (vfork) returns while the child is still inside execve: the kernel names it after
    # the script before it has set up the arguments /proc/PID/cmdline shows. Wait for both.
    while time.monotonic() < deadline:
        if (Path(f"/proc/{proc.pid}/comm").read_text().strip() == "kube-proxy"
                and str(script).encode() in Path(f"/proc/{proc.pid}/cmdline").read_bytes()):
            break
        time.sleep(0.02)
    return proc


def test_a_running_kube_proxy_with_flags_and_config(tmp_path: Path) -> None:
    cfg = tmp_path / "config.conf"
    cfg.write_text(CONFIG)
    proc = start_kube_proxy(tmp_path, f"--config={cfg}", "--conntrack-min", "65536", "--v=2")
    try:
        found = [k for k in writers.kube_proxies("/proc") if k.pid == proc.pid]
        assert found, "the process named kube-proxy is found"
        kp = found[0]
        assert kp.settings == {"maxPerCore": "0", "tcpEstablishedTimeout": "24h0m0s", "min": "65536"}
        assert kp.source == f"{cfg} and flags"
        assert kp.max_it_sets(4) is None
        assert "leaves nf_conntrack_max alone" in kp.describe(4)
    finally:
        proc.kill()
        proc.wait()


def test_a_kube_proxy_that_sets_the_new_value_is_named_first(tmp_path: Path) -> None:
    proc = start_kube_proxy(tmp_path, "--conntrack-max-per-core=1024", "--conntrack-min=65536")
    try:
        who = writers.likely_writer("/proc", 65536, os.cpu_count() or 1)
        assert who.startswith(f"kube-proxy (pid {proc.pid}, flags: maxPerCore=1024, min=65536) sets "
                              "nf_conntrack_max to 65536")
    finally:
        proc.kill()
        proc.wait()
    assert f"pid {proc.pid}" not in writers.likely_writer("/proc", 65536, 2)


def test_a_sysctl_d_file_with_the_new_value_is_named() -> None:
    who = writers.likely_writer("/nonexistent-proc", 65536, 2, "/etc/sysctl.d/99-conntrack-tuning.conf", 65536)
    assert "99-conntrack-tuning.conf" in who and "sysctl --system" in who
    assert writers.likely_writer("/nonexistent-proc", 65536, 2, "/etc/sysctl.d/99-x.conf", 1) == ""
