"""The shipped Prometheus alert rules, checked and unit-tested by promtool itself."""

import shutil
import subprocess

import pytest

from helpers.paths import REPO

HERE = REPO / "contrib" / "prometheus"

pytestmark = pytest.mark.skipif(shutil.which("promtool") is None,
                                reason="promtool not installed (Debian package prometheus; scripts/bootstrap installs it)")


def test_rules_are_valid() -> None:
    res = subprocess.run(["promtool", "check", "rules", "ctguard-alerts.yml"], cwd=HERE, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_rules_unit_tests_pass() -> None:
    res = subprocess.run(["promtool", "test", "rules", "ctguard-alerts.test.yml"], cwd=HERE, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_alerts_only_use_metrics_ctguard_writes() -> None:
    import re

    from ctguard.core.model import History, Instant, KernelLimits, NamespaceReading, Sample
    from ctguard.daemon import metrics

    sample = Sample(Instant(1.0, 1.0, "b"), KernelLimits(8192, 2048, 256, 1 << 30, 1 << 29),
                    (NamespaceReading(1, "host", 1, (("drop", 0),)),))
    written = set(re.findall(r"^(ctguard_[a-z_]+)", metrics.render(sample, History(), 65536, 6, 65536), re.M))
    used = set(re.findall(r"ctguard_[a-z_]+", (HERE / "ctguard-alerts.yml").read_text()))
    assert used <= written, used - written
