"""Issue 24: `bundles list` shows which bundles belong to which incident, and which were taken
while it was still open."""

from __future__ import annotations

import json
from pathlib import Path

import tomli_w

from ctguard.cli.main import main
from ctguard.evidence.bundle import list_bundles


def write(folder: Path, name: str, incident: dict | None) -> None:
    path = folder / name
    path.mkdir(parents=True, mode=0o700)
    manifest = {"id": name, "created": "2026-01-01T00:00:00Z", "reason": name.split("-", 1)[1],
                "netns": {"path": "/run/netns/gw", "inode": 7}, "seconds": 0.5, "collectors": {}}
    if incident is not None:
        manifest["incident"] = incident
    (path / "manifest.toml").write_text(tomli_w.dumps(manifest))


def test_list_names_each_bundles_incident(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "bundles"
    write(folder, "20260101T000000Z-bump", {"id": "incident-1000", "started": 1000.0})
    write(folder, "20260101T000010Z-drops-began", {"id": "incident-1000", "started": 1000.0})
    write(folder, "20260101T000100Z-incident-end", {"id": "incident-1000", "started": 1000.0, "ended": 1090.0})
    write(folder, "20260101T000200Z-manual", None)
    found = {b.id: (b.incident, b.incident_open) for b in list_bundles(folder)}
    assert found == {"20260101T000000Z-bump": ("incident-1000", True),
                     "20260101T000010Z-drops-began": ("incident-1000", True),
                     "20260101T000100Z-incident-end": ("incident-1000", False),
                     "20260101T000200Z-manual": ("", False)}
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[evidence]\ndir = "{folder}"\n[state]\ndir = "{tmp_path}/state"\n')
    assert main(["--policy", str(policy), "bundles", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("drops-began" in l and "incident-1000 (still open when taken)" in l for l in lines), lines
    assert any("incident-end" in l and "incident-1000" in l and "still open" not in l for l in lines), lines
    assert main(["--policy", str(policy), "bundles", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [b["incident"] for b in listed] == ["incident-1000"] * 3 + [""]
