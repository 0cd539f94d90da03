"""Issue 24: reports a person reads. For every cause of tests/unit/core/test_diagnose_causes.py,
the text, JSON and HTML views show evidence as tables and sentences (never a Python repr), state
the role once, and the HTML report leads with the story and a chart of the fill against the max
with the bumps marked (checked in a real headless chromium)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import tomli_w

from helpers.causes import CASES  # noqa: E402

from ctguard.core.diagnose import BundleData  # noqa: E402
from ctguard.evidence.report import report  # noqa: E402
from ctguard.evidence.review import show, show_json  # noqa: E402

REPR = re.compile(r"\{'|'\s*:\s|\[\{|\}\]|\{\"")


def write(folder: Path, name: str, data: BundleData) -> str:
    path = folder / name
    path.mkdir(parents=True, mode=0o700)
    (path / "manifest.toml").write_text(tomli_w.dumps({**data.manifest, "id": name, "files": []}))
    (path / "evidence.toml").write_text(tomli_w.dumps(data.evidence))
    if data.timeline is not None:
        tl = {"from": 1000.0, "to": 1003.0, **data.timeline}
        (path / "timeline.json").write_text(json.dumps(tl))
    return name


@pytest.mark.parametrize("case", [c for c in CASES if CASES[c][1] is not None])
def test_no_view_prints_a_repr(case: str, tmp_path: Path) -> None:
    name = write(tmp_path, "20260101T000000Z-bump", CASES[case][0])
    text = show(tmp_path, name)
    head = text.split("Details:")[0]
    assert not REPR.search(head), (case, REPR.search(head), head)
    assert text.count("Role: ") == 1, "the role is said once"
    assert "this host does NAT" not in head
    js = json.loads(show_json(tmp_path, name))
    for f in js["findings"]:
        for row in f["evidence_rows"]:
            assert not REPR.search(row["value"]), (case, row)
        assert f["kind"] in ("cause", "consequence")
    html = report(tmp_path, name)
    findings = html[html.index("<h2>Findings</h2>"):html.index("<h2>Timeline</h2>")]
    assert not re.search(r"\{'|&#x27;\s*:|\{&#x27;", findings), case


@pytest.mark.parametrize("case", ["DNS through the NAT past the ceiling", "NAT flash crowd: TIME_WAIT through the gateway"])
def test_the_report_leads_with_the_story_and_its_chart(case: str, tmp_path: Path) -> None:
    name = write(tmp_path, "20260101T000000Z-bump", CASES[case][0])
    html = report(tmp_path, name)
    story, chart, findings = html.index('class="story"'), html.index('class="lead-chart"'), html.index("<h2>Findings</h2>")
    assert html.index("<h2>Verdict</h2>") < story < chart < findings
    lead = html[chart:findings]
    assert "nf_conntrack_max in force" in lead and "<polyline" in lead
    assert "Largest count seen" in lead


def _chromium():
    try:
        from helpers.browser import chromium, load_page, png_size_and_colours
    except ImportError:
        return None
    return (load_page, png_size_and_colours) if chromium() else None


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_the_report_renders_its_lead_chart_in_headless_chromium(tmp_path: Path) -> None:
    load_page, png_size_and_colours = _chromium()
    data = CASES["DNS through the NAT past the ceiling"][0]
    name = write(tmp_path, "20260101T000000Z-drops-began", data)
    out = tmp_path / "report.html"
    out.write_text(report(tmp_path, name))
    page = load_page(out, evaluate="Array.from(document.querySelectorAll('.lead-chart svg polyline'))"
                                   ".filter(p => p.getBBox().width > 100).length",
                     clip_selector=".lead-chart svg")
    assert page.loaded and page.console_errors == []
    assert [u for u in page.requests if not u.startswith("file://")] == [], page.requests
    assert page.value == 2, "the entries and the max in force are drawn across the chart"
    w, h, colours = png_size_and_colours(page.clip)
    assert w > 200 and h > 60 and colours >= 4, (w, h, colours)
    # Kept beside the report so a failing run leaves what the browser drew.
    (tmp_path / "report.png").write_bytes(page.screenshot)
    (tmp_path / "lead-chart.png").write_bytes(page.clip)
