"""PURE diagnosis: a bundle's data in, ranked findings and a verdict out.

The playbook operators follow by hand after an incident (protocol and TCP-state breakdown, top
destinations, NAT, timeouts, invalid with drops, which namespace) has a decision at every step;
this module takes those decisions, each a function of the bundle's numbers only, so every one is
a row in a table-driven test (tests/test_diagnose.py, tests/unit/core/test_diagnose_causes.py).
No I/O, no clock: `BundleData` holds the parsed files (manifest.toml, evidence.toml,
timeline.json, policy.toml) and nothing else.

One story per cause: the rules that name what filled the table (an attack, the UDP insert race,
an unreachable destination, TIME_WAIT or answered-once UDP churn, a raised timeout) each tell
their cause once, with every piece of evidence that belongs to it (its source, destination,
state, port, and what users lost: drops and refused bumps), and rank before the consequences
and context (the drops of a full table, max near its cap, long hash chains, one namespace, one
protocol). A talker a cause already names is not a finding of its own.

Every finding has a stable kebab-case `id` (documented in docs/findings.md: alerts and scripts
may match on it), a `severity`, a `summary` a person can act on, the `evidence` (the numbers
that triggered it), the `action`, and, where the action is a rule, a `rule` ready to paste and
scoped to what the bundle saw. A rule is a suggestion: ctguard never applies it. Every nftables
rule limits new flows only (`ct state new`), sits in the hook that sees the traffic, and is
never suggested against a gateway's own clients or the management path (ssh, the kubelet).

A healthy or empty table yields no finding at all.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ctguard.core.decide import shape_judgement
from ctguard.core.model import TableShape
from ctguard.core.refusals import distinct, repeat_window
from ctguard.core.sizing import EXTENSION_BYTES, HASH_HEAD_BYTES

CRITICAL, WARNING, INFO = "critical", "warning", "info"
SEVERITY_RANK = {CRITICAL: 0, WARNING: 1, INFO: 2}
CAUSE, CONSEQUENCE = "cause", "consequence"

# The shares that make a thing "dominant". One place, documented in docs/findings.md.
PROTOCOL_SHARE = 0.6        # one protocol holds this share of the entries
STATE_SHARE = 0.5           # one TCP state holds this share of the TCP entries ...
TCP_SHARE = 0.3             # ... and TCP holds at least this share of the table
UDP_SHARE = 0.5             # UDP holds this share while a UDP timeout is raised
TALKER_SHARE = 0.3          # one source / destination holds this share (lower bound of its count)
NAMESPACE_SHARE = 0.6       # one namespace holds this share of all namespaces' entries
ATTACK_SHARE = 0.5          # unanswered or half-open share that counts as attack-shaped ([guard] suspicious_share)
ATTACK_SOURCES = 256        # ... from at least this many distinct sources ([guard] min_sources)
STALE_SHARE = 0.3           # unanswered share that counts as "many stale entries"
NO_TRACK_SHARE = 0.3        # one local UDP service port holds this share
CHAIN_LIMIT = 8.0           # entries (or max) per bucket above which chains are long
CAP_NEAR = 0.9              # max at this share of the ceiling / memory cap leaves no room
HEALTHY_FILL = 0.7          # below this peak fill, with no drop and no action, a table is healthy
FULL_FILL = 0.9             # drops at or above this fill are the table's size (capacity)
RACE_FILL = 0.5             # drops with failed inserts below this fill are the insert race, not the size
STALLED_SHARE = 0.5         # SYN_SENT (of TCP) or unanswered UDP (of UDP) that counts as stalled
FEW_DESTINATIONS = 3        # "few destinations": the stalled entries sit on at most this many ...
FEW_SHARE = 0.5             # ... holding at least this share of them
MANY_SOURCES = 10           # "many internal sources": at least this many distinct sources
ANSWERED_ONCE_SHARE = 0.5   # answered but never assured UDP (a query and its answer) of the UDP entries
DEFAULT_CEILING = 1048576
DEFAULT_MEMORY_FRACTION = 0.10
DEFAULT_OBJECT_SIZE = 320

# Local services whose traffic needs no connection state on a host that does no NAT for them.
NO_TRACK_PORTS = {"udp/53": "DNS", "udp/123": "NTP"}
# The management path no suggested rule may cut: ssh and the kubelet's API.
MANAGEMENT_PORTS = (22, 10250)
UDP_TIMEOUTS = ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream")
KERNEL_DEFAULT_TIMEOUTS = {"nf_conntrack_udp_timeout": 30, "nf_conntrack_udp_timeout_stream": 120,
                           "nf_conntrack_tcp_timeout_established": 432000,
                           "nf_conntrack_tcp_timeout_time_wait": 120}
SUGGESTION = "# a suggestion: ctguard never applies it"


def action_name(action: Mapping[str, Any]) -> str:
    """The class of one action in a bundle's decision ("SetMax", "Refuse", ...). The daemon
    writes it under `action` (daemon.captures.jsonable), beside the action's own `kind` (a
    Refuse's bound, a Warn's kind); bundles written before put the class in `kind` instead."""
    return str(action.get("action") or action.get("kind") or "")


def refusal_bound(action: Mapping[str, Any]) -> str:
    """The bound that refused a Refuse action ("ceiling", "guard", ...): its own `kind`, which
    bundles written before the class moved to `action` lost ("" then)."""
    return str(action.get("kind", "")) if action.get("action") == "Refuse" else ""


@dataclass(frozen=True)
class Finding:
    id: str
    severity: str
    summary: str
    evidence: Mapping[str, Any]
    action: str
    rule: str = ""              # a rule ready to paste (a suggestion: ctguard never applies it)
    weight: float = 0.0         # share of the table it explains, for ranking within a severity
    tier: str = CAUSE           # causes rank before consequences and context

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "severity": self.severity, "kind": self.tier,
                               "summary": self.summary, "evidence": dict(self.evidence), "action": self.action}
        if self.rule:
            out["rule"] = self.rule
            out["rule_note"] = "a suggestion: ctguard never applies it"
        return out


@dataclass(frozen=True)
class BundleData:
    """The parsed files of one bundle (any may be empty)."""

    manifest: Mapping[str, Any] = field(default_factory=dict)
    evidence: Mapping[str, Any] = field(default_factory=dict)
    timeline: Mapping[str, Any] | None = None
    policy: Mapping[str, Any] = field(default_factory=dict)
# --- facts: the numbers every rule reads, computed once ------------------------------------


@dataclass(frozen=True)
class SeriesFacts:
    inode: int
    name: str
    unit: str
    container: str
    first: int
    last: int
    peak: int
    peak_at: float
    peak_max: int               # the max in force when the peak was sampled
    fullest: float              # the highest fill of any point, against the max in force then
    fullest_at: float
    fullest_max: int
    rise_from: int
    rise_seconds: float
    drop: int                   # counter increases over the window
    early_drop: int
    insert_failed: int
    invalid: int

    @property
    def peak_fill(self) -> float:
        return self.peak / self.peak_max if self.peak_max else 0.0

    @property
    def rate(self) -> float:
        return (self.peak - self.rise_from) / self.rise_seconds if self.rise_seconds > 0 else 0.0

    @property
    def label(self) -> str:
        who = self.container or self.unit
        return f"{self.name} ({who})" if who and who not in self.name else self.name


@dataclass(frozen=True)
class Facts:
    entries: int                # entries the dump read
    count: int                  # nf_conntrack_count of the captured namespace at capture
    max: int                    # nf_conntrack_max at capture (0: unknown)
    buckets: int
    table: Mapping[str, Any]
    protos: Mapping[str, int]
    states: Mapping[str, int]
    unreplied: int
    series: tuple[SeriesFacts, ...]
    events: tuple[Mapping[str, Any], ...]
    totals: Mapping[str, int]   # per-CPU totals of the captured namespace (since it was created)
    window_drops: Mapping[str, int] | None   # summed increases over the recorded window, None without one
    role: str
    roles: tuple[str, ...]
    nat: bool | None            # NAT rules seen in the captured namespace (None: unknown)
    nat_text: str
    raised: tuple[Mapping[str, Any], ...]
    ceiling: int
    upper: int
    upper_by: str
    netns_label: str
    # The captured namespace judged on its own: its NAT rules and forwarding, not the host's.
    host_ns: bool = True
    inode: int = 0                                  # the captured namespace's inode (0: unknown)
    netns_path: str = ""
    forwards: bool | None = None
    nat_kinds: Mapping[str, int] = field(default_factory=dict)
    ns_role: str = ""
    listening_udp: frozenset[int] | None = None     # local UDP ports with a bound socket (None: not read)
    listening_tcp: frozenset[int] | None = None
    guard: str = ""                                 # the guard's judgement recorded by the daemon ("" none)
    guard_cleared: str = ""                         # ... or its word that the growth is not an attack
    refusals: tuple[Mapping[str, Any], ...] = ()    # refused bumps (ceiling, memory, guard, budget)
    incident: Mapping[str, Any] = field(default_factory=dict)
    guard_share: float = ATTACK_SHARE
    guard_sources: int = ATTACK_SOURCES
    clash: int = 0                                  # clash_resolve: inserts the kernel saved from the race
    local_addrs: frozenset[str] = frozenset()       # the captured namespace's own addresses

    @property
    def gateway(self) -> bool:
        """The captured namespace forwards other hosts' flows (NAT gateway, router, node)."""
        return self.ns_role in ("NAT gateway", "router", "Kubernetes node", "container host")

    @property
    def largest(self) -> tuple[int, int]:
        """The largest count seen of the captured namespace (timeline, dump, incident), with the
        max in force at that moment: the one peak every view states."""
        cands: list[tuple[int, int]] = []
        own = next((s for s in self.series if self.inode and s.inode == self.inode), None)
        p = own if own is not None else self.peak
        if p is not None:
            cands.append((p.peak, p.peak_max))
        cands.append((max(self.count, self.entries), self.max))
        inc_peak = _int(self.incident.get("peak_count"))
        inc_max = _int(self.incident.get("peak_max"))
        fill = _float(self.incident.get("peak_fill"))
        if inc_peak and inc_max:
            cands.append((inc_peak, inc_max))
        elif inc_peak and fill > 0:
            # A bundle written before the incident kept its peak's max: peak_fill is the fullest
            # fill, which need not be the peak count's, so this max is a guess.
            cands.append((inc_peak, int(round(inc_peak / fill))))
        return max(cands, key=lambda c: (c[0], 1 if c[1] else 0, -c[1]))

    @property
    def tcp(self) -> int:
        return int(self.protos.get("tcp", 0))

    @property
    def peak(self) -> SeriesFacts | None:
        return max((s for s in self.series if s.peak > 0), key=lambda s: (s.fullest, s.peak), default=None)

    @property
    def peak_fill(self) -> float:
        p = self.peak
        fills = [p.fullest] if p else []
        if self.max:
            fills.append(self.count / self.max)
        return max(fills, default=0.0)

    def kind_count(self, kind: str) -> int:
        return sum(1 for e in self.events if e.get("kind") == kind)

    @property
    def drops(self) -> dict[str, int]:
        src = self.window_drops if self.window_drops is not None else self.totals
        return {k: int(src.get(k, 0)) for k in ("drop", "early_drop", "insert_failed")}


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _float(value: Any, default: float = 0.0) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def _increase(values: Sequence[int]) -> int:
    """Sum of a counter's increases; a counter that went back (namespace recreated) restarts."""
    total = 0
    for a, b in zip(values, values[1:]):
        total += b - a if b >= a else b
    return total


def _series(ns: Mapping[str, Any]) -> SeriesFacts | None:
    t = list(ns.get("t", []))
    entries = [_int(v) for v in ns.get("entries", [])]
    if not t or len(entries) != len(t):
        return None
    maxes = [_int(v) for v in ns.get("max", [])] or [0] * len(t)
    i = max(range(len(entries)), key=lambda k: (entries[k], -k))
    peak = entries[i]
    # Where the rise to the peak began: the last point before it within 10% of the low.
    low = min(entries[: i + 1])
    j = i
    while j > 0 and entries[j - 1] - low > 0.1 * (peak - low):
        j -= 1
    # From the first point of the rise (not the calm point before it, up to a second earlier).
    start = j if j < i else max(0, j - 1)
    fills = [e / m if m else 0.0 for e, m in zip(entries, maxes)]
    k = max(range(len(fills)), key=lambda n: (fills[n], -n))
    return SeriesFacts(
        inode=_int(ns.get("inode")), name=str(ns.get("name", ns.get("inode", "?"))),
        unit=str(ns.get("unit", "")), container=str(ns.get("container", "")),
        first=entries[0], last=entries[-1], peak=peak, peak_at=float(t[i]),
        peak_max=maxes[i] if i < len(maxes) else 0,
        fullest=fills[k], fullest_at=float(t[k]), fullest_max=maxes[k],
        rise_from=entries[start], rise_seconds=float(t[i]) - float(t[start]),
        drop=_increase([_int(v) for v in ns.get("drop", [])]),
        early_drop=_increase([_int(v) for v in ns.get("early_drop", [])]),
        insert_failed=_increase([_int(v) for v in ns.get("insert_failed", [])]),
        invalid=_increase([_int(v) for v in ns.get("invalid", [])]),
    )


def _policy_value(policy: Mapping[str, Any], section: str, key: str, default: Any) -> Any:
    sec = policy.get(section, {})
    return sec.get(key, default) if isinstance(sec, Mapping) else default


def facts(data: BundleData) -> Facts:
    m, ev = data.manifest, data.evidence
    table = ev.get("table", {}) or {}
    sysctl = (ev.get("sysctl", {}) or {}).get("sysctl", {}) or {}
    entries = _int(table.get("entries"))
    count = _int(sysctl.get("nf_conntrack_count"), entries)
    kmax = _int(sysctl.get("nf_conntrack_max"))
    buckets = _int((ev.get("sysctl", {}) or {}).get("hashsize"), _int(sysctl.get("nf_conntrack_buckets")))
    tl = data.timeline or {}
    series = tuple(s for s in (_series(ns) for ns in tl.get("namespaces", [])) if s is not None)
    window_drops = None
    if series:
        window_drops = {"drop": sum(s.drop for s in series), "early_drop": sum(s.early_drop for s in series),
                        "insert_failed": sum(s.insert_failed for s in series),
                        "invalid": sum(s.invalid for s in series)}
    host = ev.get("host", {}) or {}
    rules = ev.get("rules", {}) or {}
    nat: bool | None
    if rules.get("nft_nat") or rules.get("iptables_nat"):
        nat = True
    elif "does no NAT" in str(rules.get("nat_verdict", "")):
        nat = False
    else:
        nat = None
    # The bounds: the timeline's (the daemon's view) first, else from the bundle's policy and memory.
    ceiling = _int(tl.get("ceiling"), _int(_policy_value(data.policy, "bump", "ceiling", DEFAULT_CEILING)))
    upper, upper_by = _int(tl.get("upper_bound")), str(tl.get("upper_bound_by", ""))
    if not upper:
        upper, upper_by = ceiling, "ceiling"
        slab = (ev.get("slab", {}) or {}).get("slab", {}) or {}
        mem = _int(((ev.get("memory", {}) or {}).get("bytes", {}) or {}).get("MemTotal"))
        if mem:
            frac = float(_policy_value(data.policy, "bump", "memory_fraction", DEFAULT_MEMORY_FRACTION))
            cap = int(frac * mem / (_int(slab.get("objsize"), DEFAULT_OBJECT_SIZE) + EXTENSION_BYTES + HASH_HEAD_BYTES))
            if cap < ceiling:
                upper, upper_by = cap, "memory"
    netns = m.get("netns", {}) or {}
    label = str(netns.get("path", "")) if isinstance(netns, Mapping) else str(netns)
    inode = _int(netns.get("inode")) if isinstance(netns, Mapping) else 0
    named = next((s for s in series if s.inode == inode), None)
    if named is not None:
        label = named.label
    elif label in ("", "(ctguard's own)"):
        label = "the host namespace"
    nat_kinds: dict[str, int] = {}
    for key in ("nft_nat", "iptables_nat"):
        for k, v in ((rules.get(key) or {}) if isinstance(rules.get(key), Mapping) else {}).items():
            nat_kinds[str(k).lower()] = nat_kinds.get(str(k).lower(), 0) + _int(v)
    net = ev.get("network", {}) or {}
    fwd_map = net.get("forwarding") if isinstance(net, Mapping) else None
    forwards = any(bool(v) for v in fwd_map.values()) if isinstance(fwd_map, Mapping) and fwd_map else None
    path = str(netns.get("path", "")) if isinstance(netns, Mapping) else str(netns)
    host_ns = path in ("", "(ctguard's own)", "/proc/1/ns/net") or (named is not None and named.name == "host")
    role = str(host.get("role", ""))
    snat = any(nat_kinds.get(k) for k in ("masquerade", "snat", "netmap"))
    if snat:
        ns_role = "Kubernetes node" if host_ns and role == "Kubernetes node" else "NAT gateway"
    elif host_ns and role and role != "server":
        ns_role = role
    elif forwards:
        ns_role = "router"
    elif host_ns:
        ns_role = role or "server"
    else:
        ns_role = "endpoint"
    listen = ev.get("listening", {}) or {}
    udp_ports = frozenset(_int(p) for p in listen.get("udp_ports", []) or []) if "udp_ports" in listen else None
    tcp_ports = frozenset(_int(p) for p in listen.get("tcp_ports", []) or []) if "tcp_ports" in listen else None
    events = tuple(e for e in tl.get("events", []) if isinstance(e, Mapping))
    # One per refused bump (core.refusals), also in bundles of a version that recorded one per sample.
    refusals = distinct(events, repeat_window(_float(_policy_value(data.policy, "bump", "cooldown", 30.0), 30.0)))
    decision = m.get("decision", {}) or {}
    guard = cleared = ""
    for a in (decision.get("actions", []) or []) if isinstance(decision, Mapping) else []:
        if not isinstance(a, Mapping):
            continue
        why = str(a.get("reason", ""))
        if "attack-shaped growth" in why:
            guard = why[why.index("attack-shaped growth"):].split(";")[0]
        elif a.get("clipped_by", a.get("clipped")) == "guard" or "[guard] ceiling" in why:
            guard = guard or "growth held at [guard] ceiling"
        for cleared_by in ("an outage, not an attack", "not a spoofed flood"):     # decide.judge's words
            if cleared_by in why and not cleared:
                cleared = why[why.index(cleared_by):].split(";")[0]
        # The decision's refusal is one the timeline holds when a recorded refusal has its bound
        # and max (the wanted size moves every sample: core.refusals).
        if action_name(a) == "Refuse" and a.get("kind") != "cooldown" and not any(
                _int(r.get("new")) == _int(a.get("wanted"))
                or (str(r.get("reason")) == refusal_bound(a) and _int(r.get("old")) == _int(a.get("current")))
                for r in refusals):
            refusals.append({"kind": "refusal", "reason": refusal_bound(a),
                             "old": a.get("current"), "new": a.get("wanted"), "text": why})
    if not guard:
        for e in events:
            if (e.get("kind") == "refusal" and e.get("reason") == "guard") or "attack-shaped" in str(e.get("text", "")):
                guard = "a bump refused at [guard] ceiling: the daemon judged the growth attack-shaped"
                break
    incident = m.get("incident", {}) or {}
    local_addrs = frozenset(str(a).split("/")[0] for i in (net.get("interfaces", []) or [])
                            if isinstance(i, Mapping) for a in (i.get("addresses", []) or []))
    return Facts(
        entries=entries, count=count, max=kmax, buckets=buckets, table=table,
        protos={str(k): _int(v) for k, v in (table.get("by_proto", {}) or {}).items()},
        states={str(k): _int(v) for k, v in (table.get("by_tcp_state", {}) or {}).items()},
        unreplied=_int(table.get("unreplied")),
        series=series,
        events=events,
        totals={str(k): _int(v) for k, v in ((ev.get("cpu_stats", {}) or {}).get("totals", {}) or {}).items()},
        window_drops=window_drops,
        role=str(host.get("role", "")), roles=tuple(host.get("roles", []) or ()),
        nat=nat, nat_text=str(rules.get("nat_verdict", "")),
        raised=tuple(t for t in host.get("raised_timeouts", []) or () if isinstance(t, Mapping)),
        ceiling=ceiling, upper=upper, upper_by=upper_by, netns_label=label,
        host_ns=host_ns, inode=inode, netns_path=path, forwards=forwards, nat_kinds=nat_kinds, ns_role=ns_role,
        listening_udp=udp_ports, listening_tcp=tcp_ports, guard=guard, guard_cleared=cleared if not guard else "",
        refusals=tuple(refusals),
        incident=incident if isinstance(incident, Mapping) else {},
        guard_share=float(_policy_value(data.policy, "guard", "suspicious_share", ATTACK_SHARE)),
        guard_sources=_int(_policy_value(data.policy, "guard", "min_sources", ATTACK_SOURCES), ATTACK_SOURCES),
        local_addrs=local_addrs,
        clash=_int((((ev.get("cpu_stats", {}) or {}).get("totals", {}) or {}).get("clashres"))),
    )


def healthy(f: Facts, warn: float = HEALTHY_FILL) -> bool:
    """Nothing to explain: no entries, or a fill that stayed low with no drop and no action."""
    if f.entries == 0 and not f.series and f.count == 0:
        return True
    acted = any(e.get("kind") in ("bump", "refusal", "kernel") for e in f.events)
    dropped = any(f.drops.values())
    return not acted and not dropped and f.peak_fill < warn


# --- the rules --------------------------------------------------------------------------------


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _share(n: int, whole: int) -> float:
    return n / whole if whole else 0.0


def _rows(f: Facts, key: str) -> list[Mapping[str, Any]]:
    return list(((f.table.get(key, {}) or {}).get("rows", []) or []))


def _lower(row: Mapping[str, Any]) -> int:
    return _int(row.get("count")) - _int(row.get("error"))


def _family(addr: str) -> str:
    try:
        return "ip6" if ipaddress.ip_address(addr).version == 6 else "ip"
    except ValueError:
        return "ip"


def _valid_addr(addr: str) -> bool:
    try:
        ipaddress.ip_address(addr)
        return True
    except ValueError:
        return False


def _sources(f: Facts) -> tuple[int, bool]:
    """Distinct sources the dump saw, and whether that number is exact."""
    src = f.table.get("top_sources", {}) or {}
    return _int(src.get("tracked")), bool(src.get("exact", True))


def _table_rows(rows: Sequence[Mapping[str, Any]], what: str = "entries") -> list[dict[str, Any]]:
    """Top-k rows as evidence: a list of {key, entries} (a table in every view, never a dict repr)."""
    return [{what.rstrip("s") if what != "entries" else "key": str(r.get("key")), "entries": _int(r.get("count"))}
            for r in rows]


def _n(x: int) -> str:
    return f"{x:,}"


def _window_drops(f: Facts) -> dict[str, int]:
    """What users lost in the recorded window (or since the namespace was created, without one)."""
    d = f.drops
    return {"drop": d["drop"], "early_drop": d["early_drop"], "insert_failed": d["insert_failed"],
            "table_full_lines": f.kind_count("kernel")}


def _suffered(f: Facts) -> tuple[bool, str]:
    """Did users lose flows in this incident (drops, table-full lines, bumps refused at a bound)?"""
    d = _window_drops(f)
    hard = [r for r in f.refusals if str(r.get("reason")) in ("ceiling", "memory", "guard")]
    recent = f.window_drops is not None or f.peak_fill >= HEALTHY_FILL
    parts = []
    if recent and d["drop"]:
        parts.append(f"{_n(d['drop'])} new flows dropped")
    if recent and d["early_drop"]:
        parts.append(f"{_n(d['early_drop'])} entries evicted early")
    if d["table_full_lines"]:
        parts.append(f"{d['table_full_lines']} table-full line{'s' if d['table_full_lines'] != 1 else ''}")
    if hard:
        parts.append(f"{len(hard)} bump{'s' if len(hard) != 1 else ''} refused at the "
                     + "/".join(sorted({str(r.get('reason')) for r in hard})))
    return bool(parts), ", ".join(parts)


def _severity(f: Facts) -> str:
    return CRITICAL if _suffered(f)[0] else WARNING


def _lost_text(f: Facts) -> str:
    hurt, what = _suffered(f)
    return f"; users lost: {what}" if hurt else ""


def _where(f: Facts) -> str:
    return f.netns_label


def _in_ns(f: Facts) -> str:
    """The prefix that runs a command in the captured namespace ("" for the host's)."""
    if f.host_ns:
        return ""
    if f.netns_path.startswith("/run/netns/"):
        return f"ip netns exec {f.netns_path.rsplit('/', 1)[1]} "
    if f.netns_path:
        return f"nsenter --net={f.netns_path} "
    return ""


def _clients(f: Facts) -> str:
    n, exact = _sources(f)
    if not n:
        return f"the clients behind {_where(f)}"
    if n == 1 and exact:
        return f"one client behind {_where(f)} (all its connections)"
    return f"{'more than ' if not exact else ''}{_n(n)} clients behind {_where(f)}"


def _dport_rows(f: Facts, proto: str, floor: int) -> list[Mapping[str, Any]]:
    return [r for r in _rows(f, "top_dports")[:3] if str(r.get("key", "")).startswith(proto + "/") and _lower(r) > floor]


def _port_of(key: str) -> int:
    try:
        return int(str(key).split("/", 1)[1])
    except (IndexError, ValueError):
        return 0


# --- causes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _GuardThresholds:
    suspicious_share: float
    min_sources: int


def attack_shape(f: Facts) -> Finding | None:
    """The guard's judgement (recorded in the bundle's decision and timeline) first; a bundle
    without one (a capture by hand) is judged by the same [guard] thresholds on its table."""
    sources, exact = _sources(f)
    many = sources >= f.guard_sources or not exact
    half_open = f.states.get("SYN_RECV", 0)
    unanswered = _share(f.unreplied + half_open, f.entries)
    wd = f.window_drops or {}
    invalid_climb = _int(wd.get("invalid")) > 0 and _int(wd.get("invalid")) >= _int(wd.get("drop")) > 0
    # Without a judgement recorded while it happened: the guard's own reading (decide.shape_judgement)
    # of the whole table, with the bundle's [guard] thresholds.
    look = TableShape(f.inode, f.entries, f.unreplied + half_open,
                      sources if exact else max(sources, f.guard_sources))
    judged = shape_judgement(_GuardThresholds(f.guard_share, f.guard_sources), look) if f.entries else None
    # The guard's word while it happened wins over a reading of the dump (shared, not recomputed):
    # it knew the host (internal clients retrying one dead upstream are an outage, not an attack).
    # A gateway's unanswered SYN_SENT/UDP from many clients to a few destinations is an outage
    # upstream (unreachable-destination), as the guard would judge it knowing the host: only a
    # look at the dump without that knowledge would call it an attack.
    outage = f.gateway and unreachable_destination(f) is not None
    shaped = not f.guard and not f.guard_cleared and not outage and judged is not None and many
    if not f.guard and not shaped and not invalid_climb:
        return None
    why = []
    if f.guard:
        why.append(f"the guard judged it so while it happened ({f.guard})")
    if shaped:
        why.append("by the guard's own reading of the dump: "
                   + str(judged).replace("sampled entries", "entries in the dump"))
    if invalid_climb:
        why.append(f"the kernel's invalid counter climbed by {_n(_int(wd['invalid']))} while it dropped "
                   f"{_n(_int(wd['drop']))}")
    dests = [r for r in _rows(f, "top_destinations")[:2] if _lower(r) >= 0.3 * max(1, f.entries)]
    target = (" against " + ", ".join(str(r["key"]) for r in dests)) if dests else ""
    return Finding(
        "attack-shape", CRITICAL, f"the growth is shaped like an attack{target}: " + "; ".join(why),
        {"guard_judgement": f.guard or "none recorded (judged from the table by the [guard] thresholds)",
         "unanswered_or_half_open": f.unreplied + half_open, "of": f.entries, "share": round(unanswered, 4),
         "sources": sources, "sources_exact": exact,
         "invalid_increase": _int(wd.get("invalid")), "drop_increase": _int(wd.get("drop")),
         "targets": _table_rows(dests)},
        "do not raise the table further (a bigger table is a bigger target): filter the flood upstream (ask the "
        "provider), turn on SYN cookies (sysctl -w net.ipv4.tcp_syncookies=1) on the target, and keep "
        "[guard] ceiling in place",
        weight=max(unanswered, 0.5))


def insert_race(f: Facts) -> Finding | None:
    """Drops with failed inserts at a low fill: the UDP insert race (two packets of one new flow
    on two CPUs), which no table size fixes."""
    d = f.drops
    peak = f.largest
    fill = _share(peak[0], peak[1]) if peak[1] else f.peak_fill
    if not d["insert_failed"] or fill >= RACE_FILL or f.kind_count("kernel"):
        return None
    udp = f.protos.get("udp", 0)
    dns = next((r for r in _rows(f, "top_dports")[:3] if str(r.get("key")) == "udp/53"), None)
    what = "DNS lookups (udp/53)" if dns else "UDP flows"
    span = "over the recorded window" if f.window_drops is not None else "since the namespace was created"
    return Finding(
        "insert-race", CRITICAL if d["drop"] else WARNING,
        f"{_n(d['insert_failed'])} inserts failed and {_n(d['drop'])} packets were dropped {span} at "
        f"{_pct(fill)} fill: the conntrack insert race of {what} (two packets of one new flow, e.g. a "
        "resolver's A and AAAA queries from one socket, racing on two CPUs), not a full table",
        {"insert_failed": d["insert_failed"], "drop": d["drop"], "clash_resolve": f.clash,
         "fill": round(fill, 4), "largest_count": peak[0], "max_then": peak[1], "udp": udp, "span": span},
        "a bigger table does not help: run a node-local DNS cache (NodeLocal DNSCache on Kubernetes, or a "
        "local unbound/dnsmasq), put `options single-request-reopen` (glibc) in /etc/resolv.conf or the pod's "
        "dnsConfig so A and AAAA go out on two sockets, and run a kernel with conntrack's UDP clash resolution "
        "(5.6 and later; `clashres` in /proc/net/stat/nf_conntrack counts what it saved)",
        weight=1.0)


def _stalled(f: Facts) -> tuple[str, int, int] | None:
    """('tcp', SYN_SENT, TCP) or ('udp', unanswered UDP, UDP) when one of them stalls."""
    syn = f.states.get("SYN_SENT", 0) + f.states.get("SYN_SENT2", 0)
    if f.tcp and _share(f.tcp, f.entries) >= TCP_SHARE and _share(syn, f.tcp) >= STALLED_SHARE:
        return "tcp", syn, f.tcp
    udp = f.protos.get("udp", 0)
    udp_unreplied = max(0, f.unreplied - syn)
    if udp and _share(udp, f.entries) >= UDP_SHARE and _share(udp_unreplied, udp) >= STALLED_SHARE:
        return "udp", min(udp_unreplied, udp), udp
    return None


def unreachable_destination(f: Facts) -> Finding | None:
    """SYN_SENT or unanswered UDP to few destinations from many sources: a dependency is down
    (or filtered) and its clients keep trying."""
    if f.guard:
        return None
    st = _stalled(f)
    if st is None:
        return None
    proto, stalled, total = st
    dests = [r for r in _rows(f, "top_destinations")[:FEW_DESTINATIONS] if _lower(r) > 0.1 * stalled]
    held = min(stalled, sum(_lower(r) for r in dests))
    if not dests or _share(held, stalled) < FEW_SHARE:
        return None
    sources, exact = _sources(f)
    src = _rows(f, "top_sources")
    if (sources < MANY_SOURCES and exact) or (src and _lower(src[0]) >= STALLED_SHARE * stalled):
        return None     # one client's storm, not a dependency many depend on (tcp-syn-sent-dominant)
    # The port(s) of the stalled flows: each must hold at least half of them, or a live service on
    # the same destination (its TIME_WAIT and ESTABLISHED) would be named, and refused, with it.
    ports = _dport_rows(f, proto, 0.5 * stalled)
    where = ", ".join(str(r["key"]) for r in dests)
    port_txt = (" " + ", ".join(str(r["key"]) for r in ports)) if ports else ""
    state = "SYN_SENT (connection attempts never answered)" if proto == "tcp" else "UDP never answered"
    who = (_clients(f) if f.gateway else
           f"{'more than ' if not exact else ''}{_n(sources)} source{'s' if sources != 1 else ''}")
    rule = ""
    inbound = all(str(r["key"]) in f.local_addrs for r in dests)
    if inbound:
        # The destination is this namespace's own address: its own service does not answer.
        return Finding(
            "unreachable-destination", _severity(f),
            f"{_pct(_share(stalled, total))} of {proto.upper()} entries are {state}, to {where}{port_txt}, "
            f"this namespace's own address, from {who}: the local service does not answer{_lost_text(f)}",
            {"protocol": proto, "stalled": stalled, "of_protocol": total, "share": round(_share(stalled, total), 4),
             "destinations": _table_rows(dests), "ports": _table_rows(ports), "sources": sources,
             "sources_exact": exact, "local": True, **_window_drops(f)},
            f"check the service on{port_txt or ' that address'} in {_where(f)} (`ss -lntup`): is it running, is its "
            "accept backlog full (`nstat -az TcpExtListenOverflows`)? Fix the service, not the table",
            weight=_share(stalled, f.entries))
    if ports and all(_valid_addr(str(r["key"])) for r in dests):
        hook = "forward" if f.gateway else "output"
        lines = [SUGGESTION, f"# while {where}{port_txt} does not answer: refuse new attempts at once, so clients",
                 "# fail fast instead of each holding an entry for the SYN_SENT / UDP timeout; remove it when",
                 "# the destination answers again (nft delete table inet ctguard_suggested)",
                 "nft -f - <<'EOF'", "table inet ctguard_suggested {",
                 f"  chain refuse_dead_{hook} {{",
                 f"    type filter hook {hook} priority filter; policy accept;"]
        for r in dests:
            addr = str(r["key"])
            for p in ports:
                port = _port_of(str(p["key"]))
                verdict = "reject with tcp reset" if proto == "tcp" else "reject"
                lines.append(f"    ct state new {_family(addr)} daddr {addr} {proto} dport {port} counter {verdict}")
        lines += ["  }", "}", "EOF"]
        rule = "\n".join(lines)
    return Finding(
        "unreachable-destination", _severity(f),
        f"{_pct(_share(stalled, total))} of {proto.upper()} entries are {state}, "
        f"{_pct(_share(held, stalled))} of them to {where}{port_txt}, from {who}: that destination is down or "
        f"filtered and its clients keep retrying{_lost_text(f)}",
        {"protocol": proto, "stalled": stalled, "of_protocol": total, "share": round(_share(stalled, total), 4),
         "destinations": _table_rows(dests), "ports": _table_rows(ports), "sources": sources,
         "sources_exact": exact, "role": f.ns_role, **_window_drops(f)},
        f"check that {where}{port_txt} is up and reachable from {_where(f)} (a route, a firewall, the service "
        "itself); give its clients backoff and a retry limit; while it is down, refusing new attempts to it "
        "(below) makes them fail fast instead of filling the table: fix the dependency, not the table",
        rule=rule, weight=_share(stalled, f.entries))


def syn_sent_dominant(f: Facts) -> Finding | None:
    """SYN_SENT dominant without many sources behind a few destinations: one client's retry
    storm, or attempts spread over many destinations (a scan)."""
    if f.guard:
        return None
    st = _stalled(f)
    if st is None or st[0] != "tcp":
        return None
    syn, tcp = st[1], st[2]
    dests = [r for r in _rows(f, "top_destinations")[:3] if _lower(r) > 0.1 * syn]
    ports = _dport_rows(f, "tcp", 0.1 * syn)
    srcs = [r for r in _rows(f, "top_sources")[:2] if _lower(r) > 0.3 * syn]
    where = ", ".join(f"{r['key']} ({_n(_int(r['count']))})" for r in dests) or "many destinations"
    port_txt = (" on " + ", ".join(str(r["key"]) for r in ports)) if ports else ""
    who = (" from " + ", ".join(str(r["key"]) for r in srcs)) if srcs else ""
    return Finding(
        "tcp-syn-sent-dominant", _severity(f),
        f"{_pct(_share(syn, tcp))} of TCP entries are SYN_SENT (connection attempts never answered), "
        f"mostly to {where}{port_txt}{who}: a dependency is down or a client retries in a storm{_lost_text(f)}",
        {"syn_sent": syn, "tcp": tcp, "share_of_tcp": round(_share(syn, tcp), 4), "destinations": _table_rows(dests),
         "ports": _table_rows(ports), "sources": _table_rows(srcs), **_window_drops(f)},
        f"check that {where.split(' (')[0]}{port_txt} is up and reachable, find the process that retries "
        f"(ss -tnp state syn-sent{' in ' + _where(f) if not f.host_ns else ''}) and give it backoff and a retry "
        "limit: fix the retries, not the table (a bigger table only holds more dead attempts)",
        weight=_share(syn, f.entries))


def time_wait_churn(f: Facts) -> Finding | None:
    tw = f.states.get("TIME_WAIT", 0)
    if not f.tcp or _share(f.tcp, f.entries) < TCP_SHARE or _share(tw, f.tcp) < STATE_SHARE:
        return None
    ports = _dport_rows(f, "tcp", 0.2 * tw)
    dests = [r for r in _rows(f, "top_destinations")[:2] if _lower(r) > 0.2 * tw]
    to = ", ".join(str(r["key"]) for r in dests)
    port_txt = ", ".join(str(r["key"]) for r in ports)
    target = (f" to {to}" if to else "") + (f" {port_txt}" if port_txt else "")
    if f.gateway:
        who = f"{_clients(f)} open{'s' if _sources(f)[0] == 1 else ''} a new TCP connection per request{target}"
    else:
        who = f"short-lived TCP connections{target} are opened and closed in a churn"
    t = next((x for x in f.raised if x.get("name") == "nf_conntrack_tcp_timeout_time_wait"), None)
    tw_timeout = _int(t["value"]) if t else KERNEL_DEFAULT_TIMEOUTS["nf_conntrack_tcp_timeout_time_wait"]
    where = _in_ns(f)
    rule = (f"{SUGGESTION}\n# entries of closed connections kept 30 s instead of {tw_timeout} s, in "
            f"{_where(f)} only (undo: the same line with {tw_timeout})\n"
            f"{where}sysctl -w net.netfilter.nf_conntrack_tcp_timeout_time_wait=30")
    return Finding(
        "tcp-time-wait-churn", _severity(f),
        f"{_pct(_share(tw, f.tcp))} of TCP entries are TIME_WAIT: {who}; each closed connection holds an entry "
        f"for nf_conntrack_tcp_timeout_time_wait ({tw_timeout} s){_lost_text(f)}",
        {"time_wait": tw, "tcp": f.tcp, "share_of_tcp": round(_share(tw, f.tcp), 4),
         "destinations": _table_rows(dests), "ports": _table_rows(ports), "sources": _sources(f)[0],
         "role": f.ns_role, "timeout_s": tw_timeout, **_window_drops(f)},
        ("have the clients reuse connections (HTTP keep-alive, connection pools) instead of one per request; "
         "meanwhile a shorter TIME_WAIT timeout in this namespace (below) frees the entries sooner"
         + (f"; size {_where(f)}'s table for its clients' connection rate x {tw_timeout} s (ctguard recommend)"
            if f.gateway else "")),
        rule=rule, weight=_share(tw, f.entries))


def udp_churn(f: Facts) -> Finding | None:
    """Answered-once UDP (a query and its answer, a new source port each time) holding the table:
    every such flow keeps its entry for nf_conntrack_udp_timeout after the answer."""
    udp = f.protos.get("udp", 0)
    if not udp or _share(udp, f.entries) < UDP_SHARE:
        return None
    if any(t.get("name") in UDP_TIMEOUTS for t in f.raised):
        return None     # udp-timeout-raised tells this story
    syn = f.states.get("SYN_SENT", 0) + f.states.get("SYN_SENT2", 0)
    answered = max(0, udp - max(0, f.unreplied - syn))
    once = max(0, answered - _int(f.table.get("assured")))
    if _share(once, udp) < ANSWERED_ONCE_SHARE:
        return None
    ports = _dport_rows(f, "udp", 0.2 * once)
    dns = any(str(r.get("key")) == "udp/53" for r in ports)
    dests = [r for r in _rows(f, "top_destinations")[:2] if _lower(r) > 0.2 * once]
    to = ", ".join(str(r["key"]) for r in dests)
    timeout = KERNEL_DEFAULT_TIMEOUTS["nf_conntrack_udp_timeout"]
    nat = any(f.nat_kinds.get(k) for k in ("masquerade", "snat", "netmap"))
    what = "DNS query" if dns else "UDP exchange"
    path = "through the NAT" if nat else (f"through {_where(f)}" if f.gateway else f"in {_where(f)}")
    own = next((s for s in f.series if f.inode and s.inode == f.inode), None)
    rate = max(f.largest[0] / timeout, own.rate if own is not None else 0.0)
    where = _in_ns(f)
    rule = (f"{SUGGESTION}\n# answered UDP flows kept 10 s instead of {timeout} s, in {_where(f)} only "
            f"(undo: the same line with {timeout})\n{where}sysctl -w net.netfilter.nf_conntrack_udp_timeout=10")
    if dns and f.gateway:
        action = (f"each DNS query {path} holds an entry for nf_conntrack_udp_timeout ({timeout} s): give the "
                  f"clients behind {_where(f)} a caching resolver on the gateway (unbound, dnsmasq) so their "
                  "queries end there, or lower the UDP timeout in this namespace (below); size the table for "
                  f"queries/s x {timeout} s")
    elif dns:
        action = (f"each DNS query holds an entry for nf_conntrack_udp_timeout ({timeout} s): use a local caching "
                  "resolver so lookups are not one new flow each, or lower the UDP timeout (below)")
    else:
        action = (f"each {what} holds an entry for nf_conntrack_udp_timeout ({timeout} s): lower the UDP timeout "
                  "in this namespace (below), or have the application reuse its socket")
    return Finding(
        "udp-answered-once", _severity(f),
        f"{_pct(_share(once, udp))} of UDP entries were answered once{(' (' + ', '.join(str(r['key']) for r in ports) + ')') if ports else ''}"
        f"{(' to ' + to) if to else ''}: each {what} {path} holds an entry for nf_conntrack_udp_timeout "
        f"({timeout} s), so at least {_n(int(rate))} new flows/s kept {_n(f.largest[0])} entries{_lost_text(f)}",
        {"answered_once": once, "udp": udp, "share_of_udp": round(_share(once, udp), 4),
         "ports": _table_rows(ports), "destinations": _table_rows(dests), "sources": _sources(f)[0],
         "role": f.ns_role, "nat": nat, "timeout_s": timeout, "flows_per_s_estimate": int(rate),
         **_window_drops(f)},
        action, rule=rule, weight=_share(once, f.entries))


def udp_timeout_raised(f: Facts) -> Finding | None:
    udp = f.protos.get("udp", 0)
    raised = [t for t in f.raised if t.get("name") in UDP_TIMEOUTS]
    if not raised or _share(udp, f.entries) < UDP_SHARE:
        return None
    what = ", ".join(f"{t['name']} = {t['value']} s (default {t['default']} s)" for t in raised)
    where = _in_ns(f)
    revert = "; ".join(f"{where}sysctl -w net.netfilter.{t['name']}={t['default']}" for t in raised)
    return Finding(
        "udp-timeout-raised", _severity(f),
        f"UDP holds {_pct(_share(udp, f.entries))} of the table while {what}: every UDP flow stays "
        f"{max(_int(t['value']) / max(1, _int(t['default'])) for t in raised):.0f}x longer than the kernel's "
        f"default{_lost_text(f)}",
        {"udp": udp, "of": f.entries,
         "timeouts": {str(t["name"]): _int(t["value"]) for t in raised},
         "defaults": {str(t["name"]): _int(t["default"]) for t in raised}, **_window_drops(f)},
        f"revert the raised UDP timeout ({revert}) in {f.netns_label}, and remove it from /etc/sysctl.d so it "
        "stays reverted",
        rule=revert, weight=_share(udp, f.entries))


def established_timeout_nat(f: Facts) -> Finding | None:
    t = next((t for t in f.raised if t.get("name") == "nf_conntrack_tcp_timeout_established"), None)
    forwarding = f.gateway or f.nat or any(r in ("NAT gateway", "router", "Kubernetes node") for r in f.roles)
    est = f.states.get("ESTABLISHED", 0)
    stale = _share(f.unreplied, f.entries)
    if t is None or not forwarding or (stale < STALE_SHARE and _share(est, f.entries) < STATE_SHARE):
        return None
    return Finding(
        "tcp-established-timeout-raised-nat", _severity(f),
        f"nf_conntrack_tcp_timeout_established is raised to {t['value']} s (default {t['default']} s) on a host that "
        f"forwards or NATs: {_n(est)} ESTABLISHED entries, {_pct(stale)} of the table never answered, are kept for "
        f"days{_lost_text(f)}",
        {"timeout_s": _int(t["value"]), "default_s": _int(t["default"]), "established": est,
         "unreplied": f.unreplied, "of": f.entries, "role": f.ns_role or f.role},
        "lower nf_conntrack_tcp_timeout_established back to the default (432000 s) or below (86400 s is common on "
        "NAT gateways): flows of clients that left without closing hold their entries that long",
        rule=f"sysctl -w net.netfilter.nf_conntrack_tcp_timeout_established={t['default']}",
        weight=max(stale, _share(est, f.entries)))


def no_track_candidate(f: Facts) -> Finding | None:
    """Only where the bundle shows a local service answering: a bound socket on the port in a
    namespace that neither NATs nor forwards (forwarded queries whose replies stay tracked
    would be dropped by a stateful forward policy)."""
    if f.nat or f.gateway or f.forwards or f.listening_udp is None:
        return None
    for row in _rows(f, "top_dports")[:3]:
        key = str(row.get("key"))
        svc = NO_TRACK_PORTS.get(key)
        share = _share(_lower(row), f.entries)
        if svc is None or share < NO_TRACK_SHARE:
            continue
        port = _port_of(key)
        if port not in f.listening_udp:
            continue        # the traffic goes to a remote server: a notrack here would never match
        dests = [r for r in _rows(f, "top_destinations")[:1] if _lower(r) >= 0.5 * _lower(row)
                 and _valid_addr(str(r.get("key")))]
        scope = f"{_family(str(dests[0]['key']))} daddr {dests[0]['key']} " if dests else ""
        sscope = f"{_family(str(dests[0]['key']))} saddr {dests[0]['key']} " if dests else ""
        rule = "\n".join([
            SUGGESTION, f"# the local {svc} service's traffic is not tracked, both directions: queries in, answers out",
            "nft -f - <<'EOF'", "table inet ctguard_notrack {",
            "  chain queries_in {", "    type filter hook prerouting priority raw; policy accept;",
            f"    {scope}udp dport {port} notrack", "  }",
            "  chain answers_out {", "    type filter hook output priority raw; policy accept;",
            f"    {sscope}udp sport {port} notrack", "  }", "}", "EOF"])
        return Finding(
            "no-track-candidate", _severity(f),
            f"a local {svc} service (bound to {key} in {_where(f)}) holds {_pct(share)} of the table on a "
            "namespace that neither NATs nor forwards: this traffic needs no connection state",
            {"port": key, "service": svc, "entries": _int(row["count"]), "of": f.entries, "share": round(share, 4),
             "listening": True, "nat": f.nat_text, "destinations": _table_rows(dests)},
            f"exempt the {svc} traffic from tracking with the `notrack` rule below; if the input filter accepts "
            "only `ct state established,related`, add `ct state untracked accept` (or a stateless accept for "
            f"udp dport {port}) first",
            rule=rule, weight=share)
    return None


def _talker(f: Facts, key: str, fid: str, word: str, claimed: set[str]) -> Finding | None:
    rows = _rows(f, key)
    if not rows or not f.entries:
        return None
    top = rows[0]
    share = _share(_lower(top), f.entries)
    addr = str(top["key"])
    if share < TALKER_SHARE or addr in claimed:
        return None
    evidence = {"address": addr, "entries": _int(top["count"]), "error": _int(top.get("error")),
                "of": f.entries, "share": round(share, 4), "role": f.ns_role}
    rule = ""
    if fid == "top-source-dominant" and f.gateway:
        action = (f"{addr} is one of the clients behind {_where(f)}: find out what it runs (its flows are in the "
                  "bundle's dump); a limit belongs on that host or where it enters, not on the gateway's clients")
    elif fid == "top-source-dominant" and _valid_addr(addr):
        limit = max(100, (_lower(top) // 10) // 100 * 100)
        fam = _family(addr)
        mgmt = ", ".join(str(p) for p in MANAGEMENT_PORTS)
        rule = "\n".join([
            SUGGESTION, f"# at most {limit} tracked connections from {addr} to this host's services; new flows only,",
            "# never ssh or the kubelet (remove: nft delete table inet ctguard_suggested)",
            "nft -f - <<'EOF'", "table inet ctguard_suggested {", "  chain limit_new_from_source {",
            "    type filter hook input priority filter; policy accept;",
            f"    tcp dport {{ {mgmt} }} accept",
            f"    ct state new {fam} saddr {addr} ct count over {limit} counter drop", "  }", "}", "EOF"])
        action = (f"find out why {addr} opens this many connections to this host; if it should not, cap its new "
                  "connections with the nftables `ct count` limit below")
    else:
        action = (f"check what {addr} serves and who calls it this often; the destination port list "
                  "shows which service")
    return Finding(fid, _severity(f), f"one {word} holds {_pct(share)} of the table: {addr} ({_n(_int(top['count']))} entries)"
                   + (f", a client behind {_where(f)}" if fid == "top-source-dominant" and f.gateway else ""),
                   evidence, action, rule=rule, weight=share)


# --- consequences and context -------------------------------------------------------------------


def kernel_drops(f: Facts) -> Finding | None:
    """Capacity: the table was full (or nearly) and the kernel dropped new flows."""
    d = f.drops
    lines = f.kind_count("kernel")
    total = d["drop"] + d["early_drop"] + d["insert_failed"]
    if not total and not lines:
        return None
    peak = f.largest
    fill = max(_share(peak[0], peak[1]) if peak[1] else 0.0, f.peak_fill)
    if f.window_drops is None and fill < HEALTHY_FILL and not lines:
        return None     # drops-history: counted since the namespace was created, not in this incident
    span = "over the recorded window" if f.window_drops is not None else "since the namespace was created"
    parts = [f"{_n(d['drop'])} new flows dropped", f"{_n(d['early_drop'])} entries evicted early",
             f"{_n(d['insert_failed'])} inserts failed"]
    full = fill >= FULL_FILL or lines
    what = (f"the table was full ({_n(peak[0])} entries of a max of {_n(peak[1])})" if full
            else f"at {_pct(fill)} fill at most")
    return Finding(
        "kernel-drops", CRITICAL if d["drop"] or lines else WARNING,
        f"the kernel lost traffic {span}, {what}: " + ", ".join(parts)
        + (f"; {lines} table-full line{'s' if lines != 1 else ''}" if lines else ""),
        {**d, "table_full_lines": lines, "span": span, "largest_count": peak[0], "max_then": peak[1],
         "fill": round(fill, 4)},
        "every drop is a connection that failed: deal with what filled the table (the finding above), then size "
        "the table for the peak with `ctguard recommend`",
        weight=1.0, tier=CONSEQUENCE)


def drops_history(f: Facts) -> Finding | None:
    """Drops counted since the namespace was created, with no sign of them in this bundle's moment."""
    if f.window_drops is not None or f.kind_count("kernel"):
        return None
    d = f.drops
    total = d["drop"] + d["early_drop"] + d["insert_failed"]
    peak = f.largest
    fill = max(_share(peak[0], peak[1]) if peak[1] else 0.0, f.peak_fill)
    if not total or fill >= HEALTHY_FILL:
        return None
    return Finding(
        "drops-history", INFO,
        f"the kernel's counters hold {_n(d['drop'])} drops, {_n(d['early_drop'])} early drops and "
        f"{_n(d['insert_failed'])} failed inserts since the namespace was created, but the table is at "
        f"{_pct(fill)} now: history, not this moment",
        {**d, "span": "since the namespace was created", "fill": round(fill, 4)},
        "nothing to do now; to see when they happen, keep ctguard running (its timeline records every increase)",
        weight=0.0, tier=CONSEQUENCE)


def max_near_cap(f: Facts) -> Finding | None:
    refused = [e for e in f.refusals if e.get("reason") in ("ceiling", "memory", "guard")]
    kmax = max([f.max] + [_int(e.get("new")) for e in f.events if e.get("kind") == "bump"])
    if not f.upper or (kmax < CAP_NEAR * f.upper and not refused):
        return None
    evidence = {"max": kmax, "upper_bound": f.upper, "bound_by": f.upper_by, "ceiling": f.ceiling,
                "refusals": len(refused)}
    if refused:
        last = refused[-1]
        summary = (f"ctguard was refused {len(refused)} bump(s) at the {last.get('reason')} (max "
                   f"{_n(_int(last.get('old')))}, wanted {_n(_int(last.get('new')))}): the next incident cannot "
                   "be bumped away")
        evidence["refused_at"] = str(last.get("reason"))
    else:
        summary = (f"nf_conntrack_max {_n(kmax)} is {_pct(_share(kmax, f.upper))} of the {f.upper_by} {_n(f.upper)}: "
                   "the next incident cannot be bumped away")
    return Finding(
        "max-near-cap", CRITICAL if refused else WARNING, summary, evidence,
        "deal with what fills the table (the finding above); raise [bump] ceiling in a drop-in "
        "(/etc/ctguard/policy.d/50-ceiling.toml, then `systemctl reload ctguard`) only if the host has the memory "
        "and the traffic is legitimate",
        weight=max(_share(kmax, f.upper), 0.9 if refused else 0.0), tier=CONSEQUENCE)


def namespace_dominant(f: Facts) -> Finding | None:
    if len([s for s in f.series if s.peak > 0]) < 2:
        return None
    top = max(f.series, key=lambda s: s.peak)
    total = sum(max(s.peak if s is top else s.last, 0) for s in f.series)
    share = _share(top.peak, total)
    if share < NAMESPACE_SHARE:
        return None
    return Finding(
        "namespace-dominant", WARNING,
        f"one namespace holds {_pct(share)} of all tracked entries: {top.label} ({_n(top.peak)} entries at its peak)",
        {"namespace": top.name, "inode": top.inode, "unit": top.unit, "container": top.container,
         "entries": top.peak, "of": total, "share": round(share, 4)},
        f"look inside {top.label} first (ctguard capture --netns {top.inode}); the limit is global, so this one "
        "namespace fills the table for every other",
        weight=share, tier=CONSEQUENCE)


def buckets_too_few(f: Facts) -> Finding | None:
    if not f.buckets:
        return None
    per_max = _share(f.max, f.buckets)
    per_entry = _share(max(f.count, f.entries, f.peak.peak if f.peak else 0), f.buckets)
    chain = _int(f.totals.get("chaintoolong"))
    if per_max <= CHAIN_LIMIT and per_entry <= CHAIN_LIMIT and not chain:
        return None
    want = -(-max(f.max, 1) // 4)
    return Finding(
        "buckets-too-few", WARNING,
        f"{_n(f.buckets)} hash buckets for a max of {_n(f.max)} ({per_max:.0f} per bucket): lookups walk long chains",
        {"buckets": f.buckets, "max": f.max, "max_per_bucket": round(per_max, 2),
         "entries_per_bucket": round(per_entry, 2), "chaintoolong": chain},
        f"raise the buckets to max/4 ({want}): echo {want} > /sys/module/nf_conntrack/parameters/hashsize, and "
        "let ctguard keep them ([buckets] manage = true)",
        rule=f"echo {want} > /sys/module/nf_conntrack/parameters/hashsize", weight=min(1.0, per_max / 64),
        tier=CONSEQUENCE)


def host_role(f: Facts) -> Finding | None:
    if f.host_ns and f.nat and f.role == "server":
        return Finding(
            "server-does-nat", WARNING,
            f"this host was taken for a plain server, but its rules do NAT after all ({f.nat_text}): "
            "its table holds the forwarded flows of every client behind it",
            {"role": f.role, "nat": f.nat_text},
            "size the table for the clients behind the NAT, not for the host's own services; check whether the "
            "NAT rule is meant to be there (`nft list ruleset`, `iptables-save -t nat`)", weight=0.5, tier=CONSEQUENCE)
    if f.gateway:
        fwd = "forwards" if f.forwards else ("forwarding not read" if f.forwards is None else "does not forward")
        kinds = ", ".join(f"{k} x{v}" for k, v in sorted(f.nat_kinds.items()) if v)
        nat = f"NAT: {kinds}" if kinds else ("no NAT" if f.nat is False else "NAT rules not read")
        who = "this host (its own namespace)" if f.host_ns else _where(f)
        return Finding(
            "host-role", INFO,
            f"{who} is a {f.ns_role} ({fwd}; {nat}): its table holds the "
            "flows of the clients behind it, not only its own",
            {"namespace": _where(f), "role": f.ns_role, "forwards": bool(f.forwards), "nat": kinds or "none",
             **({"host_namespace_role": f.role} if not f.host_ns else {})},
            "read the talkers as clients behind it; limits belong on those clients or where they enter",
            weight=0.1, tier=CONSEQUENCE)
    return None


def protocol_dominant(f: Facts) -> Finding | None:
    if not f.entries or not f.protos:
        return None
    name, n = max(f.protos.items(), key=lambda kv: kv[1])
    share = _share(n, f.entries)
    if share < PROTOCOL_SHARE:
        return None
    return Finding(
        "protocol-dominant", INFO, f"{name.upper()} holds {_pct(share)} of the table ({_n(n)} of {_n(f.entries)} entries)",
        {"protocol": name, "entries": n, "of": f.entries, "share": round(share, 4)},
        f"context: the findings above name what sends this much {name.upper()}; without one, list it with "
        f"`conntrack -L -p {name}`",
        weight=share, tier=CONSEQUENCE)


CAUSES: tuple[Callable[[Facts], Finding | None], ...] = (
    attack_shape, insert_race, unreachable_destination, syn_sent_dominant, udp_timeout_raised, established_timeout_nat,
    time_wait_churn, udp_churn, no_track_candidate,
)
CONTEXT: tuple[Callable[[Facts], Finding | None], ...] = (
    kernel_drops, drops_history, max_near_cap, namespace_dominant, buckets_too_few, host_role, protocol_dominant,
)

# Every id a rule may produce, for docs/findings.md (a test keeps them in step).
FINDING_IDS = (
    "attack-shape", "insert-race", "unreachable-destination", "tcp-syn-sent-dominant", "udp-timeout-raised",
    "tcp-established-timeout-raised-nat", "tcp-time-wait-churn", "udp-answered-once", "no-track-candidate",
    "top-source-dominant", "top-destination-dominant", "kernel-drops", "drops-history", "max-near-cap",
    "namespace-dominant", "buckets-too-few", "server-does-nat", "host-role", "protocol-dominant",
)


NO_CAUSE_ACTIONS = {
    "kernel-drops": "every drop is a connection that failed, and no single cause stands out in this bundle: size "
                    "the table for the peak now (`ctguard recommend` gives the number; `ctguard bump --to N` sets "
                    "it within the ceiling), then look at what holds it: the breakdown by protocol, state, source "
                    "and destination under Details, or `conntrack -L` in that namespace",
    "max-near-cap": "no single cause stands out in this bundle: look at what holds the table (the details below), "
                    "and raise [bump] ceiling in a drop-in (/etc/ctguard/policy.d/50-ceiling.toml, then "
                    "`systemctl reload ctguard`) only if the host has the memory and the traffic is legitimate",
}


def _claimed(found: Sequence[Finding]) -> set[str]:
    """Addresses a cause already tells of (its destinations, targets, sources)."""
    out: set[str] = set()
    for x in found:
        for key in ("destinations", "targets", "sources"):
            rows = x.evidence.get(key)
            for row in rows if isinstance(rows, (list, tuple)) else []:
                if isinstance(row, Mapping):
                    out.add(str(row.get("key")))
    return out


def diagnose(data: BundleData, warn: float | None = None) -> tuple[Finding, ...]:
    """Ranked findings: the causes first (by severity, then the share of the table each
    explains), then the consequences and context."""
    f = facts(data)
    threshold = warn if warn is not None else float(_policy_value(data.policy, "thresholds", "warn", HEALTHY_FILL))
    if healthy(f, threshold):
        return ()
    history = drops_history(f)
    if history is not None and healthy(replace(f, totals={}), threshold):
        return (history,)       # only counters from long ago: history, nothing of this moment
    causes = [x for x in (rule(f) for rule in CAUSES) if x is not None]
    if any(x.id == "insert-race" for x in causes):
        # The race is the story of the drops; churn at a low fill is not what users suffered from.
        causes = [x for x in causes if x.id in ("insert-race", "attack-shape")]
    if any(x.id == "no-track-candidate" for x in causes):
        causes = [x for x in causes if x.id != "udp-answered-once"]     # the local service is that story
    if any(x.id == "unreachable-destination" for x in causes):
        causes = [x for x in causes if x.id != "tcp-syn-sent-dominant"]
    if any(x.id == "attack-shape" for x in causes):
        causes = [x for x in causes if x.id not in ("tcp-time-wait-churn", "udp-answered-once")]
    claimed = _claimed(causes)
    if any(x.id in ("unreachable-destination", "tcp-time-wait-churn", "udp-answered-once", "attack-shape",
                    "tcp-syn-sent-dominant") for x in causes):
        # The cause names who filled the table: its sources are part of that story.
        src = _rows(f, "top_sources")
        if src:
            claimed.add(str(src[0].get("key")))
    talkers = [x for x in (_talker(f, "top_sources", "top-source-dominant", "source", claimed),
                           _talker(f, "top_destinations", "top-destination-dominant", "destination", claimed))
               if x is not None]
    context = [x for x in (rule(f) for rule in CONTEXT) if x is not None]
    if any(x.id == "insert-race" for x in causes):
        context = [x for x in context if x.id != "kernel-drops"]
    rank = lambda x: (SEVERITY_RANK[x.severity], -x.weight)  # noqa: E731
    if not causes:
        # Nothing names a cause: the consequences' actions cannot point "above".
        context = [replace(x, action=NO_CAUSE_ACTIONS[x.id]) if x.id in NO_CAUSE_ACTIONS else x for x in context]
    # A talker no cause explains is a lead, not a cause: after the causes, before the consequences.
    return tuple(sorted(causes, key=rank) + sorted(talkers, key=rank) + sorted(context, key=rank))


# --- the verdict ------------------------------------------------------------------------------


def _hms(t: float) -> str:
    s = int(t) % 86400
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d} UTC"


def verdict(data: BundleData, findings: Sequence[Finding] | None = None) -> str:
    """One paragraph: what filled which namespace, how fast, what ctguard did, what the kernel dropped."""
    f = facts(data)
    found = diagnose(data) if findings is None else findings
    warn = float(_policy_value(data.policy, "thresholds", "warn", HEALTHY_FILL))
    if not found and healthy(f, warn):
        if f.entries == 0 and f.count == 0 and not f.series:
            return "The table was empty when this bundle was taken: nothing to explain."
        max_txt = f" of a max of {_n(f.max)}" if f.max else ""
        return (f"Healthy: {f.netns_label} held {_n(max(f.count, f.entries))} entries{max_txt} "
                f"({_pct(f.peak_fill)} at most), with no drop and no action by ctguard.")
    parts = []
    what = []
    if f.protos and f.entries:
        name, n = max(f.protos.items(), key=lambda kv: kv[1])
        what.append(f"{name.upper()} ({_pct(_share(n, f.entries))})")
    if f.states and f.tcp and _share(f.tcp, f.entries) >= TCP_SHARE:
        st, n = max(f.states.items(), key=lambda kv: kv[1])
        what.append(f"mostly {st} among TCP")
    own = next((s for s in f.series if f.inode and s.inode == f.inode), None)
    peak = own if own is not None else f.peak
    where = peak.label if peak else f.netns_label
    largest, max_then = f.largest
    if max_then:
        size = (f"{_n(largest)} entries at its peak, {_pct(_share(largest, max_then))} of the max of {_n(max_then)} "
                "in force then")
        if peak and peak.peak == largest and peak.fullest_max != peak.peak_max and peak.fullest > peak.peak_fill + 0.05:
            size += (f" (and {_pct(peak.fullest)} of the max of {_n(peak.fullest_max)} in force at "
                     f"{_hms(peak.fullest_at)})")
        if peak and peak.peak == largest and peak.rate >= 1 and peak.peak > peak.rise_from:
            size += (f", rising from {_n(peak.rise_from)} in {peak.rise_seconds:.1f} s "
                     f"({_n(int(peak.rate))} entries/s)")
        elif peak and largest > peak.peak:
            size += f" (the dump at capture; the timeline's last sample held {_n(peak.last)})"
    else:
        size = f"{_n(largest)} entries"
    lead = f"{', '.join(what)} filled {where}" if what else f"The table of {where} filled"
    parts.append(f"{lead}: {size}.")
    bumps = [e for e in f.events if e.get("kind") == "bump"]
    refusals = f.refusals
    if bumps:
        steps = [_int(bumps[0].get("old"))] + [_int(b.get("new")) for b in bumps]
        parts.append(f"ctguard raised nf_conntrack_max {' -> '.join(_n(s) for s in steps)} "
                     f"({len(bumps)} bump{'s' if len(bumps) > 1 else ''})"
                     + (f" and was refused {len(refusals)} time(s) ({', '.join(sorted({str(r.get('reason')) for r in refusals}))})"
                        if refusals else "") + ".")
    elif refusals:
        parts.append(f"ctguard was refused a bump {len(refusals)} time(s) "
                     f"({', '.join(sorted({str(r.get('reason')) for r in refusals}))}).")
    elif f.series:
        parts.append("ctguard made no change to the table in the recorded window.")
    else:
        parts.append("(No timeline in this bundle: what ctguard did is in the journal.)")
    relief = [e for e in f.events if e.get("kind") == "relief" and not e.get("advise")]
    advised = [e for e in f.events if e.get("kind") == "relief" and e.get("advise")]
    if advised and not relief:
        parts.append(f"Relief would have shortened timeouts {len(advised)} time(s) ([relief] mode = \"advise\", "
                     f"or classes not in [relief] enforce: nothing changed; {advised[0].get('text', '')}).")
    if relief:
        parts.append(f"Relief acted {len(relief)} time(s) on timeouts ({relief[0].get('text', '')}"
                     + (", ..." if len(relief) > 1 else "") + ").")
    d = f.drops
    lines = f.kind_count("kernel")
    if d["drop"] or d["early_drop"] or lines:
        parts.append(f"The kernel dropped {_n(d['drop'])} new flows and evicted {_n(d['early_drop'])} entries early"
                     + (f", and logged {lines} table-full line{'s' if lines != 1 else ''}" if lines else "") + ".")
    elif f.window_drops is not None:
        parts.append("The kernel dropped nothing in the recorded window"
                     + (" (up to this bundle: the incident went on)." if _open(f) else "."))
    else:
        parts.append("(No timeline: the kernel's drop counters since the namespace was created are in the details.)")
    if _open(f):
        parts.append(f"Incident {f.incident.get('id', '')} was still open when this bundle was taken: later "
                     "bundles of it (`ctguard bundles list`) show how it went on.")
    if found:
        parts.append(f"Top finding: {found[0].summary}.")
    else:
        # Not healthy, yet nothing in the dump names a cause: the entries left before the capture
        # (an incident's end, once they expired). Its earlier bundles hold them.
        parts.append(f"No finding names a cause: the table held {_n(max(f.count, f.entries))} entries when this "
                     "bundle was taken"
                     + (f"; the earlier bundles of {f.incident.get('id', 'this incident')} (`ctguard bundles list`) "
                        "show what filled it." if f.incident else "."))
    return " ".join(parts)


def _open(f: Facts) -> bool:
    return bool(f.incident) and not f.incident.get("ended")
