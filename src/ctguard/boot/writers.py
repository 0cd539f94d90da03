"""Other writers of nf_conntrack_max that are visible now: a running kube-proxy (its conntrack
flags or config file), a systemd-sysctl or sysctl process. Read from a /proc root (tests pass
a prepared tree); never raises for a process that went away while being read.

kube-proxy sets nf_conntrack_max at every start to max(maxPerCore x CPUs, min) (defaults 32768
and 131072), lowering it when that is less; `maxPerCore: 0` (`--conntrack-max-per-core=0`)
makes it leave max alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ctguard.host import procs

KUBE_PROXY_DEFAULTS = {"maxPerCore": "32768", "min": "131072"}
_FLAG_TO_KEY = {
    "conntrack-max-per-core": "maxPerCore",
    "conntrack-min": "min",
    "conntrack-tcp-timeout-established": "tcpEstablishedTimeout",
    "conntrack-tcp-timeout-close-wait": "tcpCloseWaitTimeout",
    "conntrack-udp-timeout": "udpTimeout",
    "conntrack-udp-timeout-stream": "udpStreamTimeout",
}
SYSCTL_COMMS = ("systemd-sysctl", "sysctl")


@dataclass(frozen=True)
class KubeProxy:
    pid: int
    settings: dict[str, str] = field(default_factory=dict)   # conntrack key -> value, as given
    source: str = "defaults"                                  # "flags", a config path, or "defaults"

    def max_it_sets(self, cpus: int) -> int | None:
        """The nf_conntrack_max this kube-proxy sets at its next start; None: it leaves max alone."""
        try:
            per_core = int(self.settings.get("maxPerCore", KUBE_PROXY_DEFAULTS["maxPerCore"]))
            floor = int(self.settings.get("min", KUBE_PROXY_DEFAULTS["min"]))
        except ValueError:
            return None
        if per_core == 0:
            return None
        return max(per_core * cpus, floor)

    def describe(self, cpus: int) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in sorted(self.settings.items())) or "no conntrack settings given"
        sets = self.max_it_sets(cpus)
        effect = (f"sets nf_conntrack_max to {sets} at each start" if sets is not None
                  else "leaves nf_conntrack_max alone (maxPerCore 0)")
        return f"kube-proxy (pid {self.pid}, {self.source}: {shown}) {effect}"


@dataclass(frozen=True)
class Process:
    pid: int
    comm: str
    args: tuple[str, ...]


def processes(proc_root: Path | str = "/proc", comms: tuple[str, ...] = ("kube-proxy", *SYSCTL_COMMS)) -> list[Process]:
    proc = Path(proc_root)
    out = []
    try:
        all_pids = procs.pids(proc)
    except OSError:
        return out
    for pid in all_pids:
        comm = procs.comm(proc, pid)
        if comm not in comms:
            continue
        try:
            raw = (proc / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        out.append(Process(pid, comm, tuple(a.decode(errors="replace") for a in raw.split(b"\0") if a)))
    return out


def _flags(args: tuple[str, ...]) -> dict[str, str]:
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            name, eq, value = a[2:].partition("=")
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("-"):
                value = args[i + 1]
                i += 1
            out[name] = value
        i += 1
    return out


def conntrack_from_config(text: str) -> dict[str, str]:
    """The `conntrack:` mapping of a KubeProxyConfiguration (YAML, read without a YAML parser:
    only the one block of `key: value` lines under it)."""
    out: dict[str, str] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)conntrack:\s*(#.*)?$", line)
        if not m:
            continue
        indent = len(m.group(1))
        for sub in lines[i + 1:]:
            if not sub.strip() or sub.strip().startswith("#"):
                continue
            sub_indent = len(sub) - len(sub.lstrip())
            if sub_indent <= indent:
                break
            km = re.match(r"^\s*([A-Za-z]+):\s*(.*?)\s*(#.*)?$", sub)
            if km and km.group(2) not in ("", "null"):
                out[km.group(1)] = km.group(2).strip("\"'")
        break
    return out


def kube_proxy(proc_root: Path | str, p: Process) -> KubeProxy:
    flags = _flags(p.args[1:])
    settings: dict[str, str] = {}
    source = "defaults"
    config = flags.get("config")
    if config:
        # The path is inside kube-proxy's own mount namespace (a pod): read it through its root.
        try:
            text = (Path(proc_root) / str(p.pid) / "root" / config.lstrip("/")).read_text(errors="replace")[:1 << 20]
            settings.update(conntrack_from_config(text))
            source = config
        except OSError:
            source = f"{config} (unreadable)"
    given = {_FLAG_TO_KEY[k]: v for k, v in flags.items() if k in _FLAG_TO_KEY}
    if given:
        settings.update(given)   # flags given on the command line override the config file
        source = "flags" if source == "defaults" else f"{source} and flags"
    return KubeProxy(p.pid, settings, source)


def kube_proxies(proc_root: Path | str = "/proc") -> list[KubeProxy]:
    return [kube_proxy(proc_root, p) for p in processes(proc_root, ("kube-proxy",))]


def likely_writer(proc_root: Path | str, new_max: int, cpus: int, boot_file: str | None = None,
                  boot_value: int | None = None) -> str:
    """One line naming who probably lowered max to `new_max`, or "" when nothing is visible."""
    found = []
    for p in processes(proc_root):
        if p.comm == "kube-proxy":
            kp = kube_proxy(proc_root, p)
            found.append((0 if kp.max_it_sets(cpus) == new_max else 1, kp.describe(cpus)))
        else:
            found.append((0 if any("nf_conntrack_max" in a for a in p.args) else 2,
                          f"{p.comm} (pid {p.pid}: {' '.join(p.args)[:200]})"))
    if boot_file and boot_value == new_max:
        # `sysctl --system`, systemd-sysctl or a configuration-management run applying the files.
        found.append((1, f"a run of systemd-sysctl or `sysctl --system` applying {boot_file} (it sets {new_max})"))
    found.sort()
    return "; ".join(text for _, text in found[:3])
