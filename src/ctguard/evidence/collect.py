"""Evidence collectors: one per source, each reporting its own failure.

Like node_exporter's collectors, a collector that fails (tool missing, permission denied, a
file the kernel does not have) records its error and the others go on. Each returns a small
structured summary (for the manifest and `bundles show`) and raw attachments (files kept in the
bundle verbatim, so the review can check the summary against the source).

Collectors marked `in_netns` read what belongs to the inspected namespace; the bundle code runs
them in a thread that has joined it (see ctguard.host.netns.run_in_netns), so they read /proc/sys/net and
/proc/thread-self/net there, and the programs they start (nft, iptables-save) run there too.
All paths hang off `proc_root` / `sys_root` so tests can point them at prepared trees.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ctguard.config.policy import State
from ctguard.host import hostrole, procs
from ctguard.host.nat import IptablesNatCounter, NftNatCounter, iptables_nat_rules, nft_nat_rules  # noqa: F401
from ctguard.host.cgroups import parse_cgroup
from ctguard.host.netns import run_in_netns
from ctguard.store.files import read_text_nofollow
from ctguard.store.relief import ReliefStore

MAX_FILE = 4 << 20  # never keep more than this much of one source
JOURNAL_LINES = 50
JOURNAL_SCAN = 20000
PROCESSES_LISTED = 10
UNITS_LISTED = 20


@dataclass(frozen=True)
class Context:
    proc_root: Path = Path("/proc")
    sys_root: Path = Path("/sys")
    netns_run_dir: Path = Path("/run/netns")
    deadline: float = float("inf")  # time.monotonic() value after which slow collectors give up
    policy_text: str = ""
    decision: Mapping[str, object] | None = None

    def remaining(self, cap: float) -> float:
        return max(0.1, min(cap, self.deadline - time.monotonic()))

    @property
    def net_dir(self) -> Path:
        # /proc/net follows the *process's* namespace (it is /proc/self/net); the thread's own
        # view is /proc/thread-self/net. Prepared test trees may only have net/.
        threaded = self.proc_root / "thread-self" / "net"
        return threaded if threaded.exists() else self.proc_root / "net"


@dataclass(frozen=True)
class Collected:
    name: str
    data: dict[str, Any] = field(default_factory=dict)
    files: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


class CollectorError(Exception):
    """A collector's failure, phrased for the operator."""


Result = tuple[dict[str, Any], dict[str, bytes]]


def _read(path: Path, limit: int = MAX_FILE) -> str:
    try:
        with open(path, "rb") as fh:
            # Small reads for sysctls: the kernel allocates a buffer of the size asked for
            # and answers ENOMEM to a multi-megabyte read of /proc/sys.
            return fh.read(limit).decode("utf-8", errors="replace")
    except PermissionError:
        raise CollectorError(f"cannot read {path}: permission denied (run the capture as root)") from None
    except FileNotFoundError:
        raise CollectorError(f"{path} does not exist (is nf_conntrack loaded?)") from None


# --- namespace-bound collectors -------------------------------------------------------------


def sysctls(ctx: Context) -> Result:
    """Every nf_conntrack_* sysctl of the namespace, and the (global) hashsize."""
    folder = ctx.proc_root / "sys" / "net" / "netfilter"
    try:
        names = sorted(n for n in os.listdir(folder) if n.startswith("nf_conntrack_"))
    except FileNotFoundError:
        raise CollectorError(f"{folder} does not exist: nf_conntrack is not loaded (modprobe nf_conntrack)") from None
    values: dict[str, str] = {}
    errors: list[str] = []
    for name in names:
        try:
            values[name] = _read(folder / name, 4096).strip()
        except (CollectorError, OSError) as exc:
            errors.append(f"{name}: {exc}")
    data: dict[str, Any] = {"sysctl": values}
    lines = [f"net.netfilter.{k} = {v}" for k, v in values.items()]
    hashsize_path = ctx.sys_root / "module" / "nf_conntrack" / "parameters" / "hashsize"
    try:
        data["hashsize"] = int(_read(hashsize_path, 4096).strip())
        lines.append(f"# {hashsize_path} = {data['hashsize']}")
    except (CollectorError, OSError, ValueError) as exc:
        errors.append(f"hashsize: {exc}")
    if errors:
        data["errors"] = errors
    if not values:
        raise CollectorError(f"no nf_conntrack_* sysctl could be read under {folder}: " + "; ".join(errors))
    return data, {"sysctl.txt": ("\n".join(lines) + "\n").encode()}


def parse_stat(text: str) -> dict[str, Any]:
    """/proc/net/stat/nf_conntrack: a header, then one line of hex counters per CPU."""
    lines = [line.split() for line in text.splitlines() if line.strip()]
    if not lines:
        raise CollectorError("the per-CPU conntrack statistics are empty")
    header = lines[0]
    per_cpu: list[dict[str, int]] = []
    for cpu, row in enumerate(lines[1:]):
        if len(row) != len(header):
            raise CollectorError(f"per-CPU statistics line {cpu} has {len(row)} fields, the header {len(header)}")
        per_cpu.append({name: int(value, 16) for name, value in zip(header, row)})
    totals = {name: sum(c[name] for c in per_cpu) for name in header}
    if "entries" in totals and per_cpu:
        # `entries` is the namespace's count repeated on every line, not a per-CPU figure.
        totals["entries"] = per_cpu[0]["entries"]
    return {"columns": header, "per_cpu": per_cpu, "totals": totals}


def cpu_stats(ctx: Context) -> Result:
    path = ctx.net_dir / "stat" / "nf_conntrack"
    text = _read(path)
    return parse_stat(text), {"stat_nf_conntrack.txt": text.encode()}


def sockstat(ctx: Context) -> Result:
    files: dict[str, bytes] = {}
    data: dict[str, Any] = {}
    for name in ("sockstat", "sockstat6"):
        try:
            text = _read(ctx.net_dir / name)
        except CollectorError:
            if name == "sockstat":
                raise
            continue
        files[f"{name}.txt"] = text.encode()
        for line in text.splitlines():
            label, _, rest = line.partition(":")
            fields = rest.split()
            data[f"{name}.{label.strip()}"] = {fields[i]: _int(fields[i + 1]) for i in range(0, len(fields) - 1, 2)}
    return data, files


def parse_sockets(text: str, listening_state: str) -> set[int]:
    """Local ports of the sockets in `listening_state` in a /proc/net/{tcp,udp}[6] table
    ("0A": TCP LISTEN; "07": UDP bound and unconnected, a service waiting for any peer)."""
    ports: set[int] = set()
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != listening_state:
            continue
        local, remote = fields[1], fields[2]
        if listening_state == "07" and int(remote.rsplit(":", 1)[1], 16) != 0:
            continue        # a connected UDP socket (a client's), not a service
        try:
            ports.add(int(local.rsplit(":", 1)[1], 16))
        except (IndexError, ValueError):
            continue
    return ports


def listening(ctx: Context) -> Result:
    """The namespace's local services: UDP ports bound for any peer and TCP ports listening
    (the diagnosis suggests `notrack` only for a service the bundle shows answering here)."""
    udp: set[int] = set()
    tcp: set[int] = set()
    read = 0
    for name, state, into in (("udp", "07", udp), ("udp6", "07", udp), ("tcp", "0A", tcp), ("tcp6", "0A", tcp)):
        try:
            text = _read(ctx.net_dir / name)
        except CollectorError:
            continue
        read += 1
        into.update(parse_sockets(text, state))
    if not read:
        # Unknown, not an error of the capture: the diagnosis then suggests no notrack.
        return {"note": "no socket table could be read"}, {}
    return {"udp_ports": sorted(udp), "tcp_ports": sorted(tcp)}, {}


def _int(text: str) -> int | str:
    try:
        return int(text)
    except ValueError:
        return text


class _Streamed:
    """A program's output read in chunks: the first MAX_FILE bytes kept, every chunk scanned.

    A Kubernetes node's ruleset can run to tens of megabytes; holding it whole (let alone
    parsing it as JSON) would break the capture's memory bound, so the NAT counters look at
    each chunk as it passes and only the head is kept as the attachment.
    """

    def __init__(self) -> None:
        self.head = bytearray()
        self.total = 0

    def keep(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = MAX_FILE - len(self.head)
        if room > 0:
            self.head += chunk[:room]


def _stream(argv: list[str], ctx: Context, on_chunk: Callable[[bytes], None], cap: float = 5.0) -> _Streamed:
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C"}
    out = _Streamed()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, env=env)
        timer = threading.Timer(ctx.remaining(cap), proc.kill)
        timer.start()
        try:
            assert proc.stdout is not None
            while True:
                chunk = proc.stdout.read1(1 << 20)
                if not chunk:
                    break
                out.keep(chunk)
                on_chunk(chunk)
            code = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        if code == -signal.SIGKILL:
            raise CollectorError(f"`{' '.join(argv)}` did not finish within the capture budget")
        if code != 0:
            err.seek(0)
            lines = err.read(65536).decode(errors="replace").strip().splitlines()
            raise CollectorError(f"`{' '.join(argv)}` exited {code}: {lines[-1] if lines else 'no message'}")
    return out


def nat_verdict(nft: dict[str, int] | None, ipt: dict[str, int] | None) -> str:
    checked = [name for name, res in (("nft", nft), ("iptables-save", ipt)) if res is not None]
    if not checked:
        return "unknown: neither `nft` nor `iptables-save` could be read"
    parts = []
    for name, res in (("nft", nft), ("iptables", ipt)):
        if res:
            parts.append(f"{name} " + ", ".join(f"{k} x{v}" for k, v in sorted(res.items())))
    if parts:
        return "this host does NAT / masquerade (" + "; ".join(parts) + ")"
    return "this host does no NAT / masquerade (checked " + " and ".join(checked) + ")"


def rules(ctx: Context) -> Result:
    """The ruleset (nft JSON, iptables-save) and the one-line NAT verdict."""
    files: dict[str, bytes] = {}
    data: dict[str, Any] = {}
    problems: list[str] = []

    def counted(name: str, argv: list[str], counter: NftNatCounter | IptablesNatCounter, file: str,
                truncated: str) -> dict[str, int] | None:
        """Stream a ruleset through its NAT counter, keeping its head as a file; None when unread."""
        path = shutil.which(argv[0])
        if path is None:
            data[name] = "not installed"
            return None
        try:
            out = _stream([path, *argv[1:]], ctx, counter.feed)
            if isinstance(counter, IptablesNatCounter):
                counter.close()
        except (CollectorError, OSError) as exc:
            problems.append(f"{argv[0]}: {exc}")
            return None
        files[file] = bytes(out.head)
        if out.total > len(out.head):
            data[truncated] = f"kept the first {len(out.head)} of {out.total} bytes"
        return counter.found

    nft_found = counted("nft", ["nft", "-j", "list", "ruleset"], NftNatCounter(), "nft-ruleset.json", "nft_truncated")
    ipt_found = counted("iptables_save", ["iptables-save"], IptablesNatCounter(), "iptables-save.txt",
                        "iptables_save_truncated")
    data["nat_verdict"] = nat_verdict(nft_found, ipt_found)
    if nft_found:
        data["nft_nat"] = nft_found
    if ipt_found:
        data["iptables_nat"] = ipt_found
    if problems:
        data["errors"] = problems
        if nft_found is None and ipt_found is None:   # (a problem means one of them is installed)
            raise CollectorError("; ".join(problems))
    return data, files


# --- host-wide collectors --------------------------------------------------------------------


def parse_slab_line(text: str) -> dict[str, int] | None:
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "nf_conntrack":
            active, total, objsize = int(fields[1]), int(fields[2]), int(fields[3])
            return {
                "active_objs": active,
                "num_objs": total,
                "objsize": objsize,
                "active_bytes": active * objsize,
                "bytes": total * objsize,
            }
    return None


def slab(ctx: Context) -> Result:
    path = ctx.proc_root / "slabinfo"
    text = _read(path)
    parsed = parse_slab_line(text)
    if parsed is None:
        # SLUB merges caches of one size unless slab_nomerge: the objects are still there,
        # only accounted under another name.
        raise CollectorError(
            f"no nf_conntrack line in {path}: the cache is merged with another (boot with slab_nomerge to see it)"
        )
    line = next(l for l in text.splitlines() if l.split()[:1] == ["nf_conntrack"])
    head = next((l for l in text.splitlines() if l.startswith("# name")), "")
    return {"slab": parsed, "line": line}, {"slabinfo.txt": (head + "\n" + line + "\n").encode()}


def memory(ctx: Context) -> Result:
    text = _read(ctx.proc_root / "meminfo")
    out: dict[str, Any] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            value = rest.split()
            out[key] = int(value[0]) * (1024 if value[1:] == ["kB"] else 1)
    if "MemTotal" not in out:
        raise CollectorError(f"{ctx.proc_root / 'meminfo'} has no MemTotal line")
    return {"bytes": out}, {}


def namespaces(ctx: Context) -> Result:
    """Every network namespace the processes are in (plus named ones), with processes and units."""
    found: dict[int, dict[str, Any]] = {}

    def slot(inode: int) -> dict[str, Any]:
        return found.setdefault(inode, {"inode": inode, "names": [], "processes": 0, "listed": [], "units": [], "containers": []})

    try:
        for entry in sorted(os.listdir(ctx.netns_run_dir)):
            try:
                slot(os.stat(ctx.netns_run_dir / entry).st_ino)["names"].append(entry)
            except OSError:
                continue
    except OSError:
        pass
    try:
        pids = procs.pids(ctx.proc_root)
    except OSError as exc:
        raise CollectorError(f"cannot list {ctx.proc_root}: {exc}") from None
    for pid in pids:
        base = ctx.proc_root / str(pid)
        try:
            link = os.readlink(base / "ns" / "net")
        except OSError:
            continue  # gone, or a kernel thread we may not inspect
        m = re.fullmatch(r"net:\[(\d+)\]", link)
        if not m:
            continue
        ns = slot(int(m.group(1)))
        ns["processes"] += 1
        comm = procs.comm(ctx.proc_root, pid) or "?"
        try:
            unit, containers = parse_cgroup((base / "cgroup").read_text())
        except OSError:
            unit, containers = None, []
        if len(ns["listed"]) < PROCESSES_LISTED:
            ns["listed"].append({"pid": pid, "comm": comm, "unit": unit or ""})
        if unit and unit not in ns["units"] and len(ns["units"]) < UNITS_LISTED:
            ns["units"].append(unit)
        for c in containers:
            if c not in ns["containers"] and len(ns["containers"]) < UNITS_LISTED:
                ns["containers"].append(c)
    return {"namespaces": [found[k] for k in sorted(found)]}, {}


KERNEL_MATCH = "nf_conntrack"


def journal(ctx: Context) -> Result:
    """The last kernel-transport lines mentioning nf_conntrack (table full and friends)."""
    try:
        # Here: the collector runs in the capture child only, and a host without python3-systemd
        # still gets a bundle (this collector says why it is empty).
        from systemd import journal as sd_journal  # type: ignore[import-not-found]
    except ImportError:
        raise CollectorError("python3-systemd is not installed: kernel journal lines not collected") from None
    try:
        reader = sd_journal.Reader()
    except OSError as exc:
        raise CollectorError(f"journald is not available ({exc}): kernel journal lines not collected") from None
    lines: list[str] = []
    try:
        # Kernel transport only: any local user can write the same words through syslog.
        reader.add_match(_TRANSPORT="kernel")
        reader.seek_tail()
        scanned = 0
        stop_at = min(ctx.deadline, time.monotonic() + 2.0)
        while len(lines) < JOURNAL_LINES and scanned < JOURNAL_SCAN and time.monotonic() < stop_at:
            entry = reader.get_previous()
            if not entry:
                break
            scanned += 1
            message = entry.get("MESSAGE", "")
            if isinstance(message, bytes):
                message = message.decode(errors="replace")
            if KERNEL_MATCH in message:
                when = entry.get("__REALTIME_TIMESTAMP")
                stamp = when.isoformat() if hasattr(when, "isoformat") else str(when)
                lines.append(f"{stamp} {message}")
    finally:
        reader.close()
    lines.reverse()
    data: dict[str, Any] = {"lines": len(lines), "scanned": scanned}
    if lines:
        data["last"] = lines[-1]
    return data, {"journal-kernel.txt": ("\n".join(lines) + ("\n" if lines else "")).encode()}


def tomlable(value: Any) -> Any:
    """A copy of `value` that tomli-w can write (TOML has no null)."""
    if isinstance(value, Mapping):
        return {str(k): tomlable(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [tomlable(v) for v in value if v is not None]
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def policy_and_decision(ctx: Context) -> Result:
    files = {"policy.toml": ctx.policy_text.encode()}
    data: dict[str, Any] = {"policy_bytes": len(ctx.policy_text.encode())}
    if ctx.decision is not None:
        files["decision.json"] = (json.dumps(ctx.decision, indent=2, sort_keys=True, default=str) + "\n").encode()
        data["decision"] = tomlable(ctx.decision)
    return data, files


def relief(ctx: Context) -> Result:
    """Evidence: the relief in force when the bundle was taken (relief.json of the policy's
    state folder), so a review sees which timeouts were shortened, where, since when, and
    what they will be put back to."""
    try:
        doc = tomllib.loads(ctx.policy_text) if ctx.policy_text else {}
    except tomllib.TOMLDecodeError:
        doc = {}
    relief_doc = doc.get("relief", {}) if isinstance(doc.get("relief"), dict) else {}
    state = doc.get("state", {}) if isinstance(doc.get("state"), dict) else {}
    store = ReliefStore(Path(state.get("dir", str(State().dir))))
    problems: list[str] = []
    store.load(warn=problems.append, set_aside=False)
    data = {"mode": relief_doc.get("mode", "advise"), "file": str(store.path), "total": store.total,
            "active": [r.to_json() for r in store.records.values()]}
    if problems:
        data["problems"] = problems
    files = {}
    try:
        files["relief.json"] = read_text_nofollow(store.path).encode()
    except OSError:
        pass
    return data, files


Collector = Callable[[Context], Result]

# (name, function, runs inside the inspected namespace)
NAMESPACE_COLLECTORS: tuple[tuple[str, Collector], ...] = (
    ("sysctl", sysctls),
    ("cpu_stats", cpu_stats),
    ("sockstat", sockstat),
    ("listening", listening),
)
NAMESPACE_SLOW_COLLECTORS: tuple[tuple[str, Collector], ...] = (("rules", rules),)
HOST_COLLECTORS: tuple[tuple[str, Collector], ...] = (
    ("slab", slab),
    ("memory", memory),
    ("namespaces", namespaces),
    ("journal", journal),
    ("policy", policy_and_decision),
    ("relief", relief),
)


def host_profile(ctx: Context, netns_path: str | None, by_proto: Mapping[str, int] | None,
                 by_tcp_state: Mapping[str, int] | None) -> Collected:
    """What this host is, and the namespace's timeouts raised above the kernel defaults with
    the entries they likely hold (from the table breakdown just taken)."""
    start = time.monotonic()
    try:
        role = hostrole.detect(ctx.proc_root, ctx.sys_root)
        # Timeouts are per namespace: read them from a thread inside it.
        raised = run_in_netns(netns_path, lambda: hostrole.raised_timeouts(
            ctx.proc_root, dict(by_proto) if by_proto is not None else None,
            dict(by_tcp_state) if by_tcp_state is not None else None))
    except Exception as exc:  # one broken source must not sink the bundle
        return Collected("host", error=f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - start)
    data: dict[str, Any] = {
        **role.as_dict(),
        "raised_timeouts": [t.as_dict() for t in raised],
    }
    return Collected("host", data, {}, None, time.monotonic() - start)


def run_collector(name: str, fn: Collector, ctx: Context) -> Collected:
    start = time.monotonic()
    try:
        data, files = fn(ctx)
    except CollectorError as exc:
        return Collected(name, error=str(exc), seconds=time.monotonic() - start)
    except Exception as exc:  # one broken source must not sink the bundle
        return Collected(name, error=f"{type(exc).__name__}: {exc}", seconds=time.monotonic() - start)
    return Collected(name, data, files, None, time.monotonic() - start)


def run_all(collectors: tuple[tuple[str, Collector], ...], ctx: Context) -> list[Collected]:
    return [run_collector(name, fn, ctx) for name, fn in collectors]


__all__ = [
    "Collected", "Context", "CollectorError", "run_collector", "run_all",
    "NAMESPACE_COLLECTORS", "NAMESPACE_SLOW_COLLECTORS", "HOST_COLLECTORS",
    "parse_stat", "parse_slab_line", "parse_cgroup", "parse_sockets", "nft_nat_rules", "iptables_nat_rules", "nat_verdict",
]
