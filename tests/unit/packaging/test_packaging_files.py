"""The packaged files agree with the code: fast, no root, no kernel.

The default policy (/etc/ctguard/policy.toml) shows every key the policy loader knows, each
commented out with its built-in default, so an operator reading it sees the whole policy and
the file sets nothing; ctguard-policy(5)
documents every key; the unit starts what the package installs.
"""

from __future__ import annotations

import configparser
import subprocess
import re
import tomllib
from pathlib import Path

from ctguard.config import policy as policy_mod
from helpers.paths import REPO

DEFAULT_POLICY = REPO / "etc" / "ctguard" / "policy.toml"
POLICY_MAN = REPO / "man" / "ctguard-policy.5"
UNIT = REPO / "systemd" / "ctguard.service"


def _known_keys() -> dict[str, list[str]]:
    """{"": top-level keys, section: keys}: every key the policy loader accepts."""
    return policy_mod.known_keys()


def _commented_defaults() -> tuple[dict, list[tuple[int, str]]]:
    """The shipped policy with its commented-out `#key = value` lines uncommented, and those lines."""
    lines = DEFAULT_POLICY.read_text().splitlines()
    keys = [(i, line) for i, line in enumerate(lines) if re.match(r"^#[a-z_]+ = ", line)]
    for i, line in keys:
        lines[i] = line[1:]
    return tomllib.loads("\n".join(lines) + "\n"), keys


def test_default_policy_sets_nothing_and_shows_every_key_with_its_default(tmp_path: Path) -> None:
    """Issue 25: the conffile documents every key with its default commented out, so an operator who
    changes one key does not freeze every other default at this version."""
    assert not any(re.match(r"^[a-z_]+\s*=", line) for line in DEFAULT_POLICY.read_text().splitlines()), \
        f"{DEFAULT_POLICY} sets a key: ship every key commented out (#key = default)"
    loaded = policy_mod.load(DEFAULT_POLICY)
    assert loaded == policy_mod.Policy(source=loaded.source), "the shipped policy must be the built-in defaults"
    data, _ = _commented_defaults()
    for section, names in _known_keys().items():
        table = data
        for part in section.split(".") if section else []:
            table = table.get(part, {})
        missing = [n for n in names if n not in table]
        assert not missing, f"{DEFAULT_POLICY}: [{section or 'top level'}] does not show {missing}"
    # Uncommented, every shown value is the built-in default.
    whole = tmp_path / "policy.toml"
    whole.write_text("\n".join(line[1:] if re.match(r"^#[a-z_]+ = ", line) else line
                               for line in DEFAULT_POLICY.read_text().splitlines()) + "\n")
    uncommented = policy_mod.load(whole)
    assert uncommented == policy_mod.Policy(source=uncommented.source), "a shown value differs from the default"


def test_every_key_is_explained_in_the_default_policy() -> None:
    lines = DEFAULT_POLICY.read_text().splitlines()
    for i, line in _commented_defaults()[1]:
        assert i > 0 and lines[i - 1].startswith("#"), f"{DEFAULT_POLICY}:{i + 1}: {line!r} has no comment above it"
        assert not re.match(r"^#[a-z_]+ = ", lines[i - 1]) or line.split()[0] != lines[i - 1].split()[0]


def test_policy_d_is_shipped_with_a_readme() -> None:
    install = (REPO / "debian" / "ctguard.install").read_text()
    assert "etc/ctguard/policy.d/README etc/ctguard/policy.d/" in install
    assert "*.toml" in (REPO / "etc" / "ctguard" / "policy.d" / "README").read_text()


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


COMPLETION = REPO / "contrib" / "bash-completion" / "ctguard"


def _parser_commands() -> dict[str, set[str]]:
    """{"status": {"--policy", "--json"}, "bundles show": {...}, ...}: every (sub)command's options."""
    import argparse

    from ctguard.cli import main as cli

    found: dict[str, set[str]] = {}

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    key = f"{prefix} {name}".strip()
                    found[key] = {s for a in child._actions for s in a.option_strings if s not in ("-h", "--help")}
                    walk(child, key)

    walk(cli.build_parser(), "")
    return found


def test_bash_completion_offers_every_command_and_option() -> None:
    text = COMPLETION.read_text()
    subprocess.run(["bash", "-n", str(COMPLETION)], check=True)
    offered = {m.group(1): set(m.group(2).split()) for m in re.finditer(r'^\s*\[([a-z -]+)\]="([^"]*)"', text, re.M)}
    commands = set(re.search(r'local commands="([^"]*)"', text).group(1).split())
    parser = _parser_commands()
    assert commands == {k for k in parser if " " not in k}, (commands, sorted(parser))
    assert offered == parser, {k: (offered.get(k), parser.get(k)) for k in set(offered) | set(parser)
                               if offered.get(k) != parser.get(k)}
    install = (REPO / "debian" / "ctguard.install").read_text()
    assert "contrib/bash-completion/ctguard usr/share/bash-completion/completions/" in install


def test_release_builds_sort_by_release() -> None:
    """Issue 25: the Debian 12 build's version sorts below the 13 build's (the system test builds each
    with a changelog entry <version>+deb<N>u1), and both above the plain upstream version."""
    import shutil

    import pytest

    if shutil.which("dpkg") is None:
        pytest.skip("needs dpkg")
    version = re.match(r"^ctguard \(([^)]+)\)", (REPO / "debian" / "changelog").read_text()).group(1)
    ordered = [version, f"{version}+deb12u1", f"{version}+deb13u1", f"{version}+deb13u1+systemtest1"]
    for lower, higher in zip(ordered, ordered[1:]):
        assert subprocess.run(["dpkg", "--compare-versions", lower, "lt", higher]).returncode == 0, (lower, higher)
