"""Evidence bundles on disk: capture, manifest, retention, listing, summary, export.

Layout: `<dir>/<UTC YYYYmmddTHHMMSSZ>-<reason slug>[-N]/`, folder 0700, files 0600 (they hold
addresses). The folder name is reserved first with mkdir (atomic, so two captures in one second
never share a folder) and `manifest.toml` is written last, atomically: a folder without a
manifest is a capture still running or one that crashed, and listings say so.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import stat
import tarfile
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import tomli_w

from ctguard.evidence import collect
from ctguard.evidence.redact import NOTE, Redactor
from ctguard.host.ctnetlink import TableBreakdown, Top, dump_table, open_ctnetlink
from ctguard.host.netns import netns_inode, run_in_netns
from ctguard.store.files import UnsafePathError, atomic_write, ensure_private_dir, safe_child

FORMAT = 1
MANIFEST = "manifest.toml"
EVIDENCE = "evidence.toml"
TIMELINE = "timeline.json"
FILE_MODE = 0o600
DIR_MODE = 0o700
BUNDLE_NAME = re.compile(r"^\d{8}T\d{6}Z-[a-z0-9-]+$")
# A folder with no manifest younger than this may be a capture still being written.
INCOMPLETE_GRACE = 3600.0


class EvidenceConfig(Protocol):
    dir: Path
    keep: int
    max_bytes: int
    top: int
    budget: float


@dataclass(frozen=True)
class BundleInfo:
    id: str
    path: Path
    created: str  # UTC, ISO 8601, from the manifest ("" when incomplete)
    reason: str
    netns: str
    bytes: int
    seconds: float
    cut_short: bool
    complete: bool
    errors: int  # collectors that failed
    incident: str = ""  # the incident it belongs to ("" none: a capture by hand, or an old bundle)
    incident_open: bool = False  # taken while that incident was still going on

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


class BundleError(Exception):
    """A bundle the operator asked for cannot be used; the message says why."""


def slug(reason: str) -> str:
    words = re.findall(r"[a-z0-9]+", reason.lower())
    return "-".join(words)[:48].strip("-") or "manual"


def _reserve(folder: Path, stamp: str, reason_slug: str) -> Path:
    base = f"{stamp}-{reason_slug}"
    for n in range(1, 1000):
        name = base if n == 1 else f"{base}-{n}"
        path = safe_child(folder, name)
        try:
            os.mkdir(path, DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(path, DIR_MODE)  # whatever the umask said
        return path
    raise BundleError(f"more than 999 bundles named {base} in {folder}: clean the folder")


def _top_table(top: Top) -> dict[str, Any]:
    return {
        "exact": top.exact,
        "capacity": top.capacity,
        "tracked": top.tracked,
        "rows": [{"key": str(h.key), "count": h.count, "error": h.error} for h in top.rows],
    }


def table_to_toml(t: TableBreakdown) -> dict[str, Any]:
    out: dict[str, Any] = {
        "entries": t.entries,
        "cut_short": t.cut_short,
        "seconds": round(t.seconds, 4),
        "unreplied": t.unreplied,
        "assured": t.assured,
        "interrupted": t.interrupted,
        "notes": list(t.notes),
        "by_family": t.by_family,
        "by_proto": t.by_proto,
        "by_tcp_state": t.by_tcp_state,
        "top_sources": _top_table(t.top_sources),
        "top_destinations": _top_table(t.top_destinations),
        "top_dports": _top_table(t.top_dports),
        "marks": _top_table(t.marks),
        "zones": _top_table(t.zones),
    }
    if t.expected is not None:
        out["expected"] = t.expected
    return out


def _network(ctx: collect.Context, netns_path: str | None, sources: list[str]) -> collect.Collected:
    """Interfaces, addresses, routes and forwarding of the namespace, and where the top sources
    arrive (pyroute2, read from a thread inside the namespace: see evidence.netinfo)."""
    from ctguard.evidence import netinfo

    try:
        return run_in_netns(netns_path, lambda: collect.run_collector(
            "network", lambda c: netinfo.network(c.proc_root, sources), ctx))
    except OSError as exc:
        return collect.Collected("network", error=f"cannot enter the network namespace {netns_path}: {exc}")


def capture(
    cfg: EvidenceConfig,
    *,
    reason: str,
    netns_path: str | None,
    policy_text: str,
    decision: Mapping[str, object] | None,
    progress: Callable[[str], None] | None = None,
    proc_root: str | Path = "/proc",
    sys_root: str | Path = "/sys",
    timeline: Mapping[str, Any] | None = None,
    timeline_note: str | None = None,
) -> Path:
    """Capture a bundle of the namespace at `netns_path` (None: the caller's); return its folder.

    `timeline` is the daemon's flight-recorder window (ctguard.daemon.recorder), kept as timeline.json;
    without one, `timeline_note` says why (e.g. no daemon answered).
    """
    say = progress or (lambda _msg: None)
    started = datetime.now(timezone.utc)
    t0 = time.monotonic()
    budget = float(cfg.budget)
    deadline = t0 + budget
    folder = ensure_private_dir(Path(cfg.dir), DIR_MODE)
    path = _reserve(folder, started.strftime("%Y%m%dT%H%M%SZ"), slug(reason))
    ctx = collect.Context(
        proc_root=Path(proc_root),
        sys_root=Path(sys_root),
        deadline=deadline,
        policy_text=policy_text,
        decision=decision,
    )
    results: list[collect.Collected] = []
    cut: list[str] = []
    netns_info: dict[str, Any] = {"path": netns_path or "(ctguard's own)"}
    try:
        netns_info["inode"] = netns_inode(netns_path, str(proc_root))
    except OSError as exc:
        netns_info["error"] = f"cannot stat the namespace: {exc}"

    # The cheap per-namespace counters first, and the dump socket from the same visit.
    say("reading the namespace's conntrack counters")
    sock: socket.socket | None = None
    sock_error: str | None = None

    def visit() -> list[collect.Collected]:
        nonlocal sock, sock_error
        found = collect.run_all(collect.NAMESPACE_COLLECTORS, ctx)
        try:
            sock = open_ctnetlink(None)
        except OSError as exc:
            sock_error = f"cannot open a ctnetlink socket: {exc}"
        return found

    try:
        results.extend(run_in_netns(netns_path, visit))
    except OSError as exc:
        sock_error = f"cannot enter the network namespace {netns_path}: {exc}"
        results.append(collect.Collected("sysctl", error=sock_error))

    expected: int | None = None
    for r in results:
        if r.name == "sysctl" and r.error is None:
            try:
                expected = int(r.data["sysctl"]["nf_conntrack_count"])
            except (KeyError, ValueError):
                pass

    # The dump gets what is left of the budget, less a reserve for the rules and the journal.
    table: TableBreakdown | None = None
    table_error = sock_error
    table_start = time.monotonic()
    if sock is not None:
        reserve = min(2.0, budget * 0.2)
        dump_budget = deadline - time.monotonic() - reserve
        say(f"dumping the conntrack table ({expected if expected is not None else '?'} entries)")

        def dump_progress(entries: int, seconds: float) -> None:
            share = f" of {expected}" if expected else ""
            say(f"dumped {entries}{share} entries in {seconds:.1f} s")

        try:
            table = dump_table(None, budget=dump_budget, top=int(cfg.top), expected=expected,
                               progress=dump_progress, sock=sock)
        except OSError as exc:
            table_error = f"conntrack dump failed: {exc}"
        finally:
            sock.close()
    if table is not None and table.cut_short:
        cut.extend(table.notes)
    results.append(collect.Collected("conntrack", error=table_error, seconds=time.monotonic() - table_start))

    say("reading rules, namespaces, memory and the kernel journal")
    try:
        results.extend(run_in_netns(netns_path, lambda: collect.run_all(collect.NAMESPACE_SLOW_COLLECTORS, ctx)))
    except OSError as exc:
        results.append(collect.Collected("rules", error=f"cannot enter the network namespace {netns_path}: {exc}"))
    results.extend(collect.run_all(collect.HOST_COLLECTORS, ctx))
    results.append(_network(ctx, netns_path, [str(h.key) for h in table.top_sources.rows] if table else []))
    results.append(collect.host_profile(ctx, netns_path, table.by_proto if table else None,
                                        table.by_tcp_state if table else None))

    evidence: dict[str, Any] = {}
    written: list[str] = []
    for r in results:
        if r.data:
            evidence[r.name] = collect.tomlable(r.data)
        for name, data in r.files.items():
            atomic_write(safe_child(path, name), data, FILE_MODE)
            written.append(name)
    if table is not None:
        evidence["table"] = table_to_toml(table)
    atomic_write(path / EVIDENCE, tomli_w.dumps(evidence), FILE_MODE)
    written.append(EVIDENCE)
    if timeline is not None:
        atomic_write(path / TIMELINE, json.dumps(timeline, separators=(",", ":"), default=str), FILE_MODE)
        written.append(TIMELINE)

    elapsed = time.monotonic() - t0
    if elapsed > budget and not cut:
        cut.append(f"the capture took {elapsed:.2f} s, over its budget of {budget:.2f} s")
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "what": "ctguard evidence bundle",
        "id": path.name,
        "created": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "reason": reason,
        "host": socket.gethostname(),
        "netns": netns_info,
        "seconds": round(elapsed, 4),
        "budget": budget,
        "cut_short": bool(cut),
        "cut_short_what": cut,
        "files": sorted(written) + [MANIFEST],
        "collectors": {
            r.name: {"ok": r.error is None, "seconds": round(r.seconds, 4), **({"error": r.error} if r.error else {})}
            for r in results
        },
    }
    if table is not None:
        manifest["table"] = {
            "entries_seen": table.entries,
            "cut_short": table.cut_short,
            **({"expected": table.expected} if table.expected is not None else {}),
        }
    if decision is not None:
        manifest["decision"] = collect.tomlable(decision)
    if timeline is None:
        manifest["timeline_note"] = timeline_note or "no timeline: the capture was not given the daemon's window"
    elif isinstance(timeline.get("incident"), Mapping):
        manifest["incident"] = collect.tomlable(timeline["incident"])
    atomic_write(path / MANIFEST, tomli_w.dumps(collect.tomlable(manifest)), FILE_MODE)
    say(f"bundle written in {elapsed:.1f} s: {path}")
    try:
        prune(folder, int(cfg.keep), int(cfg.max_bytes), protect=path)
    except OSError as exc:
        say(f"retention could not run: {exc}")
    return path


# --- reading bundles -------------------------------------------------------------------------


def _bundle_bytes(path: Path) -> int:
    total = 0
    try:
        with os.scandir(path) as it:
            for entry in it:
                try:
                    total += entry.stat(follow_symlinks=False).st_size
                except OSError:
                    pass
    except OSError:
        pass
    return total


def _candidates(folder: Path) -> list[Path]:
    """Real folders (never symlinks) named like bundles, oldest first (names start with UTC time)."""
    out = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                if BUNDLE_NAME.match(entry.name) and entry.is_dir(follow_symlinks=False):
                    out.append(Path(entry.path))
    except FileNotFoundError:
        return []
    return sorted(out, key=lambda p: p.name)


def load_toml(path: Path) -> dict[str, Any]:
    st = os.lstat(path)
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{path} is not a regular file")
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        return tomllib.load(fh)


def _info(path: Path) -> BundleInfo:
    try:
        m = load_toml(path / MANIFEST)
    except (OSError, BundleError, tomllib.TOMLDecodeError):
        return BundleInfo(path.name, path, "", "", "", _bundle_bytes(path), 0.0, False, False, 0)
    netns = m.get("netns", {})
    inc = m.get("incident", {})
    return BundleInfo(
        id=path.name,
        path=path,
        created=str(m.get("created", "")),
        reason=str(m.get("reason", "")),
        netns=str(netns.get("path", "")) if isinstance(netns, dict) else str(netns),
        bytes=_bundle_bytes(path),
        seconds=float(m.get("seconds", 0.0)),
        cut_short=bool(m.get("cut_short", False)),
        complete=True,
        errors=sum(1 for c in m.get("collectors", {}).values() if isinstance(c, dict) and not c.get("ok", True)),
        incident=str(inc.get("id", "")) if isinstance(inc, dict) else "",
        incident_open=isinstance(inc, dict) and bool(inc) and not inc.get("ended"),
    )


def list_bundles(folder: Path | str) -> list[BundleInfo]:
    """Every bundle in `folder`, oldest first."""
    return [_info(p) for p in _candidates(Path(folder))]


def bundle_path(folder: Path | str, bundle_id: str) -> Path:
    """The folder of bundle `bundle_id`; refuses anything that would leave `folder`."""
    try:
        path = safe_child(Path(folder), bundle_id)
    except UnsafePathError as exc:
        raise BundleError(f"refusing bundle id {bundle_id!r}: {exc.strerror}") from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise BundleError(f"no bundle {bundle_id!r} in {folder} (see `ctguard bundles list`)") from None
    if not stat.S_ISDIR(st.st_mode):
        raise BundleError(f"{path} is not a bundle folder")
    return path


def prune(folder: Path | str, keep: int, max_bytes: int, protect: Path | None = None) -> list[Path]:
    """Remove the oldest bundles until at most `keep` remain and they hold at most `max_bytes`.

    `protect` (the bundle just written) is never removed, nor is a manifest-less folder younger
    than an hour (another capture may be writing it). Returns what was removed.
    """
    folder = Path(folder)
    now = time.time()
    bundles = _candidates(folder)
    sizes = {p: _bundle_bytes(p) for p in bundles}
    total = sum(sizes.values())
    count = len(bundles)
    removed: list[Path] = []
    for path in bundles:
        if count <= keep and total <= max_bytes:
            break
        if protect is not None and path.name == Path(protect).name:
            continue
        if not (path / MANIFEST).exists():
            try:
                if now - os.lstat(path).st_mtime < INCOMPLETE_GRACE:
                    continue
            except OSError:
                continue
        shutil.rmtree(path)  # rmtree never follows symlinks inside the tree
        removed.append(path)
        count -= 1
        total -= sizes[path]
    return removed


def export(folder: Path | str, bundle_id: str, out: Path | None = None, redact: bool = False) -> Path:
    """Write bundle `bundle_id` as a .tar.gz (0600: it holds addresses); return the file.

    `redact`: every IP address in every file is replaced by a pseudonym keyed for this export
    (ctguard.evidence.redact); the bundle on disk is left as it is.
    """

    redactor = Redactor() if redact else None
    path = bundle_path(folder, bundle_id)
    suffix = "-redacted.tar.gz" if redact else ".tar.gz"
    if out is None:
        out = Path.cwd() / f"{path.name}{suffix}"
    elif Path(out).is_dir():
        out = Path(out) / f"{path.name}{suffix}"
    out = Path(out)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        with os.scandir(path) as it:
            names = sorted(e.name for e in it if e.is_file(follow_symlinks=False))
        for name in names:
            fd = os.open(path / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as fh:
                data = fh.read()
                st = os.fstat(fh.fileno())
            if redactor is not None:
                data = redactor.bytes(data)
            info = tarfile.TarInfo(f"{path.name}/{name}")
            info.size = len(data)
            info.mode = FILE_MODE
            info.mtime = int(st.st_mtime)
            tar.addfile(info, io.BytesIO(data))
        if redactor is not None:
            info = tarfile.TarInfo(f"{path.name}/REDACTED.txt")
            info.size = len(NOTE)
            info.mode = FILE_MODE
            info.mtime = int(time.time())
            tar.addfile(info, io.BytesIO(NOTE))
    atomic_write(out, buf.getvalue(), FILE_MODE)
    return out


