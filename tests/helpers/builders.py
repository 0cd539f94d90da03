"""Builders for the pure tests: instants, policies, samples and histories, as tables want them.

`at(t)` is T0 + t seconds on the wall clock and 1000 + t on CLOCK_BOOTTIME, in boot "b1";
`sample(t, max_, *counts)` reads one namespace per count, the first one the host's.
"""

from __future__ import annotations

from ctguard.config import policy as policy_mod
from ctguard.core.model import BumpRecord, History, Instant, KernelLimits, NamespaceReading, Sample

GiB = 1 << 30
T0 = 1_800_000_000.0


def at(t: float = 0.0, boot_id: str = "b1", *, mono: float = 1000.0) -> Instant:
    return Instant(T0 + t, mono + t, boot_id)


def now(t: float = 0.0) -> Instant:
    """The instant of the status, metrics and sizing tables: boot "b", CLOCK_BOOTTIME 100 + t."""
    return at(t, "b", mono=100.0)


def pol(text: str = "") -> policy_mod.Policy:
    return policy_mod.loads(text, "t.toml")


def sample(t: float, max_: int, *counts: int, buckets: int | None = None, mem: int = 16 * GiB, obj: int | None = 320,
           drops: tuple[int, ...] = (), early: tuple[int, ...] = ()) -> Sample:
    ns = tuple(
        NamespaceReading(4026531000 + i, "host" if i == 0 else f"ns{i}", c,
                         (("drop", drops[i] if i < len(drops) else 0),)
                         + ((("early_drop", early[i]),) if i < len(early) else ()))
        for i, c in enumerate(counts)
    )
    # Buckets = max by default: the kernel's own ratio since 5.15 (issue 22).
    return Sample(at(t), KernelLimits(max_, buckets if buckets is not None else max_, obj, mem, mem // 2), ns)


def kinds(decision) -> list[str]:
    return [type(a).__name__ for a in decision.actions]


def bumps(*times_and_trigger, ok: bool = True) -> History:
    return History(bumps=tuple(BumpRecord(at(t), 1, 2, trig, ok) for t, trig in times_and_trigger))


def status_sample(max_: int, *counts: int) -> Sample:
    """At now(10): the host, then namespaces named n"1", n"2"... (a quote to escape), drops 0, 1, 2..."""
    ns = tuple(NamespaceReading(4026531000 + i, "host" if not i else f'n"{i}', c, (("drop", i),))
               for i, c in enumerate(counts))
    return Sample(now(10), KernelLimits(max_, max_ // 4, 256, 1 << 34, 1 << 33), ns)


def run_at_ceiling(policy_text: str, turns: list[tuple[float, int]]):
    """Turns of (t, max) with the table at 8,000 entries, each decision carried out as it is:
    (the History after them, the Refuse actions decided)."""
    from ctguard.core.decide import advance, decide
    from ctguard.core.model import Outcome, Refuse

    p = pol(policy_text)
    h = History()
    refused: list[Refuse] = []
    for t, kmax in turns:
        s = sample(t, kmax, 8000)
        d = decide(p, s, h, s.at)
        outcomes = [Outcome(a, True, getattr(a, "reason", "")) for a in d.actions]
        refused += [a for a in d.actions if isinstance(a, Refuse)]
        h = advance(h, s, (), outcomes, s.at, p)
    return h, refused


def every(step: float, until: float, kmax: int = 8192) -> list[tuple[float, int]]:
    """(t, max) turns every `step` seconds up to `until`."""
    return [(round(i * step, 3), kmax) for i in range(int(until / step) + 1)]
