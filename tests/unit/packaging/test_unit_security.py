"""The unit's exposure as systemd itself scores it: `systemd-analyze security --offline=yes`.

ctguard runs as root with CAP_SYS_ADMIN, so every sandboxing option it can take matters. The
score must stay at or below MAX_EXPOSURE on the systemd this runs on; the booted system test
(tests/system/test_debian_package.py) scores the installed unit with Debian 12's systemd 252
and Debian 13's 257 as well. Different systemd versions weigh options differently (252 counts
PrivateMounts= unless it is set explicitly), hence one test per machine, not a fixed number.
No root needed: offline mode reads the file and nothing of the running system.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

from helpers.paths import REPO

UNIT = REPO / "systemd" / "ctguard.service"
MAX_EXPOSURE = 3.0
SCORE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")


def exposure(output: str) -> float:
    match = SCORE.search(output)
    assert match, f"no overall exposure level in:\n{output}"
    return float(match.group(1))


def flagged(output: str) -> list[str]:
    """The options systemd-analyze holds against the unit (lines marked ✗), for the message."""
    return [" ".join(line.split()) for line in output.splitlines() if line.startswith("✗")]


def _offline_supported() -> str | None:
    if shutil.which("systemd-analyze") is None:
        return "needs systemd-analyze (apt-get install systemd)"
    help_text = subprocess.run(["systemd-analyze", "--help"], capture_output=True, text=True).stdout
    if "--offline" not in help_text:
        return "needs systemd >= 250 for systemd-analyze security --offline"
    return None


def test_exposure_parser() -> None:
    out = "✗ PrivateNetwork=   Service has access to the host's network   0.5\n\n" \
          "→ Overall exposure level for ctguard.service: 2.6 OK 🙂\n"
    assert exposure(out) == 2.6
    assert flagged(out) == ["✗ PrivateNetwork= Service has access to the host's network 0.5"]


@pytest.mark.skipif(_offline_supported() is not None, reason=str(_offline_supported()))
def test_unit_exposure_is_at_most_3() -> None:
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)],
                          capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 and not SCORE.search(output):
        # A chroot without systemd's runtime folders (a package build as a user) cannot score.
        pytest.skip(f"systemd-analyze cannot run here: {output.strip().splitlines()[-1] if output.strip() else proc.returncode}")
    score = exposure(output)
    assert score <= MAX_EXPOSURE, (
        f"{UNIT}: exposure {score} > {MAX_EXPOSURE}; flagged:\n" + "\n".join(flagged(output)))
