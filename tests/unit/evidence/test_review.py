"""`bundles show` (text, terminal, --json), `bundles report` (HTML in a real chromium) and
`bundles export --redact`, over a bundle folder shaped as a real capture writes it."""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path

import pytest

from ctguard.cli.main import main
from ctguard.evidence.bundle import export
from ctguard.evidence.report import report
from ctguard.evidence.review import show, show_json
from helpers.browser import chromium, load_page, png_size_and_colours
from helpers.paths import REPO
from helpers.policy import write_policy
from helpers.reviewdata import ADDRESSES, SOURCE, write_bundle

NAME = "20260101T000000Z-bump"


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    write_bundle(tmp_path / "bundles", NAME)
    write_bundle(tmp_path / "bundles", "20260101T000100Z-manual", with_timeline=False)
    return tmp_path / "bundles"


def test_show_leads_with_the_verdict_and_findings(folder: Path) -> None:
    text = show(folder, NAME)
    order = [text.index(h) for h in ("Verdict:", "Findings:", "Timeline", "Details:")]
    assert order == sorted(order)
    verdict = " ".join(text[text.index("Verdict:"):text.index("Findings:")].split())
    assert "UDP (97%) filled ctgt-rx (flood.service)" in verdict
    # fills against the max of the moment: 88% of 8,192 at the peak, and full at the old 4,096
    assert "7,190 entries at its peak, 88% of the max of 8,192 in force then" in verdict
    assert "100% of the max of 4,096 in force at" in verdict
    assert "raised nf_conntrack_max 4,096 -> 8,192" in verdict and "refused 1 time(s) (ceiling)" in verdict
    assert "dropped" in verdict
    findings = text[text.index("Findings:"):text.index("Timeline")]
    for fid in ("kernel-drops", "udp-timeout-raised", "top-source-dominant", "max-near-cap"):
        assert fid in findings
    assert f"ip saddr {SOURCE} ct count over" in findings
    # The decision reads as sentences, not a dict.
    assert "ctguard raised nf_conntrack_max from 4,096 to 8,192 (trigger: fill)" in text
    assert "{" not in text.split("Details:")[1]


def test_show_collapses_top_lists_without_a_dominant_entry(folder: Path) -> None:
    text = show(folder, NAME)
    assert "Top destination ports: no dominant entry (4096+ distinct" in text
    assert "±14" not in text                            # no noise rows


def test_show_on_a_terminal_draws_sparklines_with_markers(folder: Path) -> None:
    text = show(folder, NAME, tty=True)
    line = next(l for l in text.splitlines() if l.strip().startswith("ctgt-rx") and "largest" in l)
    assert any(c in line for c in "▁▂▃▄▅▆▇█")
    marks = text.splitlines()[text.splitlines().index(line) + 1]
    assert "B" in marks and "R" in marks and "K" in marks
    plain = show(folder, NAME, tty=False)
    assert not any(c in plain for c in "▁▂▃▄▅▆▇█")


def test_show_without_a_timeline_says_why(folder: Path) -> None:
    text = show(folder, "20260101T000100Z-manual")
    assert "Timeline: no timeline: no ctguard daemon answered" in text


def test_show_json_has_the_same_content(folder: Path) -> None:
    data = json.loads(show_json(folder, NAME))
    assert isinstance(data["verdict"], str) and data["verdict"] in show(folder, NAME).replace("\n  ", " ")
    assert data["findings"] and {"id", "severity", "summary", "evidence", "action"} <= set(data["findings"][0])
    assert data["findings"][0]["severity"] == "critical"
    assert data["timeline"]["namespaces"][1]["name"] == "ctgt-rx"
    none = json.loads(show_json(folder, "20260101T000100Z-manual"))
    assert "no ctguard daemon answered" in none["timeline"]["note"]


def test_cli_show_json_report_and_redacted_export(folder: Path, tmp_path: Path, capsys) -> None:
    pol = write_policy(tmp_path, persist_mode=None, evidence_dir=folder, metrics=False, control=False)
    assert main(["--policy", str(pol), "bundles", "show", NAME, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"]
    out = tmp_path / "r.html"
    assert main(["--policy", str(pol), "bundles", "report", NAME, "-o", str(out)]) == 0
    assert out.stat().st_mode & 0o777 == 0o600 and "<svg" in out.read_text()
    capsys.readouterr()
    assert main(["--policy", str(pol), "bundles", "export", NAME, "--redact", "-o", str(tmp_path)]) == 0
    archive = Path(capsys.readouterr().out.strip())
    assert archive.name == f"{NAME}-redacted.tar.gz"


def test_report_is_self_contained(folder: Path) -> None:
    text = report(folder, NAME)
    # issue 24: the report leads with the story and its chart (fill against max), then the findings
    assert text.index("Verdict") < text.index("<svg") < text.index("Findings")
    assert "<script" not in text.lower()
    # No fetch of any kind: no src/href attributes, no CSS url() or @import; the only URL is
    # the SVG namespace name, which is an identifier, not a fetch.
    assert not re.search(r"\b(src|href)\s*=", text, re.I)
    assert "url(" not in text and "@import" not in text
    assert set(re.findall(r"https?://[^\s\"'<>]+", text)) <= {"http://www.w3.org/2000/svg"}
    assert text.count("<svg") >= 5                    # fill, fill ratio, drops, protocols, talkers
    assert "Top destination ports" in text and "no dominant entry" in text
    assert "ceiling 65,536" in text and "nf_conntrack_max" in text
    assert "<polyline" in text


def test_report_escapes_what_the_bundle_says(tmp_path: Path) -> None:
    path = write_bundle(tmp_path, NAME)
    m = (path / "manifest.toml").read_text().replace('reason = "bump"', 'reason = "<script>alert(1)</script>"')
    (path / "manifest.toml").write_text(m)
    text = report(tmp_path, NAME)
    assert "<script>alert" not in text and "&lt;script&gt;" in text


@pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_report_renders_in_headless_chromium(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    out.write_text(report(folder, NAME))
    page = load_page(out, evaluate="Array.from(document.querySelectorAll('svg polyline'))"
                                   ".filter(p => p.getBBox().width > 100).length",
                     clip_selector="svg")
    assert page.loaded
    assert page.console_errors == []
    assert [u for u in page.requests if not u.startswith("file://")] == [], page.requests
    assert page.value and page.value >= 3, "the chart lines are drawn"
    w, h, colours = png_size_and_colours(page.clip)
    assert w > 200 and h > 60 and colours >= 4, (w, h, colours)
    assert len(page.screenshot) > 20000


def test_redacted_export_hides_every_address(folder: Path, tmp_path: Path) -> None:
    before = {p.name: p.read_bytes() for p in (folder / NAME).iterdir()}
    archive = export(folder, NAME, tmp_path / "x.tar.gz", redact=True)
    assert {p.name: p.read_bytes() for p in (folder / NAME).iterdir()} == before, "the bundle on disk is unchanged"
    with tarfile.open(archive) as tar:
        files = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()}
    blob = b"\n".join(files.values())
    for addr in ADDRESSES:
        assert addr.encode() not in blob, addr
    assert "REDACTED.txt" in files
    # One address, one token, in every file.
    ev = files["evidence.toml"].decode()
    token = re.search(r'key = "(ip4-[0-9a-f]{10})", count = 7000', ev) or re.search(r'"(ip4-[0-9a-f]{10})"', ev)
    assert token is not None
    tl = json.loads(files["timeline.json"])
    assert token.group(1) in tl["events"][1]["text"]
    assert token.group(1).encode() in files["journal-kernel.txt"]
    # A second export uses another key: tokens cannot be joined across exports.
    again = export(folder, NAME, tmp_path / "y.tar.gz", redact=True)
    with tarfile.open(again) as tar:
        ev2 = tar.extractfile(f"{NAME}/evidence.toml").read().decode()
    assert token.group(1) not in ev2
    # The report of a redacted bundle is still built (tokens are not addresses).
    plain = export(folder, NAME, tmp_path / "z.tar.gz")
    with tarfile.open(plain) as tar:
        assert SOURCE.encode() in tar.extractfile(f"{NAME}/evidence.toml").read()


def test_review_benchmark_runs_quick() -> None:
    """bench/bench_review.py in its tiny configuration (no timing is checked here)."""
    import subprocess
    import sys

    bench = REPO / "bench" / "bench_review.py"
    out = subprocess.run([sys.executable, str(bench), "--quick"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "diagnose + report" in out.stdout and "goal diagnose + report < 1000 ms" in out.stdout
    rows = [line.split()[0] for line in out.stdout.splitlines() if line.split()[:1] in (["calm"], ["pressure"])]
    assert rows == ["calm", "pressure"]


def test_status_shows_the_last_bundle_and_its_top_finding(folder: Path, tmp_path: Path) -> None:
    from dataclasses import replace

    from ctguard.cli import status as status_cli
    from ctguard.config.policy import Policy
    from ctguard.control import status
    from ctguard.core.model import History, Instant, KernelLimits, NamespaceReading, Sample
    from ctguard.evidence.review import last_bundle

    last = last_bundle(folder)
    assert last is not None and last["id"] == "20260101T000100Z-manual"    # the newest complete one
    # issue 24: the cause (the raised UDP timeout) ranks before its consequence (the drops)
    assert last["top_finding"]["id"] == "udp-timeout-raised" and "kernel-drops" in last["findings"]
    policy = Policy()
    policy = replace(policy, persist=replace(policy.persist, sysctl_file=tmp_path / "none.conf"))
    now = Instant(1000.0, 1000.0)
    sample = Sample(now, KernelLimits(4096, 1024, 320, 8 << 30, 4 << 30), (NamespaceReading(1, "host", 10),))
    view = status.build(policy, sample, History(), now, last_bundle=last)
    assert view.data["last_bundle"]["top_finding"]["id"] == "udp-timeout-raised"
    text = status_cli.render_text(view)
    assert "last bundle: 20260101T000100Z-manual - critical udp-timeout-raised:" in text
    assert last_bundle(tmp_path / "empty") is None
