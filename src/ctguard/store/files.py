"""Atomic, private, symlink-refusing file writes.

Every file ctguard writes (sysctl.d, modprobe.d, state, metrics, bundle manifests) goes
through here so that a crash or a full disk leaves either the old file or the new one,
never a torn one, and so that a symlink planted by someone else is never followed.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path


class UnsafePathError(OSError):
    """A path ctguard was asked to write or read leads somewhere it must not go."""


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_private_dir(folder: Path, mode: int = 0o700) -> Path:
    """Create `folder` (and parents) if missing; refuse it if it is a symlink.

    Parents are created with 0755 (they are usually /var/lib or /etc subfolders); the leaf
    gets `mode`. An existing leaf keeps its mode unless it is more open than `mode` allows
    for group/other, in which case it is tightened.
    """
    folder = Path(folder)
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(folder, mode)
        except FileExistsError:
            pass
        os.chmod(folder, mode, follow_symlinks=False)
        return folder
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(errno.ELOOP, f"{folder} is a symlink; ctguard refuses to follow it", str(folder))
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(errno.ENOTDIR, f"{folder} is not a directory", str(folder))
    if st.st_mode & 0o077 & ~mode:
        os.chmod(folder, stat.S_IMODE(st.st_mode) & (mode | 0o700))
    return folder


def atomic_write(path: Path | str, data: bytes | str, mode: int = 0o644) -> None:
    """Write `data` to `path` atomically: same-folder temporary file, fsync, rename, fsync folder.

    Refuses to replace a symlink (rename would replace the link itself, but a reader such as
    systemd-sysctl would have followed it before, so the link may be an attack or a mistake
    either way). On any error the temporary file is removed and the old file stays whole.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    folder = path.parent
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(errno.ELOOP, f"{path} is a symlink; ctguard refuses to write through it", str(path))
    tmp = folder / f".{path.name}.ctguard-tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(folder)


def read_text_nofollow(path: Path | str, limit: int = 16 << 20) -> str:
    """Read a file without following a symlink at its last component; at most `limit` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        chunks = []
        remaining = limit
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks).decode("utf-8", errors="replace")
    finally:
        os.close(fd)


def safe_child(folder: Path, name: str) -> Path:
    """`folder / name` when `name` is a single plain component that stays inside `folder`.

    Used for bundle IDs and other names that come from the command line: no separators,
    no `..`, no leading dot, no NUL, and the result must not be a symlink.
    """
    if not name or name in (".", "..") or "/" in name or "\0" in name or name.startswith("."):
        raise UnsafePathError(errno.EINVAL, f"{name!r} is not a plain name inside {folder}", name)
    child = Path(folder) / name
    try:
        st = os.lstat(child)
    except FileNotFoundError:
        return child
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(errno.ELOOP, f"{child} is a symlink; ctguard refuses to follow it", str(child))
    return child
