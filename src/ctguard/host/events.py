"""ctguard's own journal entries: one fixed MESSAGE_ID per kind, CTGUARD_* fields, rate-limited.

`journalctl MESSAGE_ID=<id>` finds every entry of a kind on a host; docs/journal.md lists the
ids (a test keeps that table and this file in step). Entries go through the journal API
(`_TRANSPORT=journal`), which the journal follower never reads, so ctguard's own words can
never trigger ctguard.

A sustained flood (a table that stays full for an hour) must not flood the journal: each
kind may write at most `burst` entries per `window` seconds; the rest are counted and, when
the window closes, summed up in one "N similar entries suppressed" entry (its own
MESSAGE_ID, CTGUARD_REASON = the kind, CTGUARD_SUPPRESSED = N). The summary is written on
the next `emit()` or `flush()` after the window closes; the daemon calls `flush()` once per
cycle and on stop.

Without journald (a minimal container) every entry becomes one plain line on stderr.
`echo=True` (ctguard run in a terminal, not under systemd: see `echo_wanted`) prints every entry
on stderr as well, in the same words; under systemd stderr is the journal already (JOURNAL_STREAM),
so nothing is printed twice.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger(__name__)

SYSLOG_IDENTIFIER = "ctguard"
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")

# syslog(3) priorities, as journald stores them in PRIORITY=
LOG_ERR = 3
LOG_WARNING = 4
LOG_NOTICE = 5
LOG_INFO = 6

_PRIORITY_NAMES = {3: "err", 4: "warning", 5: "notice", 6: "info"}


@dataclass(frozen=True)
class Kind:
    name: str
    message_id: str  # 32 lowercase hex digits, never changed once released
    priority: int
    summary: str  # one line for docs/journal.md


# Generated once with uuid4().hex; these are a public interface (alerts and saved journalctl
# queries use them): never change or reuse one.
MESSAGE_ID_START = "8f575c367c5f4931ac5b8fb0ccdd6786"
MESSAGE_ID_STOP = "631db25f16e542e58d0a8fcfdd6dd2b7"
MESSAGE_ID_JOURNAL_UNAVAILABLE = "f6686516a21140f4a5daebd402f1d357"
MESSAGE_ID_WAITING = "9c3d70999ead427bbfbaea40f1eb47f9"
MESSAGE_ID_PRESSURE = "8c7296fa989f467da11e03415fb98045"
MESSAGE_ID_TABLE_FULL = "802b03bd3ae1496fa8842f55e04fc8e8"
MESSAGE_ID_BUMP = "953e8aba31884714a95257d72e230f9c"
MESSAGE_ID_BUMP_REFUSED = "0883e84cdb5e431e8b98319536be6742"
MESSAGE_ID_BUMP_FAILED = "9f6451a4deae492abaaadd3485fdf6a3"
MESSAGE_ID_BUCKETS = "17af92d24111424e9316d9cceb1ff37d"
MESSAGE_ID_PERSISTED = "2ea0a8b1a907438b944c155503842e2f"
MESSAGE_ID_BUNDLE = "df598dc36514407a9627919760641636"
MESSAGE_ID_POLICY_RELOADED = "a9926543953149339cc939be08d68182"
MESSAGE_ID_POLICY_REJECTED = "b49f6a2aa0274efb9f18bcfe1719c402"
MESSAGE_ID_SUPPRESSED = "a8e3d94bec444addb0fba40e032cbcce"
MESSAGE_ID_OTHER = "f2472e9e90994e07b701cb7218da156e"
MESSAGE_ID_MAX_LOWERED = "96a87547c4fb4b649cb95fae581ef6e8"
MESSAGE_ID_PERSIST_SHADOWED = "3db2626d632b4d289d8b9049100a7e1c"
MESSAGE_ID_INITRAMFS = "c567043ca59949d088052c3ec12b26b8"
MESSAGE_ID_INCIDENT_START = "6db88ec617644a76ae0f2b5bc77769fb"
MESSAGE_ID_INCIDENT_END = "d86f06d8bda24112af95694381fa6299"
MESSAGE_ID_RELIEF = "3c62b1e1ef5c4f61aee61acc8b3cfdaf"
MESSAGE_ID_RELIEF_RESTORED = "7f5d2dfa814047bcb208cb3539bec07a"
MESSAGE_ID_RELIEF_ADVICE = "2dc6104bea8c46d19a172f17d267e468"
MESSAGE_ID_RELIEF_TRIMMED = "3e17d4cefa214d39ac76d1e8ba35ea68"

KINDS: Mapping[str, Kind] = {
    k.name: k
    for k in (
        Kind("start", MESSAGE_ID_START, LOG_INFO, "ctguard started (policy file and mode in MESSAGE)"),
        Kind("stop", MESSAGE_ID_STOP, LOG_INFO, "ctguard stopped"),
        Kind("journal-unavailable", MESSAGE_ID_JOURNAL_UNAVAILABLE, LOG_WARNING,
             "no journald to follow: table-full lines are only noticed at the next sample"),
        Kind("waiting", MESSAGE_ID_WAITING, LOG_NOTICE, "nf_conntrack is not loaded; waiting for it"),
        Kind("pressure", MESSAGE_ID_PRESSURE, LOG_WARNING,
             "a namespace stayed above thresholds.warn for thresholds.sustain seconds"),
        Kind("table-full", MESSAGE_ID_TABLE_FULL, LOG_WARNING,
             "the kernel said the conntrack table is full (packets were dropped)"),
        Kind("bump", MESSAGE_ID_BUMP, LOG_WARNING,
             "nf_conntrack_max raised (CTGUARD_REASON: the trigger, or `manual` for `ctguard bump`, "
             "which may also lower it with `--lower`)"),
        Kind("refused", MESSAGE_ID_BUMP_REFUSED, LOG_ERR,
             "a needed bump was not made; CTGUARD_REASON: `ceiling`, `memory`, `budget`, `guard`, or for an "
             "operator's bump (CTGUARD_TRIGGER=manual) `lower` / `unchanged`"),
        Kind("bump-failed", MESSAGE_ID_BUMP_FAILED, LOG_ERR,
             "a kernel write failed or did not read back (CTGUARD_REASON: what, e.g. `buckets`)"),
        Kind("buckets", MESSAGE_ID_BUCKETS, LOG_NOTICE, "conntrack hash buckets resized"),
        Kind("persisted", MESSAGE_ID_PERSISTED, LOG_NOTICE, "sysctl.d / modprobe.d files written"),
        Kind("bundle", MESSAGE_ID_BUNDLE, LOG_NOTICE, "evidence bundle captured (CTGUARD_BUNDLE: its folder)"),
        Kind("policy-reloaded", MESSAGE_ID_POLICY_RELOADED, LOG_INFO, "policy reloaded on SIGHUP"),
        Kind("policy-rejected", MESSAGE_ID_POLICY_REJECTED, LOG_ERR,
             "reloaded policy invalid; the old one stays in force (MESSAGE names file and key)"),
        Kind("suppressed", MESSAGE_ID_SUPPRESSED, LOG_NOTICE,
             "N entries of one kind were not written (rate limit); CTGUARD_REASON: the kind, CTGUARD_SUPPRESSED: N"),
        Kind("max-lowered", MESSAGE_ID_MAX_LOWERED, LOG_WARNING,
             "another writer lowered nf_conntrack_max (CTGUARD_OLD_MAX, CTGUARD_NEW_MAX, CTGUARD_WRITER: the likely "
             "writer; CTGUARD_REASON: `defend`, `defend-failed`, `gave-up`, `not-defended`, `observe`, `at-bound`)"),
        Kind("persist-shadowed", MESSAGE_ID_PERSIST_SHADOWED, LOG_WARNING,
             "a file applied after ctguard's decides the boot value (CTGUARD_FILE, CTGUARD_NEW_MAX: its value; "
             "MESSAGE names the fix)"),
        Kind("initramfs", MESSAGE_ID_INITRAMFS, LOG_NOTICE,
             "update-initramfs run after the modprobe file changed (CTGUARD_REASON: `updated` or `failed`)"),
        Kind("relief", MESSAGE_ID_RELIEF, LOG_WARNING,
             "relief: a conntrack timeout shortened in one namespace, or raised back a step (CTGUARD_NETNS, "
             "CTGUARD_KEY, CTGUARD_OLD, CTGUARD_NEW, CTGUARD_REASON; CTGUARD_STEP `enter`, `down` or `up`, "
             "CTGUARD_LEVEL, CTGUARD_FILL, CTGUARD_FREED: entries freed since it entered); a failed write says so "
             "in MESSAGE with PRIORITY err"),
        Kind("relief-restored", MESSAGE_ID_RELIEF_RESTORED, LOG_NOTICE,
             "relief over (CTGUARD_STEP `leave`): the original timeout is back (CTGUARD_OLD: relief's value, "
             "CTGUARD_NEW: the original; CTGUARD_FILL, CTGUARD_FREED), "
             "or left alone: CTGUARD_REASON `operator` (someone changed it meanwhile) or `gone` (namespace vanished)"),
        Kind("relief-advice", MESSAGE_ID_RELIEF_ADVICE, LOG_NOTICE,
             "relief.mode is advise, mode observe, or the class is not in [relief] enforce: the timeout relief would shorten, nothing changed"),
        Kind("relief-trimmed", MESSAGE_ID_RELIEF_TRIMMED, LOG_NOTICE,
             "existing entries aged over ctnetlink: remaining timeout capped, or deleted when already past the new timeout (CTGUARD_ENTRIES: how many changed or deleted)"),
        Kind("other", MESSAGE_ID_OTHER, LOG_NOTICE, "an entry of a kind this version does not know (a bug)"),
        Kind("incident-start", MESSAGE_ID_INCIDENT_START, LOG_WARNING,
             "pressure began (fill at warn, a table-full line, or a bump); CTGUARD_INCIDENT names it"),
        Kind("incident-end", MESSAGE_ID_INCIDENT_END, LOG_NOTICE,
             "thresholds.calm seconds without pressure: the incident's summary (peak fill, drops, early drops, "
             "bumps, rate, bundles)"),
    )
}

# Other spellings callers may use for the same kinds.
ALIASES: Mapping[str, str] = {
    "startup": "start",
    "started": "start",
    "stopped": "stop",
    "table-full-seen": "table-full",
    "bump-refused": "refused",
    "write-failed": "bump-failed",
    "buckets-resized": "buckets",
    "bundle-captured": "bundle",
}

FIELDS = ("CTGUARD_NETNS", "CTGUARD_FILL", "CTGUARD_OLD_MAX", "CTGUARD_NEW_MAX", "CTGUARD_REASON", "CTGUARD_BUNDLE",
          "CTGUARD_NETNS_NAME", "CTGUARD_UNIT", "CTGUARD_RATE", "CTGUARD_NEED", "CTGUARD_HORIZON",
          "CTGUARD_INCIDENT", "CTGUARD_PEAK_FILL", "CTGUARD_DROPS", "CTGUARD_EARLY_DROPS", "CTGUARD_TABLE_FULL",
          "CTGUARD_BUMPS", "CTGUARD_DURATION", "CTGUARD_TRIGGER",
          "CTGUARD_KEY", "CTGUARD_OLD", "CTGUARD_NEW", "CTGUARD_ENTRIES", "CTGUARD_FINDING",
          "CTGUARD_WRITER", "CTGUARD_FILE", "CTGUARD_STEP", "CTGUARD_LEVEL", "CTGUARD_FREED")


# journald field names: uppercase letters, digits, underscore; not starting with a digit or
# underscore (leading underscore = trusted fields journald sets itself).
_FIELD_RE = re.compile(r"\A[A-Z][A-Z0-9_]{0,63}\Z")
_RESERVED = {"MESSAGE", "MESSAGE_ID", "PRIORITY", "SYSLOG_IDENTIFIER"}


def kind_of(name: str) -> Kind:
    """The Kind for a name or alias; unknown names map to `other` (logged) rather than raising,
    because a typo in a rarely taken branch must not take the daemon down."""
    kind = KINDS.get(ALIASES.get(name, name))
    if kind is None:
        log.warning("unknown event kind %r: written with the generic MESSAGE_ID %s", name, MESSAGE_ID_OTHER)
        return KINDS["other"]
    return kind


def _field_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


Sender = Callable[..., Any]


def _journal_sender() -> Sender | None:
    try:
        # Here: without python3-systemd (a minimal container) entries go to stderr instead.
        from systemd import journal
    except ImportError:
        return None
    return journal.send


@dataclass
class _Window:
    start: float
    written: int = 0
    suppressed: int = 0


@dataclass
class EventLog:
    """Writes ctguard's journal entries. One instance per daemon (no module-level state).

    `sender` is `systemd.journal.send` by default; `stderr` receives the fallback lines;
    `clock` drives the rate limiter (monotonic seconds).
    """

    burst: int = 10
    window: float = 60.0
    sender: Sender | None = field(default_factory=_journal_sender)
    stderr: TextIO | None = None
    clock: Callable[[], float] = time.monotonic
    # sd_journal_sendv() silently drops entries when this socket does not exist (ENOENT is
    # "no journal here, fine" to libsystemd), so its absence is checked here; None: skip.
    journal_socket: Path | None = JOURNAL_SOCKET
    # Also print each entry written to the journal on stderr (a foreground daemon in a terminal).
    echo: bool = False
    _windows: dict[str, _Window] = field(default_factory=dict, init=False, repr=False)
    _journal_down: bool = field(default=False, init=False, repr=False)

    def emit(self, kind: str, message: str, priority: int | None = None, limited: bool = True,
             **fields: Any) -> bool:
        """Write one entry; False when the rate limiter held it back (it is counted).

        `limited=False`: an operator's own request (`ctguard bump`), written even when a flood
        has used up the kind's window; it still counts towards the window."""
        k = kind_of(kind)
        now = self.clock()
        self._close_windows(now)
        win = self._windows.get(k.name)
        if win is None:
            win = self._windows[k.name] = _Window(start=now)
        if win.written >= self.burst and limited:
            win.suppressed += 1
            return False
        win.written += 1
        self._write(k, message, k.priority if priority is None else priority, fields)
        return True

    def flush(self) -> None:
        """Write the summaries of windows that have closed (call once per cycle and on stop)."""
        self._close_windows(self.clock())

    def flush_all(self) -> None:
        """On stop: summarise every open window now, closed or not."""
        self._close_windows(float("inf"))

    def _close_windows(self, now: float) -> None:
        for name, win in list(self._windows.items()):
            if now - win.start < self.window:
                continue
            del self._windows[name]
            if win.suppressed:
                span = self.window if now != float("inf") else self.clock() - win.start
                self._write(
                    KINDS["suppressed"],
                    f"{win.suppressed} similar {name!r} entries suppressed in the last {span:.0f} s "
                    f"(at most {self.burst} per {self.window:.0f} s are written)",
                    KINDS["suppressed"].priority,
                    {"CTGUARD_REASON": name, "CTGUARD_SUPPRESSED": win.suppressed},
                )

    def _write(self, kind: Kind, message: str, priority: int, fields: Mapping[str, Any]) -> None:
        clean: dict[str, str] = {}
        for key, value in fields.items():
            if value is None:
                continue
            if not _FIELD_RE.match(key) or key in _RESERVED:
                log.warning("journal field %r is not a valid field name; dropped", key)
                continue
            clean[key] = _field_value(value)
        if self.sender is not None:
            try:
                if self.journal_socket is not None and not self.journal_socket.exists():
                    raise FileNotFoundError(2, f"{self.journal_socket} does not exist (no journald here)")
                self.sender(
                    message,
                    MESSAGE_ID=kind.message_id,
                    PRIORITY=str(priority),
                    SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER,
                    CTGUARD_KIND=kind.name,
                    **clean,
                )
                self._journal_down = False
                if self.echo:
                    self._stderr_line(kind, message, priority, clean)
                return
            except OSError as exc:
                # No journald socket (minimal container) or journald gone. Say so once, then
                # keep writing to stderr; every entry tries the journal first again (a failed
                # sendmsg is cheap) so entries return there when journald comes back.
                if not self._journal_down:
                    self._journal_down = True
                    self._stderr_line(
                        KINDS["journal-unavailable"],
                        f"cannot write to the journal ({exc}); writing ctguard's entries to stderr",
                        LOG_WARNING,
                        {},
                    )
        self._stderr_line(kind, message, priority, clean)

    def _stderr_line(self, kind: Kind, message: str, priority: int, fields: Mapping[str, str]) -> None:
        out = self.stderr if self.stderr is not None else sys.stderr
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        level = _PRIORITY_NAMES.get(priority, str(priority))
        line = f"ctguard: {level}: {message} [{kind.name} MESSAGE_ID={kind.message_id}{' ' + extra if extra else ''}]"
        try:
            print(line, file=out, flush=True)
        except (OSError, ValueError):
            pass  # stderr closed: nothing left to tell


def echo_wanted(environ: Mapping[str, str] | None = None) -> bool:
    """Print entries on stderr too: not under systemd, whose JOURNAL_STREAM / INVOCATION_ID say
    stderr already reaches the journal (a line there would be a duplicate)."""
    env = os.environ if environ is None else environ
    return not (env.get("JOURNAL_STREAM") or env.get("INVOCATION_ID"))


def docs_table() -> str:
    """The Markdown table of kinds for docs/journal.md."""
    rows = ["| kind | MESSAGE_ID | priority | meaning |", "|---|---|---|---|"]
    for k in KINDS.values():
        rows.append(f"| `{k.name}` | `{k.message_id}` | {_PRIORITY_NAMES[k.priority]} ({k.priority}) | {k.summary} |")
    return "\n".join(rows)
