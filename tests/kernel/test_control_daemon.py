"""`status`, `bump`, `capture` and `reload` through a running `ctguard run`'s control socket.

Real daemon process, real kernel (under the shared kernel lock, values restored), real
journald. The daemon runs in a cgroup named like a systemd service
(`system.slice/ctguard-test-N.service`), which is how journald fills `_SYSTEMD_UNIT`, so
"journaled under the unit" is checked the way `journalctl -u` finds entries.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.daemon import Running, ctguard
from helpers.journald import NotifySocket
from helpers.kernelenv import get_buckets, get_max, needs_kernel, netns_pair, saved_kernel_values, set_max
from helpers.policy import write_policy
from helpers.wait import wait_for

pytestmark = needs_kernel    # the `kernel` marker: tests/conftest.py, by folder

MSG_BUMP = "953e8aba31884714a95257d72e230f9c"
MSG_REFUSED = "0883e84cdb5e431e8b98319536be6742"
MSG_PERSISTED = "2ea0a8b1a907438b944c155503842e2f"
MSG_REJECTED = "b49f6a2aa0274efb9f18bcfe1719c402"


def policy_file(tmp: Path, persist_mode: str = "stable", extra: str = "") -> Path:
    return write_policy(tmp, extra, persist_mode, defend=None, ceiling=65536, budget=2, stable_for=1)


CGROUP_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup"))


@contextlib.contextmanager
def service_cgroup(unit: str) -> Iterator[list[Path]]:
    """Folders named system.slice/<unit> in every writable cgroup hierarchy journald may read."""
    made: list[Path] = []
    for root in CGROUP_ROOTS:
        if not (root / "cgroup.procs").exists():
            continue
        folder = root / "system.slice" / unit
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        made.append(folder)
    if not made:
        pytest.skip("no writable cgroup hierarchy to name the daemon's unit")
    try:
        yield made
    finally:
        for folder in made:
            for _ in range(50):
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.1)     # the daemon's last process is still leaving


def unit_entries(unit: str, message_id: str, since: float) -> list[dict]:
    """Entries of one kind that journald filed under `unit` (what `journalctl -u unit` shows)."""
    from systemd import journal

    subprocess.run(["journalctl", "--sync"], check=False, capture_output=True)
    r = journal.Reader()
    r.this_boot()
    r.add_match(_SYSTEMD_UNIT=unit)
    r.add_match(MESSAGE_ID=message_id)
    r.seek_realtime(since)
    return list(r)


def test_manual_bumps_go_through_the_daemon_and_are_journaled_under_its_unit(tmp_path: Path, journald) -> None:
    unit = f"ctguard-test-{os.getpid()}-bump.service"
    # No growth prediction: the --lower part floods a little, and only the operator may move max here.
    policy = policy_file(tmp_path, "stable", extra="[thresholds]\nhorizon = 0")
    sysctl = tmp_path / "etc/sysctl.d/90-ctguard.conf"
    since = time.time() - 1
    with saved_kernel_values(), netns_pair() as pair, service_cgroup(unit) as cgroups:
        set_max(4096)
        daemon = Running(policy, cgroups=cgroups).started(socket=True)
        try:
            ok = ctguard("bump", "--to", "16384", "--policy", str(policy))
            assert ok.returncode == 0, ok.stderr + daemon.output()
            assert f"done by the running daemon (pid {daemon.proc.pid})" in ok.stdout
            assert get_max() == 16384 and get_buckets() * 4 >= 16384
            # The operator's value is persisted at once (persist.mode stable waits only for emergencies).
            assert f"persisted to {sysctl} (persist.mode stable)" in ok.stdout
            assert "net.netfilter.nf_conntrack_max = 16384" in sysctl.read_text()

            bumps = unit_entries(unit, MSG_BUMP, since)
            manual = [e for e in bumps if e.get("CTGUARD_REASON") == "manual"]
            assert len(manual) == 1, bumps
            assert manual[0]["CTGUARD_NEW_MAX"] == "16384" and "operator (uid 0, pid" in manual[0]["MESSAGE"]
            assert unit_entries(unit, MSG_PERSISTED, since), "the persist is journaled by the daemon too"

            # Refused ones are journaled as well, under the same unit.
            over = ctguard("bump", "--to", "70000", "--policy", str(policy))
            assert over.returncode == 1 and "above the ceiling 65536" in over.stderr
            down = ctguard("bump", "--to", "8192", "--policy", str(policy))
            assert down.returncode == 1 and "--lower" in down.stderr and get_max() == 16384
            refused = {e["CTGUARD_REASON"]: e for e in unit_entries(unit, MSG_REFUSED, since)
                       if e.get("CTGUARD_TRIGGER") == "manual"}
            assert set(refused) == {"ceiling", "lower"}, refused
            assert refused["ceiling"]["CTGUARD_NEW_MAX"] == "70000"

            # --lower: refused below the live count / act, done (and persisted at once) above it.
            pair.flood_udp(3400, rate=2000)
            assert wait_for(lambda: pair.count() >= 3400, 5)
            floor = -(-pair.count() * 100 // 85)
            low = ctguard("bump", "--to", str(floor - 1), "--lower", "--policy", str(policy))
            assert low.returncode == 1 and "below what the table holds now" in low.stderr
            undo = ctguard("bump", "--to", "8192", "--lower", "--policy", str(policy))
            assert undo.returncode == 0, undo.stderr
            assert get_max() == 8192 and get_buckets() * 4 >= 16384, "live buckets are never shrunk"
            assert "= 8192" in sysctl.read_text()
            lowered = [e for e in unit_entries(unit, MSG_BUMP, since) if e["CTGUARD_NEW_MAX"] == "8192"]
            assert lowered and lowered[0]["MESSAGE"].startswith("lowered nf_conntrack_max 16384 -> 8192")
            state = json.loads((tmp_path / "state/state.json").read_text())
            assert [(b["old"], b["new"], b["trigger"]) for b in state["bumps"]] == [(4096, 16384, "manual"),
                                                                                    (16384, 8192, "manual")]
        finally:
            daemon.stop()
    assert not (tmp_path / "run/control.sock").exists(), "the daemon removes its socket at stop"


def test_without_a_daemon_the_commands_act_directly_and_say_so(tmp_path: Path) -> None:
    policy = policy_file(tmp_path, "immediate")
    with saved_kernel_values():
        set_max(4096)
        res = ctguard("bump", "--to", "8192", "--policy", str(policy))
        assert res.returncode == 0, res.stderr
        assert "no ctguard daemon answers on" in res.stderr and "acting directly" in res.stderr
        assert get_max() == 8192 and "= 8192" in (tmp_path / "etc/sysctl.d/90-ctguard.conf").read_text()
        status = ctguard("status", "--json", "--policy", str(policy))
        assert json.loads(status.stdout)["daemon"] is None and "acting directly" in status.stderr


def test_another_policys_daemon_is_not_asked(tmp_path: Path, journald) -> None:
    """Two policies naming one socket: the daemon answers only for its own file."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    pa = policy_file(tmp_path / "a")
    pb = policy_file(tmp_path / "b")
    pb.write_text(pb.read_text().replace(str(tmp_path / "b" / "run"), str(tmp_path / "a" / "run")))
    unit = f"ctguard-test-{os.getpid()}-other.service"
    with saved_kernel_values(), service_cgroup(unit) as cgroups:
        daemon = Running(pa, cgroups=cgroups).started(socket=True)
        try:
            res = ctguard("status", "--json", "--policy", str(pb))
            assert json.loads(res.stdout)["daemon"] is None
            assert "runs another policy" in res.stderr
            mine = ctguard("status", "--json", "--policy", str(pa))
            assert json.loads(mine.stdout)["daemon"]["pid"] == daemon.proc.pid
        finally:
            daemon.stop()


def test_a_rejected_reload_fails_loudly_and_status_and_bump_keep_working(tmp_path: Path, journald) -> None:
    unit = f"ctguard-test-{os.getpid()}-reload.service"
    policy = policy_file(tmp_path, "immediate")
    good = policy.read_text()
    notify = NotifySocket(tmp_path)
    with saved_kernel_values(), service_cgroup(unit) as cgroups:
        set_max(4096)
        daemon = Running(policy, env={"NOTIFY_SOCKET": notify.path}, cgroups=cgroups).started(socket=True)
        try:
            ok = ctguard("reload", "--policy", str(policy))
            assert ok.returncode == 0 and ok.stdout.startswith("reloaded:"), ok.stderr

            policy.write_text(good + "\n[thresholds]\nact = 'high'\n")
            since = time.time() - 1
            bad = ctguard("reload", "--policy", str(policy))
            assert bad.returncode == 1, bad.stdout
            assert "reload rejected, the previous policy stays in force" in bad.stderr
            assert "[thresholds] act" in bad.stderr
            # STATUS= says so (what `systemctl status` shows), and every STATUS= line after it too
            # (sent when the line changes, at most once a second: issue 25).
            assert notify.drain(lambda m: any("STATUS=reload REJECTED" in x for x in m)), notify.messages
            first = next(i for i, x in enumerate(notify.messages) if "STATUS=reload REJECTED" in x)
            notify.drain(lambda m: False, timeout=2.5)
            later = [x for x in notify.messages[first:] if x.startswith("STATUS=")]
            assert later and all("reload REJECTED" in x for x in later), later
            assert unit_entries(unit, MSG_REJECTED, since)

            # The file is broken; the daemon's policy in force still answers status and bump.
            status = ctguard("status", "--policy", str(policy))
            assert status.returncode in (0, 1, 2), status.stdout + status.stderr
            assert f"daemon: pid {daemon.proc.pid}" in status.stdout and "reload REJECTED" in status.stdout
            assert "[thresholds] act" in status.stderr
            bump = ctguard("bump", "--to", "8192", "--policy", str(policy))
            assert bump.returncode == 0, bump.stderr
            assert get_max() == 8192 and "persisted to" in bump.stdout   # the old policy's mode: immediate

            # A capture too: the daemon's child gets the policy in force, not the broken file.
            cap = ctguard("capture", "--reason", "review", "--policy", str(policy))
            assert cap.returncode == 0, cap.stderr + daemon.output()
            bundle = Path(cap.stdout.strip())
            kept = "".join(p.read_text(errors="replace") for p in bundle.rglob("*policy*") if p.is_file())
            assert "ceiling = 65536" in kept and "'high'" not in kept

            policy.write_text(good)
            again = ctguard("reload", "--policy", str(policy))
            assert again.returncode == 0, again.stderr
            n = len(notify.messages)
            assert notify.drain(lambda m: any(x.startswith("STATUS=") and "REJECTED" not in x for x in m[n:]))
            assert "reload REJECTED" not in ctguard("status", "--policy", str(policy)).stdout
        finally:
            daemon.stop()


def test_capture_goes_through_the_daemon_and_prints_the_bundle(tmp_path: Path, journald) -> None:
    unit = f"ctguard-test-{os.getpid()}-capture.service"
    policy = policy_file(tmp_path)
    with saved_kernel_values(), service_cgroup(unit) as cgroups:
        daemon = Running(policy, cgroups=cgroups).started(socket=True)
        try:
            since = time.time() - 1
            res = ctguard("capture", "--reason", "review", "--policy", str(policy))
            assert res.returncode == 0, res.stderr + daemon.output()
            assert "capture started by the running daemon" in res.stderr
            bundle = Path(res.stdout.strip())
            assert bundle.parent == tmp_path / "bundles" and (bundle / "manifest.toml").exists()
            assert "operator's capture" in (bundle / "manifest.toml").read_text() + "".join(
                p.read_text(errors="replace") for p in bundle.rglob("*.json"))
            assert wait_for(lambda: unit_entries(unit, "df598dc36514407a9627919760641636", since), 5)
        finally:
            daemon.stop()
