"""ctguard capture / bundles against a real namespace."""

from __future__ import annotations

import io
import json
import tomllib
from pathlib import Path

import pytest

from helpers.bundles_cli import parser, policy, run
from helpers.kernelenv import needs_kernel, netns_pair


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
