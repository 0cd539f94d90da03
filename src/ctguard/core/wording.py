"""How each outcome is told in the journal: the kind, the words and the CTGUARD_* fields.

One home for the wording, so the daemon's entries and a daemon-less `ctguard bump`'s are the
same (they had drifted: "did not raise" in one, "did not set" in the other). Pure: the daemon's
reporter and the command line write what these return.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ctguard.core.model import (
    Capture, Outcome, Persist, Refuse, RestoreTimeout, SetBuckets, SetMax, ShortenTimeout, TrimEntries, Warn,
)
from ctguard.core.timeouts import sysctl_name

if TYPE_CHECKING:   # the policy's nouns, typed only
    from ctguard.config.policy import Policy

LOG_ERR = 3                 # syslog priorities (the journal's PRIORITY=)


@dataclass(frozen=True)
class Entry:
    """One journal entry to write (kind: a ctguard.host.events kind); `log` entries are plain
    log lines (priority warning) rather than entries of a kind."""

    kind: str
    message: str
    fields: dict[str, Any] = field(default_factory=dict)
    limited: bool = True
    priority: int | None = None


# inode -> (' in netns NAME (inode N, unit U)', the CTGUARD_NETNS_* fields); ("", {}) when unknown
Where = Callable[["int | None"], "tuple[str, dict[str, str]]"]


def nowhere(_inode: int | None) -> tuple[str, dict[str, str]]:
    return "", {}


def entry(o: Outcome, where: Where = nowhere, incident: str | None = None,
          observe_only: bool = False) -> Entry | None:
    """The entry for one outcome, or None when it is not journaled (a cooldown refusal, a repeated
    refusal, a pending resize, a relief action that did nothing worth saying)."""
    a = o.action
    if o.pending:
        return Entry("log", o.detail, priority=6)
    if isinstance(a, SetMax):
        return _set_max(o, a, where, incident)
    if isinstance(a, SetBuckets):
        if o.ok:
            took = o.extra.get("seconds")
            return Entry("buckets", f"resized conntrack buckets {a.old} -> {o.read_back}"
                         + (f" in {took * 1000:.0f} ms" if took is not None else ""),
                         dict(CTGUARD_OLD_MAX=a.old, CTGUARD_NEW_MAX=o.read_back or a.new, CTGUARD_REASON=a.reason))
        return Entry("bump-failed", f"buckets not resized: {o.detail}", dict(CTGUARD_REASON="buckets"))
    if isinstance(a, Refuse):
        if a.kind == "cooldown" or a.repeat:
            return None     # a wait, or the refusal already journaled (core.refusals): said once
        in_ns, ns_fields = where(a.netns)
        return Entry("refused", f"bump refused ({a.kind}){in_ns}: {a.reason}",
                     dict(CTGUARD_NETNS=a.netns or "", CTGUARD_FILL=f"{a.fill:.4f}", CTGUARD_OLD_MAX=a.current,
                          CTGUARD_NEW_MAX=a.wanted, CTGUARD_REASON=a.kind, CTGUARD_TRIGGER=a.trigger, **ns_fields),
                     limited=a.trigger != "manual")
    if isinstance(a, Persist):
        if o.ok:
            return Entry("persisted", f"persisted nf_conntrack_max {a.max}: {o.detail}",
                         dict(CTGUARD_NEW_MAX=a.max, CTGUARD_REASON=a.reason))
        if o.detail.startswith(("observe", "persist.mode", "not persisted")):
            return None     # a max that failed to apply was reported already; nothing new to say
        return Entry("log", o.detail)
    if isinstance(a, Warn):
        in_ns, ns_fields = where(a.netns)
        if a.kind == "pressure":
            return Entry("pressure", f"conntrack pressure{in_ns}: {a.reason}",
                         dict(CTGUARD_NETNS=a.netns or "", CTGUARD_FILL=f"{a.fill:.4f}", CTGUARD_REASON="pressure",
                              **ns_fields))
        return Entry("table-full", f"kernel reported the conntrack table full{in_ns}: {a.reason}",
                     dict(CTGUARD_NETNS=a.netns or "", CTGUARD_FILL=f"{a.fill:.4f}", CTGUARD_REASON="table-full",
                          **ns_fields))
    if isinstance(a, Capture):
        return None if o.ok else Entry("log", o.detail)
    if isinstance(a, ShortenTimeout):
        return _shorten(o, a, observe_only)
    if isinstance(a, RestoreTimeout):
        return _restore(o, a)
    if isinstance(a, TrimEntries) and not o.ok and "still running" not in o.detail:
        return Entry("log", f"relief: {o.detail}")
    return None


def _set_max(o: Outcome, a: SetMax, where: Where, incident: str | None) -> Entry:
    in_ns, ns_fields = where(a.netns)
    fields: dict[str, Any] = dict(CTGUARD_NETNS=a.netns or "", CTGUARD_FILL=f"{a.fill:.4f}", CTGUARD_OLD_MAX=a.old,
                                  CTGUARD_NEW_MAX=o.read_back or a.new, CTGUARD_REASON=a.trigger, **ns_fields)
    if a.need:
        fields.update(CTGUARD_RATE=f"{a.rate:.0f}", CTGUARD_NEED=a.need, CTGUARD_HORIZON=f"{a.cover:g}")
    if incident is not None:
        fields["CTGUARD_INCIDENT"] = incident
    if o.ok:
        verb = "lowered" if a.new < a.old else "raised"   # an operator's --lower
        return Entry("bump", f"{verb} nf_conntrack_max {a.old} -> {o.read_back}{in_ns}: {a.reason}", fields,
                     limited=a.trigger != "manual")
    return Entry("bump-failed", f"did not set nf_conntrack_max to {a.new}: {o.detail}", fields)


def _relief_fields(a: ShortenTimeout | RestoreTimeout, step: str) -> dict[str, Any]:
    out: dict[str, Any] = dict(CTGUARD_STEP=step, CTGUARD_FILL=f"{a.fill:.4f}", CTGUARD_FREED=a.freed)
    if isinstance(a, ShortenTimeout) and a.steps:
        out["CTGUARD_LEVEL"] = f"{a.level}/{a.steps}"
    return out


def _shorten(o: Outcome, a: ShortenTimeout, observe_only: bool) -> Entry:
    fields = dict(CTGUARD_NETNS=a.netns, CTGUARD_KEY=a.key, CTGUARD_OLD=a.old, CTGUARD_NEW=a.new,
                  CTGUARD_REASON=a.reason, **_relief_fields(a, a.step))
    verb, base = ("raised", "raise") if a.step == "up" else ("lowered", "lower")
    if o.ok:
        return Entry("relief", f"relief: {verb} {sysctl_name(a.key)} {o.extra.get('old', a.old)} -> "
                               f"{o.read_back} s in netns {a.name}: {a.reason}", fields)
    if a.advise or observe_only:
        return Entry("relief-advice", f"relief would {base} {sysctl_name(a.key)} {a.old} -> {a.new} s "
                                      f"in netns {a.name} ({o.detail.split(':')[0]}): {a.reason}", fields)
    if o.extra.get("forget"):
        return Entry("relief-restored", f"relief over, nothing restored: {o.detail}",
                     dict(fields, CTGUARD_REASON="operator"))
    return Entry("relief", f"relief: did not {base} {sysctl_name(a.key)} in netns {a.name}: {o.detail}", fields,
                 priority=LOG_ERR)


def _restore(o: Outcome, a: RestoreTimeout) -> Entry:
    why = o.extra.get("why", "calm" if o.ok else "failed")
    fields = dict(CTGUARD_NETNS=a.netns, CTGUARD_KEY=a.key, CTGUARD_OLD=a.relieved,
                  CTGUARD_NEW=a.original if o.ok else o.extra.get("found", ""), CTGUARD_REASON=why,
                  **_relief_fields(a, "leave"))
    if a.advise:
        return Entry("relief-advice", f"relief would leave netns {a.name}: {sysctl_name(a.key)} back to "
                                      f"{a.original} s ({a.reason})", fields)
    if o.ok:
        return Entry("relief-restored", f"relief over: {sysctl_name(a.key)} {a.relieved} -> {o.read_back} s "
                                        f"in netns {a.name} ({a.reason})", fields)
    if o.extra.get("forget"):
        return Entry("relief-restored", f"relief over, nothing restored: {o.detail}", fields)
    return Entry("log", o.detail)


def start_line(policy: Policy, version: str, kernel_max: int | None) -> str:
    """The start entry: version, the policy files in force, mode, what is watched, max and ceiling."""
    files = ", ".join([policy.source, *policy.dropins])
    watched = "every network namespace" if policy.watch.namespaces == "all" else "the host namespace only"
    kmax = kernel_max if kernel_max is not None else "unknown (nf_conntrack not loaded)"
    return (f"ctguard {version} starting with {files} (mode {policy.mode}); watching {watched}; "
            f"nf_conntrack_max {kmax}, ceiling {policy.bump.ceiling}")


def last_action(o: Outcome) -> str | None:
    """The short line `systemctl status` shows as the last action, or None if this is none."""
    a = o.action
    if o.pending:
        return None
    if isinstance(a, SetMax):
        if o.ok:
            return f"{'bumped' if a.new > a.old else 'lowered'} {a.old} -> {o.read_back} ({a.trigger})"
        return f"bump to {a.new} not done"
    if isinstance(a, Refuse) and a.kind != "cooldown":
        return f"bump refused ({a.kind})"
    if isinstance(a, ShortenTimeout) and o.ok:
        return f"relief: {a.key} timeout {a.old} -> {o.read_back} in {a.name}"
    if isinstance(a, RestoreTimeout) and o.ok:
        return f"relief over: {a.key} timeout back to {a.original} in {a.name}"
    return None


def trimmed(name: str, netns: int, report: dict) -> Entry:
    """A relief trim child's report (ctguard.host.trim)."""
    return Entry("relief-trimmed",
                 f"relief: capped the remaining timeout of {report.get('changed', 0)} existing entries "
                 f"and deleted {report.get('deleted', 0)} already past the new timeout "
                 f"in netns {name} ({report.get('seen', 0)} looked at, {report.get('gone', 0)} "
                 f"already gone, {report.get('seconds', 0)} s"
                 + (", cut short by its bounds)" if report.get("cut_short") else ")"),
                 dict(CTGUARD_NETNS=netns, CTGUARD_ENTRIES=report.get("changed", 0) + report.get("deleted", 0),
                      CTGUARD_REASON="trim"))
