"""A process's unit and container labels, from a prepared /proc/<pid>/cgroup."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.mark.parametrize(
    "cgroup, unit, container",
    [
        ("0::/system.slice/docker-3f2a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8.scope\n",
         "docker-3f2a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8.scope", "docker:3f2a1b2c3d4e"),
        ("0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1b2c3d4e_5f60_7182_93a4_b5c6d7e8f90a.slice/"
         "cri-containerd-aabbccddeeff00112233.scope\n", "cri-containerd-aabbccddeeff00112233.scope",
         "containerd:aabbccddeeff"),
        ("0::/system.slice/nginx.service\n", "nginx.service", None),
        ("0::/\n", None, None),
    ],
)
def test_cgroup_labels(tmp_path: Path, cgroup: str, unit, container) -> None:
    from ctguard.host.cgroups import labels_of

    (tmp_path / "42").mkdir()
    (tmp_path / "42/cgroup").write_text(cgroup)
    assert labels_of(tmp_path, 42) == (unit, container)
    assert labels_of(tmp_path, 43) == (None, None)
