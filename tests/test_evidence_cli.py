"""`ctguard capture` and `ctguard bundles ...` through the argparse wiring the main CLI uses."""

from __future__ import annotations

import argparse
import io
import json
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from kernelenv import needs_kernel, netns_pair

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


def test_bundles_commands_refuse_escapes_and_say_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pol = policy(tmp_path)
    assert run(["bundles", "list"], pol, capsys)[1].startswith("no bundles in")
    assert json.loads(run(["bundles", "list", "--json"], pol, capsys)[1]) == []
    code, _out, err = run(["bundles", "show", "../../etc"], pol, capsys)
    assert code == 1 and "refusing bundle id" in err
    code, _out, err = run(["bundles", "export", "20250101T000000Z-x"], pol, capsys)
    assert code == 1 and "ctguard bundles list" in err


def test_capture_rejects_a_bad_decision_file_and_unknown_netns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "d.json"
    bad.write_text("[1, 2]")
    code, _o, err = run(["capture", "--decision-file", str(bad)], policy(tmp_path), capsys)
    assert code == 1 and "JSON object" in err
    code, _o, err = run(["capture", "--netns", "ctg-no-such-namespace"], policy(tmp_path), capsys)
    assert code == 1 and "ip netns list" in err


@needs_kernel
def test_capture_list_show_export(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    pol = policy(tmp_path)
    pol_file = tmp_path / "policy.toml"
    pol_file.write_text("[evidence]\ntop = 5\n")
    decision = tmp_path / "decision.json"
    decision.write_text(json.dumps({"action": "bump", "old_max": 65536, "new_max": 131072}))
    with netns_pair(prefix="ctgc") as pair:
        code, out, err = run(["--policy", str(pol_file), "capture", "--netns", pair.receiver, "--reason", "after bump",
                              "--decision-file", str(decision)], pol, capsys)
        assert code == 0, err
        inode = pair.receiver_inode
    path = Path(out.strip())
    assert path.parent == pol.evidence.dir and path.name.endswith("-after-bump")
    manifest = tomllib.loads((path / "manifest.toml").read_text())
    assert manifest["netns"]["inode"] == inode
    assert manifest["decision"] == {"action": "bump", "old_max": 65536, "new_max": 131072}
    assert (path / "policy.toml").read_text() == "[evidence]\ntop = 5\n"
    listed = json.loads(run(["bundles", "list", "--json"], pol, capsys)[1])
    assert [b["id"] for b in listed] == [path.name] and listed[0]["complete"]
    listing = run(["bundles", "list"], pol, capsys)[1]
    assert path.name in listing
    assert listing.splitlines()[0].split()[1:6] == ["SIZE", "(KiB)", "TOOK", "(s)", "NOTES"], "columns carry units"
    kib = float(listing.splitlines()[1].split()[1])
    assert kib == round(listed[0]["bytes"] / 1024, 1)
    code, out, _ = run(["bundles", "show", path.name], pol, capsys)
    assert code == 0 and "new_max = 131072" in out and "NAT:" in out
    code, out, _ = run(["bundles", "export", path.name, "-o", str(tmp_path)], pol, capsys)
    assert code == 0 and Path(out.strip()) == tmp_path / f"{path.name}.tar.gz"


@needs_kernel
def test_progress_goes_to_a_terminal_only(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    fake = Tty()
    monkeypatch.setattr("sys.stderr", fake)
    args = parser().parse_args(["capture", "--reason", "tty"])
    assert args.func(args, policy(tmp_path)) == 0
    assert "dumping the conntrack table" in fake.getvalue() and "bundle written" in fake.getvalue()
