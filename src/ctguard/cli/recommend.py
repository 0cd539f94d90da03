"""`ctguard recommend`: sizing advice that agrees with the daemon.

It reads the same history the daemon keeps (state.json: drops and early drops it counted,
bumps it made, incidents, what it persisted) and the recorded per-minute peaks, and sizes
with the same function the daemon persists with (decide.persist_advice -> sizing.advice):
the higher of the p99 per-minute peak over the last 7 days and the peak since the last write
(legitimate load only: minutes and incidents the guard judged attack-shaped are left out),
times 2 (3 once the kernel dropped), never below the kernel's boot default nor what the table
held in the window, and down from the persisted value by at most half at a time (it says which
floor decided), within the ceiling and memory cap.
"""

from __future__ import annotations

import json
import time

from ctguard.boot import persist
from ctguard.boot import report as bootreport
from ctguard.config.policy import Policy
from ctguard.core import incident as incident_text
from ctguard.core import relief
from ctguard.core.decide import persist_advice, persist_due_in
from ctguard.core.model import History, Instant, KernelLimits
from ctguard.core import sizing
from ctguard.core.sizing import HASH_HEAD_BYTES
from ctguard.core.timeouts import DEFAULT_TIMEOUTS
from ctguard.host import hostrole
from ctguard.host.clock import Clock
from ctguard.host.kernel import Kernel
from ctguard.store.relief import ReliefStore
from ctguard.store.state import Peak, StateStore

MIN_MINUTES = 60        # less than an hour of history is too little to size a table on
OWN_LOCAL = "/etc/sysctl.d/95-conntrack-local.conf"   # an example of a file ctguard does not own, read after its own


def advise(policy: Policy, peaks: list[Peak], current_max: int, current_buckets: int,
           object_size: int | None, now: float, history: History | None = None, mem_total: int = 0,
           now_instant: Instant | None = None) -> dict:
    recent = sizing.recent(peaks, lambda p: p.minute, now)
    used = sizing.peaks_used((p.count, p.attack) for p in recent)
    peak99 = used.p99
    peak_drops = sum(p.drops for p in recent)
    h = (history or History()).with_(recorded_p99=peak99, recorded_high=used.high, recorded_minutes=used.minutes,
                                     recorded_attack_minutes=used.attack_minutes)
    at = now_instant or Instant(now, now)
    if peak_drops and (h.last_drop is None or at.since(h.last_drop) >= sizing.PEAK_WINDOW):
        h = h.with_(last_drop=Instant(max(p.minute for p in recent if p.drops), 0.0))   # dropped in a recorded minute
    limits = KernelLimits(current_max, current_buckets, object_size, mem_total, 0)
    adv = persist_advice(policy, limits, h, at)
    obj = object_size or 320
    rec_buckets = adv.buckets if adv.buckets is not None else current_buckets
    cost = adv.max * (obj + sizing.EXTENSION_BYTES) + rec_buckets * HASH_HEAD_BYTES
    due = persist_due_in(policy, h, at)
    last = h.last_incident or h.incident
    return {
        "minutes_recorded": len(recent),
        "enough_history": len(recent) >= MIN_MINUTES,
        "p99_peak": peak99,
        "peak_since_persist": h.sizing_peak,
        "highest_peak": max((p.count for p in recent), default=0),
        "peaks_used": {"minutes": used.minutes, "attack_minutes_left_out": used.attack_minutes, "p99": used.p99,
                       "highest": used.high, "since_persist": h.sizing_peak, "text": used.text()},
        "drops_seen": peak_drops,
        "drops_seen_by_daemon": bool(h.last_drop is not None and at.since(h.last_drop) < sizing.PEAK_WINDOW),
        "last_drop": h.last_drop.wall if h.last_drop else None,
        "incident": incident_text.summary(last) if last else None,
        "bumps_last_hour": [{"at": b.at.wall, "old": b.old, "new": b.new, "trigger": b.trigger}
                            for b in h.bumps if b.ok and at.since(b.at) < 3600],
        "factor": adv.factor,
        "sized_on_peak": adv.peak,
        "recommended_max": adv.max,
        "recommended_buckets": adv.buckets,
        "why": list(adv.why),
        "boot_default": adv.boot_default,
        "persisted_max": adv.persisted,
        "pending_persist_in": due,
        "memory_bytes": cost,
        "object_size": obj,
        "current_max": current_max,
        "current_buckets": current_buckets,
        "ceiling": policy.bump.ceiling,
        "upper_bound": adv.upper,
        "above_ceiling": adv.by_peak > adv.upper,
        "persist_mode": policy.persist.mode,
        "sysctl_file": str(policy.persist.sysctl_file),
        "sysctl_line": f"net.netfilter.nf_conntrack_max = {adv.max}",
        "modprobe_line": f"options nf_conntrack hashsize={adv.buckets}" if adv.buckets else None,
    }


def render(a: dict) -> str:
    lines = []
    if not a["enough_history"]:
        lines.append(f"Too little history to size on: {a['minutes_recorded']} minute(s) recorded, "
                     f"at least {MIN_MINUTES} wanted; the advice below is provisional.")
    drops = ("drops seen: yes" + (f" ({a['drops_seen']} in recorded minutes)" if a["drops_seen"] else "")
             if a["drops_seen"] or a["drops_seen_by_daemon"] else "drops seen: none")
    lines.append(f"p99 peak over the last {min(a['minutes_recorded'], sizing.PEAK_WINDOW // 60)} minute(s): {a['p99_peak']} "
                 f"entries (highest {a['highest_peak']}); peak since the last persist: {a['peak_since_persist']}; {drops}.")
    used = a.get("peaks_used")
    if used:
        lines.append(f"Peaks sized on: {used['text']}; peak since the last persist {used['since_persist']} "
                     "(attack-shaped incidents, as the guard judged them, never count).")
    inc = a["incident"]
    if inc:
        lines.append(f"Last incident {inc['id']} in {inc['name'] or inc['netns']}: peak fill {inc['peak_fill']:.1%}, "
                     f"{inc['drops']} drops, {inc['early_drops']} early drops, {inc['bumps']} bump(s)"
                     f" (max {inc['max_at_start']} -> {inc['max_now']}).")
    if a["bumps_last_hour"]:
        lines.append("Bumps in the last hour: " + ", ".join(f"{b['old']} -> {b['new']} ({b['trigger']})"
                                                          for b in a["bumps_last_hour"]) + ".")
    buckets = f", buckets = {a['recommended_buckets']}" if a["recommended_buckets"] else " (buckets not managed)"
    lines.append(f"Recommended nf_conntrack_max = {a['recommended_max']} ({a['factor']}x the peak "
                 f"{a['sized_on_peak']}){buckets}, costing about {a['memory_bytes'] / 2**20:.1f} MiB of kernel "
                 f"memory ({a['object_size']} bytes of object + {sizing.EXTENSION_BYTES} of extensions per entry, and the buckets).")
    for why in a["why"]:
        lines.append(f"  - {why}")
    lines.append(f"Now: max {a['current_max']}, buckets {a['current_buckets']}; persisted: "
                 f"{a['persisted_max'] if a['persisted_max'] is not None else 'nothing'}; kernel boot default "
                 f"{a['boot_default']}; ceiling {a['ceiling']}"
                 + (" - the sizing is ABOVE the ceiling (or the memory cap): raise [bump] ceiling first." if a["above_ceiling"] else "."))
    mode = a["persist_mode"]
    if mode == "never":
        lines.append(f"persist.mode is \"never\": ctguard writes nothing for the next boot. To keep this size, set "
                     f"[persist] mode = \"stable\" in the policy, or put the line below in a sysctl drop-in of your "
                     f"own (e.g. {OWN_LOCAL}):")
        lines.append(f"  {a['sysctl_line']}")
    else:
        when = ""
        if a["pending_persist_in"] is not None:
            when = (" now" if a["pending_persist_in"] <= 0
                    else f" in {a['pending_persist_in']:.0f} s if no drop comes first")
        lines.append(f"ctguard writes this sizing to {a['sysctl_file']} itself (persist.mode \"{mode}\"){when}; "
                     f"do not edit that file, ctguard rewrites it. To size differently, change the policy "
                     f"(/etc/ctguard/policy.toml or a drop-in: [bump] ceiling, [persist] mode), or set "
                     f"persist.mode = \"never\" and pin your own value in a sysctl drop-in read after ctguard's "
                     f"(e.g. {OWN_LOCAL}).")
    for t in a.get("timeouts", []):
        lines.append(f"Timeout: {t['why']}.")
        lines.append(f"  {t['line']}")
    if a.get("timeouts"):
        lines.append("Put timeout lines in a sysctl drop-in of your own (e.g. /etc/sysctl.d/95-conntrack-local.conf); "
                     "ctguard never writes timeouts to /etc.")
    for note in a.get("boot_notes", []):   # a later file, the command line or the initramfs (issue 16)
        lines.append(f"Note: {note}")
    return "\n".join(lines)


def _timeout_advice(policy: Policy) -> list[dict]:
    """Timeout advice from what relief saw (relief.json) and the host's raised timeouts."""
    store = ReliefStore(policy.state.dir)
    store.load(set_aside=False)
    try:
        raised = [(t.name, t.value) for t in hostrole.raised_timeouts()]
    except OSError:
        raised = []
    return relief.timeout_advice(store.seen, dict(DEFAULT_TIMEOUTS), raised)


def _boot_notes(policy: Policy) -> list[str]:
    """What would keep the advice from holding at boot: a file that overrides ctguard's, the initramfs."""
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
    store = StateStore(policy.state.dir)
    peaks = store.load_peaks()
    history = store.load_history()
    kernel = Kernel()
    try:
        limits = kernel.limits()
        cur_max, cur_buckets, obj, mem = limits.max, limits.buckets, limits.slab_object_size, limits.mem_total
    except OSError:
        cur_max = cur_buckets = mem = 0
        obj = None
    try:
        now = Clock().now()
    except OSError:
        now = Instant(time.time(), 0.0)
    persisted = persist.read_persisted_max(policy.persist.sysctl_file)
    if persisted is not None and history.persisted_max is None:
        history = history.with_(persisted_max=persisted)   # a file written by an older ctguard, or by hand
    advice = advise(policy, peaks, cur_max, cur_buckets, obj, now.wall, history, mem, now)
    advice["timeouts"] = _timeout_advice(policy)
    advice["boot_notes"] = _boot_notes(policy)
    print(json.dumps(advice, indent=2, sort_keys=True) if as_json else render(advice))
    return 0
