"""What the daemon tells: journal entries for each outcome (their words: ctguard.core.wording),
incidents, bundles and trims, and the one-line STATUS= that `systemctl status` shows."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ctguard.core import incident as incident_text
from ctguard.core import wording
from ctguard.core.model import Incident, NamespaceReading, Outcome, Sample
from ctguard.host.events import EventLog

log = logging.getLogger(__name__)


class Reporter:
    def __init__(self, events: EventLog) -> None:
        self.events = events
        self.last_action = "none yet"
        self._labels: dict[int, NamespaceReading] = {}     # inode -> reading: names and units in entries

    def saw(self, sample: Sample) -> None:
        self._labels = {ns.inode: ns for ns in sample.namespaces}

    def where(self, inode: int | None) -> tuple[str, dict[str, str]]:
        """(' in netns NAME (inode N, unit U)', its CTGUARD_NETNS_* fields), by name and unit where known."""
        ns = self._labels.get(inode) if inode is not None else None
        if ns is None:
            return "", incident_text.ns_fields(None)
        return f" in {incident_text.where(ns.name, ns.unit, ns.inode)}", incident_text.ns_fields(ns)

    def outcomes(self, outcomes: Sequence[Outcome], incident: Incident | None, observe_only: bool) -> None:
        for o in outcomes:
            text = wording.last_action(o)
            if text is not None:
                self.last_action = text
            self.say(wording.entry(o, self.where, incident.id if incident is not None else None, observe_only))

    def say(self, e: wording.Entry | None) -> None:
        if e is None:
            return
        if e.kind == "log":
            log.log(logging.INFO if e.priority == 6 else logging.WARNING, "%s", e.message)
            return
        self.events.emit(e.kind, e.message, priority=e.priority, limited=e.limited, **e.fields)

    def incident_started(self, inc: Incident, sample: Sample) -> None:
        w = sample.worst
        self.events.emit("incident-start", incident_text.start_message(inc, sample.worst_fill, w.count if w else 0),
                         **incident_text.start_fields(inc, sample.worst_fill))

    def incident_ended(self, inc: Incident) -> None:
        self.events.emit("incident-end", incident_text.end_message(inc), **incident_text.end_fields(inc))

    def bundle(self, reason: str, path: str, output: str, top: str) -> None:
        self.events.emit("bundle", f"evidence bundle captured ({reason}): {output}"
                         + (f"; top finding: {top}" if top else ""),
                         CTGUARD_BUNDLE=path, CTGUARD_REASON=reason, CTGUARD_FINDING=top or None)

    def trimmed(self, name: str, netns: int, report: dict) -> None:
        if "error" in report:
            log.warning("relief: the trim of netns %s failed: %s", name, report["error"])
        else:
            self.say(wording.trimmed(name, netns, report))
