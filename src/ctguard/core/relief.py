"""PURE relief core: past the ceiling, age early what fills one namespace, in steps.

The playbook's third lever. When a bump is refused or capped (ceiling, memory, budget, guard)
or cannot keep up (the kernel still drops during the cooldown), and the namespace is still at
or above the high watermark or dropping, ctguard lowers the conntrack timeouts that hold the
entries filling it -- in that namespace only, since nf_conntrack's timeouts are per network
namespace -- and caps the remaining time of the entries already there (TrimEntries).

Which timeouts: the classes of core.timeouts.classify, the timeout the kernel actually applies
to each entry (a DNS query answered at once is held by udp_timeout, not the stream timeout).

How far: graduated early aging between watermarks, like pf's adaptive timeouts and SRX's
early-ageout. From the high watermark (`[relief] high`, default `[thresholds] act`) the
offending classes' timeouts are scaled by (steps - level) / steps, the level growing with how
far the fill has gone towards full (level_for), never below their emergency values; a drop
takes the last level at once. They come back up one level at a time, only below the low
watermark (`[relief] low`, default `[thresholds] warn`), after calm_for / steps seconds of calm
(doubled after each re-entry within REENTRY_WINDOW), and -- `restore = "predicted"` -- only when
the fill predicted at the next level up (each class's count scaled by the timeouts' ratio:
Little's law, entries = arrivals x timeout) stays below the low watermark. A flood that goes on
therefore keeps relief on instead of switching it off and on. At level 0 the originals go back
(RestoreTimeout, which leaves alone a value someone else set meanwhile).

Written or advised, per class: `[relief] mode = "enforce"` (the default) writes only the classes
in `[relief] enforce` (default: unanswered, half-open and closing, core.timeouts.ENFORCE_CLASSES)
and advises the rest, so one namespace may hold both; `mode = "advise"` and observe mode advise all.

Like decide.py: no I/O, no clock; `plan` returns actions with reasons, `advance` folds what
carrying them out did into the ReliefState. Imports only model, timeouts and policy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ctguard.core.model import (
    Action, History, Instant, NamespaceReading, Outcome, Refuse, Relieved, ReliefState, RestoreTimeout, Sample,
    SetMax, ShortenTimeout, TrimEntries,
)
from ctguard.core.timeouts import sysctl_name

if TYPE_CHECKING:   # the policy's nouns, typed only: the core never loads a file
    from ctguard.config.policy import Policy

BLOCKED = ("ceiling", "memory", "budget", "guard")   # refusals a bigger table cannot fix
SHARE = 0.10        # a timeout is shortened when the entries it holds are at least this share of a look
LOOK_EVERY = 5.0    # seconds between two looks at one namespace's table and timeouts
TRIM_EVERY = 5.0    # seconds between two passes over one namespace's existing entries
REENTRY_WINDOW = 3600.0   # entering again within this long after leaving doubles the calm a step up waits
MAX_BACKOFF = 4           # ... up to 2**4 times
# The entries whose remaining timeout a trim may cap: never an assured (answered and confirmed)
# UDP stream nor an open TCP connection, only what was never answered, answered once and done
# (UDP held by udp_timeout) or is already closing.
TRIMMABLE = ("udp", "tcp_syn_sent", "tcp_syn_recv", "tcp_time_wait", "tcp_last_ack", "tcp_unacknowledged")
LABELS = {
    "udp": "unanswered UDP or UDP answered within its first 2 s (held by udp_timeout)",
    "udp_stream": "UDP streams (active after 2 s)",
    "tcp_syn_sent": "half-open TCP (SYN_SENT)",
    "tcp_syn_recv": "half-open TCP (SYN_RECV)",
    "tcp_time_wait": "TCP TIME_WAIT",
    "tcp_close_wait": "TCP CLOSE_WAIT",
    "tcp_fin_wait": "TCP FIN_WAIT",
    "tcp_last_ack": "TCP LAST_ACK",
    "tcp_close": "TCP CLOSE",
    "tcp_unacknowledged": "TCP picked up mid-stream and never answered",
    "tcp_established": "established TCP",
    "icmp": "ICMP",
    "icmpv6": "ICMPv6",
    "generic": "other protocols",
}


def advised_why(policy: Policy, key: str) -> str:
    """Why relief only advises `key` (for the journal): the mode, or the class left out of [relief] enforce."""
    if policy.observe_only:
        return "mode is observe"
    if policy.relief.mode != "enforce":
        return f"relief.mode is {policy.relief.mode}"
    return f"{key} is not in [relief] enforce"


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


# --- the schedule (pure arithmetic) -------------------------------------------------------------

def level_for(fill: float, high: float, steps: int) -> int:
    """The level a fill calls for: 0 below the high watermark, then in proportion to how far the
    fill has gone from it towards full (pf: timeouts x (end - states) / (end - start))."""
    if fill < high:
        return 0
    if high >= 1.0:
        return steps
    return min(steps, max(1, math.ceil(steps * (fill - high) / (1.0 - high) - 1e-9)))


def value_at(original: int, emergency: int, level: int, steps: int) -> int:
    """A timeout at a level: the original scaled by (steps - level) / steps, never below the
    emergency value (the policy's, itself never below the floor) nor above the original."""
    if level <= 0 or original <= emergency:
        return original
    return min(original, max(emergency, round(original * (steps - level) / steps)))


def predicted_fill(count: int, max_: int, states: Sequence[tuple[str, int]], seen: int,
                   now: dict[str, int], then: dict[str, int]) -> float:
    """The fill if the timeouts `now` became `then`: each class's share of the count scaled by
    then / now (Little's law: a class's entries = its arrivals x its timeout). Classes whose
    timeout does not change keep their count."""
    if max_ <= 0:
        return 1.0
    total = float(count)
    for key, n in states:
        a, b = now.get(key), then.get(key)
        if a and b and a != b and seen > 0:
            total += count * n / seen * (b / a - 1.0)
    return max(0.0, total) / max_


def arrival_fill(policy: Policy, count: int, max_: int, states: Sequence[tuple[str, int]], seen: int,
                 current: dict[str, int], originals: dict[str, int], keys: Sequence[str], arrivals: float,
                 level: int) -> float:
    """The fill the arrivals would hold at `level` once each relieved class has turned over.

    Little's law: a class's entries = its arrival rate x its timeout. The relieved classes'
    entries (`keys`, scaled from the look to the count) each arrive at entries / timeout in force
    a second -- scaled up to the measured `arrivals` (new entries/s, dropped ones included) when
    more arrive than that, as while the table fills -- and the rest of the table stays as it is.
    Level 0 with no `originals` is the timeouts in force now."""
    r = policy.relief
    if max_ <= 0:
        return 1.0
    if seen <= 0:
        return count / max_
    held = {k: count * n / seen for k, n in states if k in keys and current.get(k)}
    little = sum(n / current[k] for k, n in held.items())
    scale = max(1.0, arrivals / little) if little > 0 else 1.0
    total = count - sum(held.values())
    for k, n in held.items():
        original = originals.get(k, current[k])
        total += n / current[k] * scale * value_at(original, r.emergency(k) or original, level, r.steps)
    return total / max_


def rate_level(policy: Policy, count: int, max_: int, states: Sequence[tuple[str, int]], seen: int,
               current: dict[str, int], originals: dict[str, int], keys: Sequence[str], arrivals: float,
               low: float, start: int) -> int:
    """The lowest level from `start` at which arrival_fill stays below the low watermark, or the last.

    One level per look let the lab's DNS storm (500 new entries/s, udp_timeout 30 s: 15,000
    wanted, 8,192 allowed) fill the table while relief went 30 -> 22 -> 15 -> 10 s: the level is
    chosen from what the arrivals will hold instead. Below the low watermark, not the high one:
    the kernel reaps expired entries lazily (they count against the max until then), and a step
    back up waits for the same prediction at the level above, so relief does not flap."""
    for level in range(max(start, 1), policy.relief.steps + 1):
        if arrival_fill(policy, count, max_, states, seen, current, originals, keys, arrivals, level) < low:
            return level
    return policy.relief.steps


def step_wait(policy: Policy, reentries: int) -> float:
    """Seconds of calm before each step back up: calm_for / steps, doubled per recent re-entry."""
    r = policy.relief
    return r.calm_for / r.steps * (2 ** min(reentries, MAX_BACKOFF))


# --- plan ---------------------------------------------------------------------------------------

def _level_of(st: ReliefState, netns: int, steps: int) -> int:
    lv = dict(st.levels).get(netns)
    if lv is None:
        return steps if st.of(netns) or any(n == netns for n, _ in st.advised) else 0
    return min(lv, steps)


def _freed(st: ReliefState, ns: NamespaceReading) -> int:
    for n, _t, count in st.entered:
        if n == ns.inode:
            return max(0, count - ns.count)
    return 0


def plan(policy: Policy, sample: Sample, history: History, now: Instant,
         actions: Sequence[Action], rate_of: Callable[[int], float] = lambda netns: 0.0,
         ) -> tuple[list[Action], int | None]:
    """Relief actions for this turn, and the namespace relief needs a look at first (or None).
    `rate_of(netns)`: new entries a second arriving there (growth and drops, decide's reading)."""
    r = policy.relief
    st = history.relief
    out: list[Action] = list(_restores(policy, sample, history, now))
    if r.mode == "off":
        return out, None
    restoring = {a.netns for a in out if isinstance(a, RestoreTimeout)}
    look: int | None = None
    relieved = sorted({x.netns for x in st.active} | {n for n, _ in st.advised} | {n for n, _ in st.levels})
    for netns in relieved:
        if netns in restoring:
            continue
        ns = next((n for n in sample.namespaces if n.inode == netns), None)
        if ns is None:
            continue
        acts, need = _schedule(policy, sample, history, now, ns, rate_of(netns))
        out.extend(acts)
        if look is None and need is not None:
            look = need
    netns, why = blocked(actions, history, sample)
    if netns is None or netns in relieved:
        return out, look
    ns = next((n for n in sample.namespaces if n.inode == netns), None)
    if ns is None:
        return out, look
    fill = sample.fill(ns)
    dropping = _new_drops(history, sample, netns) > 0
    high, low = r.high_mark(policy.thresholds), r.low_mark(policy.thresholds)
    arrivals = rate_of(netns)
    # Growing past the low watermark with no bigger table to come: look now, so relief can act
    # before the table is full when the arrivals will fill it (the prediction below).
    growing = arrivals > 0 and fill >= low
    if not (fill >= high or dropping or growing):
        return out, look
    timeouts = dict(sample.timeouts).get(netns)
    shape = sample.shape if sample.shape is not None and sample.shape.netns == netns else None
    if timeouts is None or shape is None or not shape.states:
        last = _at(st.last_look, netns)
        if timeouts is None and (last is None or now.since(last) >= LOOK_EVERY):
            return out, netns
        return out, look
    current = dict(timeouts)
    keys = [k for k, _ in _offending(policy, shape, current)]
    ahead = ""
    if not (fill >= high or dropping):
        will = arrival_fill(policy, ns.count, sample.limits.max, shape.states, shape.seen, current, {}, keys,
                            arrivals, 0)
        if not keys or will < high:
            return out, look        # what arrives fits at today's timeouts
        ahead = f", {arrivals:.0f} new entries/s would hold {will:.0%} at today's timeouts"
    level = r.steps if dropping else max(level_for(fill, high, r.steps),
                                         rate_level(policy, ns.count, sample.limits.max, shape.states, shape.seen,
                                                    current, {}, keys, arrivals, low, 1))
    why = f"{why}; netns {ns.name} at {fill:.1%}" + (" and dropping" if dropping else ahead)
    acts = _shorten(policy, ns, fill, shape, current, {}, level, "enter", why, 0)
    out.extend(acts)
    if r.mode == "enforce" and not policy.observe_only:
        trim = {a.key: a.new for a in acts if isinstance(a, ShortenTimeout) and a.key in TRIMMABLE and not a.advise}
        if trim:
            out.append(_trim(ns, trim, why, {a.key: a.old for a in acts if isinstance(a, ShortenTimeout)}))
    return out, look


def _offending(policy: Policy, shape, current: dict[str, int]) -> list[tuple[str, int]]:
    """(key, entries) of the classes that hold at least SHARE of the look and that the policy may shorten."""
    counts = dict(shape.states)
    out = []
    for key, _ in policy.relief.timeouts:
        n = counts.get(key, 0)
        if n > 0 and n >= SHARE * shape.seen and key in current:
            out.append((key, n))
    return sorted(out, key=lambda kn: -kn[1])


def _shorten(policy: Policy, ns: NamespaceReading, fill: float, shape, current: dict[str, int],
             originals: dict[str, int], level: int, step: str, why: str, freed: int) -> list[Action]:
    """ShortenTimeouts taking the offending classes (and those already relieved) to `level`."""
    r = policy.relief
    keys: list[tuple[str, int]] = []
    if shape is not None and shape.seen > 0:
        keys = _offending(policy, shape, current)
    have = {k for k, _ in keys}
    keys += [(k, 0) for k in originals if k not in have]
    out: list[Action] = []
    for key, n in keys:
        emergency = r.emergency(key)
        old = current.get(key)
        original = originals.get(key, old)
        if emergency is None or old is None or original is None:
            continue
        new = value_at(original, emergency, level, r.steps)
        if new >= old:
            continue        # already at or below this level's value: nothing to gain
        held = n / shape.seen if shape is not None and shape.seen and n else 0.0
        what = (f"{n} of {shape.seen} sampled entries are {LABELS.get(key, key)}" if n
                else f"{LABELS.get(key, key)} relieved already")
        lead = "entering relief" if step == "enter" else "relief steps down"
        reason = (f"{lead} at level {level}/{r.steps}: {sysctl_name(key)} {old} -> {new} s in netns {ns.name} "
                  f"(original {original} s" + (f", {freed} entries freed so far" if step != "enter" else "")
                  + f"); {why}; {what}")
        # Advised, never written: relief.mode advise, observe mode, or a class not in [relief] enforce.
        advise = policy.observe_only or not r.enforces(key)
        out.append(ShortenTimeout(ns.inode, ns.name, key, old, new, reason, advise=advise, held=held, step=step,
                                  level=level, steps=r.steps, fill=fill, freed=freed))
    return out


def _trim(ns: NamespaceReading, caps: dict[str, int], why: str, previous: dict[str, int] | None = None) -> TrimEntries:
    """Trim the existing entries to `caps`; `previous` (the values before this step) ages them
    as if the new values had been in force since each entry's last packet (host.trim.plan_entry)."""
    prev = {k: v for k, v in (previous or {}).items() if k in caps and v > caps[k]}
    keys = ", ".join(f"{k} <= {v} s" + (f", aged from {prev[k]} s" if k in prev else "") for k, v in sorted(caps.items()))
    return TrimEntries(ns.inode, ns.name, tuple(sorted(caps.items())),
                       f"{why}; cap the remaining timeout of existing entries ({keys})", tuple(sorted(prev.items())))


def _schedule(policy: Policy, sample: Sample, history: History, now: Instant,
              ns: NamespaceReading, arrivals: float = 0.0) -> tuple[list[Action], int | None]:
    """One relieved namespace's turn: a step down as the fill climbs, a step up (or leaving) as
    it falls below the low watermark and stays there, periodic trims in between."""
    r = policy.relief
    st = history.relief
    netns = ns.inode
    level = _level_of(st, netns, r.steps)
    fill = sample.fill(ns)
    dropping = _new_drops(history, sample, netns) > 0
    high, low = r.high_mark(policy.thresholds), r.low_mark(policy.thresholds)
    timeouts = dict(sample.timeouts).get(netns)
    shape = sample.shape if sample.shape is not None and sample.shape.netns == netns else None
    active = {x.key: x for x in st.of(netns)}
    advised = [k for n, k in st.advised if n == netns and k not in active]
    # One namespace may hold both: classes written (active: their saved originals and the values
    # in force) and classes only advised ([relief] enforce leaves them out, or mode advise), whose
    # values in the namespace are still the originals.
    base = dict(timeouts) if timeouts is not None else {}
    originals = {k: base[k] for k in advised if k in base}
    current = {k: value_at(v, r.emergency(k) or v, level, r.steps) for k, v in originals.items()}
    originals.update({k: x.original for k, x in active.items()})
    current.update({k: x.value for k, x in active.items()})
    written = {k: x.value for k, x in active.items()}
    freed = _freed(st, ns)
    where = f"netns {ns.name} at {fill:.1%}" + (" and dropping" if dropping else "")

    # What is in force: the namespace's values as looked at, ours (written or advised) over them.
    cur = {**(dict(timeouts) if timeouts is not None else {}), **current}
    target = r.steps if dropping else level_for(fill, high, r.steps)
    if 0 < target < r.steps and shape is not None and shape.seen:
        # Above the high watermark: straight to the level the arrivals need, not one level a look.
        keys = sorted({k for k, _ in _offending(policy, shape, cur)} | set(originals))
        target = max(target, rate_level(policy, ns.count, sample.limits.max, shape.states, shape.seen, cur,
                                        originals, keys, arrivals, low, target))
    if target > level:
        acts = _shorten(policy, ns, fill, shape, cur, originals, target, "down",
                        f"{where}, above the high watermark {high:.0%}", freed)
        out: list[Action] = list(acts)
        caps = {k: v for k, v in written.items() if k in TRIMMABLE}
        caps.update({a.key: a.new for a in acts if isinstance(a, ShortenTimeout) and a.key in TRIMMABLE
                     and not a.advise})
        if caps:
            out.append(_trim(ns, caps, where, {a.key: a.old for a in acts if isinstance(a, ShortenTimeout)}))
        return out, None

    quiet = fill < low and not dropping
    calm = _at(st.calm_since, netns)
    reentries = dict(st.reentries).get(netns, 0)
    wait = step_wait(policy, reentries)
    if quiet and calm is not None and now.since(calm) >= wait:
        # The next level up that changes a value (two levels may share one at the emergency floor).
        up = level - 1
        then = {k: value_at(o, r.emergency(k) or o, up, r.steps) for k, o in originals.items()}
        while up > 0 and all(then[k] <= current.get(k, then[k]) for k in then):
            up -= 1
            then = {k: value_at(o, r.emergency(k) or o, up, r.steps) for k, o in originals.items()}
        if r.restore == "predicted":
            if timeouts is None or shape is None or shape.error:
                # (An empty look is an answer: nothing left to scale.)
                last = _at(st.last_look, netns)
                return [], (netns if last is None or now.since(last) >= LOOK_EVERY else None)
            # Advising changed nothing: the table already shows the fill at the originals of the
            # advised classes; only the written ones scale.
            now_values = {**dict(timeouts), **written}
            then_values = {**dict(timeouts), **{k: v for k, v in then.items() if k in written}}
            predicted = predicted_fill(ns.count, sample.limits.max, shape.states, shape.seen, now_values, then_values)
            if predicted >= low:
                return [], None     # the flood goes on: the fill at the next level up would be back above low
            basis = f"the fill predicted at level {up}/{r.steps} is {predicted:.1%}, below the low watermark {low:.0%}"
        else:
            basis = f"below the low watermark {low:.0%}"
        why = (f"{where}; calm for {now.since(calm):.0f} s (step wait {wait:g} s"
               + (f", backed off x{2 ** min(reentries, MAX_BACKOFF)} after {reentries} re-entries" if reentries else "")
               + f"); {basis}; {freed} entries freed since relief entered")
        if up <= 0:
            out = []
            for k, o in sorted(originals.items()):
                relieved = active[k].value if k in active else current.get(k, o)
                out.append(RestoreTimeout(netns, ns.name, k, o, relieved, f"leaving relief: {why}",
                                          advise=k not in active, fill=fill, freed=freed))
            return out, None
        out = []
        for k, o in sorted(originals.items()):
            old = current.get(k, o)
            if then[k] > old:
                out.append(ShortenTimeout(netns, ns.name, k, old, then[k],
                                          f"relief steps up to level {up}/{r.steps}: {sysctl_name(k)} {old} -> "
                                          f"{then[k]} s in netns {ns.name} (original {o} s); {why}",
                                          advise=k not in active, step="up", level=up, steps=r.steps, fill=fill,
                                          freed=freed))
        return out, None

    if written and fill >= high:
        caps = {k: v for k, v in written.items() if k in TRIMMABLE}
        last = _at(st.last_trim, netns)
        if caps and (last is None or now.since(last) >= TRIM_EVERY):
            return [_trim(ns, caps, where)], None
    return [], None


def _restores(policy: Policy, sample: Sample, history: History, now: Instant) -> list[RestoreTimeout]:
    """Restores that do not wait for the schedule: relief turned off or to advise, observe mode,
    a key no longer in the policy, a namespace gone."""
    r = policy.relief
    present = {n.inode for n in sample.namespaces}
    out = []
    for x in history.relief.active:
        reason = None
        if r.mode != "enforce":
            reason = f"relief.mode is {r.mode}"
        elif policy.observe_only:
            reason = "mode is observe"
        elif x.key not in r.enforce:
            reason = f"{x.key} is no longer in [relief] enforce"
        elif r.emergency(x.key) is None:
            reason = f"{x.key} is no longer in [relief.timeouts]"
        elif x.netns not in present:
            reason = "the namespace is gone"
        if reason is not None:
            out.append(RestoreTimeout(x.netns, x.name, x.key, x.original, x.value, reason))
    return out


def rows(policy: Policy, state: ReliefState, now: Instant) -> list[dict]:
    """Active relief for `ctguard status`: per namespace and timeout, the level and the time left
    before the next step back up (None: not calm, or the predicted fill holds it)."""
    out = []
    calm = dict(state.calm_since)
    reentries = dict(state.reentries)
    for x in state.active:
        since = calm.get(x.netns)
        wait = step_wait(policy, reentries.get(x.netns, 0))
        left = None if since is None else max(0.0, wait - now.since(since))
        out.append({"netns": x.netns, "name": x.name, "key": x.key, "value": x.value, "original": x.original,
                    "since": x.since.wall, "calm_since": since.wall if since else None,
                    "level": _level_of(state, x.netns, policy.relief.steps), "steps": policy.relief.steps,
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
    levels = dict(state.levels)
    entered = {n: (t, c) for n, t, c in state.entered}
    reentries = dict(state.reentries)
    left = dict(state.left)
    total = state.total
    steps = policy.relief.steps
    counts = {ns.inode: ns.count for ns in sample.namespaces} if sample is not None else {}
    for o in outcomes:
        a = o.action
        if isinstance(a, ShortenTimeout):
            moved = False
            if a.advise:
                if a.step != "up":
                    advised.add((a.netns, a.key))
                moved = True
            elif o.ok:
                prior = active.get((a.netns, a.key))
                # The value read before the write is the original (a.old is the advised level's
                # value when a reload moved an advised class into [relief] enforce).
                original = prior.original if prior else o.extra.get("old", a.old)
                active[(a.netns, a.key)] = Relieved(a.netns, a.name, a.key, original,
                                                    o.read_back if o.read_back is not None else a.new,
                                                    prior.since if prior else now)
                advised.discard((a.netns, a.key))
                if a.step != "up":
                    total += 1
                moved = True
            elif o.extra.get("saved"):
                # Written to the state folder but the kernel write failed part way: keep it, so
                # the original is put back whatever the kernel now holds.
                active.setdefault((a.netns, a.key), Relieved(a.netns, a.name, a.key, a.old, a.new, now))
                moved = True
            elif o.extra.get("forget"):
                active.pop((a.netns, a.key), None)     # a step up found the operator's value: theirs stays
            if moved:
                if a.netns not in entered:
                    last_left = left.get(a.netns)
                    soon = last_left is not None and now.since(last_left) < REENTRY_WINDOW
                    reentries[a.netns] = reentries.get(a.netns, 0) + 1 if soon else 0
                    entered[a.netns] = (now, counts.get(a.netns, 0))
                levels[a.netns] = min(a.level, steps) if a.level else steps
                if a.step == "up":
                    calm[a.netns] = now     # the next step up waits a whole step again
        elif isinstance(a, RestoreTimeout):
            if a.advise:
                advised.discard((a.netns, a.key))
            elif o.ok or o.extra.get("forget"):
                active.pop((a.netns, a.key), None)
        elif isinstance(a, TrimEntries):
            last_trim[a.netns] = now
    relieved = {n for n, _ in active} | {n for n, _ in advised}
    for n in [n for n in entered if n not in relieved]:
        del entered[n]
        left[n] = now
    levels = {n: lv for n, lv in levels.items() if n in relieved}
    if sample is not None:
        for netns, _ in sample.timeouts:
            last_look[netns] = now
        low = policy.relief.low_mark(policy.thresholds)
        for ns in sample.namespaces:
            if ns.inode not in relieved:
                continue
            quiet = sample.fill(ns) < low and _new_drops(history, sample, ns.inode) == 0
            if not quiet:
                calm.pop(ns.inode, None)
            elif ns.inode not in calm:
                calm[ns.inode] = now
        present = {ns.inode for ns in sample.namespaces}
        advised = {(n, k) for n, k in advised if n in present}
        last_trim = {n: t for n, t in last_trim.items() if n in present}
        last_look = {n: t for n, t in last_look.items() if n in present}
    calm = {n: t for n, t in calm.items() if n in relieved}
    left = {n: t for n, t in left.items() if now.since(t) < REENTRY_WINDOW}
    reentries = {n: c for n, c in reentries.items() if n in relieved or n in left}
    return ReliefState(tuple(active.values()), tuple(sorted(advised)), tuple(calm.items()),
                       tuple(last_look.items()), tuple(last_trim.items()), total,
                       tuple(sorted(levels.items())), tuple((n, t, c) for n, (t, c) in sorted(entered.items())),
                       tuple(sorted(reentries.items())), tuple(sorted(left.items())))
