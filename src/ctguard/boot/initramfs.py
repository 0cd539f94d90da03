"""Is nf_conntrack in the initramfs? Then the modprobe.d hash size only counts after
`update-initramfs -u` (the image carries its own copy of /etc/modprobe.d).

`detect` is cheap: `lsinitramfs` runs only when the image changed since the last look (its
path, size and mtime are cached in the state folder); the initramfs-tools `modules` list says
whether the next image will hold it. `Updater` runs the look and update-initramfs in one worker
thread beside the daemon's loop (polled each turn, never waited for) and hands back the outcome.
Under systemd update-initramfs is not run by ctguard but by the package's
ctguard-initramfs.service, on a request file (see `request`).
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
                     lister: str = "lsinitramfs", timeout: float = UPDATE_TIMEOUT,
                     request_dir: Path | str | None = None) -> UpdateOutcome:
    """Blocking (run it in the Updater's worker): look, then `update-initramfs -u -k <release>` when
    nf_conntrack is (or will be) in the image: under systemd with the package's path unit (or with
    `request_dir`) by a request to ctguard-initramfs.path, else directly."""
    t = time.monotonic()
    state = detect(root, release_name, cache_dir, modprobe_file, lister)
    if not state.matters:
        why = "nf_conntrack is not in the initramfs" if state.contains is False else f"cannot tell ({state.how})"
        return UpdateOutcome(False, True, None, time.monotonic() - t, f"not run: {why}")
    if command is None and request_dir is None and through_path_unit():
        request_dir = REQUEST_DIR
    if command is None and request_dir is not None:
        return request(Path(request_dir), timeout, t)
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
    """Outside systemd (`ctguard run` in a terminal) update-initramfs runs directly."""
    return ["update-initramfs", "-u", "-k", release_name]


# Under systemd, ctguard's sandbox (read-only /boot, a handful of capabilities, PID 1's and the
# bus's sockets inaccessible) keeps it from running update-initramfs or having PID 1 run it. It
# leaves a request file instead; the package's ctguard-initramfs.path starts
# ctguard-initramfs.service, which takes the request, runs `update-initramfs -u` for the running
# kernel and writes "<result> <exit code> <exit status>" ($SERVICE_RESULT, $EXIT_CODE,
# $EXIT_STATUS) to the result file. The request's content is never read by that unit.
REQUEST_DIR = Path("/run/ctguard")
REQUEST_NAME = "update-initramfs.request"
RESULT_NAME = "update-initramfs.result"
PATH_UNIT = "ctguard-initramfs.path"
UNIT_DIRS = (Path("/etc/systemd/system"), Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))


def through_path_unit() -> bool:
    """ctguard runs under systemd (INVOCATION_ID) and the path unit is installed."""
    return bool(os.environ.get("INVOCATION_ID")) and any((d / PATH_UNIT).exists() for d in UNIT_DIRS)


def request(folder: Path, timeout: float = UPDATE_TIMEOUT, t0: float | None = None,
            poll: float = 0.5) -> UpdateOutcome:
    """Leave the request, wait for ctguard-initramfs.service's result (blocking: the worker's job)."""
    t0 = time.monotonic() if t0 is None else t0
    result = folder / RESULT_NAME
    try:
        result.unlink(missing_ok=True)
        atomic_write(folder / REQUEST_NAME, f"requested by ctguard pid {os.getpid()} at {time.time():.0f}\n", 0o600)
    except OSError as exc:
        return UpdateOutcome(False, False, None, time.monotonic() - t0, f"cannot leave the request in {folder}: {exc}")
    see = "journalctl -u ctguard-initramfs.service"
    deadline = t0 + timeout
    while time.monotonic() < deadline:
        try:
            words = result.read_text().split()
        except OSError:
            time.sleep(poll)
            continue
        status = words[2] if len(words) > 2 else ""
        code = int(status) if status.lstrip("-").isdigit() else None
        ok = bool(words) and words[0] == "success"
        return UpdateOutcome(True, ok, code, time.monotonic() - t0,
                             f"ctguard-initramfs.service: {' '.join(words) or 'no result'} (see `{see}`)")
    return UpdateOutcome(True, False, None, time.monotonic() - t0,
                         f"no result from ctguard-initramfs.service after {timeout:g} s: is {PATH_UNIT} active? "
                         f"(see `{see}`)")


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
