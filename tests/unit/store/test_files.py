"""Atomic private files: whole or not at all, never through a symlink, names that cannot leave their folder."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ctguard.store.files import UnsafePathError, atomic_write, ensure_private_dir, safe_child


def test_atomic_write_replaces_whole_and_sets_mode(tmp_path: Path) -> None:
    f = tmp_path / "x.conf"
    atomic_write(f, "one\n", 0o600)
    atomic_write(f, "two\n", 0o644)
    assert f.read_text() == "two\n" and stat.S_IMODE(f.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["x.conf"], "no temporary file left behind"


def test_atomic_write_refuses_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(UnsafePathError):
        atomic_write(link, "evil")
    assert target.read_text() == "keep"


def test_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    f = tmp_path / "x"
    atomic_write(f, "old")

    with pytest.raises(TypeError):
        atomic_write(f, 12345)  # type: ignore[arg-type]
    assert f.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x"]


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", "/etc", ".hidden", "", "a\0b"])
def test_safe_child_refuses_names_that_leave(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafePathError):
        safe_child(tmp_path, name)


def test_safe_child_refuses_planted_symlink(tmp_path: Path) -> None:
    (tmp_path / "b").symlink_to("/etc")
    with pytest.raises(UnsafePathError):
        safe_child(tmp_path, "b")
    assert safe_child(tmp_path, "20260101T000000Z-bump") == tmp_path / "20260101T000000Z-bump"


def test_private_dir(tmp_path: Path) -> None:
    d = ensure_private_dir(tmp_path / "a" / "state")
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    os.chmod(d, 0o777)
    ensure_private_dir(d)
    assert stat.S_IMODE(d.stat().st_mode) & 0o077 == 0
    (tmp_path / "l").symlink_to(d)
    with pytest.raises(UnsafePathError):
        ensure_private_dir(tmp_path / "l")
