"""Every bundle captured on this host says what the host is (root: dumps the real conntrack table)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def test_every_bundle_says_what_the_host_is(tmp_policy: Path) -> None:
    import tomllib

    from helpers.daemon import ctguard

    if os.geteuid() != 0:
        pytest.skip("needs root to dump the conntrack table")
    policy = tmp_policy
    res = ctguard("capture", "--reason", "role", "--policy", str(policy))
    assert res.returncode == 0, res.stderr
    bundle = Path(res.stdout.strip().splitlines()[-1])
    ev = tomllib.loads((bundle / "evidence.toml").read_text())
    assert ev["host"]["role"] in ("server", "router", "NAT gateway", "container host", "Kubernetes node")
    assert "raised_timeouts" in ev["host"]
    shown = ctguard("bundles", "show", bundle.name, "--policy", str(policy))
    # Issue 24: the role is said once, per namespace ("Role: NAME is a ROLE: it forwards; NAT: ...").
    assert "Role: " in shown.stdout and ev["host"]["role"] in shown.stdout, shown.stdout
