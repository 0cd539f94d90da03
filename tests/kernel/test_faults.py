"""Faults a real host throws at ctguard, made real with mount namespaces.

`ctguard run` is started inside `unshare --mount` where /proc/sys or the hashsize parameter
is bind-mounted read-only (what a container gives), or where nf_conntrack's sysctls are
hidden (module not loaded yet). Nothing outside that mount namespace changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from helpers.daemon import SRC
from helpers.kernelenv import get_buckets, get_max, needs_kernel, netns_pair, saved_kernel_values, set_max
from helpers.policy import write_policy
from helpers.wait import wait_for

pytestmark = needs_kernel    # the `kernel` marker: tests/conftest.py, by folder


def run_in_mount_ns(setup: str, policy: Path, log: Path) -> subprocess.Popen:
    """Start `ctguard run` in a private mount namespace after running `setup` (sh) there.

    The setup script is ours, a constant in this file; the only value interpolated is the
    policy path, passed as a positional argument, never through the shell's parser.
    """
    script = setup + '\nexec "$0" -m ctguard run --policy "$1"\n'
    env = {**os.environ, "PYTHONPATH": SRC}
    env.pop("NOTIFY_SOCKET", None)
    return subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                             sys.executable, str(policy)], stdout=subprocess.DEVNULL, stderr=open(log, "w"), env=env)


def said(proc: subprocess.Popen, log: Path, text: str) -> bool:
    """The daemon said `text`: on stderr, or in the journal when journald runs."""
    if text in log.read_text():
        return True
    try:
        from systemd import journal
    except ImportError:
        return False
    r = journal.Reader()
    r.add_match(_PID=str(proc.pid))
    return any(text in e.get("MESSAGE", "") for e in r)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


READ_ONLY_PROC_SYS = "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys"
READ_ONLY_HASHSIZE = (
    "P=/sys/module/nf_conntrack/parameters && mount --bind $P $P && mount -o remount,bind,ro $P"
)
HIDE_NETFILTER = "mount -t tmpfs none /proc/sys/net/netfilter"


def test_read_only_proc_sys_is_logged_and_sampling_goes_on(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, "[bump]\ncooldown = 1")
    log = tmp_path / "log"
    with saved_kernel_values(), netns_pair() as pair:
        set_max(4096)
        proc = run_in_mount_ns(READ_ONLY_PROC_SYS, policy, log)
        try:
            assert wait_for((tmp_path / "ctguard.prom").exists, 10), log.read_text()
            pair.flood_udp(3900, rate=4000)
            assert wait_for(lambda: said(proc, log, "Read-only file system"), 10), log.read_text()
            assert said(proc, log, "raise the limit on the host"), "advice the operator can act on"
            assert get_max() == 4096
            # Still sampling: the metrics keep being rewritten with the live count.
            m = tmp_path / "ctguard.prom"
            assert wait_for(lambda: f'name="{pair.receiver}"}} 3' in m.read_text(), 5)
            assert proc.poll() is None
            state = json.loads((tmp_path / "state/state.json").read_text())
            assert state["bumps"] and not state["bumps"][-1]["ok"], "a failed write is recorded, not counted"
            assert not (tmp_path / "etc/sysctl.d/90-ctguard.conf").exists(), "nothing persisted that is not in force"
        finally:
            stop(proc)


def test_hashsize_not_writable_still_bumps_max(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, "[bump]\ncooldown = 1")
    log = tmp_path / "log"
    with saved_kernel_values(), netns_pair() as pair:
        set_max(4096)
        buckets = get_buckets()
        if buckets * 4 >= 8192 * 2:
            subprocess.run(["sh", "-c", "echo 1024 > /sys/module/nf_conntrack/parameters/hashsize"], check=True)
            buckets = get_buckets()
        proc = run_in_mount_ns(READ_ONLY_HASHSIZE, policy, log)
        try:
            assert wait_for((tmp_path / "ctguard.prom").exists, 10), log.read_text()
            pair.flood_udp(3900, rate=4000)
            assert wait_for(lambda: get_max() > 4096, 10), log.read_text()
            assert get_buckets() == buckets
            assert wait_for(lambda: said(proc, log, "buckets not resized"), 5), log.read_text()
        finally:
            stop(proc)


def test_waits_for_nf_conntrack_then_guards(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, "[bump]\ncooldown = 1")
    log = tmp_path / "log"
    with saved_kernel_values(), netns_pair() as pair:
        set_max(4096)
        proc = run_in_mount_ns(HIDE_NETFILTER, policy, log)
        try:
            assert wait_for(lambda: said(proc, log, "not loaded"), 10), log.read_text()
            assert proc.poll() is None
            # The module "appears": lift the tmpfs inside the daemon's mount namespace.
            shell_pid = proc.pid
            subprocess.run(["nsenter", "-t", str(shell_pid), "-m", "umount", "/proc/sys/net/netfilter"], check=True)
            time.sleep(2.5)
            pair.flood_udp(3900, rate=4000)
            assert wait_for(lambda: get_max() > 4096, 10), log.read_text()
        finally:
            stop(proc)


def test_run_inside_a_network_namespace_where_max_is_read_only(tmp_path: Path) -> None:
    """Outside the host's namespace the kernel makes nf_conntrack_max read-only (EACCES even
    for root): the refusal is logged with advice and ctguard keeps sampling."""
    policy = write_policy(tmp_path, "[bump]\ncooldown = 1\n[watch]\nnamespaces = \"host\"")
    log = tmp_path / "log"
    with saved_kernel_values(), netns_pair() as pair:
        set_max(4096)
        env = {**os.environ, "PYTHONPATH": SRC}
        env.pop("NOTIFY_SOCKET", None)
        proc = subprocess.Popen(["ip", "netns", "exec", pair.receiver, sys.executable, "-m", "ctguard", "run",
                                 "--policy", str(policy)], env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
        try:
            assert wait_for((tmp_path / "ctguard.prom").exists, 10), log.read_text()
            pair.flood_udp(3900, rate=4000)
            assert wait_for(lambda: said(proc, log, "cannot set nf_conntrack_max"), 10), log.read_text()
            assert said(proc, log, "host's network namespace") or said(proc, log, "Permission denied")
            assert get_max() == 4096
            m = tmp_path / "ctguard.prom"
            assert wait_for(lambda: 'name="host"} 3' in m.read_text(), 5), m.read_text()
            assert proc.poll() is None
        finally:
            stop(proc)
