"""ctguard's own journal entries: ids, fields, priorities, rate limit, stderr fallback (through a
real journald: tests/kernel/test_events_kernel.py)."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from ctguard.host import events
from ctguard.host.events import KINDS, EventLog, docs_table, kind_of
from helpers.paths import REPO

ROOT = REPO


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def recording() -> tuple[EventLog, list[tuple[str, dict]], Clock]:
    sent: list[tuple[str, dict]] = []
    clock = Clock()
    log = EventLog(sender=lambda msg, **kw: sent.append((msg, kw)), clock=clock, stderr=io.StringIO(),
                   journal_socket=None)
    return log, sent, clock


def test_message_ids_are_fixed_unique_uuids() -> None:
    ids = [k.message_id for k in KINDS.values()]
    assert len(set(ids)) == len(ids)
    for i in ids:
        assert re.fullmatch(r"[0-9a-f]{32}", i)
        assert uuid.UUID(i).hex == i
    # Spot-check that released ids stay what docs and alerts say.
    assert events.MESSAGE_ID_BUMP == "953e8aba31884714a95257d72e230f9c"
    assert KINDS["bump"].message_id == events.MESSAGE_ID_BUMP


def test_every_kind_the_spec_names_exists() -> None:
    for name in ("pressure", "table-full", "bump", "refused", "bump-failed", "buckets", "persisted", "bundle",
                 "policy-reloaded", "policy-rejected", "start", "stop", "journal-unavailable", "suppressed"):
        assert name in KINDS
    assert kind_of("bump-refused") is KINDS["refused"]
    assert kind_of("bundle-captured") is KINDS["bundle"]


def test_priorities_fit() -> None:
    assert KINDS["bump"].priority in (events.LOG_WARNING, events.LOG_NOTICE)
    assert KINDS["refused"].priority in (events.LOG_WARNING, events.LOG_ERR)
    assert KINDS["table-full"].priority == events.LOG_WARNING
    assert KINDS["policy-rejected"].priority == events.LOG_ERR
    assert KINDS["start"].priority == events.LOG_INFO


def test_fields_are_strings_and_identifier_is_set() -> None:
    log, sent, _ = recording()
    log.emit("bump", "raised nf_conntrack_max 65536 -> 131072", CTGUARD_NETNS=4026532246, CTGUARD_FILL=0.8734,
             CTGUARD_OLD_MAX=65536, CTGUARD_NEW_MAX=131072, CTGUARD_REASON="act", CTGUARD_BUNDLE=None)
    msg, kw = sent[0]
    assert msg == "raised nf_conntrack_max 65536 -> 131072"
    assert kw["MESSAGE_ID"] == events.MESSAGE_ID_BUMP
    assert kw["SYSLOG_IDENTIFIER"] == "ctguard"
    assert kw["PRIORITY"] == str(KINDS["bump"].priority)
    assert kw["CTGUARD_NETNS"] == "4026532246"
    assert kw["CTGUARD_FILL"] == "0.8734"
    assert kw["CTGUARD_OLD_MAX"] == "65536" and kw["CTGUARD_NEW_MAX"] == "131072"
    assert "CTGUARD_BUNDLE" not in kw  # None: left out
    assert all(isinstance(v, str) for v in kw.values())


def test_bad_field_names_are_dropped_not_fatal() -> None:
    log, sent, _ = recording()
    log.emit("bump", "x", _TRANSPORT="kernel", lower="x", MESSAGE_ID="forged", CTGUARD_REASON="act")
    _, kw = sent[0]
    assert "_TRANSPORT" not in kw and "lower" not in kw
    assert kw["MESSAGE_ID"] == events.MESSAGE_ID_BUMP
    assert kw["CTGUARD_REASON"] == "act"


def test_unknown_kind_uses_generic_id() -> None:
    log, sent, _ = recording()
    log.emit("no-such-kind", "x")
    assert sent[0][1]["MESSAGE_ID"] == events.MESSAGE_ID_OTHER


def test_rate_limit_then_one_summary_per_window() -> None:
    log, sent, clock = recording()
    for _ in range(100):
        log.emit("table-full", "kernel reported the conntrack table full")
        clock.t += 0.1  # 10 s of a sustained flood
    log.emit("bump", "a different kind is not held back by table-full's limit")
    assert len([s for s in sent if s[1]["MESSAGE_ID"] == events.MESSAGE_ID_TABLE_FULL]) == 10
    assert any(s[1]["MESSAGE_ID"] == events.MESSAGE_ID_BUMP for s in sent)
    assert not any(s[1]["MESSAGE_ID"] == events.MESSAGE_ID_SUPPRESSED for s in sent)
    clock.t += 60
    log.flush()
    summaries = [s for s in sent if s[1]["MESSAGE_ID"] == events.MESSAGE_ID_SUPPRESSED]
    assert len(summaries) == 1
    assert summaries[0][1]["CTGUARD_REASON"] == "table-full"
    assert summaries[0][1]["CTGUARD_SUPPRESSED"] == "90"
    assert "90 similar" in summaries[0][0]
    # a new window writes again
    assert log.emit("table-full", "again")
    log.flush()
    assert len([s for s in sent if s[1]["MESSAGE_ID"] == events.MESSAGE_ID_SUPPRESSED]) == 1


def test_an_operators_entry_is_written_through_a_spent_window() -> None:
    log, sent, _ = recording()
    for _ in range(20):
        log.emit("refused", "a flood's refusals fill the window")
    assert not log.emit("refused", "another automatic one is held back")
    assert log.emit("refused", "the operator's own bump, refused", limited=False, CTGUARD_TRIGGER="manual")
    assert sent[-1][1]["CTGUARD_TRIGGER"] == "manual" and "limited" not in sent[-1][1]


def test_flush_all_summarises_open_windows_on_stop() -> None:
    log, sent, clock = recording()
    for _ in range(15):
        log.emit("pressure", "p")
    log.flush_all()
    summary = [s for s in sent if s[1]["MESSAGE_ID"] == events.MESSAGE_ID_SUPPRESSED]
    assert summary and summary[0][1]["CTGUARD_SUPPRESSED"] == "5"


def test_sustained_flood_stays_bounded() -> None:
    log, sent, clock = recording()
    for _ in range(36_000):  # an hour of 10 table-full lines a second
        log.emit("table-full", "x")
        clock.t += 0.1
    log.flush_all()
    assert len(sent) <= 61 * 11


def test_stderr_fallback_when_journal_refuses() -> None:
    def broken(*a, **kw):
        raise ConnectionRefusedError(111, "Connection refused")

    err = io.StringIO()
    log = EventLog(sender=broken, stderr=err, journal_socket=None)
    log.emit("bump", "raised nf_conntrack_max 1024 -> 2048", CTGUARD_OLD_MAX=1024, CTGUARD_NEW_MAX=2048)
    log.emit("stop", "ctguard stopped")
    lines = err.getvalue().splitlines()
    assert len(lines) == 3  # said once that the journal is unavailable, then each entry
    assert "cannot write to the journal" in lines[0]
    assert lines[1].startswith("ctguard: warning: raised nf_conntrack_max 1024 -> 2048")
    assert "CTGUARD_NEW_MAX=2048" in lines[1] and events.MESSAGE_ID_BUMP in lines[1]
    assert lines[2].startswith("ctguard: info: ctguard stopped")


def test_missing_journal_socket_means_stderr(tmp_path: Path) -> None:
    sent: list = []
    err = io.StringIO()
    log = EventLog(sender=lambda *a, **kw: sent.append(a), stderr=err, journal_socket=tmp_path / "socket")
    log.emit("start", "ctguard starting")
    assert sent == []  # libsystemd would have dropped it silently
    assert "does not exist" in err.getvalue() and "ctguard: info: ctguard starting" in err.getvalue()


def test_no_systemd_module_means_stderr() -> None:
    err = io.StringIO()
    EventLog(sender=None, stderr=err).emit("start", "ctguard starting")
    assert err.getvalue().startswith("ctguard: info: ctguard starting")


def test_docs_table_is_current() -> None:
    doc = (ROOT / "docs" / "journal.md").read_text()
    assert docs_table() in doc, "docs/journal.md is out of date: paste ctguard.host.events.docs_table() into it"


# -- real journald ------------------------------------------------------------------------------


# -- the journal message catalog (issue 25) ---------------------------------------------------

# The checkout's root, wherever this file sits below it.
CATALOG = next(d for d in Path(__file__).resolve().parents if (d / "pyproject.toml").exists()) / "catalog" / "ctguard.catalog"


def _catalog_entries() -> dict[str, str]:
    entries: dict[str, str] = {}
    current = None
    for line in CATALOG.read_text().splitlines():
        m = re.match(r"^-- ([0-9a-f]{32})$", line)
        if m:
            current = m.group(1)
            assert current not in entries, f"{CATALOG}: {current} twice"
            entries[current] = ""
        elif current is not None:
            entries[current] += line + "\n"
    return entries


def test_every_message_id_in_the_source_has_a_catalog_entry() -> None:
    """`journalctl -x` explains every entry ctguard writes: each MESSAGE_ID in src/ (events.KINDS and
    any 32-hex id written anywhere else) has a catalog entry with a Subject and a text."""
    src = Path(__import__("ctguard").__file__).resolve().parent     # the whole package, sub-packages too
    in_source = {k.message_id for k in events.KINDS.values()}
    for path in src.rglob("*.py"):
        in_source |= set(re.findall(r"MESSAGE_ID\w*\s*=\s*\"([0-9a-f]{32})\"", path.read_text()))
    entries = _catalog_entries()
    missing = sorted(in_source - set(entries))
    assert not missing, f"{CATALOG} has no entry for {missing}"
    assert not sorted(set(entries) - in_source), "catalog entries for ids the source no longer writes"
    for mid, body in entries.items():
        assert re.search(r"^Subject: \S", body, re.M), f"{mid}: no Subject"
        assert re.search(r"^Defined-By: ctguard$", body, re.M), f"{mid}: no Defined-By"
        text = body.split("\n\n", 1)[-1].strip()
        assert len(text) > 40, f"{mid}: no text saying what happened and what to do"


@pytest.mark.skipif(shutil.which("journalctl") is None, reason="needs journalctl")
def test_journalctl_reads_the_catalog(tmp_path: Path) -> None:
    catalog_dir = tmp_path / "usr/lib/systemd/catalog"
    catalog_dir.mkdir(parents=True)
    (tmp_path / "var/lib/systemd").mkdir(parents=True)
    shutil.copy(CATALOG, catalog_dir / "ctguard.catalog")
    subprocess.run(["journalctl", f"--root={tmp_path}", "--update-catalog"], check=True, capture_output=True)
    listed = subprocess.run(["journalctl", f"--root={tmp_path}", "--list-catalog"], check=True,
                            capture_output=True, text=True).stdout
    assert {line.split()[0] for line in listed.splitlines() if line.strip()} >= set(_catalog_entries())


def test_a_foreground_daemon_echoes_each_entry_on_stderr_once() -> None:
    """Issue 25: `ctguard run` in a terminal prints each entry on stderr in the journal's words; under
    systemd (JOURNAL_STREAM / INVOCATION_ID) it does not (stderr is the journal: a duplicate); with
    journald gone the entry is printed once, not twice."""
    assert events.echo_wanted({}) is True
    assert events.echo_wanted({"JOURNAL_STREAM": "8:1234"}) is False
    assert events.echo_wanted({"INVOCATION_ID": "abc"}) is False
    sent: list[str] = []
    out = io.StringIO()
    log = EventLog(sender=lambda message, **f: sent.append(message), stderr=out, journal_socket=None, echo=True)
    log.emit("bump", "nf_conntrack_max 4096 -> 8192", CTGUARD_NEW_MAX=8192)
    assert sent == ["nf_conntrack_max 4096 -> 8192"]
    assert out.getvalue().count("nf_conntrack_max 4096 -> 8192") == 1 and "CTGUARD_NEW_MAX=8192" in out.getvalue()

    def down(message: str, **f: str) -> None:
        raise OSError(2, "no journald")

    out = io.StringIO()
    log = EventLog(sender=down, stderr=out, journal_socket=None, echo=True)
    log.emit("bump", "nf_conntrack_max 8192 -> 16384")
    assert out.getvalue().count("nf_conntrack_max 8192 -> 16384") == 1
