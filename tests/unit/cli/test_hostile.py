"""Hostile neighbours: a local non-root user must get no lever on ctguard (it runs as root)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from helpers.daemon import SRC, ctguard

SOURCE = Path(SRC) / "ctguard"


def test_no_subprocess_goes_through_a_shell() -> None:
    offenders = []
    for path in SOURCE.rglob("*.py"):
        text = path.read_text()
        for pattern in (r"shell\s*=\s*True", r"\bos\.system\(", r"\bos\.popen\(", r"subprocess\.getoutput",
                        r"subprocess\.getstatusoutput"):
            for m in re.finditer(pattern, text):
                offenders.append(f"{path.relative_to(SOURCE)}:{text[:m.start()].count(chr(10)) + 1}: {m.group()}")
    assert offenders == []


def test_numbers_beyond_the_kernels_range_are_refused_before_the_kernel(tmp_policy: Path) -> None:
    policy = tmp_policy
    for value in ("4294967296", "2147483648", "-1", "0", "1e9", "0x1000"):
        res = ctguard("bump", "--to", value, "--policy", str(policy))
        assert res.returncode == 2, (value, res.stderr)
        assert "--to" in res.stderr


@pytest.mark.parametrize("spec", ["../../etc", "/etc/passwd", "..", ".hidden", "a/b", "99999999999999999999"])
def test_netns_values_cannot_leave_run_netns(spec: str) -> None:
    from ctguard.host.netns import NetnsError, resolve

    with pytest.raises(NetnsError):
        resolve(spec)


