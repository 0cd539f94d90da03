"""The boot-order model against real files in a temporary root, and against systemd itself
(`systemd-analyze cat-config --root`), which reads the same tree."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ctguard.boot import values as bv

OURS = "/etc/sysctl.d/90-ctguard.conf"
OURS_MP = "/etc/modprobe.d/ctguard.conf"


def put(root: Path, path: str, text: str) -> Path:
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def link(root: Path, path: str, target: str) -> None:
    p = root / path.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, p)


def max_line(v: int) -> str:
    return f"net.netfilter.nf_conntrack_max = {v}\n"


# (files: path -> content, or "->target" for a symlink) -> (winning file, value, shadowed?)
CASES = {
    "only ours": ({OURS: max_line(262144)}, OURS, "262144", False),
    "nothing at all": ({}, None, None, False),
    "a later /etc file wins": ({OURS: max_line(262144), "/etc/sysctl.d/99-conntrack-tuning.conf": max_line(65536)},
                               "/etc/sysctl.d/99-conntrack-tuning.conf", "65536", True),
    "an earlier file loses": ({OURS: max_line(262144), "/etc/sysctl.d/10-tuning.conf": max_line(65536)},
                              OURS, "262144", False),
    "a later file with the same value": ({OURS: max_line(262144), "/etc/sysctl.d/99-x.conf": max_line(262144)},
                                         "/etc/sysctl.d/99-x.conf", "262144", False),
    "/run counts": ({OURS: max_line(262144), "/run/sysctl.d/95-run.conf": max_line(1000)},
                    "/run/sysctl.d/95-run.conf", "1000", True),
    "/usr/local/lib counts": ({OURS: max_line(262144), "/usr/local/lib/sysctl.d/91-local.conf": max_line(2000)},
                              "/usr/local/lib/sysctl.d/91-local.conf", "2000", True),
    "/usr/lib counts": ({OURS: max_line(262144), "/usr/lib/sysctl.d/99-vendor.conf": max_line(3000)},
                        "/usr/lib/sysctl.d/99-vendor.conf", "3000", True),
    "/lib counts": ({OURS: max_line(262144), "/lib/sysctl.d/99-old.conf": max_line(4000)},
                    "/lib/sysctl.d/99-old.conf", "4000", True),
    "same name: /etc hides /usr/lib": ({OURS: max_line(262144), "/usr/lib/sysctl.d/99-v.conf": max_line(3000),
                                        "/etc/sysctl.d/99-v.conf": "# nothing here\n"}, OURS, "262144", False),
    "same name: /run hides /usr/lib": ({OURS: max_line(262144), "/usr/lib/sysctl.d/99-v.conf": "vm.swappiness = 1\n",
                                        "/run/sysctl.d/99-v.conf": max_line(5000)},
                                       "/run/sysctl.d/99-v.conf", "5000", True),
    "masked by /dev/null": ({OURS: max_line(262144), "/usr/lib/sysctl.d/99-v.conf": max_line(3000),
                             "/etc/sysctl.d/99-v.conf": "->/dev/null"}, OURS, "262144", False),
    "masked by an empty file": ({OURS: max_line(262144), "/usr/lib/sysctl.d/99-v.conf": max_line(3000),
                                 "/etc/sysctl.d/99-v.conf": ""}, OURS, "262144", False),
    "sysctl.conf via Debian 12's 99-sysctl.conf": (
        {OURS: max_line(262144), "/etc/sysctl.conf": "# tuning\n" + max_line(131072),
         "/etc/sysctl.d/99-sysctl.conf": "->../sysctl.conf"}, "/etc/sysctl.d/99-sysctl.conf", "131072", True),
    "sysctl.conf via an absolute link": (
        {OURS: max_line(262144), "/etc/sysctl.conf": max_line(131072),
         "/etc/sysctl.d/99-sysctl.conf": "->/etc/sysctl.conf"}, "/etc/sysctl.d/99-sysctl.conf", "131072", True),
    "sysctl.conf without the link is not read at boot": (
        {OURS: max_line(262144), "/etc/sysctl.conf": max_line(131072)}, OURS, "262144", False),
    "a dangling link hides nothing": ({OURS: max_line(262144), "/usr/lib/sysctl.d/99-v.conf": max_line(3000),
                                       "/etc/sysctl.d/99-v.conf": "->/nowhere.conf"},
                                      "/usr/lib/sysctl.d/99-v.conf", "3000", True),
    "slash spelling and a dash prefix": ({OURS: max_line(262144),
                                          "/etc/sysctl.d/95-s.conf": "-net/netfilter/nf_conntrack_max=7000\n"},
                                         "/etc/sysctl.d/95-s.conf", "7000", True),
    "comments and other files ignored": ({OURS: max_line(262144), "/etc/sysctl.d/99-c.conf": "; " + max_line(1)
                                          + "# " + max_line(2), "/etc/sysctl.d/99-d.conf.disabled": max_line(3)},
                                         OURS, "262144", False),
    "last assignment in one file wins": ({OURS: max_line(262144), "/etc/sysctl.d/99-two.conf": max_line(10)
                                          + max_line(20)}, "/etc/sysctl.d/99-two.conf", "20", True),
}


def build(root: Path, files: dict[str, str]) -> None:
    for path, content in files.items():
        if content.startswith("->"):
            link(root, path, content[2:])
        else:
            put(root, path, content)


@pytest.mark.parametrize("name", list(CASES))
def test_sysctl_order(tmp_path: Path, name: str) -> None:
    files, winner, value, shadowed = CASES[name]
    build(tmp_path, files)
    view = bv.boot_view(tmp_path, OURS, OURS_MP)
    w = view.max.winner
    assert (w.path if w else None, w.value if w else None) == (winner, value)
    assert (view.max_shadow is not None) == shadowed
    if shadowed:
        assert view.max_shadow.file.startswith(winner)
        assert view.max_shadow.value == value
        assert "persist] sysctl_file" in view.max_shadow.fix


def test_fix_names_the_real_file_behind_the_link(tmp_path: Path) -> None:
    build(tmp_path, {OURS: max_line(262144), "/etc/sysctl.conf": max_line(131072),
                     "/etc/sysctl.d/99-sysctl.conf": "->../sysctl.conf"})
    s = bv.boot_view(tmp_path, OURS, OURS_MP).max_shadow
    assert s.file == "/etc/sysctl.d/99-sysctl.conf (-> /etc/sysctl.conf)"
    assert "remove the net.netfilter.nf_conntrack_max line from /etc/sysctl.conf" in s.fix
    assert "zz-ctguard.conf" in s.fix


def test_our_file_outside_the_boot_folders_is_never_called_shadowed(tmp_path: Path) -> None:
    build(tmp_path, {"/etc/sysctl.d/99-x.conf": max_line(5)})
    view = bv.boot_view(tmp_path, "/tmp/elsewhere/90-ctguard.conf", OURS_MP)
    assert view.max_shadow is None and not view.sysctl_file_read_at_boot
    assert view.max.value == "5"


MP = "options nf_conntrack hashsize={}\n"

MODPROBE_CASES = {
    "only ours": ({OURS_MP: MP.format(65536)}, "", OURS_MP, "65536", False),
    "nf_conntrack.conf sorts after ctguard.conf": (
        {OURS_MP: MP.format(65536), "/etc/modprobe.d/nf_conntrack.conf": MP.format(16384)}, "",
        "/etc/modprobe.d/nf_conntrack.conf", "16384", True),
    "an earlier name loses": ({OURS_MP: MP.format(65536), "/etc/modprobe.d/a.conf": MP.format(16384)}, "",
                              OURS_MP, "65536", False),
    "/lib counts": ({OURS_MP: MP.format(65536), "/lib/modprobe.d/zz.conf": MP.format(1024)}, "",
                    "/lib/modprobe.d/zz.conf", "1024", True),
    "/usr/lib counts": ({OURS_MP: MP.format(65536), "/usr/lib/modprobe.d/zz.conf": MP.format(1024)}, "",
                        "/usr/lib/modprobe.d/zz.conf", "1024", True),
    "masked by /dev/null": ({OURS_MP: MP.format(65536), "/usr/lib/modprobe.d/zz.conf": MP.format(1024),
                             "/etc/modprobe.d/zz.conf": "->/dev/null"}, "", OURS_MP, "65536", False),
    "the command line beats every file": ({OURS_MP: MP.format(65536)},
                                          "quiet nf_conntrack.hashsize=4096 ro", "/proc/cmdline", "4096", True),
    "after -- belongs to init": ({OURS_MP: MP.format(65536)}, "quiet -- nf_conntrack.hashsize=4096",
                                 OURS_MP, "65536", False),
    "dash spelling and other modules": ({OURS_MP: MP.format(65536), "/etc/modprobe.d/zz.conf":
                                         "options nf-conntrack expect_hashsize=9 hashsize=2048\n"
                                         "options nf_conntrack_ipv4 hashsize=1\n"},
                                        "nf_nat.hashsize=3", "/etc/modprobe.d/zz.conf", "2048", True),
    "continuation lines": ({OURS_MP: MP.format(65536), "/etc/modprobe.d/zz.conf":
                            "options nf_conntrack \\\n  hashsize=8192\n"}, "", "/etc/modprobe.d/zz.conf", "8192", True),
}


@pytest.mark.parametrize("name", list(MODPROBE_CASES))
def test_modprobe_order(tmp_path: Path, name: str) -> None:
    files, cmdline, winner, value, shadowed = MODPROBE_CASES[name]
    build(tmp_path, files)
    put(tmp_path, "/proc/cmdline", cmdline + "\n")
    view = bv.boot_view(tmp_path, OURS, OURS_MP)
    w = view.hashsize.winner
    assert (w.path, w.value) == (winner, value)
    assert (view.hashsize_shadow is not None) == shadowed


def cat_config_order(root: Path | None) -> list[str]:
    args = ["systemd-analyze", "cat-config", "--no-pager", "sysctl.d"]
    if root is not None:
        args.insert(2, f"--root={root}")
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    prefix = str(root) if root is not None else ""
    names = []
    for line in out.splitlines():
        m = re.match(r"^# (/\S+)$", line)
        if m and m.group(1).endswith(".conf"):
            names.append(m.group(1)[len(prefix):])
    return names


needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")


@needs_analyze
def test_order_matches_systemd_on_every_case(tmp_path: Path) -> None:
    """One tree holding every case's files at once (names made unique), read by systemd and by us."""
    build(tmp_path, {
        OURS: max_line(262144),
        "/etc/sysctl.d/99-conntrack-tuning.conf": max_line(65536),
        "/etc/sysctl.d/10-early.conf": max_line(1),
        "/run/sysctl.d/95-run.conf": max_line(2),
        "/usr/local/lib/sysctl.d/91-local.conf": max_line(3),
        "/usr/lib/sysctl.d/50-vendor.conf": max_line(4),
        "/lib/sysctl.d/60-old.conf": max_line(5),
        "/usr/lib/sysctl.d/70-hidden.conf": max_line(6),
        "/etc/sysctl.d/70-hidden.conf": "# replaces the vendor file\n",
        "/usr/lib/sysctl.d/71-masked.conf": max_line(7),
        "/etc/sysctl.d/71-masked.conf": "->/dev/null",
        "/usr/lib/sysctl.d/72-run-hides.conf": max_line(8),
        "/run/sysctl.d/72-run-hides.conf": max_line(9),
        "/etc/sysctl.conf": max_line(131072),
        "/etc/sysctl.d/99-sysctl.conf": "->../sysctl.conf",
        "/etc/sysctl.d/README.sysctl": "not a conf\n",
    })
    ours = [cf.path for cf in bv.conf_files(tmp_path, bv.SYSCTL_DIRS)]
    assert ours == cat_config_order(tmp_path)
    # And the value: the last assignment in systemd's concatenation is ours too.
    out = subprocess.run(["systemd-analyze", "cat-config", "--no-pager", f"--root={tmp_path}", "sysctl.d"],
                         capture_output=True, text=True, check=True).stdout
    last = [a for _, k, a in bv.sysctl_assignments(out) if k == bv.MAX_KEY][-1]
    assert bv.sysctl_effective(tmp_path).value == last == "131072"


@needs_analyze
def test_order_matches_systemd_on_this_host() -> None:
    assert [cf.path for cf in bv.conf_files(Path("/"), bv.SYSCTL_DIRS)] == cat_config_order(None)
