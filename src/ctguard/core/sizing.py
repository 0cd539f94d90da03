"""PURE sizing: how big a bump must be, and what is worth keeping for the next boot.

Two questions, one module, so that the daemon, `status` and `recommend` give the same answers:

- `bump_size`: an emergency bump holds what the table was asked to hold (its count plus the
  flows the kernel refused or evicted during this incident) plus GROWTH_COVER seconds of the
  growth still going on, below `thresholds.act`; at least `old x bump.factor`. A burst that
  has stopped has no growth left, so it gets what arrived plus headroom, not rate x cooldown.
  Growth that goes on is met by another bump before the cooldown (decide.py: `urgent`).
- `advice`: what `recommend` advises and what `persist` writes: the highest of the recorded
  per-minute p99 peak and the peak of the incident(s) since the last write, times HEADROOM
  (HEADROOM_AFTER_DROPS once the kernel dropped), never below the kernel's boot default nor
  the value already persisted, never above the ceiling / memory cap. Buckets never below the
  live ones nor the kernel's default for this machine.

No I/O: everything arrives as arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

STEP = 1024                 # nf_conntrack_max moves in whole multiples of this
GROWTH_COVER = 1.0          # seconds of current growth a bump makes room for (beyond what is held)
HEADROOM = 2                # persisted max = HEADROOM x peak (docs/contract.md, Sizing; `recommend` uses it too)
HEADROOM_AFTER_DROPS = 3    # ... once the kernel dropped or evicted flows in the window
# The kernel's defaults (net/netfilter/nf_conntrack_core.c, nf_conntrack_init_start, since
# Linux 5.15 "netfilter: conntrack: sanitize table size default settings"): buckets =
# RAM / 16384 / sizeof(struct hlist_nulls_head), at least 1024, at most 262144, and 262144
# outright above 4 GiB on 64-bit; nf_conntrack_max = buckets.
KERNEL_MIN_BUCKETS = 1024
KERNEL_MAX_BUCKETS = 262144
HASH_HEAD_BYTES = 8         # one hlist_nulls_head per bucket (64-bit); the one home of this fact


def round_up(value: float, step: int = STEP) -> int:
    return int(math.ceil(value / step)) * step


def kernel_default_buckets(mem_total: int) -> int:
    """Hash buckets the kernel gives nf_conntrack on this machine when nobody sets hashsize."""
    if mem_total > 4 << 30:
        return KERNEL_MAX_BUCKETS
    return max(KERNEL_MIN_BUCKETS, min(KERNEL_MAX_BUCKETS, mem_total // 16384 // HASH_HEAD_BYTES))


def kernel_default_max(mem_total: int) -> int:
    """nf_conntrack_max the kernel sets at boot on this machine (= its default buckets)."""
    return kernel_default_buckets(mem_total)


@dataclass(frozen=True)
class BumpSize:
    """How a bump was sized: every number the journal entry and the decision print."""

    old: int
    held: int           # entries the namespace holds now
    lost: int           # flows refused (drop) or evicted (early_drop) during this incident
    rate: float         # entries/s still arriving: the one rate (never negative)
    cover: float        # seconds of that growth made room for
    act: float          # thresholds.act
    factor: float       # bump.factor
    need: int           # held + lost + rate x cover
    by_need: int        # need / act, rounded up to STEP
    by_factor: int      # old x factor, rounded up to STEP

    @property
    def want(self) -> int:
        return max(self.by_need, self.by_factor)

    def text(self) -> str:
        parts = [f"holds {self.held}"]
        if self.lost:
            parts.append(f"+ {self.lost} refused or evicted")
        if self.rate > 0:
            parts.append(f"+ {self.rate:.0f}/s for {self.cover:g} s")
        binding = "need" if self.by_need >= self.by_factor else f"x{self.factor:g}"
        return (f"needs {self.need} ({' '.join(parts)}), {self.by_need} below act {self.act:.0%}, "
                f"{self.by_factor} by factor: {self.want} ({binding})")


def bump_size(old: int, held: int, lost: int, rate: float, act: float, factor: float,
              cover: float = GROWTH_COVER) -> BumpSize:
    rate = max(0.0, rate)
    need = held + max(0, lost) + int(math.ceil(rate * cover))
    return BumpSize(old, held, max(0, lost), rate, cover, act, factor, need,
                    round_up(need / act), round_up(old * factor))


@dataclass(frozen=True)
class Advice:
    """The sizing for the next boot, with every floor and bound that shaped it."""

    peak: int               # the peak sized on (entries)
    factor: int             # HEADROOM or HEADROOM_AFTER_DROPS
    by_peak: int            # peak x factor, rounded up
    boot_default: int       # the kernel's own max on this machine
    persisted: int | None   # what ctguard's file already holds
    upper: int              # ceiling or memory cap
    max: int                # the advice
    buckets: int | None     # None: buckets are not managed
    why: tuple[str, ...]    # the floors and bounds that moved it off peak x factor

    def text(self) -> str:
        base = f"{self.factor}x peak {self.peak} = {self.by_peak}"
        return base + ("; " + "; ".join(self.why) if self.why else "")


def advice(peak: int, drops_seen: bool, boot_default: int, persisted: int | None, upper: int,
           manage_buckets: bool, ratio: int, live_buckets: int, default_buckets: int) -> Advice:
    factor = HEADROOM_AFTER_DROPS if drops_seen else HEADROOM
    by_peak = max(round_up(peak * factor), STEP)
    value = by_peak
    why: list[str] = []
    if value < boot_default:
        value = boot_default
        why.append(f"raised to the kernel's boot default {boot_default}")
    if persisted is not None and value < persisted:
        value = persisted
        why.append(f"kept at the persisted {persisted} (ctguard never advises less than it wrote)")
    if value > upper:
        value = upper
        why.append(f"cut to the upper bound {upper}")
    buckets = None
    if manage_buckets:
        buckets = int(math.ceil(value / ratio))
        if buckets < live_buckets:
            buckets = live_buckets
            why.append(f"buckets kept at the live {live_buckets}")
        if buckets < default_buckets:
            buckets = default_buckets
            why.append(f"buckets at the kernel's default {default_buckets}")
    return Advice(peak, factor, by_peak, boot_default, persisted, upper, value, buckets, tuple(why))


def p99(values: list[int]) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


PEAK_WINDOW = 7 * 86400     # seconds of recorded per-minute peaks that sizing looks at


def recent(minutes: Iterable[T], minute_of: Callable[[T], float], now: float) -> list[T]:
    """The recorded minutes within PEAK_WINDOW of `now` (the daemon and `recommend` alike)."""
    return [m for m in minutes if now - minute_of(m) <= PEAK_WINDOW]
