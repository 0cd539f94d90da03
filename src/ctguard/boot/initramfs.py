"""Is nf_conntrack in the initramfs? Then the modprobe.d hash size only counts after
`update-initramfs -u` (the image carries its own copy of /etc/modprobe.d).

`detect` is cheap: `lsinitramfs` runs only when the image changed since the last look (its
path, size and mtime are cached in the state folder); the initramfs-tools `modules` list says
whether the next image will hold it. `Updater` runs the look and update-initramfs in one worker
thread beside the daemon's loop (polled each turn, never waited for) and hands back the outcome.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from ctguard.store.files import atomic_write

CACHE_NAME = "initramfs.json"
LIST_TIMEOUT = 60.0
UPDATE_TIMEOUT = 600.0


@dataclass(frozen=True)
class InitramfsState:
    image: str | None          # /boot/initrd.img-<release>, None when there is none
    contains: bool | None      # nf_conntrack.ko is in it; None: could not tell
    listed: bool               # /etc/initramfs-tools/modules names nf_conntrack (the next image holds it)
    older_than_modprobe: bool  # the image predates ctguard's modprobe file: it still has the old hash size
    how: str                   # how `contains` was found: lsinitramfs, cache, or why it is unknown

    @property
    def matters(self) -> bool:
        return bool(self.contains or self.listed)

    def advice(self) -> str | None:
        if not self.matters:
            return None
        why = "is in the initramfs" if self.contains else "is listed in /etc/initramfs-tools/modules"
        stale = "; the current image predates ctguard's modprobe file" if self.older_than_modprobe else ""
        return (f"nf_conntrack {why}: a changed hash size takes effect at boot only after `update-initramfs -u`"
                f"{stale} (or set [persist] update_initramfs = true)")


def image_path(root: Path, release: str) -> Path:
    return root / "boot" / f"initrd.img-{release}"


def _listed(root: Path) -> bool:
    for p in [root / "etc/initramfs-tools/modules", *sorted((root / "etc/initramfs-tools/modules.d").glob("*"))]:
        try:
            text = p.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            words = line.split("#", 1)[0].split()
            if words and words[0].replace("-", "_") == "nf_conntrack":
                return True
    return False


def list_contains(image: Path, lister: str = "lsinitramfs") -> bool | None:
    if shutil.which(lister) is None and not os.path.isabs(lister):
        return None
    try:
        out = subprocess.run([lister, str(image)], capture_output=True, timeout=LIST_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return any(line.rsplit(b"/", 1)[-1].startswith(b"nf_conntrack.ko") for line in out.stdout.splitlines())


def detect(root: Path | str, release: str, cache_dir: Path | str | None, modprobe_file: Path | str | None = None,
           lister: str = "lsinitramfs") -> InitramfsState:
    root = Path(root)
    img = image_path(root, release)
    listed = _listed(root)
    try:
        st = img.stat()
    except OSError:
        return InitramfsState(None, None, listed, False, f"no {img}")
    older = False
    if modprobe_file is not None:
        try:
            older = (root / str(modprobe_file).lstrip("/")).stat().st_mtime > st.st_mtime
        except OSError:
            older = False
    key = {"image": str(img), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    cache = Path(cache_dir) / CACHE_NAME if cache_dir is not None else None
    if cache is not None:
        try:
            saved = json.loads(cache.read_text())
            if {k: saved.get(k) for k in key} == key and isinstance(saved.get("contains"), bool):
                return InitramfsState(str(img), saved["contains"], listed, older and saved["contains"], "cache")
        except (OSError, ValueError, AttributeError):
            pass
    contains = list_contains(img, lister)
    if contains is None:
        return InitramfsState(str(img), None, listed, False, f"{lister} is not available or failed")
    if cache is not None:
        try:
            atomic_write(cache, json.dumps({**key, "contains": contains}), 0o644)
        except OSError:
            pass   # uncached: the next look lists the image again, nothing worse
    return InitramfsState(str(img), contains, listed, older and contains, lister)


def release(proc_root: Path | str = "/proc") -> str:
    try:
        return (Path(proc_root) / "sys/kernel/osrelease").read_text().strip()
    except OSError:
        return os.uname().release


@dataclass(frozen=True)
class UpdateOutcome:
    ran: bool                  # False: not needed (nf_conntrack not in the initramfs) or not possible
    ok: bool
    code: int | None
    seconds: float
    output: str                # the tail of update-initramfs's output, or why it did not run

    def as_dict(self) -> dict:
        return asdict(self)


def update_if_needed(root: Path | str, release_name: str, cache_dir: Path | str | None,
                     modprobe_file: Path | str | None, command: list[str] | None = None,
                     lister: str = "lsinitramfs", timeout: float = UPDATE_TIMEOUT) -> UpdateOutcome:
    """Blocking (run it in the Updater's worker): look, then `update-initramfs -u -k <release>` when
    nf_conntrack is (or will be) in the image."""
    t = time.monotonic()
    state = detect(root, release_name, cache_dir, modprobe_file, lister)
    if not state.matters:
        why = "nf_conntrack is not in the initramfs" if state.contains is False else f"cannot tell ({state.how})"
        return UpdateOutcome(False, True, None, time.monotonic() - t, f"not run: {why}")
    cmd = command or default_command(release_name)
    try:
        out = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             timeout=timeout, start_new_session=True)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.output or b"")[-1500:].decode(errors="replace").strip()
        return UpdateOutcome(True, False, None, time.monotonic() - t, f"killed after {timeout:g} s: {tail}")
    except OSError as exc:
        return UpdateOutcome(False, False, None, time.monotonic() - t, f"cannot run {cmd[0]}: {exc.strerror}")
    tail = out.stdout[-1500:].decode(errors="replace").strip()
    return UpdateOutcome(True, out.returncode == 0, out.returncode, time.monotonic() - t, tail)


def default_command(release_name: str) -> list[str]:
    """Under systemd, update-initramfs runs as a transient unit of its own: ctguard's sandbox
    (read-only /boot, a handful of capabilities) would make it fail. systemd-run asks PID 1 over
    the system bus (AF_UNIX, allowed) and waits; --pipe brings its output back for the journal."""
    cmd = ["update-initramfs", "-u", "-k", release_name]
    if os.environ.get("INVOCATION_ID") and shutil.which("systemd-run"):
        return ["systemd-run", "--quiet", "--wait", "--pipe", "--collect", "--unit=ctguard-update-initramfs",
                "--description=update-initramfs for ctguard's nf_conntrack hash size", *cmd]
    return cmd


class Updater:
    """One job at a time in one worker thread beside the loop; a request while one runs is kept
    (the latest only) and runs when it ends. `poll()` hands back a finished job's outcome."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ctguard-initramfs")
        self._future: Future | None = None
        self._pending: Callable[[], UpdateOutcome] | None = None

    @property
    def busy(self) -> bool:
        return self._future is not None

    def request(self, job: Callable[[], UpdateOutcome]) -> bool:
        """True: started now; False: queued behind the running one."""
        if self._future is not None:
            self._pending = job
            return False
        self._future = self._pool.submit(job)
        return True

    def poll(self) -> UpdateOutcome | None:
        if self._future is None or not self._future.done():
            return None
        fut, self._future = self._future, None
        try:
            outcome = fut.result()
        except Exception as exc:  # a bug in the job must not reach the loop
            outcome = UpdateOutcome(False, False, None, 0.0, f"failed: {exc!r}")
        if self._pending is not None:
            job, self._pending = self._pending, None
            self.request(job)
        return outcome

    def stop(self) -> None:
        self._pending = None
        self._pool.shutdown(wait=False, cancel_futures=True)
