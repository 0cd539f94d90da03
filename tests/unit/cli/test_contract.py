"""docs/contract.md is complete and true: every command, option, policy key and metric the code
knows is documented there, and nothing in the repository points at a document it does not hold.

When one of these fails after you added a key, a metric or a flag, its message says exactly
what to add and where.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tomllib
from pathlib import Path

from ctguard.cli.main import build_parser
from ctguard.config import policy as policy_mod
from ctguard.core.model import BumpRecord, History, Instant, KernelLimits, NamespaceReading, Sample
from ctguard.daemon import metrics
from helpers.contract import CONTRACT, documented_metrics, section
from helpers.paths import REPO

ROOT = REPO
SRC = Path(__import__("ctguard").__file__).resolve().parent     # the checkout's src/ctguard, or the installed package (autopkgtest)

# Strings that look like metric names but are not metrics: name them here, with why.
NOT_METRICS: set[str] = {
    "ctguard_suggested", "ctguard_notrack",   # nftables table names in the rules diagnose.py suggests
}


def rendered() -> str:
    at = Instant(1000.0, 1000.0, "b")
    sample = Sample(at, KernelLimits(8192, 2048, 256, 1 << 30, 1 << 29),
                    (NamespaceReading(1, "host", 1, (("drop", 0),), "u.service", "docker:1"),))
    history = History(bumps=(BumpRecord(at, 4096, 8192, "fill"),), bumps_total=1, refusals=(("ceiling", 1),))
    return metrics.render(sample, history, 65536, 6, 65536, slab_bytes=1)


def written_metrics() -> dict[str, str]:
    """{metric: where it is written}: whatever render() writes, plus every `ctguard_...` name in
    the source (a metric written by another module, or only in some states, counts too)."""
    found = {name: "src/ctguard/daemon/metrics.py" for name in re.findall(r"^# TYPE (\S+) ", rendered(), re.M)}
    for path in sorted(SRC.rglob("*.py")):
        for name in re.findall(r"\bctguard_[a-z][a-z0-9_]*\b", path.read_text()):
            if name not in NOT_METRICS:
                found.setdefault(name, f"src/ctguard/{path.relative_to(SRC)}")
    return found


def test_every_metric_the_code_writes_is_documented() -> None:
    docs = documented_metrics()
    missing = {n: w for n, w in written_metrics().items() if n not in docs}
    assert not missing, (
        f"{CONTRACT.relative_to(ROOT)} does not document these metrics; add one row per metric to the table "
        f"under '## Metrics' (and the name to the METRICS section of man/ctguard.8):\n"
        + "\n".join(f"  | `{n}` | {'counter' if n.endswith('_total') else 'gauge'} | <labels> | <what it measures> |"
                    f"      (written in {w})" for n, w in sorted(missing.items())))


def test_every_documented_metric_is_written_with_the_documented_type() -> None:
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", rendered(), re.M))
    written = written_metrics()
    for name, kind in documented_metrics().items():
        assert name in written, (f"{CONTRACT.relative_to(ROOT)} documents {name} under '## Metrics' but no code "
                                 f"writes it: remove its row, or write it")
        if name in types:
            assert types[name] == kind, (f"{CONTRACT.relative_to(ROOT)}: {name} is documented as a {kind} but "
                                         f"written as a {types[name]}: fix the row under '## Metrics'")
        assert (kind == "counter") == name.endswith("_total"), f"{name}: counters, and only counters, end in _total"


# -- policy keys ----------------------------------------------------------------------------

def documented_policy() -> dict:
    m = re.search(r"```toml\n(.*?)```", section("Policy"), re.S)
    assert m, f"{CONTRACT} has no ```toml block under '## Policy'"
    return tomllib.loads(m.group(1))


def _toml_line(key: str, value) -> str:
    return f"{key} = {policy_mod._toml_value(value)}"


def test_every_policy_key_the_loader_accepts_is_documented_with_its_default() -> None:
    doc = documented_policy()
    defaults = policy_mod.Policy()
    where = f"the ```toml block under '## Policy' in {CONTRACT.relative_to(ROOT)}"
    missing, wrong = [], []
    for sec, keys in policy_mod.known_keys().items():
        table = doc if sec == "" else doc.get(sec, {})
        owner = defaults if sec == "" else getattr(defaults, sec)
        for key in keys:
            default = getattr(owner, key)
            line = f"{_toml_line(key, default)}   # <what it does>"
            head = "at the top (before any [section])" if sec == "" else f"under [{sec}]"
            if key not in table:
                missing.append(f"  {head}: {line}")
            else:
                value = table[key]
                if isinstance(default, Path):
                    default = str(default)
                if isinstance(default, tuple) and all(isinstance(x, tuple) and len(x) == 2 for x in default):
                    default = dict(default)     # a table of its own ([relief.timeouts])
                elif isinstance(default, tuple):
                    default = list(default)     # a TOML list ([relief] enforce)
                if value != default or type(value) is bool and type(default) is not bool:
                    wrong.append(f"  [{sec or 'top level'}] {key} = {value!r} there, but the default is "
                                 f"{_toml_line(key, default)}")
    assert not missing, f"{where} lacks these keys the policy loader accepts; add:\n" + "\n".join(missing)
    assert not wrong, f"{where} shows values that are not the defaults; fix:\n" + "\n".join(wrong)
    # And nothing there that the loader refuses (a key renamed or removed in the code).
    try:
        policy_mod.from_mapping(doc, where)
    except policy_mod.PolicyError as exc:
        raise AssertionError(f"{where} holds keys the loader refuses; remove or rename them:\n{exc}") from None


# -- command line ---------------------------------------------------------------------------

def commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, list[str]]:
    """{"bundles list": ["--json"], ...}: every (sub)command and its options (not --policy/--help)."""
    out: dict[str, list[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                path = f"{prefix}{name}"
                opts = [s for a in sub._actions for s in a.option_strings
                        if s not in ("-h", "--help", "--policy")]
                nested = commands(sub, path + " ")
                if nested:
                    out.update(nested)
                else:
                    out[path] = opts
    return out


def test_every_command_and_option_is_in_the_command_line_table() -> None:
    rows = [line for line in section("Command line").splitlines() if line.startswith("|")]
    problems = []
    for command, options in commands(build_parser()).items():
        mine = [r for r in rows if re.search(rf"`(ctguard )?{re.escape(command)}\b", r)]
        if not mine:
            problems.append(f"  add a row: | `ctguard {command} {' '.join(f'[{o} ...]' for o in options)}` | <what it does> |")
            continue
        for option in options:
            if not any(option in r for r in mine):
                problems.append(f"  add `{option}` to the row of `ctguard {command}` (and what it does)")
    assert not problems, (f"the table under '## Command line' in {CONTRACT.relative_to(ROOT)} is incomplete "
                          f"(also add them to README.md's Commands and man/ctguard.8):\n" + "\n".join(problems))


# -- nothing points outside the repository ----------------------------------------------------

def tracked_text_files() -> list[Path]:
    try:
        git = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True)
    except FileNotFoundError:     # no git at all (a package build)
        git = subprocess.CompletedProcess([], 127, "", "")
    if git.returncode == 0:
        names = git.stdout.split()
    else:
        # No git checkout (the package build's unpacked source, another user's tree): every file but
        # what a build or a test run leaves behind.
        skip = {".git", "__pycache__", ".pytest_cache", ".hypothesis", ".pybuild", "build", "dist", ".venv"}
        names = []
        for dirpath, dirnames, filenames in os.walk(ROOT):
            dirnames[:] = [d for d in dirnames if d not in skip and not d.endswith(".egg-info")
                           and not (Path(dirpath) == ROOT / "debian" and d not in ("source", "tests"))]
            names += [os.path.relpath(os.path.join(dirpath, f), ROOT) for f in filenames]
    out = []
    for n in names:
        p = ROOT / n
        if p.suffix in (".md", ".py", ".toml", ".yml", ".json", ".5", ".8", ".service", ".sh", "") and p.is_file():
            out.append(p)
    return out


def test_every_local_link_in_the_docs_resolves() -> None:
    broken = []
    for path in tracked_text_files():
        if path.suffix != ".md":
            continue
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if re.match(r"[a-z]+:", target):
                continue   # a URL
            if not (path.parent / target).exists():
                broken.append(f"  {path.relative_to(ROOT)} links to {target}, which is not in the repository")
    assert not broken, "fix or remove these links:\n" + "\n".join(broken)


def test_the_readme_links_the_contract_and_nothing_names_a_spec_the_repository_lacks() -> None:
    assert "](docs/contract.md)" in (ROOT / "README.md").read_text()
    gone = "SPEC" + ".md"     # the first draft's file, never in the repository
    named = [str(p.relative_to(ROOT)) for p in tracked_text_files()
             if p.name != Path(__file__).name and gone in p.read_text(errors="replace")]
    assert not named, f"these files send readers to {gone}, which is not in the repository; point them at docs/contract.md: {named}"
