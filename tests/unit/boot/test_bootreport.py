"""status / check-policy / metrics views of the boot model, and the initramfs look and update,
on temporary roots with real files and real child processes."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from ctguard.boot import initramfs
from ctguard.boot import report as bootreport
from ctguard.cli import status as status_cli
from ctguard.config import policy as policy_mod
from ctguard.control import status as status_mod
from ctguard.core.model import History, Instant, KernelLimits, NamespaceReading, Sample
from ctguard.daemon import metrics


def put(root: Path, path: str, text: str) -> Path:
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def shadowed_root(root: Path) -> None:
    put(root, "/etc/sysctl.d/90-ctguard.conf", "net.netfilter.nf_conntrack_max = 262144\n")
    put(root, "/etc/sysctl.d/99-conntrack-tuning.conf", "net.netfilter.nf_conntrack_max = 65536\n")
    put(root, "/proc/cmdline", "quiet\n")
    (root / "proc/sys/kernel").mkdir(parents=True)


def test_status_names_the_file_its_value_and_the_fix(tmp_path: Path) -> None:
    shadowed_root(tmp_path)
    p = policy_mod.loads("[bump]\nceiling = 1048576\n", "t.toml")
    report = bootreport.build(p, root=tmp_path, proc_root=tmp_path / "proc", with_initramfs=False)
    s = Sample(Instant(1.8e9, 100.0, "b"), KernelLimits(262144, 65536, 320, 16 << 30, 8 << 30),
               (NamespaceReading(4026531840, "host", 10),))
    view = status_mod.build(p, s, History(), Instant(1.8e9, 100.0, "b"), boot=report)
    assert view.code == status_mod.WARNING
    assert "/etc/sysctl.d/99-conntrack-tuning.conf overrides ctguard's net.netfilter.nf_conntrack_max" in view.headline
    text = status_cli.render_text(view)
    assert "next boot: nf_conntrack_max 65536 from /etc/sysctl.d/99-conntrack-tuning.conf" in text
    assert "remove the net.netfilter.nf_conntrack_max line from /etc/sysctl.d/99-conntrack-tuning.conf" in text
    data = json.loads(status_cli.render_json(view))
    assert data["boot"]["max"]["value"] == 65536
    assert data["boot"]["shadowed"] == [{
        "key": "net.netfilter.nf_conntrack_max", "file": "/etc/sysctl.d/99-conntrack-tuning.conf", "value": "65536",
        "ours": "/etc/sysctl.d/90-ctguard.conf", "ours_value": "262144", "fix": report.view.max_shadow.fix}]
    assert report.warnings() == [report.view.max_shadow.message()]


def test_nothing_shadowed_is_ok(tmp_path: Path) -> None:
    put(tmp_path, "/etc/sysctl.d/90-ctguard.conf", "net.netfilter.nf_conntrack_max = 262144\n")
    p = policy_mod.Policy()
    report = bootreport.build(p, root=tmp_path, proc_root=tmp_path / "proc", with_initramfs=False)
    s = Sample(Instant(1.8e9, 100.0, "b"), KernelLimits(262144, 65536, 320, 16 << 30, 8 << 30),
               (NamespaceReading(4026531840, "host", 10),))
    view = status_mod.build(p, s, History(), Instant(1.8e9, 100.0, "b"), boot=report)
    assert view.code == status_mod.OK and report.warnings() == []
    assert "next boot: nf_conntrack_max 262144 from /etc/sysctl.d/90-ctguard.conf" in status_cli.render_text(view)


def test_metrics_text() -> None:
    text = metrics.render_persist([("/etc/sysctl.d/99-sysctl.conf (-> /etc/sysctl.conf)", 65536)], 3, 1)
    assert 'ctguard_persist_shadowed{file="/etc/sysctl.d/99-sysctl.conf (-> /etc/sysctl.conf)"} 65536\n' in text
    assert "# TYPE ctguard_max_lowered_total counter\nctguard_max_lowered_total 3\n" in text
    assert "ctguard_max_defended_total 1\n" in text
    if shutil.which("promtool"):
        out = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout + out.stderr


# -- initramfs --------------------------------------------------------------------------------

def newc(names: list[str]) -> bytes:
    """A gzip'd newc cpio archive of empty files (what mkinitramfs makes, minus the content)."""
    out = b""
    for i, name in enumerate([*names, "TRAILER!!!"]):
        n = name.encode() + b"\0"
        head = b"070701" + b"".join(b"%08X" % v for v in (i + 1, 0o100644, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(n), 0))
        out += head + n
        out += b"\0" * (-len(out) % 4)
    return gzip.compress(out)


LISTER = """#!/usr/bin/python3
# Lists a gzip'd newc cpio archive (an initramfs without early microcode), like lsinitramfs.
import gzip, sys
data = gzip.decompress(open(sys.argv[1], "rb").read())
pos = 0
while True:
    size, namesize = int(data[pos + 54:pos + 62], 16), int(data[pos + 94:pos + 102], 16)
    name = data[pos + 110:pos + 110 + namesize - 1].decode()
    if name == "TRAILER!!!":
        break
    print(name)
    pos += 110 + namesize
    pos += -pos % 4
    pos += size + (-size % 4)
"""


def image_root(tmp: Path, with_conntrack: bool) -> Path:
    root = tmp / "root"
    mods = ["usr/lib/modules/6.1.0-test/kernel/fs/ext4/ext4.ko"]
    if with_conntrack:
        mods.append("usr/lib/modules/6.1.0-test/kernel/net/netfilter/nf_conntrack.ko.xz")
    img = root / "boot/initrd.img-6.1.0-test"
    img.parent.mkdir(parents=True)
    img.write_bytes(newc(["etc", "etc/modprobe.d/ctguard.conf", *mods]))
    return root


def lister(tmp: Path) -> str:
    p = tmp / "list-initramfs"
    p.write_text(LISTER)
    p.chmod(0o755)
    return str(p)


@pytest.mark.parametrize("tool", ["script", "lsinitramfs"])
def test_detect_lists_once_then_uses_the_cache(tmp_path: Path, tool: str) -> None:
    if tool == "lsinitramfs" and shutil.which("lsinitramfs") is None:
        pytest.skip("needs lsinitramfs (initramfs-tools-core)")
    how = lister(tmp_path) if tool == "script" else "lsinitramfs"
    root = image_root(tmp_path, True)
    put(root, "/etc/modprobe.d/ctguard.conf", "options nf_conntrack hashsize=65536\n")
    cache = tmp_path / "state"
    cache.mkdir()
    img = root / "boot/initrd.img-6.1.0-test"
    os.utime(img, (time.time() - 3600, time.time() - 3600))
    first = initramfs.detect(root, "6.1.0-test", cache, "/etc/modprobe.d/ctguard.conf", lister=how)
    assert (first.contains, first.how, first.older_than_modprobe) == (True, how, True)
    assert "update-initramfs -u" in first.advice()
    again = initramfs.detect(root, "6.1.0-test", cache, None, lister="/nonexistent")
    assert (again.contains, again.how) == (True, "cache")
    # A new image (update-initramfs ran) is listed again.
    img.write_bytes(newc(["usr/lib/modules/6.1.0-test/kernel/fs/ext4/ext4.ko"]))
    fresh = initramfs.detect(root, "6.1.0-test", cache, None, lister=how)
    assert (fresh.contains, fresh.how, fresh.advice()) == (False, how, None)


def test_detect_without_an_image_and_the_modules_list(tmp_path: Path) -> None:
    put(tmp_path, "/etc/initramfs-tools/modules", "# comment\nnf-conntrack hashsize=1\n")
    st = initramfs.detect(tmp_path, "6.1.0-test", None)
    assert (st.image, st.contains, st.listed) == (None, None, True)
    assert "listed in /etc/initramfs-tools/modules" in st.advice()


def test_update_runs_only_when_needed_and_reports(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    cmd = ["sh", "-c", f"echo 'update-initramfs: Generating /boot/initrd.img-6.1.0-test'; touch {marker}"]
    without = image_root(tmp_path / "a", False)
    out = initramfs.update_if_needed(without, "6.1.0-test", None, None, command=cmd, lister=lister(tmp_path))
    assert (out.ran, out.ok) == (False, True) and "not in the initramfs" in out.output and not marker.exists()
    with_ct = image_root(tmp_path / "b", True)
    out = initramfs.update_if_needed(with_ct, "6.1.0-test", None, None, command=cmd, lister=lister(tmp_path))
    assert (out.ran, out.ok, out.code) == (True, True, 0) and marker.exists()
    assert out.output.startswith("update-initramfs: Generating")
    failing = initramfs.update_if_needed(with_ct, "6.1.0-test", None, None, command=["sh", "-c", "echo no space >&2; exit 1"],
                                         lister=lister(tmp_path))
    assert (failing.ran, failing.ok, failing.code, failing.output) == (True, False, 1, "no space")


def test_updater_runs_beside_the_caller_one_at_a_time(tmp_path: Path) -> None:
    u = initramfs.Updater()
    gate = tmp_path / "gate"
    job = lambda: initramfs.update_if_needed(  # noqa: E731
        image_root(tmp_path / str(time.monotonic_ns()), True), "6.1.0-test", None, None,
        command=["sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.01; done; echo ok"], lister=lister(tmp_path))
    try:
        assert u.request(job) is True
        assert u.request(job) is False          # queued behind the running one
        assert u.poll() is None and u.busy      # the caller is not held up
        gate.touch()
        results = []
        deadline = time.monotonic() + 20
        while len(results) < 2 and time.monotonic() < deadline:
            r = u.poll()
            if r is not None:
                results.append(r)
            time.sleep(0.01)
        assert [(r.ran, r.ok, r.output) for r in results] == [(True, True, "ok")] * 2
        assert not u.busy
    finally:
        u.stop()


def test_under_systemd_the_update_is_a_request_to_the_path_unit(tmp_path: Path) -> None:
    """Issue 25: ctguard's sandbox cannot reach PID 1, so under systemd it leaves a request file for
    ctguard-initramfs.path and waits for the result its service writes (here a thread plays it)."""
    import threading

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with_ct = image_root(tmp_path / "b", True)

    def service(result: str) -> None:
        deadline = time.monotonic() + 10
        while not (run_dir / initramfs.REQUEST_NAME).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        (run_dir / initramfs.REQUEST_NAME).unlink()
        (run_dir / initramfs.RESULT_NAME).write_text(result)

    for result, ok, code in (("success exited 0\n", True, 0), ("exit-code exited 1\n", False, 1)):
        t = threading.Thread(target=service, args=(result,))
        t.start()
        out = initramfs.update_if_needed(with_ct, "6.1.0-test", None, None, lister=lister(tmp_path),
                                         request_dir=run_dir, timeout=10)
        t.join()
        assert (out.ran, out.ok, out.code) == (True, ok, code), out
        assert "journalctl -u ctguard-initramfs.service" in out.output
    late = initramfs.update_if_needed(with_ct, "6.1.0-test", None, None, lister=lister(tmp_path),
                                      request_dir=run_dir, timeout=0.3)
    assert (late.ran, late.ok) == (True, False) and "ctguard-initramfs.path" in late.output
    assert (run_dir / initramfs.REQUEST_NAME).exists()
    # Not under systemd: update-initramfs runs directly, as before.
    assert initramfs.default_command("6.1.0-test") == ["update-initramfs", "-u", "-k", "6.1.0-test"]
