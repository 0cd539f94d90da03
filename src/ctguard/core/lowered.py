"""Someone else lowered nf_conntrack_max: noticed at the next sample, and (by policy) set back.

Pure: `judge(policy, watch, current, upper, now)` returns what happened and the next `MaxWatch`.
The daemon carries out a `SetMax` it returns and tells `accept()` what the kernel holds after
its own writes. A tool that keeps lowering max (kube-proxy restarting in a loop, a
configuration-management run every minute) gets one answer per `[bump] cooldown`: a second
lowering inside the cooldown after a defence is left alone and journaled as ctguard giving up
until the cooldown ends, so the journal shows a few lines, not a fight.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, TYPE_CHECKING

from ctguard.core.model import Instant, SetMax

if TYPE_CHECKING:   # the policy's nouns, typed only: the core never loads a file
    from ctguard.config.policy import Policy

Verdict = Literal["defend", "not-defended", "gave-up", "observe", "at-bound"]


@dataclass(frozen=True)
class MaxWatch:
    known: int | None = None                 # the max ctguard last set or found
    defended_at: Instant | None = None       # the last time ctguard set a lowered max back
    lowered_total: int = 0
    defended_total: int = 0

    def accept(self, value: int) -> "MaxWatch":
        """The kernel's max after a turn (ctguard's own write, or a value someone raised it to)."""
        return replace(self, known=value)


@dataclass(frozen=True)
class Lowered:
    old: int
    new: int
    verdict: Verdict
    action: SetMax | None
    reason: str


def judge(policy: Policy, watch: MaxWatch, current: int, upper: int, now: Instant) -> tuple[Lowered | None, MaxWatch]:
    """`current`: this sample's max; `upper`: the highest max ctguard may set (ceiling, memory)."""
    if watch.known is None or current >= watch.known:
        return None, watch.accept(current) if watch.known is None or current > watch.known else watch
    old = watch.known
    counted = replace(watch, known=current, lowered_total=watch.lowered_total + 1)
    if policy.observe_only:
        return Lowered(old, current, "observe", None, "observe mode: ctguard does not set it back"), counted
    if not policy.persist.defend:
        return Lowered(old, current, "not-defended", None, "[persist] defend is false: ctguard leaves it"), counted
    target = min(old, upper)
    if target <= current:
        return Lowered(old, current, "at-bound", None,
                       f"the value it had is above what ctguard may set ({upper}): ctguard leaves it"), counted
    cooldown = policy.bump.cooldown
    if watch.defended_at is not None and now.since(watch.defended_at) < cooldown:
        ago = now.since(watch.defended_at)
        return Lowered(old, current, "gave-up", None,
                       f"lowered again {ago:.0f} s after ctguard set it back: ctguard gives up and leaves it at "
                       f"{current} (it sets a lowered max back at most once per [bump] cooldown, {cooldown:g} s); "
                       "stop the other writer or make it leave nf_conntrack_max alone"), counted
    action = SetMax(current, target, "reapply", None, 0.0,
                    f"nf_conntrack_max was lowered {old} -> {current} by another writer; setting {target} back",
                    clipped_by="ceiling" if target < old else None)
    return (Lowered(old, current, "defend", action, f"ctguard sets {target} back ([persist] defend)"),
            replace(counted, defended_at=now))


def defended(watch: MaxWatch, ok: bool, value: int | None) -> MaxWatch:
    """After the SetMax `judge` asked for: count it and take the value read back as known."""
    if not ok or value is None:
        return watch
    return replace(watch, known=value, defended_total=watch.defended_total + 1)
