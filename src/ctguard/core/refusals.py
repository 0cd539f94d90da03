"""When a refused bump is a new one: the one rule the incident, the journal, the metrics, the
flight recorder and diagnosis count refusals by.

At a bound (ceiling, memory cap, guard, budget) decide refuses on every sample while the table
stays there: 62 refusals in 5 s at the ceiling are one bump the bound kept ctguard from making,
not 62 (issue 24's lab: "users lost: 62 bumps refused"). A refusal counts when the bound or the
max it refused at changed, or once per window (the bump cooldown: at most one bump a cooldown
would have been made, so at most one is refused). The wanted size is not part of it: it moves
with the count on every sample and would count the same refusal again; the latest is still
reported (status, the decision)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ctguard.core.model import Refuse, RefusalMark

# A cooldown of 0 would count a refusal per sample again: no refusal repeats more often than this.
MIN_REPEAT_WINDOW = 5.0


def repeat_window(cooldown: float) -> float:
    """Seconds within which the same bound refusing at the same max is one refused bump."""
    return max(float(cooldown), MIN_REPEAT_WINDOW)


def repeats(last: RefusalMark | None, kind: str, current: int, at: float, window: float) -> bool:
    """Is a refusal by `kind` at max `current`, at `at` seconds, the one `last` already counted?"""
    return (last is not None and last.kind == kind and last.current == current
            and 0 <= at - last.at < window)


def counted(a: Refuse) -> bool:
    """Does this refusal count (metrics, incident, journal)? Not a cooldown wait, not a repeat."""
    return a.kind != "cooldown" and not a.repeat


def distinct(events: Sequence[Mapping[str, Any]], window: float) -> list[Mapping[str, Any]]:
    """The refusal events of a recorded timeline (`kind` "refusal", `t` seconds, `reason`, `old`:
    the max refused at), one per refused bump by the rule above. A daemon of this version records
    only counted refusals already; bundles written before recorded one per sample."""
    out: list[Mapping[str, Any]] = []
    last: RefusalMark | None = None
    for e in events:
        if e.get("kind") != "refusal":
            continue
        reason = str(e.get("reason", ""))
        try:
            at, current = float(e.get("t", 0.0)), int(e.get("old", 0) or 0)
        except (TypeError, ValueError):
            at, current = 0.0, 0
        if repeats(last, reason, current, at, window):
            continue
        last = RefusalMark(at, reason, current)
        out.append(e)
    return out
