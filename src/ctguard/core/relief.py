"""PURE relief core: past the ceiling, shorten the timeouts that hold what fills one namespace.

The playbook's third lever. When a bump is refused or capped (ceiling, memory, budget, guard)
or cannot keep up (the kernel still drops during the cooldown), and the namespace is still at
or above `thresholds.act` or dropping, ctguard may lower the conntrack timeouts that hold the
entries filling it -- in that namespace only, since nf_conntrack's timeouts are per network
namespace -- and cap the remaining time of the entries already there (TrimEntries). Once the
namespace has been calm (below `thresholds.warn`, no new drops) for `relief.calm_for` seconds,
the originals go back (RestoreTimeout, which leaves alone a value someone else set meanwhile).

Like decide.py: no I/O, no clock; `plan` returns actions with reasons, `advance` folds what
carrying them out did into the ReliefState. Imports only model and policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ctguard.core.model import (
    Action, History, Instant, Outcome, Refuse, Relieved, ReliefState, RestoreTimeout, Sample, SetMax,
    ShortenTimeout, TrimEntries,
)
from ctguard.core.timeouts import sysctl_name

if TYPE_CHECKING:   # the policy's nouns, typed only: the core never loads a file
    from ctguard.config.policy import Policy

BLOCKED = ("ceiling", "memory", "budget", "guard")   # refusals a bigger table cannot fix
SHARE = 0.10        # a timeout is shortened when the entries it holds are at least this share of a look
LOOK_EVERY = 5.0    # seconds between two looks at one namespace's table and timeouts
TRIM_EVERY = 5.0    # seconds between two passes over one namespace's existing entries
# The entries whose remaining timeout a trim may cap: never an assured (answered and confirmed)
# UDP flow nor an open TCP connection, only what was never answered or is already closing.
TRIMMABLE = ("udp", "tcp_syn_sent", "tcp_syn_recv", "tcp_time_wait")
LABELS = {
    "udp": "unanswered UDP",
    "udp_stream": "answered UDP streams",
    "tcp_syn_sent": "half-open TCP (SYN_SENT)",
    "tcp_syn_recv": "half-open TCP (SYN_RECV)",
    "tcp_time_wait": "TCP TIME_WAIT",
    "tcp_close_wait": "TCP CLOSE_WAIT",
    "tcp_fin_wait": "TCP FIN_WAIT",
    "tcp_unacknowledged": "TCP with unacknowledged data",
    "tcp_established": "established TCP",
}


def _at(pairs: Sequence[tuple[int, Instant]], netns: int) -> Instant | None:
    return dict(pairs).get(netns)


def _new_drops(history: History, sample: Sample, netns: int) -> int:
    before = dict(history.drops).get(netns)
    ns = next((n for n in sample.namespaces if n.inode == netns), None)
    if before is None or ns is None:
        return 0
    return max(0, ns.drops - before)


def blocked(actions: Sequence[Action], history: History, sample: Sample) -> tuple[int | None, str]:
    """(namespace, why) when this turn's bump cannot save the table, else (None, "")."""
    for a in actions:
        if isinstance(a, Refuse) and a.kind in BLOCKED:
            return a.netns, f"bump refused ({a.kind})"
        if isinstance(a, SetMax) and a.clipped_by in BLOCKED:
            return a.netns, f"bump capped by the {a.clipped_by}"
        if isinstance(a, Refuse) and a.kind == "cooldown" and a.netns is not None \
                and _new_drops(history, sample, a.netns) > 0:
            return a.netns, "the last bump cannot keep up (still dropping in its cooldown)"
    return None, ""


def plan(policy: Policy, sample: Sample, history: History, now: Instant,
         actions: Sequence[Action]) -> tuple[list[Action], int | None]:
    """Relief actions for this turn, and the namespace relief needs a look at first (or None)."""
    r = policy.relief
    st = history.relief
    out: list[Action] = list(_restores(policy, sample, history, now))
    if r.mode == "off":
        return out, None
    netns, why = blocked(actions, history, sample)
    if netns is None:
        netns = sample.worst.inode if sample.worst else None
        if netns is None:
            return out, None
    ns = next((n for n in sample.namespaces if n.inode == netns), None)
    if ns is None:
        return out, None
    fill = sample.fill(ns)
    dropping = _new_drops(history, sample, netns) > 0
    if not why or not (fill >= policy.thresholds.act or dropping):
        return out, None
    where = f"netns {ns.name}"
    why = f"{why}; {where} at {fill:.1%}" + (" and dropping" if dropping else "")
    restoring = {(a.netns, a.key) for a in out if isinstance(a, RestoreTimeout)}
    active = {x.key: x for x in st.of(netns) if (netns, x.key) not in restoring}
    advised = {k for n, k in st.advised if n == netns}
    wanted = [k for k, _ in r.timeouts if k not in active and k not in advised]

    timeouts = dict(sample.timeouts).get(netns)
    shape = sample.shape if sample.shape is not None and sample.shape.netns == netns else None
    if wanted and (timeouts is None or shape is None or not shape.states):
        last = _at(st.last_look, netns)
        if timeouts is None and (last is None or now.since(last) >= LOOK_EVERY):
            return out, netns
    if wanted and timeouts is not None and shape is not None and shape.seen > 0:
        current = dict(timeouts)
        counts = dict(shape.states)
        for key in sorted(wanted, key=lambda k: -counts.get(k, 0)):
            n = counts.get(key, 0)
            value = r.emergency(key)
            old = current.get(key)
            if value is None or old is None or n < SHARE * shape.seen or n == 0:
                continue
            if old <= value:
                continue        # already at or below its emergency value: nothing to gain
            reason = (f"{why}; {n} of {shape.seen} sampled entries are {LABELS[key]}: "
                      f"{sysctl_name(key)} {old} -> {value} s in {where}")
            out.append(ShortenTimeout(netns, ns.name, key, old, value, reason,
                                      advise=r.mode == "advise" or policy.observe_only, held=n / shape.seen))
    if r.mode == "enforce" and not policy.observe_only:
        trim = {k: x.value for k, x in active.items() if k in TRIMMABLE}
        trim.update({a.key: a.new for a in out if isinstance(a, ShortenTimeout) and a.key in TRIMMABLE})
        last = _at(st.last_trim, netns)
        if trim and (last is None or now.since(last) >= TRIM_EVERY):
            keys = ", ".join(f"{k} <= {v} s" for k, v in sorted(trim.items()))
            out.append(TrimEntries(netns, ns.name, tuple(sorted(trim.items())),
                                   f"{why}; cap the remaining timeout of existing entries ({keys})"))
    return out, None


def _restores(policy: Policy, sample: Sample, history: History, now: Instant) -> list[RestoreTimeout]:
    r = policy.relief
    present = {n.inode for n in sample.namespaces}
    out = []
    for x in history.relief.active:
        reason = None
        if r.mode != "enforce":
            reason = f"relief.mode is {r.mode}"
        elif policy.observe_only:
            reason = "mode is observe"
        elif r.emergency(x.key) is None:
            reason = f"{x.key} is no longer in [relief.timeouts]"
        elif x.netns not in present:
            reason = "the namespace is gone"
        else:
            calm = _at(history.relief.calm_since, x.netns)
            if calm is not None and now.since(calm) >= r.calm_for:
                reason = f"calm for {now.since(calm):.0f} s (relief.calm_for {r.calm_for:g} s)"
        if reason is not None:
            out.append(RestoreTimeout(x.netns, x.name, x.key, x.original, x.value, reason))
    return out


def rows(policy: Policy, state: ReliefState, now: Instant) -> list[dict]:
    """Active relief for `ctguard status`: per namespace and timeout, with the time left."""
    out = []
    calm = dict(state.calm_since)
    for x in state.active:
        since = calm.get(x.netns)
        left = None if since is None else max(0.0, policy.relief.calm_for - now.since(since))
        out.append({"netns": x.netns, "name": x.name, "key": x.key, "value": x.value, "original": x.original,
                    "since": x.since.wall, "calm_since": since.wall if since else None,
                    "seconds_left": None if left is None else round(left, 1)})
    return out


def timeout_advice(seen: dict[str, dict], defaults: dict[str, int], raised: Sequence[tuple[str, int]] = ()) -> list[dict]:
    """`ctguard recommend`'s timeout advice from what relief saw (`seen`: per key, how often it
    shortened or would have shortened it, from what value, and the share of the table those
    entries held) and from the timeouts raised above the kernel's defaults now (`raised`:
    (sysctl name, value)). Each item has the sysctl.d line to write."""
    out = []
    by_name = {sysctl_name(k): k for k in LABELS}
    for key, s in sorted(seen.items(), key=lambda kv: -kv[1].get("times", 0)):
        name = sysctl_name(key)
        default = defaults.get(name)
        original = int(s.get("original", 0))
        share = float(s.get("held", 0.0))
        times = int(s.get("times", 0))
        if default is not None and original > default:
            value = default
            why = (f"{name} was raised to {original} s (kernel default {default} s) and its entries ({LABELS[key]}) "
                   f"held {share:.0%} of the table when relief was needed {times} time(s): go back to the default")
        else:
            value = int(s.get("value", original))
            why = (f"{LABELS[key]} held {share:.0%} of the table when relief was needed {times} time(s) "
                   f"({name} {original} s); {value} s is what relief used"
                   + ("; half-open TCP dominating is the shape of a SYN flood: SYN cookies "
                      "(net.ipv4.tcp_syncookies = 1) and a rate limit help more than any timeout"
                      if key in ("tcp_syn_sent", "tcp_syn_recv") else ""))
        out.append({"key": key, "sysctl": name, "current": original, "recommended": value, "why": why,
                    "line": f"net.netfilter.{name} = {value}"})
    advised = {a["sysctl"] for a in out}
    for name, value in raised:
        default = defaults.get(name)
        if name in advised or default is None or name not in by_name or value <= default:
            continue
        out.append({"key": by_name[name], "sysctl": name, "current": value, "recommended": default,
                    "why": f"{name} is {value} s, above the kernel default {default} s: every entry it holds stays "
                           f"that long; keep it only if something needs it (relief has not needed to cut it yet)",
                    "line": f"net.netfilter.{name} = {default}"})
    return out


def at_start(state: ReliefState, boot_id: str, boot_ids: Sequence[tuple[int, str, str]] = ()) -> tuple[
        list[RestoreTimeout], ReliefState]:
    """What relief left behind when ctguard stopped: restore it now. `boot_ids` gives, per
    (netns, key), the boot the value was written in; a value written in another boot was
    undone by the reboot (relief is never persisted), so it is only forgotten."""
    written_in = {(n, k): b for n, k, b in boot_ids}
    keep, restores = [], []
    for x in state.active:
        if written_in.get((x.netns, x.key), boot_id) != boot_id:
            continue
        restores.append(RestoreTimeout(x.netns, x.name, x.key, x.original, x.value,
                                       "ctguard restarted during relief"))
        keep.append(x)
    return restores, ReliefState(active=tuple(keep), total=state.total)


def restore_all(state: ReliefState, why: str) -> tuple[RestoreTimeout, ...]:
    """Put every relieved timeout back now (ctguard stopping, or relief turned off by a reload)."""
    return tuple(RestoreTimeout(x.netns, x.name, x.key, x.original, x.value, why) for x in state.active)


def advance(state: ReliefState, history: History, sample: Sample | None, outcomes: Sequence[Outcome],
            now: Instant, policy: Policy) -> ReliefState:
    """Fold one turn into the relief state (`history` is the one the turn decided on)."""
    active = {(x.netns, x.key): x for x in state.active}
    advised = set(state.advised)
    last_trim = dict(state.last_trim)
    last_look = dict(state.last_look)
    calm = dict(state.calm_since)
    total = state.total
    for o in outcomes:
        a = o.action
        if isinstance(a, ShortenTimeout):
            if a.advise:
                advised.add((a.netns, a.key))
            elif o.ok:
                prior = active.get((a.netns, a.key))
                active[(a.netns, a.key)] = Relieved(a.netns, a.name, a.key, prior.original if prior else a.old,
                                                    o.read_back if o.read_back is not None else a.new,
                                                    prior.since if prior else now)
                total += 1
            elif o.extra.get("saved"):
                # Written to the state folder but the kernel write failed part way: keep it, so
                # the original is put back whatever the kernel now holds.
                active.setdefault((a.netns, a.key), Relieved(a.netns, a.name, a.key, a.old, a.new, now))
        elif isinstance(a, RestoreTimeout):
            if o.ok or o.extra.get("forget"):
                active.pop((a.netns, a.key), None)
        elif isinstance(a, TrimEntries):
            last_trim[a.netns] = now
    if sample is not None:
        for netns, _ in sample.timeouts:
            last_look[netns] = now
        watched = {n for n, _ in active} | {n for n, _ in advised}
        for ns in sample.namespaces:
            if ns.inode not in watched:
                continue
            quiet = sample.fill(ns) < policy.thresholds.warn and _new_drops(history, sample, ns.inode) == 0
            if not quiet:
                calm.pop(ns.inode, None)
            elif ns.inode not in calm:
                calm[ns.inode] = now
            if quiet and now.since(calm[ns.inode]) >= policy.relief.calm_for:
                advised = {(n, k) for n, k in advised if n != ns.inode}
        watched = {n for n, _ in active} | {n for n, _ in advised}
        present = {ns.inode for ns in sample.namespaces}
        calm = {n: t for n, t in calm.items() if n in watched}
        advised = {(n, k) for n, k in advised if n in present}
        last_trim = {n: t for n, t in last_trim.items() if n in present}
        last_look = {n: t for n, t in last_look.items() if n in present}
    return ReliefState(tuple(active.values()), tuple(sorted(advised)), tuple(calm.items()),
                       tuple(last_look.items()), tuple(last_trim.items()), total)
