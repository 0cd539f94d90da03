"""`ctguard recommend`: sizing advice from the recorded per-minute peaks.

The seed's rule: max at least 2x the p99 peak (3x when drops or retry storms were seen),
buckets = max / 4, and say what it costs in kernel memory.
"""

from __future__ import annotations

import json
import math
import time

from ctguard.decide import HASH_HEAD_BYTES, round_up
from ctguard.kernel import Kernel
from ctguard.policy import Policy
from ctguard.state import Peak, StateStore

WINDOW = 7 * 86400
MIN_MINUTES = 60        # less than an hour of history is too little to size a table on


def p99(values: list[int]) -> int:
    if not values:
        return 0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


def advise(policy: Policy, peaks: list[Peak], current_max: int, current_buckets: int,
           object_size: int | None, now: float) -> dict:
    recent = [p for p in peaks if now - p.minute <= WINDOW]
    peak99 = p99([p.count for p in recent])
    drops = sum(p.drops for p in recent)
    factor = 3 if drops else 2
    obj = object_size or 320
    rec_max = max(round_up(peak99 * factor), 1024)
    rec_buckets = math.ceil(rec_max / policy.buckets.ratio)
    cost = rec_max * obj + rec_buckets * HASH_HEAD_BYTES
    span_minutes = len(recent)
    return {
        "minutes_recorded": span_minutes,
        "enough_history": span_minutes >= MIN_MINUTES,
        "p99_peak": peak99,
        "highest_peak": max((p.count for p in recent), default=0),
        "drops_seen": drops,
        "factor": factor,
        "recommended_max": rec_max,
        "recommended_buckets": rec_buckets,
        "memory_bytes": cost,
        "object_size": obj,
        "current_max": current_max,
        "current_buckets": current_buckets,
        "ceiling": policy.bump.ceiling,
        "above_ceiling": rec_max > policy.bump.ceiling,
        "sysctl_line": f"net.netfilter.nf_conntrack_max = {rec_max}",
        "modprobe_line": f"options nf_conntrack hashsize={rec_buckets}",
    }


def render(a: dict) -> str:
    lines = []
    if not a["enough_history"]:
        lines.append(f"Too little history to size on: {a['minutes_recorded']} minute(s) recorded, "
                     f"at least {MIN_MINUTES} wanted; the advice below is provisional.")
    lines.append(f"p99 peak over the last {min(a['minutes_recorded'], WINDOW // 60)} minute(s): {a['p99_peak']} "
                 f"entries (highest {a['highest_peak']}); drops seen: {a['drops_seen']}.")
    lines.append(f"Recommended nf_conntrack_max = {a['recommended_max']} ({a['factor']}x the p99 peak), "
                 f"buckets = {a['recommended_buckets']}, costing about {a['memory_bytes'] / 2**20:.1f} MiB of kernel "
                 f"memory ({a['object_size']} bytes per entry).")
    lines.append(f"Now: max {a['current_max']}, buckets {a['current_buckets']}; ceiling {a['ceiling']}"
                 + (" - the recommendation is ABOVE the ceiling: raise [bump] ceiling first." if a["above_ceiling"] else "."))
    lines.append("To apply, put in /etc/sysctl.d/90-ctguard.conf:")
    lines.append(f"  {a['sysctl_line']}")
    lines.append("and in /etc/modprobe.d/ctguard.conf:")
    lines.append(f"  {a['modprobe_line']}")
    for note in a.get("boot_notes", []):   # a later file, the command line or the initramfs (issue 16)
        lines.append(f"Note: {note}")
    return "\n".join(lines)


def _boot_notes(policy: Policy) -> list[str]:
    """What would keep the advice from holding at boot: a file that overrides ctguard's, the initramfs."""
    from ctguard import bootreport

    try:
        boot = bootreport.build(policy)
    except OSError:
        return []
    notes = [s.message() for s in boot.view.shadows]
    advice = boot.initramfs.advice() if boot.initramfs is not None else None
    if advice:
        notes.append(advice)
    return notes


def main(policy: Policy, as_json: bool = False) -> int:
    peaks = StateStore(policy.state.dir).load_peaks()
    kernel = Kernel()
    try:
        limits = kernel.limits()
        cur_max, cur_buckets, obj = limits.max, limits.buckets, limits.slab_object_size
    except OSError:
        cur_max = cur_buckets = 0
        obj = None
    advice = advise(policy, peaks, cur_max, cur_buckets, obj, time.time())
    advice["boot_notes"] = _boot_notes(policy)
    print(json.dumps(advice, indent=2, sort_keys=True) if as_json else render(advice))
    return 0
