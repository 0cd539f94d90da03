"""The Debian package, proven by building, installing and booting it on Debian 13 and 12.

One test per release (trixie, bookworm), in phases, each timed and printed:

  base      a debootstrapped root of the release, made once and cached (tests/system/debian_root.sh)
  build     a copy of it: build-deps with apt, a changelog entry <version>+deb<N>u1 (12 sorts
            below 13), dpkg-buildpackage -us -uc -b as a user with that release's debhelper
            (dh_auto_test runs the pure tests against its python3-* libraries), lintian
  boot      another copy booted with systemd-nspawn -b (systemd as PID 1)
  install   apt installs the .deb inside the running system: enabled, started, Type=notify,
            a status line; the unit's exposure (systemd-analyze security --offline) at most 3.0;
            systemd-run from inside the sandbox fails; journalctl -x shows the catalog; a user in
            ctguard-status gets `ctguard status` and is refused `ctguard bump`
  unit      debian/tests/unit: the pure tests against the installed package, as a user
  policy    a changed policy, check-policy, `systemctl reload`
  flood     a conntrack flood between two namespaces made inside the container meets a bump
            that stays within the ceiling, and the bump is persisted; a relief trim of the
            receiver's entries with the release's python3-pyroute2
  control   a rejected `systemctl reload` exits non-zero; status and bump go through the daemon's
            control socket with the file broken, journaled under ctguard.service
  watchdog  (trixie) ctguard stopped with SIGSTOP: systemd's watchdog kills it and restarts it
            within WatchdogSec + RestartSec; the bump budget and history survive
  restart   (trixie) `systemctl restart` keeps the bump budget
  upgrade   (trixie) a newer version of the same package: restarted, the changed policy kept
  remove    (trixie) stopped; the sysctl file and the state stay, the metrics file does not
  purge     /var/lib/ctguard and the metrics file gone; the sysctl file and the value in force
            stay, and purge says so
  piuparts  Debian's install/purge QA on the built .deb against the cached base root

Debian 12 runs the phases that differ between the releases (what its debhelper builds, its
systemd 252 and Python 3.11, its pyroute2/sdnotify/systemd/tomli-w); the rest is the same code
and runs once, on trixie, to keep the boots lean.

The container shares the host's kernel and network namespace (nf_conntrack_max can only be
written from the initial network namespace), so the host's nf_conntrack_max and hashsize
are saved before the boot and restored afterwards, under the shared kernel-test lock; the
only traffic sent flows between the two namespaces the test creates inside the container.

Environment: CTGUARD_TEST_CACHE (default /var/cache/ctguard-tests) holds the cached roots and
the apt archive; CTGUARD_KEEP_ROOTS=1 keeps the work copies for a post-mortem;
CTGUARD_RELEASES=trixie (or bookworm) runs one release only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.kernelenv import FLOOD_SCRIPT, HASHSIZE, PROC_MAX, kernel_ready, saved_kernel_values
from helpers.paths import REPO
from helpers.wait import wait_for

# The `system` marker: tests/conftest.py, by folder.

HELPER = Path(__file__).resolve().parent / "debian_root.sh"
CACHE = Path(os.environ.get("CTGUARD_TEST_CACHE", "/var/cache/ctguard-tests"))
APT_ARCHIVES = CACHE / "apt-archives"
KEEP = os.environ.get("CTGUARD_KEEP_ROOTS") == "1"
KMSG = Path("/dev/kmsg")
PATH_INSIDE = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
UPGRADE_VERSION_SUFFIX = "+systemtest1"
MAX_EXPOSURE = 3.0    # systemd-analyze security's overall exposure level for ctguard.service
# piuparts from Debian 12 does not ignore the folder trixie's debconf leaves behind for every
# package (trixie's own piuparts does).
PIUPARTS_IGNORE = r"/var/cache/debconf/tmp\.ci(/.*)?$"


@dataclasses.dataclass(frozen=True)
class Release:
    suite: str
    version: str
    # The whole life cycle (watchdog, restart, bad policy, upgrade, remove), lintian and
    # piuparts; the other release runs install, reload, flood and purge.
    full: bool


RELEASES = [Release("trixie", "13", full=True), Release("bookworm", "12", full=False)]
_ONLY = os.environ.get("CTGUARD_RELEASES", "").split(",") if os.environ.get("CTGUARD_RELEASES") else None

# The policy the test puts in force: small numbers so that a few thousand flows are a flood,
# a short cooldown so two bumps fit in the test, bumps persisted at once.
TEST_CEILING = 12288
TEST_MAX_PER_HOUR = 4
TEST_POLICY = textwrap.dedent(f"""\
    # changed by the system test: must survive an upgrade
    mode = "enforce"

    [watch]
    interval = 0.5
    fast_interval = 0.1

    [thresholds]
    warn = 0.5
    sustain = 5
    act = 0.75
    horizon = 0

    [bump]
    factor = 2.0
    ceiling = {TEST_CEILING}
    cooldown = 2
    max_per_hour = {TEST_MAX_PER_HOUR}

    [persist]
    mode = "immediate"
    # The test lowers max by hand under the running daemon (room for a flood, a max the kernel
    # lost before a restart); with defend on, ctguard would set it straight back.
    defend = false

    [relief]
    # Relief enforces by default (unanswered UDP among its classes): past this ceiling it would
    # lower the receiver's udp_timeout and age the flood's entries itself, leaving none with more
    # than 7 s for trim_with_debians_pyroute2 to change. Advise keeps the entries at the kernel's
    # timeout; relief enforcing on a real kernel is tests/kernel/test_relief_kernel.py's.
    mode = "advise"
    """)
BAD_POLICY = TEST_POLICY.replace(f"ceiling = {TEST_CEILING}", 'ceiling = "lots"')
LOW_MAX = 4096
LOW_BUCKETS = 1024


def _message_id(name: str) -> str | None:
    """The fixed MESSAGE_ID of a kind of entry, from the source tree (None if it has none)."""
    try:
        from ctguard.host import events
    except ImportError:
        return None
    return getattr(events, f"MESSAGE_ID_{name}", None)


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root (debootstrap, systemd-nspawn, the global nf_conntrack sysctls)"
    for tool in ("debootstrap", "systemd-nspawn", "nsenter", "flock"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install debootstrap systemd-container util-linux)"
    return kernel_ready()


_skip = _missing()


# ---------------------------------------------------------------- helpers


class Phases:
    """Times each phase and prints it at once, outside pytest's capture."""

    def __init__(self, capsys: pytest.CaptureFixture[str], release: str) -> None:
        self.capsys = capsys
        self.release = release
        self.times: list[tuple[str, float]] = []
        self.start = time.monotonic()

    def say(self, text: str) -> None:
        with self.capsys.disabled():
            print(f"[system {self.release}] {text}", flush=True)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        self.say(f"{name} ...")
        try:
            yield
        finally:
            took = time.monotonic() - t0
            self.times.append((name, took))
            self.say(f"{name}: {took:.1f} s")

    def summary(self) -> None:
        rows = ", ".join(f"{n} {t:.1f}s" for n, t in self.times)
        self.say(f"phases: {rows}; total {time.monotonic() - self.start:.1f} s")


def sh(*args: str, timeout: float = 600, check: bool = True, input: str | None = None,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, input=input,
                          env=env, stdin=None if input is not None else subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)[:300]} exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def copy_root(src: Path, dst: Path) -> None:
    sh("cp", "-a", "--reflink=auto", str(src), str(dst), timeout=600)
    seed_archives(dst)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:     # another file system
        shutil.copy2(src, dst)


# Each root gets an apt archive of its own, seeded from the shared cache, rather than the
# cache itself bound in: apt holds /var/cache/apt/archives/lock while it works, and a second
# run's container (another checkout's CI, a build beside a boot) then fails with "Could not
# get lock /var/cache/apt/archives/lock. It is held by process 0".
def seed_archives(root: Path) -> None:
    """Hard links to every cached .deb in the root's own archive (apt never rewrites a .deb)."""
    archive = root / "var/cache/apt/archives"
    (archive / "partial").mkdir(parents=True, exist_ok=True)
    for deb in APT_ARCHIVES.glob("*.deb"):
        if not (archive / deb.name).exists():
            with contextlib.suppress(FileNotFoundError):
                _link_or_copy(deb, archive / deb.name)


def harvest_archives(root: Path) -> None:
    """What apt downloaded in the root goes back to the cache, each file renamed into place
    whole (a concurrent run sees the old set or the new file, never half of it)."""
    for deb in (root / "var/cache/apt/archives").glob("*.deb"):
        target = APT_ARCHIVES / deb.name
        if target.exists():
            continue
        tmp = APT_ARCHIVES / f".{deb.name}.{os.getpid()}.tmp"
        with contextlib.suppress(OSError):
            _link_or_copy(deb, tmp)
            os.replace(tmp, target)


def remove_root(path: Path) -> None:
    if KEEP or not path.exists():
        return
    sh("rm", "-rf", "--one-file-system", str(path), check=False, timeout=600)


def remove_stale_work_dirs(hours: float = 6) -> None:
    """Copies left by a run that was killed (a CI timeout) are removed after a while."""
    for old in Path("/var/tmp").glob("ctguard-system-*"):
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > hours * 3600:
                remove_root(old / "root")
                remove_root(old / "build")
                shutil.rmtree(old, ignore_errors=True)


def nspawn(root: Path, script: str, timeout: float = 900, check: bool = True,
           offline: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a shell script in `root` as a chroot-like container (no init), apt cache bound in.

    offline: in a network namespace of its own with nothing but loopback.
    """
    return sh(
        "systemd-nspawn", "-q", "--register=no", "--keep-unit", "-D", str(root),
        *(["--private-network"] if offline else []),
        "--setenv=DEBIAN_FRONTEND=noninteractive", "--setenv=LC_ALL=C.UTF-8",
        f"--setenv=PATH={PATH_INSIDE}",
        "/bin/sh", "-ec", script, timeout=timeout, check=check)


def source_files() -> list[str]:
    """The files of the work tree that git knows or would know (not ignored, not .git)."""
    if (REPO / ".git").exists() and shutil.which("git"):
        out = sh("git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard").stdout
        return [f for f in out.split("\0") if f and (REPO / f).exists()]
    skip = {".git", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist"}
    found = []
    for dirpath, dirnames, filenames in os.walk(REPO):
        dirnames[:] = [d for d in dirnames if d not in skip and not d.endswith(".egg-info")]
        for name in filenames:
            found.append(os.path.relpath(os.path.join(dirpath, name), REPO))
    return found


def copy_source(dst: Path) -> None:
    dst.mkdir(parents=True)
    for rel in source_files():
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, target, follow_symlinks=False)


class Machine:
    """A root booted with `systemd-nspawn -b`; commands run inside through nsenter."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None

    def boot(self, timeout: float = 120) -> None:
        env = dict(os.environ, SYSTEMD_NSPAWN_API_VFS_WRITABLE="1")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "--register=no", "--keep-unit", "-b", "-D", str(self.root),
                 "--capability=all", "--link-journal=no", "--console=read-only",
                 # The kernel log, so that ctguard's /dev/kmsg early warning is exercised
                 # too (nspawn gives a container none).
                 *(["--bind-ro=/dev/kmsg"] if KMSG.exists() else []),
                 f"--machine=ctguard-{os.getpid()}"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.leader is None:
            if self.proc.poll() is not None:
                raise AssertionError(f"systemd-nspawn exited {self.proc.returncode}:\n{self.console()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no init in the container after {timeout} s:\n{self.console()}")
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
            with contextlib.suppress(OSError):
                pids = children.read_text().split()
                for pid in pids:
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                        self.leader = int(pid)
            time.sleep(0.1)
        # Wait for the boot to finish ("degraded" is fine: some units do not fit a container).
        while True:
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"system state {state!r} after {timeout} s:\n{self.console()}")
            time.sleep(0.2)

    def console(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def run(self, *args: str, check: bool = True, timeout: float = 300, input: str | None = None
            ) -> subprocess.CompletedProcess[str]:
        assert self.leader is not None
        return sh("nsenter", "-t", str(self.leader), "-a",
                  "env", "-i", f"PATH={PATH_INSIDE}", "LC_ALL=C.UTF-8", "DEBIAN_FRONTEND=noninteractive",
                  *args, check=check, timeout=timeout, input=input)

    def shell(self, script: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.run("/bin/sh", "-ec", script, check=check, timeout=timeout)

    def show(self, prop: str, unit: str = "ctguard.service") -> str:
        return self.run("systemctl", "show", "-P", prop, unit).stdout.strip()

    def write(self, path: str, text: str) -> None:
        self.run("/bin/sh", "-c", f"cat > '{path}'", input=text)

    def wait_active(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            state = self.show("ActiveState")
            if state == "active" or time.monotonic() > deadline:
                return state
            time.sleep(0.2)

    def journal(self, unit: str = "ctguard.service", lines: int = 60) -> str:
        return self.run("journalctl", "--no-pager", "-o", "short-precise", "-n", str(lines), "-u", unit,
                        check=False).stdout

    def entries(self, message_id: str | None) -> list[dict]:
        """ctguard's journal entries with this MESSAGE_ID (none known: an empty list)."""
        if message_id is None:
            return []
        out = self.run("journalctl", "--no-pager", "-o", "json", "-u", "ctguard.service",
                       f"MESSAGE_ID={message_id}", check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    def status_json(self) -> tuple[int, dict]:
        proc = self.run("ctguard", "status", "--json", check=False)
        assert proc.returncode in (0, 1, 2, 3), f"ctguard status --json exited {proc.returncode}: {proc.stderr}"
        return proc.returncode, json.loads(proc.stdout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.leader is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.leader, signal.SIGRTMIN + 4)   # systemd: poweroff
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


class MaxSampler:
    """Reads the kernel's nf_conntrack_max (the container's is the host's) every 20 ms."""

    def __init__(self) -> None:
        self.highest = 0
        self.seen: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            value = int(PROC_MAX.read_text())
            if not self.seen or self.seen[-1] != value:
                self.seen.append(value)
            self.highest = max(self.highest, value)
            time.sleep(0.02)

    def __enter__(self) -> MaxSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# machinectl and systemctl calls are slow: poll every 0.2 s unless a call says otherwise.
wait_for = functools.partial(wait_for, interval=0.2)


# ---------------------------------------------------------------- the test


@pytest.mark.skipif(_skip is not None, reason=str(_skip))
@pytest.mark.parametrize("release", RELEASES, ids=[r.suite for r in RELEASES])
def test_debian_package_life_cycle(release: Release, capsys: pytest.CaptureFixture[str]) -> None:
    if _ONLY is not None and release.suite not in _ONLY:
        pytest.skip(f"CTGUARD_RELEASES={','.join(_ONLY)}")
    phase = Phases(capsys, release.suite)
    remove_stale_work_dirs()
    work = Path(tempfile.mkdtemp(prefix="ctguard-system-", dir="/var/tmp"))
    try:
        with phase(f"base (debootstrap {release.suite}, cached)"):
            base = Path(sh("bash", str(HELPER), str(CACHE), release.suite,
                           timeout=1800).stdout.strip().splitlines()[-1])
            assert (base / "usr/lib/systemd/systemd").exists(), base
            assert (base / "etc/debian_version").read_text().startswith(release.version), \
                (base / "etc/debian_version").read_text()

        with phase("build (.deb, dh_auto_test and lintian)"):
            debs = build_package(base, work / "build", phase, release)

        machine = Machine(work / "root", work / "console.log")
        with phase("copy root"):
            copy_root(base, machine.root)
            for deb in debs.values():
                shutil.copy2(deb, machine.root / "root" / deb.name)
            shutil.copytree(REPO / "debian" / "tests", machine.root / "root" / "debian-tests")
            # The source tree for debian/tests/unit, readable by the user it runs as.
            copy_source(machine.root / "root" / "source")
            os.chmod(machine.root / "root", 0o755)
            sh("chmod", "-R", "a+rX", str(machine.root / "root" / "source"))
        t_lock = time.monotonic()
        with saved_kernel_values():
            phase.times.append(("kernel-test lock wait", time.monotonic() - t_lock))
            phase.say(f"kernel-test lock held after {phase.times[-1][1]:.1f} s")
            try:
                with phase("boot"):
                    machine.boot()
                check_life_cycle(machine, debs, phase, release)
            except BaseException:
                phase.say("container console:\n" + machine.console())
                if machine.leader is not None and machine.proc and machine.proc.poll() is None:
                    with contextlib.suppress(Exception):
                        phase.say("ctguard journal:\n" + machine.journal(lines=120))
                raise
            finally:
                with phase("poweroff"):
                    machine.stop()
            # Under the kernel-test lock: piuparts runs the maintainer scripts in a chroot
            # that sees the host's /proc. On both releases (each build's maintainer scripts
            # differ: its debhelper's snippets, systemd-sysusers 252 or 257).
            with phase("piuparts (install, purge, what purge leaves)"):
                piuparts(base, release.suite, debs["first"], work, phase)
    finally:
        t_clean = time.monotonic()
        for root in (work / "build", work / "root"):
            harvest_archives(root)
            remove_root(root)
        phase.times.append(("cleanup", time.monotonic() - t_clean))
        if not KEEP:
            shutil.rmtree(work, ignore_errors=True)
        else:
            phase.say(f"kept {work}")
        phase.summary()


def build_package(base: Path, build: Path, phase: Phases, release: Release) -> dict[str, Path]:
    copy_root(base, build)
    copy_source(build / "src" / "ctguard")
    # lintian on both releases, each with its own lintian (a binary-only build: no source tags
    # such as Debian 12's newer-standards-version).
    tools = "build-essential lintian"
    nspawn(build, f"""
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends {tools} >/dev/null
        cd /src/ctguard
        apt-get build-dep -y -qq --no-install-recommends ./ >/dev/null
        """, timeout=1800)
    # Issue 25: one version per release, the Debian 12 build below the 13 build (and both above
    # the plain upstream version), the way a stable update is versioned: a changelog entry.
    version = release_version(build / "src" / "ctguard")
    # The build itself runs without a network (everything comes from the build-deps) and as a
    # user, as Debian's buildds do (Rules-Requires-Root: no): the pure tests run in
    # dh_auto_test against this release's python3-* libraries, and the kernel tests skip.
    out = nspawn(build, "useradd --system --no-create-home builder 2>/dev/null || true; "
                        "chown -R builder /src; cd /src/ctguard && "
                        "setpriv --reuid=builder --regid=builder --init-groups env HOME=/tmp "
                        "dpkg-buildpackage -us -uc -b 2>&1", check=False, offline=True)
    assert out.returncode == 0, f"dpkg-buildpackage failed:\n{out.stdout[-8000:]}"
    plain = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout)      # pytest colours its summary
    tests = re.findall(r"^=+ .*(?:passed|failed).* in [\d.]+s.*=+$", plain, re.M)
    assert tests and "failed" not in tests[-1], f"dh_auto_test did not run the pure tests:\n{out.stdout[-8000:]}"
    phase.say(f"dh_auto_test ({release.suite}'s python3-* libraries): {tests[-1].strip('= ')}")
    built = sorted((build / "src").glob("ctguard_*_all.deb"))
    assert len(built) == 1, built
    assert f"_{version}_all.deb" in built[0].name, (version, built)
    phase.say(f"built {built[0].name}")
    # What went wrong on Debian 12 before: a unit in a folder that release's dh_installsystemd
    # does not search is installed but never enabled or started (no snippet in the postinst).
    postinst = sh("dpkg-deb", "-I", str(built[0]), "postinst").stdout
    snippet = re.search(r"Automatically added by dh_installsystemd/(\S+)", postinst)
    assert snippet and "deb-systemd-helper enable 'ctguard.service'" in postinst, \
        f"dh_installsystemd ({release.suite}) made no enable/start snippet:\n{postinst}"
    phase.say(f"dh_installsystemd {snippet.group(1)} made the postinst's enable/start snippets")
    lint = nspawn(build, "cd /src && rc=0 && lintian --fail-on error,warning -I --tag-display-limit 0 "
                         "ctguard_*.changes >/tmp/lintian.out 2>&1 || rc=$?; "
                         "grep -v 'running with root privileges' /tmp/lintian.out || true; exit $rc", check=False)
    phase.say(f"lintian ({release.suite}): " + (lint.stdout.strip() or "no tags"))
    assert lint.returncode == 0, f"lintian found errors or warnings:\n{lint.stdout}{lint.stderr}"
    if not release.full:
        return {"first": built[0]}
    # An "upgrade": the same package with a higher version, to exercise the upgrade path.
    nspawn(build, f"""
        cd /src
        rm -rf up && dpkg-deb -R ctguard_*_all.deb up
        sed -i 's/^Version: .*/&{UPGRADE_VERSION_SUFFIX}/' up/DEBIAN/control
        dpkg-deb -b --root-owner-group up ctguard_upgrade_all.deb >/dev/null
        """)
    return {"first": built[0], "upgrade": build / "src" / "ctguard_upgrade_all.deb"}


def release_version(source: Path) -> str:
    """Prepend a changelog entry `<upstream>+deb<N>u1` for the release being built (as dch would)."""
    changelog = source / "debian" / "changelog"
    text = changelog.read_text()
    first = re.match(r"^ctguard \(([^)]+)\)", text)
    assert first, text[:200]
    suite = sh("sh", "-c", f". {source.parent.parent}/etc/os-release && echo $VERSION_CODENAME:$VERSION_ID").stdout.strip()
    codename, number = suite.split(":")
    version = f"{first.group(1)}+deb{number}u1"
    stamp = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
    changelog.write_text(f"ctguard ({version}) {codename}; urgency=medium\n\n"
                         f"  * Build for Debian {number} ({codename}).\n\n"
                         f" -- ctguard maintainers <maintainers@users.noreply.r-seed-fd71250f.example>  {stamp}\n\n" + text)
    return version


def check_life_cycle(m: Machine, debs: dict[str, Path], phase: Phases, release: Release) -> None:
    with phase("install (apt inside the booted system)"):
        m.shell("apt-get update -qq", timeout=600)
        m.run("apt-get", "install", "-y", "-q", "--no-install-recommends", f"/root/{debs['first'].name}", timeout=900)
        assert m.run("systemctl", "is-enabled", "ctguard.service", check=False).stdout.strip() == "enabled"
        state = m.wait_active()
        assert state == "active", f"ctguard.service is {state}:\n{m.journal()}"
        assert m.show("Type") == "notify"
        assert m.show("NotifyAccess") == "main"
        assert m.show("WatchdogUSec") not in ("", "0", "infinity"), m.show("WatchdogUSec")
        assert wait_for(lambda: m.show("StatusText") != "", 10), "no STATUS= line from the daemon"
        phase.say(f"StatusText: {m.show('StatusText')}")
        mode = m.shell("stat -c %a /var/lib/ctguard").stdout.strip()
        assert mode == "700", f"/var/lib/ctguard has mode {mode}"
        assert "/etc/ctguard/policy.toml" in m.run("dpkg-query", "--showformat=${Conffiles}", "-W", "ctguard").stdout
        m.run("ctguard", "check-policy", "/etc/ctguard/policy.toml")
        plain = m.run("ctguard", "status", check=False)
        assert plain.returncode in (0, 1, 2), f"ctguard status exited {plain.returncode}: {plain.stdout}{plain.stderr}"
        phase.say(f"ctguard status ({plain.returncode}): {plain.stdout.strip().splitlines()[0] if plain.stdout else ''}")
        code, data = m.status_json()
        assert code in (0, 1, 2), data
        for key in ("max", "buckets", "ceiling", "bump_budget_left"):
            assert key in data, f"status --json lacks {key}: {sorted(data)}"
        check_exposure(m, phase)
        check_no_way_out(m, phase)
        check_catalog(m, phase)
        check_status_group(m, phase)
        for script in ("policy", "service"):
            out = m.shell(f"mkdir -p /tmp/apt && AUTOPKGTEST_TMP=/tmp/apt /root/debian-tests/{script} 2>&1",
                          check=False, timeout=120)
            assert out.returncode == 0, f"debian/tests/{script} failed:\n{out.stdout}"

    with phase("autopkgtest unit: the pure tests against the installed package, as a user"):
        m.run("apt-get", "install", "-y", "-q", "--no-install-recommends", "python3-pytest", "python3-hypothesis",
              timeout=900)
        out = m.shell("rm -rf /tmp/unit && mkdir -p /tmp/unit && chmod 1777 /tmp/unit && cd /root/source && "
                      "setpriv --reuid=nobody --regid=nogroup --clear-groups env HOME=/tmp/unit "
                      "AUTOPKGTEST_TMP=/tmp/unit sh debian/tests/unit 2>&1", check=False, timeout=900)
        plain = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout)
        summary = [line for line in plain.splitlines() if re.search(r"\d+ (passed|failed)", line)]
        phase.say("debian/tests/unit: " + " | ".join(plain.splitlines()[:2]) + " | " + (summary[-1] if summary else "?"))
        assert out.returncode == 0, f"debian/tests/unit failed:\n{out.stdout[-8000:]}"

    with phase("policy change + reload"):
        reloaded_id, rejected_id = _message_id("POLICY_RELOADED"), _message_id("POLICY_REJECTED")
        m.write("/etc/ctguard/policy.toml", TEST_POLICY)
        m.run("ctguard", "check-policy", "/etc/ctguard/policy.toml")
        pid = m.show("MainPID")
        reloads = len(m.entries(reloaded_id))
        m.run("systemctl", "reload", "ctguard.service", timeout=60)
        assert m.wait_active() == "active"
        assert m.show("MainPID") == pid, "reload restarted the daemon instead of reloading it"
        if reloaded_id:
            assert wait_for(lambda: len(m.entries(reloaded_id)) > reloads, 10), f"no policy-reloaded entry:\n{m.journal()}"
        # A bad policy on reload: logged, the old one stays in force, the daemon runs on.
        m.write("/etc/ctguard/policy.toml", BAD_POLICY)
        bad = m.run("ctguard", "check-policy", "/etc/ctguard/policy.toml", check=False)
        assert bad.returncode == 1 and "ceiling" in bad.stdout + bad.stderr, bad
        rejected = m.run("systemctl", "reload", "ctguard.service", check=False, timeout=60)
        assert rejected.returncode != 0, "a rejected reload must fail `systemctl reload`"
        if rejected_id:
            assert wait_for(lambda: len(m.entries(rejected_id)) > 0, 10), f"no policy-rejected entry:\n{m.journal()}"
        time.sleep(0.5)
        assert m.show("ActiveState") == "active" and m.show("MainPID") == pid, m.journal()
        m.write("/etc/ctguard/policy.toml", TEST_POLICY)
        m.run("systemctl", "reload", "ctguard.service", timeout=60)
        assert m.wait_active() == "active"

    with phase("flood"):
        flood(m, phase)

    with phase("control socket: a rejected reload fails loudly, status and bump go through the daemon"):
        control_socket(m, phase)

    if release.full:
        with phase("watchdog replaces a hung daemon"):
            check_watchdog(m, phase)

    sysctl_file = "/etc/sysctl.d/90-ctguard.conf"
    in_force = PROC_MAX.read_text().strip()
    if release.full:
        check_restarts_upgrade_remove(m, debs, phase)
        in_force = PROC_MAX.read_text().strip()

    with phase("purge"):
        prom = "/var/lib/prometheus/node-exporter/ctguard.prom"
        if not release.full:      # still installed: a metrics file to be removed
            m.run("mkdir", "-p", "/var/lib/prometheus/node-exporter")
            m.run("systemctl", "restart", "ctguard.service", timeout=60)
            assert wait_for(lambda: m.run("test", "-s", prom, check=False).returncode == 0, 15), m.journal()
        purged = m.run("apt-get", "purge", "-y", "-q", "ctguard", timeout=600)
        assert m.run("test", "-e", prom, check=False).returncode != 0, "purge left the metrics file"
        said = purged.stdout + purged.stderr
        assert "files written by ctguard stay" in said and sysctl_file in said, said[-3000:]
        assert "# Once ctguard is removed or purged this file stays" in m.run("cat", sysctl_file).stdout
        assert m.run("test", "-e", "/var/lib/ctguard", check=False).returncode != 0, "purge left /var/lib/ctguard"
        assert m.run("test", "-e", "/etc/ctguard/policy.toml", check=False).returncode != 0
        m.run("test", "-s", sysctl_file)
        m.run("test", "-s", "/etc/modprobe.d/ctguard.conf")
        assert PROC_MAX.read_text().strip() == in_force, "purge changed the nf_conntrack_max in force"


def check_restarts_upgrade_remove(m: Machine, debs: dict[str, Path], phase: Phases) -> None:
    """The phases that are the same code on every release: run on one (trixie)."""
    with phase("restart keeps the budget, re-applies the persisted max"):
        _, before = m.status_json()
        persisted = _persisted_max(m.run("cat", "/etc/sysctl.d/90-ctguard.conf").stdout)
        # As if nf_conntrack had been loaded after systemd-sysctl ran: the kernel holds less
        # than the persisted value, and ctguard applies it again at start.
        m.shell(f"echo {LOW_MAX} > /proc/sys/net/netfilter/nf_conntrack_max")
        invocation = m.show("InvocationID")
        m.run("systemctl", "restart", "ctguard.service", timeout=60)
        assert m.wait_active() == "active", m.journal()
        assert m.show("InvocationID") != invocation
        assert wait_for(lambda: int(PROC_MAX.read_text()) == persisted, 10), \
            f"persisted max {persisted} not re-applied at start (kernel has {PROC_MAX.read_text().strip()}):\n{m.journal()}"
        _, after = m.status_json()
        phase.say(f"budget left: before restart {before['bump_budget_left']}, after {after['bump_budget_left']}")
        assert before["bump_budget_left"] < TEST_MAX_PER_HOUR, before
        assert after["bump_budget_left"] <= before["bump_budget_left"], (before, after)

    with phase("boot values: a later sysctl.d file shadows ctguard's"):
        check_boot_values(m, phase)

    with phase("bad policy at start: exit 78, no restart loop"):
        m.write("/etc/ctguard/policy.toml", BAD_POLICY)
        m.run("systemctl", "restart", "ctguard.service", check=False, timeout=60)
        assert wait_for(lambda: m.show("ActiveState") in ("failed", "inactive"), 15), m.show("ActiveState")
        assert m.show("ExecMainStatus") == "78", (m.show("ExecMainStatus"), m.journal())
        time.sleep(6)     # RestartSec=5s: a restart would have happened by now
        assert m.show("ActiveState") in ("failed", "inactive") and m.show("NRestarts") == "0", \
            (m.show("ActiveState"), m.show("NRestarts"))
        m.write("/etc/ctguard/policy.toml", TEST_POLICY)
        m.run("systemctl", "reset-failed", "ctguard.service", check=False)
        m.run("systemctl", "start", "ctguard.service", timeout=60)
        assert m.wait_active() == "active", m.journal()

    with phase("upgrade"):
        invocation = m.show("InvocationID")
        m.run("apt-get", "install", "-y", "-q", f"/root/{debs['upgrade'].name}", timeout=600)
        version = m.run("dpkg-query", "-W", "-f=${Version}", "ctguard").stdout
        assert version.endswith(UPGRADE_VERSION_SUFFIX), version
        assert m.wait_active() == "active", m.journal()
        assert m.show("InvocationID") != invocation, "the upgrade did not restart the service"
        assert m.run("cat", "/etc/ctguard/policy.toml").stdout == TEST_POLICY, "the upgrade replaced the changed policy"

    sysctl_file = "/etc/sysctl.d/90-ctguard.conf"
    with phase("remove"):
        in_force = PROC_MAX.read_text().strip()
        prom = "/var/lib/prometheus/node-exporter/ctguard.prom"
        m.run("test", "-s", prom)
        m.run("apt-get", "remove", "-y", "-q", "ctguard", timeout=600)
        assert m.run("test", "-e", prom, check=False).returncode != 0, "remove left the metrics file"
        assert m.show("ActiveState") in ("inactive", "failed", ""), m.show("ActiveState")
        assert m.show("LoadState") in ("not-found", ""), m.show("LoadState")
        m.run("test", "-s", sysctl_file)
        m.run("test", "-s", "/etc/modprobe.d/ctguard.conf")
        m.run("test", "-d", "/var/lib/ctguard")
        m.run("sh", "-c", "ls -d /var/lib/ctguard/bundles/*/manifest.toml")
        m.run("test", "-f", "/etc/ctguard/policy.toml")
        assert PROC_MAX.read_text().strip() == in_force


def check_no_way_out(m: Machine, phase: Phases) -> None:
    """Issue 25: from inside the service's mount namespace, `systemd-run` cannot reach PID 1 (its
    private socket and the system bus are inaccessible); from outside it works. The daemon still
    reaches journald and the notify socket (its STATUS= and journal entries come through)."""
    pid = m.show("MainPID")
    outside = m.run("systemd-run", "--wait", "--quiet", "--collect", "true", check=False, timeout=60)
    assert outside.returncode == 0, f"systemd-run from outside the sandbox failed: {outside.stderr}"
    inside = m.run("nsenter", "-t", pid, "-m", "--", "systemd-run", "--wait", "--quiet", "--collect",
                   "touch", "/run/ctguard-escaped", check=False, timeout=60)
    assert inside.returncode != 0, "systemd-run worked from inside ctguard's sandbox"
    assert m.run("test", "-e", "/run/ctguard-escaped", check=False).returncode != 0
    probe = ("import socket\nfor p in ('/run/systemd/private', '/run/dbus/system_bus_socket', "
             "'/run/systemd/notify', '/run/systemd/journal/socket'):\n"
             "    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM if 'notify' not in p and 'journal' not in p "
             "else socket.SOCK_DGRAM)\n"
             "    try:\n        s.connect(p); print(p, 'reachable')\n"
             "    except OSError as e:\n        print(p, 'refused', e.strerror)\n")
    seen = m.run("nsenter", "-t", pid, "-m", "--", "python3", "-c", probe, check=False).stdout
    phase.say("inside ctguard's sandbox: systemd-run exited "
              f"{inside.returncode} ({(inside.stderr.strip().splitlines() or [''])[-1]}); " + "; ".join(seen.splitlines()))
    assert "/run/systemd/private refused" in seen and "/run/dbus/system_bus_socket refused" in seen, seen
    assert "/run/systemd/notify reachable" in seen and "/run/systemd/journal/socket reachable" in seen, seen
    # What ctguard does instead of systemd-run: a request that ctguard-initramfs.path (started with
    # ctguard.service) hands to ctguard-initramfs.service, outside the sandbox, whose outcome comes
    # back. This root has no initramfs-tools: update-initramfs is not found (127), and that is
    # what comes back.
    assert m.show("ActiveState", "ctguard-initramfs.path") == "active", m.show("ActiveState", "ctguard-initramfs.path")
    out = m.run("python3", "-c", "from pathlib import Path; from ctguard.boot import initramfs; "
                "o = initramfs.request(Path('/run/ctguard'), timeout=60); print(o.ran, o.ok, o.code, o.output)",
                timeout=90).stdout.strip()
    phase.say(f"update-initramfs request through ctguard-initramfs.path: {out}")
    assert out.startswith("True False 127 ctguard-initramfs.service: exit-code exited 127"), out
    assert m.run("test", "-e", "/run/ctguard/update-initramfs.request", check=False).returncode != 0


def check_catalog(m: Machine, phase: Phases) -> None:
    """`journalctl -x` explains ctguard's entries with the package's catalog."""
    start_id = _message_id("START")
    out = m.run("journalctl", "--no-pager", "-x", "-u", "ctguard.service", f"MESSAGE_ID={start_id}", check=False).stdout
    assert "ctguard started guarding the connection tracking table" in out, out[-3000:]
    listed = m.run("journalctl", "--list-catalog", check=False).stdout
    assert sum(1 for line in listed.splitlines() if " ctguard: " in line) >= 20, listed[-2000:]
    phase.say("journalctl -x: " + next(line.strip() for line in out.splitlines() if "Subject" in line or "░░" in line))


def check_status_group(m: Machine, phase: Phases) -> None:
    """A monitoring account in ctguard-status gets `ctguard status` from the daemon and is refused
    `ctguard bump`; an account outside the group does not reach the socket at all."""
    m.shell("getent group ctguard-status; id ctgmon 2>/dev/null || useradd --system -G ctguard-status ctgmon; "
            "id ctgother 2>/dev/null || useradd --system ctgother")
    assert m.run("stat", "-c", "%a %G", "/run/ctguard/control.sock").stdout.split() == ["660", "ctguard-status"]
    assert m.run("stat", "-c", "%a %G", "/run/ctguard").stdout.split() == ["750", "ctguard-status"]
    as_mon = ["setpriv", "--reuid=ctgmon", "--regid=ctgmon", "--init-groups", "env", "HOME=/tmp"]
    status = m.run(*as_mon, "ctguard", "status", check=False)
    assert status.returncode in (0, 1, 2) and f"daemon: pid {m.show('MainPID')}" in status.stdout, status
    bump = m.run(*as_mon, "ctguard", "bump", "--to", "999424", check=False)
    assert bump.returncode != 0 and "only root" in bump.stdout + bump.stderr, bump
    other = m.run("setpriv", "--reuid=ctgother", "--regid=ctgother", "--init-groups", "ctguard", "status", check=False)
    assert f"daemon: pid {m.show('MainPID')}" not in other.stdout, other
    phase.say(f"ctgmon (ctguard-status): status exit {status.returncode}; bump refused: "
              f"{(bump.stdout + bump.stderr).strip().splitlines()[-1]}")


def check_exposure(m: Machine, phase: Phases) -> None:
    """The installed unit, scored by the release's own systemd-analyze (tests/unit/packaging/test_unit_security.py
    scores the source's unit with the host's)."""
    assert m.show("PrivateMounts") == "yes", m.show("PrivateMounts")
    unit = m.show("FragmentPath")
    out = m.run("systemd-analyze", "security", "--offline=yes", "--no-pager", unit, check=False)
    score = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out.stdout + out.stderr)
    assert score, f"systemd-analyze security --offline=yes {unit}:\n{out.stdout}{out.stderr}"
    version = m.run("systemctl", "--version").stdout.split()[1]
    flagged = [" ".join(line.split()[:2]) for line in out.stdout.splitlines() if line.startswith("✗")]
    phase.say(f"systemd {version} scores {unit}: exposure {score.group(1)}")
    assert float(score.group(1)) <= MAX_EXPOSURE, \
        f"exposure {score.group(1)} > {MAX_EXPOSURE} with systemd {version}; flagged: {flagged}"


def _timespan(text: str) -> float:
    """Seconds in a timespan as `systemctl show` prints it ("30s", "1min 30s", "500ms")."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|min|h)\b", text)
    assert parts and "".join(n + u for n, u in parts) == text.replace(" ", ""), f"not a timespan: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def check_watchdog(m: Machine, phase: Phases) -> None:
    """SIGSTOP: the daemon stops pinging; systemd's watchdog must kill it and start a new one.

    The deadline is the unit's own promise: the last ping came at most WatchdogSec/2 before the
    stop (ctguard pings at half the interval), the watchdog fires WatchdogSec after it (SIGABRT,
    with SIGCONT so that a stopped process gets it), and the restart comes RestartSec after the
    death: a new process between WatchdogSec/2 + RestartSec and WatchdogSec + RestartSec after
    the stop. A SIGABRT that did not kill would add TimeoutAbortSec; a watchdog that never
    fires shows as no restart.
    """
    watchdog = _timespan(m.show("WatchdogUSec"))
    restart = _timespan(m.show("RestartUSec"))
    _, before = m.status_json()
    pid = m.show("MainPID")
    restarts = int(m.show("NRestarts"))
    stopped_at = time.monotonic()
    m.run("kill", "-STOP", pid)
    # systemd's timers may fire up to 250 ms late each; the rest is slack for a busy machine.
    slack = 3.0
    started = wait_for(lambda: m.show("MainPID") not in (pid, "0"), watchdog + restart + 30, interval=0.5)
    assert started, f"no new process {watchdog + restart + 30:.0f} s after SIGSTOP:\n{m.journal()}"
    # CLOCK_MONOTONIC is the host's inside the container (no time namespace).
    new_start = int(m.show("ExecMainStartTimestampMonotonic")) / 1e6
    assert m.wait_active() == "active", m.journal()
    ready = time.monotonic() - stopped_at
    took = new_start - stopped_at
    phase.say(f"watchdog: SIGSTOP to new process {took:.1f} s (expected {watchdog / 2 + restart:g}-"
              f"{watchdog + restart:g} s: WatchdogSec {watchdog:g} s, RestartSec {restart:g} s); "
              f"active again after {ready:.1f} s")
    assert int(m.show("NRestarts")) == restarts + 1, m.show("NRestarts")
    log = m.run("journalctl", "--no-pager", "-u", "ctguard.service", "-n", "80", check=False).stdout.lower()
    assert "watchdog timeout" in log, f"the restart was not the watchdog's:\n{m.journal()}"
    assert took <= watchdog + restart + slack, f"restarted {took:.1f} s after SIGSTOP:\n{m.journal()}"
    _, after = m.status_json()
    phase.say(f"budget left before {before['bump_budget_left']}, after {after['bump_budget_left']}; "
              f"bumps remembered before {len(before['last_bumps'])}, after {len(after['last_bumps'])}")
    assert before["bump_budget_left"] < TEST_MAX_PER_HOUR, before
    assert after["bump_budget_left"] <= before["bump_budget_left"], (before, after)
    assert all(b in after["last_bumps"] for b in before["last_bumps"]), (before["last_bumps"], after["last_bumps"])
    assert after["table_full_events"] >= before["table_full_events"], (before, after)


def piuparts(base: Path, suite: str, deb: Path, work: Path, phase: Phases) -> None:
    """Debian's own QA: install, purge, and what the purge leaves behind, in a copy of `base`."""
    if shutil.which("piuparts") is None:
        pytest.fail("needs piuparts (apt-get install piuparts; scripts/bootstrap test installs it)")
    log = work / "piuparts.log"
    out = sh("piuparts", f"--existing-chroot={base}", "-d", suite,
             "-m", os.environ.get("CTGUARD_DEBIAN_MIRROR", "http://deb.debian.org/debian"),
             f"--tmpdir={work}", "--no-upgrade-test", "-I", PIUPARTS_IGNORE,
             "--log-level=info", f"--log-file={log}", str(deb), check=False, timeout=900)
    # (Its "WARN: Broken symlinks" are the minbase root's own /etc/vconsole.conf and
    # /etc/default/locale, there before ctguard: not verdicts.)
    verdicts = re.findall(r"^\S+ (?:INFO|ERROR): ((?:PASS|FAIL): .*)$", out.stdout, re.M)
    phase.say("piuparts: " + "; ".join(verdicts))
    assert out.returncode == 0, f"piuparts failed:\n{out.stdout[-8000:]}{out.stderr[-2000:]}"


def check_boot_values(m: Machine, phase: Phases) -> None:
    """Issue 16: the usual tuning advice's 99-conntrack-tuning.conf sorts after 90-ctguard.conf and
    wins at boot; status (text and JSON), check-policy, the journal and the metric say so, and the
    model's file order is the one systemd 257 itself reads (`systemd-analyze cat-config`)."""
    tuning = "/etc/sysctl.d/99-conntrack-tuning.conf"
    persisted = _persisted_max(m.run("cat", "/etc/sysctl.d/90-ctguard.conf").stdout)
    lower = persisted // 2
    m.write(tuning, f"# the usual tuning advice\nnet.netfilter.nf_conntrack_max = {lower}\n")
    try:
        code, data = m.status_json()
        assert code >= 1, data["problems"]
        shadowed = data["boot"]["shadowed"]
        assert [(s["file"], s["value"], s["ours_value"]) for s in shadowed] == [(tuning, str(lower), str(persisted))], data["boot"]
        assert data["boot"]["max"]["file"] == tuning and data["boot"]["max"]["value"] == lower
        text = m.run("ctguard", "status", check=False).stdout
        assert f"SHADOWED: {tuning} sets net.netfilter.nf_conntrack_max = {lower}" in text, text
        check = m.run("ctguard", "check-policy", "/etc/ctguard/policy.toml").stdout
        assert f"warning: {tuning} sets" in check and "[persist] sysctl_file" in check, check
        shadow_id = _message_id("PERSIST_SHADOWED")
        # node_exporter's folder, so that the unit's ReadWritePaths=-... takes it at the restart;
        # a started daemon looks at the boot files in its first turn.
        m.run("mkdir", "-p", "/var/lib/prometheus/node-exporter")
        m.run("systemctl", "restart", "ctguard.service", timeout=60)
        assert m.wait_active() == "active", m.journal()
        assert wait_for(lambda: any(e.get("CTGUARD_FILE") == tuning for e in m.entries(shadow_id)), 15), m.journal()
        prom = "/var/lib/prometheus/node-exporter/ctguard.prom"
        assert wait_for(lambda: f'ctguard_persist_shadowed{{file="{tuning}"}} {lower}' in
                        m.run("cat", prom, check=False).stdout, 15), m.run("cat", prom, check=False).stdout
        model = m.run("python3", "-c", "from ctguard.boot import values as b; "
                      "print('\\n'.join(c.path for c in b.conf_files('/', b.SYSCTL_DIRS)))").stdout.split()
        cat = [line[2:] for line in m.run("systemd-analyze", "cat-config", "--no-pager", "sysctl.d").stdout.splitlines()
               if line.startswith("# /") and line.endswith(".conf")]
        assert model == cat, (model, cat)
        phase.say(f"boot order (systemd-analyze cat-config = model): {' '.join(cat)}")
    finally:
        m.run("rm", "-f", tuning)
        m.run("systemctl", "reload", "ctguard.service", timeout=60)
def control_socket(m: Machine, phase: Phases) -> None:
    """`systemctl reload` with a bad policy exits non-zero and STATUS= says so; with the file
    broken, `ctguard status` and `ctguard bump` are answered by the daemon's policy in force, and
    the manual bump and a refused one are journaled under ctguard.service."""
    assert "203/EXEC" not in m.journal(lines=2000), "a start step could not be executed (modprobe: kmod)"
    sock = "/run/ctguard/control.sock"
    # Root's, and the ctguard-status group's for `status` only (check_status_group).
    assert m.run("stat", "-c", "%a %F %U:%G", sock).stdout.strip() == "660 socket root:ctguard-status"
    assert m.run("stat", "-c", "%a %U:%G", "/run/ctguard").stdout.strip() == "750 root:ctguard-status"
    pid = m.show("MainPID")
    m.write("/etc/ctguard/policy.toml", BAD_POLICY)
    try:
        rejected = m.run("systemctl", "reload", "ctguard.service", check=False, timeout=60)
        assert rejected.returncode != 0, rejected
        assert m.show("ActiveState") == "active" and m.show("MainPID") == pid, m.journal()
        assert wait_for(lambda: "reload REJECTED" in m.show("StatusText"), 10), m.show("StatusText")
        phase.say(f"after a rejected reload: StatusText {m.show('StatusText')[:160]!r}")

        status = m.run("ctguard", "status", check=False)
        assert status.returncode in (0, 1, 2), f"{status.stdout}{status.stderr}"
        assert f"daemon: pid {pid}" in status.stdout and "[bump] ceiling" in status.stderr, status
        code, data = m.status_json()
        assert data["daemon"]["pid"] == int(pid) and data["ceiling"] == TEST_CEILING, data["daemon"]

        over = m.run("ctguard", "bump", "--to", str(2 * TEST_CEILING), check=False)
        assert over.returncode == 1 and "ceiling" in over.stderr, over
        current = data["max"]
        worst = max((n["count"] for n in data["namespaces"]), default=0)
        floor = -(-worst * 4 // 3)          # the test policy's act = 0.75
        # Above LOW_MAX: the restart phase writes LOW_MAX and waits for the persisted value to return.
        target = max(LOW_MAX + 1024, -(-floor // 1024) * 1024)
        lower = target < current
        if not lower:
            target = min(TEST_CEILING, current + 1024)
        args = ["--to", str(target)] + (["--lower"] if lower else [])
        done = m.run("ctguard", "bump", *args, check=False)
        assert done.returncode == 0 and f"done by the running daemon (pid {pid})" in done.stdout, done
        assert int(PROC_MAX.read_text()) == target
        phase.say(f"ctguard bump {' '.join(args)}: {current} -> {target} through the daemon")
        assert wait_for(lambda: f"= {target}" in m.run("cat", "/etc/sysctl.d/90-ctguard.conf").stdout, 10)
        manual = [e for e in m.entries(_message_id("BUMP"))
                  if e.get("CTGUARD_REASON") == "manual" and e.get("CTGUARD_NEW_MAX") == str(target)]
        assert manual and manual[-1]["_PID"] == pid, f"no manual bump under ctguard.service:\n{m.journal()}"
        refused = [e for e in m.entries(_message_id("BUMP_REFUSED")) if e.get("CTGUARD_TRIGGER") == "manual"]
        assert refused and refused[-1]["CTGUARD_REASON"] == "ceiling", f"no refused manual bump:\n{m.journal()}"
    finally:
        m.write("/etc/ctguard/policy.toml", TEST_POLICY)
    m.run("systemctl", "reload", "ctguard.service", timeout=60)
    assert wait_for(lambda: "REJECTED" not in m.show("StatusText"), 10), m.show("StatusText")


def _persisted_max(text: str) -> int:
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "net.netfilter.nf_conntrack_max":
            return int(value)
    raise AssertionError(f"no net.netfilter.nf_conntrack_max in the sysctl file:\n{text}")


def flood(m: Machine, phase: Phases) -> None:
    """Two namespaces on a veth pair inside the container; flows from one to the other."""
    m.run("python3", "-c", "pass")
    # Room to bump: the kernel's table is made small (from inside: the container writes the
    # host's value; saved_kernel_values puts it back).
    m.shell(f"echo {LOW_BUCKETS} > /sys/module/nf_conntrack/parameters/hashsize; "
            f"echo {LOW_MAX} > /proc/sys/net/netfilter/nf_conntrack_max")
    assert int(PROC_MAX.read_text()) == LOW_MAX
    m.shell("""
        ip netns add ctgsnd
        ip netns add ctgrcv
        ip link add ctgsnd0 netns ctgsnd type veth peer name ctgrcv0 netns ctgrcv
        ip -n ctgsnd addr add 10.231.77.1/30 dev ctgsnd0
        ip -n ctgrcv addr add 10.231.77.2/30 dev ctgrcv0
        for ns in ctgsnd ctgrcv; do ip -n $ns link set lo up; done
        ip -n ctgsnd link set ctgsnd0 up
        ip -n ctgrcv link set ctgrcv0 up
        printf 'table inet ctgtest {\\n chain pre { type filter hook prerouting priority 0; ct state new counter; }\\n}\\n' \
            | ip netns exec ctgrcv nft -f -
        """)
    m.write("/root/flood.py", FLOOD_SCRIPT)

    def send(flows: int, rate: int, first_port: int) -> None:
        m.run("ip", "netns", "exec", "ctgsnd", "python3", "/root/flood.py", "10.231.77.2",
              str(flows), str(rate), str(first_port), timeout=120)

    def rcv_count() -> int:
        return int(m.run("ip", "netns", "exec", "ctgrcv", "cat",
                         "/proc/sys/net/netfilter/nf_conntrack_count").stdout)

    try:
        with MaxSampler() as sampler:
            t0 = time.monotonic()
            send(int(LOW_MAX * 0.95), 3000, 1)
            bumped = wait_for(lambda: int(PROC_MAX.read_text()) > LOW_MAX, 20)
            phase.say(f"first flood: {rcv_count()} entries in the receiver; max now {PROC_MAX.read_text().strip()} "
                      f"after {time.monotonic() - t0:.1f} s")
            assert bumped, f"no bump from {LOW_MAX}:\n{m.journal()}"
            # Persisted at once (persist.mode = "immediate").
            assert wait_for(lambda: m.run("cat", "/etc/sysctl.d/90-ctguard.conf", check=False).stdout.strip() != "", 10), \
                f"the bump was not persisted:\n{m.journal()}"
            # Push on towards the ceiling and past it: the max must stop at the ceiling.
            # Many more buckets than entries: the kernel's early drop (it looks at 8 buckets
            # for an unreplied entry to evict) then often finds none, so the table really
            # drops packets and says "table full" in the kernel log.
            m.shell("echo 65536 > /sys/module/nf_conntrack/parameters/hashsize")
            time.sleep(2.5)    # cooldown
            send(2 * TEST_CEILING, 6000, 20000)
            wait_for(lambda: int(PROC_MAX.read_text()) >= TEST_CEILING, 15)
            time.sleep(2)
        phase.say(f"nf_conntrack_max values seen: {sampler.seen}; receiver has {rcv_count()} entries")
        assert sampler.highest <= TEST_CEILING, f"max reached {sampler.highest} > ceiling {TEST_CEILING}"
        assert sampler.highest > LOW_MAX
        persisted = m.run("cat", "/etc/sysctl.d/90-ctguard.conf").stdout
        phase.say(f"persisted: {persisted.strip()!r}")
        assert "nf_conntrack_max" in persisted
        code, data = m.status_json()
        phase.say(f"status after flood: {code} max={data['max']} buckets={data['buckets']} "
                  f"budget left={data['bump_budget_left']} bumps={data.get('last_bumps')}")
        assert data["max"] <= TEST_CEILING
        assert data["ceiling"] == TEST_CEILING
        buckets = int(HASHSIZE.read_text())
        phase.say(f"hashsize now {buckets}")
        bump_id = _message_id("BUMP")
        if bump_id:
            bumps = m.entries(bump_id)
            assert bumps, f"no bump entry in the journal:\n{m.journal()}"
            ours = [b for b in bumps if b.get("CTGUARD_OLD_MAX") == str(LOW_MAX)]
            assert ours, f"no bump from {LOW_MAX} in the journal: {bumps}"
            since = bumps[bumps.index(ours[0]):]
            assert all(int(b["CTGUARD_NEW_MAX"]) <= TEST_CEILING for b in since if "CTGUARD_NEW_MAX" in b), since
            assert LOW_MAX < int(ours[0]["CTGUARD_NEW_MAX"]), ours[0]
        # The flood past the ceiling made the kernel drop packets and say so; ctguard read the
        # line (from /dev/kmsg or the journal) and recorded a table-full event.
        full_id = _message_id("TABLE_FULL")
        if full_id and KMSG.exists():
            receiver = m.run("stat", "-L", "-c", "%i", "/run/netns/ctgrcv").stdout.strip()
            assert wait_for(lambda: any(e.get("CTGUARD_NETNS") == receiver for e in m.entries(full_id)), 10), \
                f"no table-full entry for the receiver's namespace {receiver}:\n{m.entries(full_id)[:3]}\n{m.journal()}"
            phase.say(f"table-full entries: {len(m.entries(full_id))}; "
                      f"status table_full_events={m.status_json()[1].get('table_full_events')}")
        bundle_id = _message_id("BUNDLE")
        if bundle_id:
            assert wait_for(lambda: m.entries(bundle_id), 20), f"no evidence bundle:\n{m.journal()}"
            bundle = m.entries(bundle_id)[0]["CTGUARD_BUNDLE"]
            mode = m.run("stat", "-c", "%a", bundle).stdout.strip()
            assert mode == "700", f"bundle {bundle} has mode {mode}"
            m.run("test", "-s", f"{bundle}/manifest.toml")
        assert m.wait_active() == "active", m.journal()
        trim_with_debians_pyroute2(m, phase)
    finally:
        m.shell("ip netns del ctgsnd; ip netns del ctgrcv", check=False)


def trim_with_debians_pyroute2(m: Machine, phase: Phases) -> None:
    """Issue 25: relief's trim (pyroute2's conntrack message internals) against this release's
    python3-pyroute2: the receiver's unanswered UDP entries get their remaining timeout capped."""
    version = m.run("dpkg-query", "-W", "-f=${Version}", "python3-pyroute2").stdout.strip()
    out = m.run("python3", "-m", "ctguard.host.trim", "--netns-path", "/run/netns/ctgrcv", "--timeout", "udp=7",
                "--max-entries", "2000", "--budget", "10", check=False, timeout=60)
    assert out.returncode == 0, out
    result = json.loads(out.stdout.strip().splitlines()[-1])
    phase.say(f"relief trim with python3-pyroute2 {version}: {result}")
    assert result["matched"] > 0 and result["changed"] > 0 and result["failed"] == 0, result
