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
# Seconds of current growth a bump makes room for (beyond what is held). Issue 22: a whole
# second of a burst's rate sent 20,000 flows sent as fast as one sender can to 104k-138k (5-7x);
# the loop re-bumps before the cooldown once growth reaches act within half the cover (decide:
# urgent) and looks again within a fast interval, so a bump only needs to cover what such a fast
# re-bump cannot: decide.cover_for = max(GROWTH_COVER, FAST_COVER x fast_interval), 0.3 s by default.
GROWTH_COVER = 0.25
HEADROOM = 2                # persisted max = HEADROOM x peak (docs/contract.md, Sizing; `recommend` uses it too)
HEADROOM_AFTER_DROPS = 3    # ... once the kernel dropped or evicted flows in the window
DECAY = 2                   # a persisted size comes down by at most this factor at a time ...
DECAY_EVERY = 86400.0       # ... at most once a day (decide: the daily re-persist) ...
DECAY_MIN_MINUTES = 24 * 60  # ... and only once a day of per-minute peaks is recorded
# The kernel's defaults, as net/netfilter/nf_conntrack_core.c nf_conntrack_init_start computes
# them from totalram_pages() (= MemTotal) when nobody sets hashsize:
# - since Linux 5.15 ("netfilter: conntrack: sanitize table size default settings"): buckets =
#   RAM / 16384 / sizeof(struct hlist_head), 65,536 above 1 GiB, 262,144 above 4 GiB (64-bit),
#   at least 1,024; max_factor = 1, so nf_conntrack_max = buckets (a full table averages 2
#   tuples a bucket: every entry is hashed twice, original and reply).
# - before 5.15: the same formula, 16,384 above 1 GiB, 65,536 above 4 GiB, at least 32;
#   max_factor = 4, so nf_conntrack_max = 4 x buckets.
# nf_ct_alloc_hashtable then rounds the bucket count up to whole pages of hlist_nulls_head
# (PAGE_SIZE / 8 = 512 buckets on 4 KiB pages).
KERNEL_MIN_BUCKETS = 1024
KERNEL_MAX_BUCKETS = 262144
HASH_HEAD_BYTES = 8         # one hlist_nulls_head per bucket (64-bit); the one home of this fact
BUCKETS_PAGE = 4096 // HASH_HEAD_BYTES
# Per-entry memory beside the nf_conn slab object: the extension area (nf_ct_ext: NAT, acct,
# ecache, timestamp, labels ... allocated with each entry by __nf_ct_ext_add_length; ~128 bytes
# on the x86_64 6.x test VM next to a 256-byte nf_conn). /proc/slabinfo does not show it (it
# comes from kmalloc), so it is an estimate and counted on top of the slab object.
EXTENSION_BYTES = 128
GiB = 1 << 30


def round_up(value: float, step: int = STEP) -> int:
    return int(math.ceil(value / step)) * step


def kernel_version(release: str) -> tuple[int, int] | None:
    """(major, minor) of a kernel release string ("6.1.0-18-amd64"); None when unknown."""
    parts = release.split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return None


def sanitized_defaults(release: str) -> bool:
    """Does this kernel size the table the >= 5.15 way? An unknown release is taken to (Debian 12: 6.1)."""
    v = kernel_version(release)
    return v is None or v >= (5, 15)


def kernel_ratio(release: str = "") -> int:
    """max / buckets the kernel itself sets by default: 1 since 5.15, 4 before."""
    return 1 if sanitized_defaults(release) else 4


def kernel_default_buckets(mem_total: int, release: str = "") -> int:
    """Hash buckets the kernel gives nf_conntrack on this machine when nobody sets hashsize."""
    new = sanitized_defaults(release)
    buckets = mem_total // 16384 // HASH_HEAD_BYTES
    if mem_total > 4 * GiB:
        buckets = KERNEL_MAX_BUCKETS if new else 65536
    elif mem_total > 1 * GiB:
        buckets = 65536 if new else 16384
    buckets = max(KERNEL_MIN_BUCKETS if new else 32, buckets)
    return round_up(buckets, BUCKETS_PAGE)


def kernel_default_max(mem_total: int, release: str = "") -> int:
    """nf_conntrack_max the kernel sets at boot on this machine (buckets x its max_factor)."""
    return kernel_default_buckets(mem_total, release) * kernel_ratio(release)


def entry_bytes(object_size: int, ratio: float) -> float:
    """Kernel memory one entry costs: the nf_conn object, its extensions and its share of buckets."""
    return object_size + EXTENSION_BYTES + HASH_HEAD_BYTES / max(1.0, ratio)


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

    peak: int               # the peak sized on (entries): legitimate load only
    factor: int             # HEADROOM or HEADROOM_AFTER_DROPS
    by_peak: int            # peak x factor, rounded up
    boot_default: int       # the kernel's own max on this machine
    persisted: int | None   # what ctguard's file already holds
    upper: int              # ceiling or memory cap
    max: int                # the advice
    buckets: int | None     # None: buckets are not managed
    why: tuple[str, ...]    # the floors and bounds that moved it off peak x factor
    held: int = 0           # the most the table held (legitimately) in the recorded window

    def text(self) -> str:
        base = f"{self.factor}x peak {self.peak} = {self.by_peak}"
        return base + ("; " + "; ".join(self.why) if self.why else "")


def advice(peak: int, drops_seen: bool, boot_default: int, persisted: int | None, upper: int,
           manage_buckets: bool, ratio: int, live_buckets: int, default_buckets: int,
           held: int = 0, act: float = 1.0) -> Advice:
    """peak x HEADROOM (x HEADROOM_AFTER_DROPS after drops), never below the kernel's boot default,
    nor below what the table held in the window (below `act`), nor below half the persisted value
    (a persisted size follows the load down, at most by half at a time, DECAY), never above `upper`."""
    factor = HEADROOM_AFTER_DROPS if drops_seen else HEADROOM
    by_peak = max(round_up(peak * factor), STEP)
    value = by_peak
    why: list[str] = []
    if value < boot_default:
        value = boot_default
        why.append(f"raised to the kernel's boot default {boot_default}")
    if held and value < round_up(held / act):
        value = round_up(held / act)
        why.append(f"raised to hold the {held} entries the table held in the window below act {act:.0%}")
    if persisted is not None and value < persisted:
        floor = round_up(persisted / DECAY)
        if value < floor:
            value = floor
            why.append(f"down from the persisted {persisted} by at most 1/{DECAY} at a time")
        else:
            why.append(f"down from the persisted {persisted}: the load no longer needs it")
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
    return Advice(peak, factor, by_peak, boot_default, persisted, upper, value, buckets, tuple(why), held)


def p99(values: list[int]) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


PEAK_WINDOW = 7 * 86400     # seconds of recorded per-minute peaks that sizing looks at


def recent(minutes: Iterable[T], minute_of: Callable[[T], float], now: float) -> list[T]:
    """The recorded minutes within PEAK_WINDOW of `now` (the daemon and `recommend` alike)."""
    return [m for m in minutes if now - minute_of(m) <= PEAK_WINDOW]


@dataclass(frozen=True)
class PeaksUsed:
    """Which recorded peaks sizing used: minutes of legitimate load, the attack-shaped ones left out."""

    minutes: int            # recorded minutes in the window
    attack_minutes: int     # of them, minutes of attack-shaped incidents (as the guard judged them): left out
    p99: int                # p99 of the legitimate minutes' peaks
    high: int               # the highest legitimate minute's peak

    def text(self) -> str:
        out = f"p99 {self.p99} (highest {self.high}) of {self.minutes - self.attack_minutes} minute(s) of legitimate load"
        if self.attack_minutes:
            out += f"; {self.attack_minutes} attack-shaped minute(s) left out"
        return out


def peaks_used(counts: Iterable[tuple[int, bool]]) -> PeaksUsed:
    """(count, attack-shaped) per recorded minute -> what sizing reads."""
    rows = list(counts)
    legit = [c for c, attack in rows if not attack]
    return PeaksUsed(len(rows), len(rows) - len(legit), p99(legit), max(legit, default=0))
