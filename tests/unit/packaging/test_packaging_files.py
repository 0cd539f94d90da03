"""The packaged files agree with the code: fast, no root, no kernel.

The default policy (/etc/ctguard/policy.toml) sets every key the policy loader knows, each to
its built-in default, so an operator reading it sees the whole policy; ctguard-policy(5)
documents every key; the unit starts what the package installs.
"""

from __future__ import annotations

import configparser
import re
import tomllib

from ctguard.config import policy as policy_mod
from helpers.paths import REPO

DEFAULT_POLICY = REPO / "etc" / "ctguard" / "policy.toml"
POLICY_MAN = REPO / "man" / "ctguard-policy.5"
UNIT = REPO / "systemd" / "ctguard.service"


def _known_keys() -> dict[str, list[str]]:
    """{"": top-level keys, section: keys}: every key the policy loader accepts."""
    return policy_mod.known_keys()


def test_default_policy_sets_every_key_to_its_default() -> None:
    data = tomllib.loads(DEFAULT_POLICY.read_text())
    for section, names in _known_keys().items():
        table = data if section == "" else data.get(section, {})
        missing = [n for n in names if n not in table]
        assert not missing, f"{DEFAULT_POLICY}: [{section or 'top level'}] lacks {missing}"
    loaded = policy_mod.load(DEFAULT_POLICY)
    assert loaded == policy_mod.Policy(source=loaded.source), "the default policy differs from the built-in defaults"


def test_every_key_is_commented_in_the_default_policy() -> None:
    lines = DEFAULT_POLICY.read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^[a-z_]+\s*=", line):
            assert i > 0 and lines[i - 1].startswith("#"), f"{DEFAULT_POLICY}:{i + 1}: {line!r} has no comment above it"


def test_man_page_documents_every_key() -> None:
    text = POLICY_MAN.read_text()
    for section, names in _known_keys().items():
        if section:
            assert f".SH [{section}]" in text, f"{POLICY_MAN} has no [{section}] section"
        for name in names:
            assert re.search(rf"^\.BR {re.escape(name)} ", text, re.M), f"{POLICY_MAN} does not document {name}"


def test_unit_runs_the_installed_policy() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment, method-assign]
    unit.read_string(UNIT.read_text())
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["ExecStart"].split() == ["/usr/bin/ctguard", "run", "--policy", "/etc/ctguard/policy.toml"]
    assert "78" in service["RestartPreventExitStatus"].split()
    install = (REPO / "debian" / "ctguard.install").read_text()
    assert "etc/ctguard/policy.toml etc/ctguard/" in install
    # dh_installsystemd installs the unit (see debian/rules): never a path in ctguard.install.
    assert "ctguard.service" not in install, "install the unit through debian/ctguard.service"
    link = REPO / "debian" / "ctguard.service"
    assert link.is_symlink() and link.resolve() == UNIT.resolve(), f"{link} must link to {UNIT}"
