"""Which systemd unit and which container a process belongs to, from /proc/PID/cgroup.

Used to label namespaces (metrics, status) and in evidence bundles, so an operator reads
"docker:3f2a..." or "kubelet.service" instead of a bare namespace inode.
"""

from __future__ import annotations

import re
from pathlib import Path

_CONTAINER_PATTERNS = (
    (re.compile(r"docker-([0-9a-f]{12,})\.scope"), "docker"),
    (re.compile(r"/docker/([0-9a-f]{12,})"), "docker"),
    (re.compile(r"cri-containerd-([0-9a-f]{12,})\.scope"), "containerd"),
    (re.compile(r"crio-(?:conmon-)?([0-9a-f]{12,})\.scope"), "cri-o"),
    (re.compile(r"libpod-(?:conmon-)?([0-9a-f]{12,})\.scope"), "podman"),
    (re.compile(r"machine-([^/]+)\.scope"), "machine"),
    (re.compile(r"kubepods[^/]*/(?:[^/]*/)?[^/]*pod([0-9a-f_\-]{36})"), "k8s-pod"),
)


def parse_cgroup(text: str) -> tuple[str | None, list[str]]:
    """The systemd unit and container labels one /proc/PID/cgroup names."""
    unit: str | None = None
    containers: list[str] = []
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        for part in reversed(path.split("/")):
            if part.endswith((".service", ".scope")) and unit is None:
                unit = part
                break
        for pattern, kind in _CONTAINER_PATTERNS:
            m = pattern.search(path)
            if m:
                ident = m.group(1)
                if kind == "k8s-pod":
                    ident = ident.replace("_", "-")  # the systemd cgroup driver's spelling of the pod UID
                elif kind != "machine":
                    ident = ident[:12]  # container ids as `docker ps` / `crictl ps` show them
                label = f"{kind}:{ident}"
                if label not in containers:
                    containers.append(label)
    return unit, containers


def labels_of(proc_root: str | Path, pid: int) -> tuple[str | None, str | None]:
    """(unit, first container label) for a process; (None, None) when unreadable."""
    try:
        text = (Path(proc_root) / str(pid) / "cgroup").read_text()
    except OSError:
        return None, None
    unit, containers = parse_cgroup(text)
    return unit, (containers[0] if containers else None)
