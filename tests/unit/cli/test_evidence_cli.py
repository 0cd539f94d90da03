"""`ctguard capture` and `ctguard bundles ...` through the argparse wiring the main CLI uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.bundles_cli import policy, run


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


