"""Bundle folders without the kernel: ids that try to escape, retention, listing, export."""

from __future__ import annotations

import os
import stat
import tarfile
import time
from pathlib import Path

import pytest
import tomli_w

from ctguard.evidence.bundle import BundleError, bundle_path, export, list_bundles, prune, slug
from ctguard.evidence.review import show


def make_bundle(folder: Path, name: str, size: int = 100, manifest: bool = True) -> Path:
    path = folder / name
    path.mkdir(parents=True, mode=0o700)
    (path / "blob.bin").write_bytes(b"x" * size)
    if manifest:
        (path / "manifest.toml").write_text(tomli_w.dumps({
            "id": name, "created": "2025-01-01T00:00:00Z", "reason": "test", "netns": {"path": "/run/netns/a"},
            "seconds": 0.5, "budget": 15.0, "cut_short": False, "collectors": {"slab": {"ok": False, "error": "x"}},
        }))
    return path


NAMES = [f"2025010{d}T000000Z-bump" for d in range(1, 6)]


def test_slug() -> None:
    assert slug("Bump refused: ceiling!") == "bump-refused-ceiling"
    assert slug("../../etc/passwd") == "etc-passwd"
    assert slug("") == slug("!!!") == "manual"
    assert len(slug("x" * 500)) <= 48


@pytest.mark.parametrize("bad", ["../x", "..", ".", "/etc", "/etc/passwd", "a/b", ".hidden", "", "x\0y"])
def test_ids_that_leave_the_folder_are_refused(tmp_path: Path, bad: str) -> None:
    make_bundle(tmp_path, NAMES[0])
    with pytest.raises(BundleError):
        show(tmp_path, bad)
    with pytest.raises(BundleError):
        export(tmp_path, bad, tmp_path / "out.tar.gz")
    assert not (tmp_path / "out.tar.gz").exists()


def test_symlink_planted_in_the_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "bundles"
    folder.mkdir()
    secret = make_bundle(tmp_path / "outside", NAMES[0])
    (folder / NAMES[1]).symlink_to(secret)
    with pytest.raises(BundleError):
        show(folder, NAMES[1])
    with pytest.raises(BundleError):
        export(folder, NAMES[1], tmp_path / "o.tar.gz")
    # Neither listed nor pruned, and what it points to is left alone.
    assert list_bundles(folder) == []
    assert prune(folder, keep=0, max_bytes=0) == []
    assert (secret / "manifest.toml").exists()


def test_prune_by_count_oldest_first_and_protects_newest(tmp_path: Path) -> None:
    for name in NAMES:
        make_bundle(tmp_path, name)
    (tmp_path / "notes.txt").write_text("not a bundle")
    removed = prune(tmp_path, keep=2, max_bytes=1 << 30, protect=tmp_path / NAMES[-1])
    assert [p.name for p in removed] == NAMES[:3]
    assert [b.id for b in list_bundles(tmp_path)] == NAMES[3:]
    assert (tmp_path / "notes.txt").exists()


def test_prune_by_bytes_never_removes_the_protected(tmp_path: Path) -> None:
    for name in NAMES:
        make_bundle(tmp_path, name, size=1000)
    per = sum(f.stat().st_size for f in (tmp_path / NAMES[0]).iterdir())
    prune(tmp_path, keep=50, max_bytes=per * 2, protect=tmp_path / NAMES[-1])
    assert [b.id for b in list_bundles(tmp_path)] == NAMES[3:]
    prune(tmp_path, keep=0, max_bytes=0, protect=tmp_path / NAMES[-1])
    assert [b.id for b in list_bundles(tmp_path)] == NAMES[-1:]


def test_incomplete_bundle_is_listed_and_spared_while_young(tmp_path: Path) -> None:
    make_bundle(tmp_path, NAMES[0], manifest=False)
    make_bundle(tmp_path, NAMES[1], manifest=False)
    old = time.time() - 7200
    os.utime(tmp_path / NAMES[0], (old, old))
    infos = list_bundles(tmp_path)
    assert [(b.id, b.complete) for b in infos] == [(NAMES[0], False), (NAMES[1], False)]
    with pytest.raises(BundleError, match="no manifest"):
        show(tmp_path, NAMES[1])
    prune(tmp_path, keep=0, max_bytes=0)
    assert [b.id for b in list_bundles(tmp_path)] == [NAMES[1]]  # the crashed old one went


def test_list_and_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_bundle(tmp_path / "b", NAMES[0])
    (tmp_path / "b" / NAMES[0] / "planted").symlink_to("/etc/passwd")
    info = list_bundles(tmp_path / "b")[0]
    assert (info.id, info.reason, info.netns, info.errors, info.complete) == (NAMES[0], "test", "/run/netns/a", 1, True)
    assert info.as_json()["path"] == str(tmp_path / "b" / NAMES[0])
    monkeypatch.chdir(tmp_path)
    out = export(tmp_path / "b", NAMES[0], None)
    assert out == tmp_path / f"{NAMES[0]}.tar.gz"
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    with tarfile.open(out) as tar:
        assert sorted(tar.getnames()) == [f"{NAMES[0]}/blob.bin", f"{NAMES[0]}/manifest.toml"]  # no symlink
    assert export(tmp_path / "b", NAMES[0], tmp_path / "x.tgz") == tmp_path / "x.tgz"


def test_missing_bundle_message(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="ctguard bundles list"):
        bundle_path(tmp_path, NAMES[0])
    assert list_bundles(tmp_path / "does-not-exist") == []
