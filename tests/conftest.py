"""The tiers, and what every test may ask for by name.

tests/unit/<package>/  pure: no root, no kernel, no journald; `pytest -m "not kernel and not system"`
tests/kernel/          marked `kernel` here: root, the real nf_conntrack, namespaces, journald, real daemons
tests/system/          marked `system` here: booted Debian 12 and 13 roots, dpkg, piuparts
tests/helpers/         the shared helpers (`helpers.kernelenv`, `helpers.daemon`, ...), no tests

This checkout's src/ comes first on sys.path (before an installed ctguard) and tests/ next, so
`pytest` works from a plain checkout and the helpers import as `helpers.<module>`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

from helpers.journald import journald  # noqa: E402,F401  (the session fixture, for every test)
from helpers.policy import write_policy  # noqa: E402

TIERS = {"kernel": HERE / "kernel", "system": HERE / "system"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test by its folder: `kernel` under tests/kernel, `system` under tests/system."""
    for item in items:
        path = Path(str(item.path)).resolve()
        for marker, folder in TIERS.items():
            if folder in path.parents:
                item.add_marker(marker)


@pytest.fixture
def tmp_policy(tmp_path: Path) -> Path:
    """A policy whose every path (state, bundles, sysctl.d, modprobe.d, metrics, socket) is under tmp_path."""
    return write_policy(tmp_path)


@pytest.fixture
def kernel_values() -> Iterator[None]:
    """The shared kernel lock held, nf_conntrack_max and hashsize restored afterwards."""
    from helpers.kernelenv import saved_kernel_values   # imported here: kernelenv probes the kernel on import

    with saved_kernel_values():
        yield
