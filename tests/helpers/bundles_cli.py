"""`ctguard capture` and `ctguard bundles ...` through the argparse wiring the main CLI uses, in
this process, with a stand-in policy that holds only the [evidence] table."""

from __future__ import annotations

import argparse
from pathlib import Path
from types import SimpleNamespace

import pytest

from ctguard.cli import bundles as cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ctguard")
    p.add_argument("--policy", default="/nonexistent/policy.toml")
    cli.add_commands(p.add_subparsers(dest="command", required=True))
    return p


def run(argv: list[str], policy: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    args = parser().parse_args(argv)
    code = args.func(args, policy)
    out, err = capsys.readouterr()
    return code, out, err


def policy(tmp_path: Path, budget: float = 10.0) -> SimpleNamespace:
    # A control socket of its own: the host's /run/ctguard/control.sock may be a running daemon's
    # (the autopkgtest testbed runs the installed service), refused to a user who is not root.
    return SimpleNamespace(evidence=SimpleNamespace(dir=tmp_path / "bundles", keep=10, max_bytes=1 << 30, top=5, budget=budget),
                           control=SimpleNamespace(socket=tmp_path / "no-daemon.sock"))
