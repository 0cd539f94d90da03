"""PURE diagnosis: a bundle's data in, ranked findings and a verdict out.

The playbook operators follow by hand after an incident (protocol and TCP-state breakdown, top
destinations, NAT, timeouts, invalid with drops, which namespace) has a decision at every step;
this module takes those decisions, each a function of the bundle's numbers only, so every one is
a row in a table-driven test (tests/test_diagnose.py). No I/O, no clock: `BundleData` holds the
parsed files (manifest.toml, evidence.toml, timeline.json, policy.toml) and nothing else.

Every finding has a stable kebab-case `id` (documented in docs/findings.md: alerts and scripts
may match on it), a `severity`, a `summary` a person can act on, the `evidence` (the numbers
that triggered it), the `action`, and, where the action is a rule, a `rule` ready to paste and
scoped to what the bundle saw. A rule is a suggestion: ctguard never applies it.

A healthy or empty table yields no finding at all.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ctguard.core.sizing import EXTENSION_BYTES, HASH_HEAD_BYTES

CRITICAL, WARNING, INFO = "critical", "warning", "info"
SEVERITY_RANK = {CRITICAL: 0, WARNING: 1, INFO: 2}

# The shares that make a thing "dominant". One place, documented in docs/findings.md.
PROTOCOL_SHARE = 0.6        # one protocol holds this share of the entries
STATE_SHARE = 0.5           # one TCP state holds this share of the TCP entries ...
TCP_SHARE = 0.3             # ... and TCP holds at least this share of the table
UDP_SHARE = 0.5             # UDP holds this share while a UDP timeout is raised
TALKER_SHARE = 0.3          # one source / destination holds this share (lower bound of its count)
NAMESPACE_SHARE = 0.6       # one namespace holds this share of all namespaces' entries
ATTACK_SHARE = 0.5          # unanswered or half-open share that counts as attack-shaped
ATTACK_SOURCES = 256        # ... from at least this many distinct sources
STALE_SHARE = 0.3           # unanswered share that counts as "many stale entries"
NO_TRACK_SHARE = 0.3        # one local UDP service port holds this share
CHAIN_LIMIT = 8.0           # entries (or max) per bucket above which chains are long
CAP_NEAR = 0.9              # max at this share of the ceiling / memory cap leaves no room
HEALTHY_FILL = 0.7          # below this peak fill, with no drop and no action, a table is healthy
DEFAULT_CEILING = 1048576
DEFAULT_MEMORY_FRACTION = 0.10
DEFAULT_OBJECT_SIZE = 320

# Local services whose traffic needs no connection state on a host that does no NAT for them.
NO_TRACK_PORTS = {"udp/53": "DNS", "udp/123": "NTP"}
UDP_TIMEOUTS = ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream")
KERNEL_DEFAULT_TIMEOUTS = {"nf_conntrack_udp_timeout": 30, "nf_conntrack_udp_timeout_stream": 120,
                           "nf_conntrack_tcp_timeout_established": 432000}


@dataclass(frozen=True)
class Finding:
    id: str
    severity: str
    summary: str
    evidence: Mapping[str, Any]
    action: str
    rule: str = ""              # a rule ready to paste (a suggestion: ctguard never applies it)
    weight: float = 0.0         # share of the table it explains, for ranking within a severity

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "severity": self.severity, "summary": self.summary,
                               "evidence": dict(self.evidence), "action": self.action}
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
    inode: int = 0              # the captured namespace (its dump counts towards its series' peak)

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
    return Facts(
        entries=entries, count=count, max=kmax, buckets=buckets, table=table,
        protos={str(k): _int(v) for k, v in (table.get("by_proto", {}) or {}).items()},
        states={str(k): _int(v) for k, v in (table.get("by_tcp_state", {}) or {}).items()},
        unreplied=_int(table.get("unreplied")),
        series=series,
        events=tuple(e for e in tl.get("events", []) if isinstance(e, Mapping)),
        totals={str(k): _int(v) for k, v in ((ev.get("cpu_stats", {}) or {}).get("totals", {}) or {}).items()},
        window_drops=window_drops,
        role=str(host.get("role", "")), roles=tuple(host.get("roles", []) or ()),
        nat=nat, nat_text=str(rules.get("nat_verdict", "")),
        raised=tuple(t for t in host.get("raised_timeouts", []) or () if isinstance(t, Mapping)),
        ceiling=ceiling, upper=upper, upper_by=upper_by, netns_label=label, inode=inode,
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


def protocol_dominant(f: Facts) -> Finding | None:
    if not f.entries or not f.protos:
        return None
    name, n = max(f.protos.items(), key=lambda kv: kv[1])
    share = _share(n, f.entries)
    if share < PROTOCOL_SHARE:
        return None
    return Finding(
        "protocol-dominant", INFO, f"{name.upper()} holds {_pct(share)} of the table ({n} of {f.entries} entries)",
        {"protocol": name, "entries": n, "of": f.entries, "share": round(share, 4)},
        f"look at what sends this much {name.upper()}: the findings below name the states and talkers",
        weight=share)


def syn_sent_dominant(f: Facts) -> Finding | None:
    syn = f.states.get("SYN_SENT", 0) + f.states.get("SYN_SENT2", 0)
    if not f.tcp or _share(f.tcp, f.entries) < TCP_SHARE or _share(syn, f.tcp) < STATE_SHARE:
        return None
    dests = [r for r in _rows(f, "top_destinations")[:3] if _lower(r) > 0.1 * syn]
    ports = [r for r in _rows(f, "top_dports")[:3] if str(r.get("key", "")).startswith("tcp/") and _lower(r) > 0.1 * syn]
    where = ", ".join(f"{r['key']} ({_int(r['count'])})" for r in dests) or "many destinations"
    port_txt = (" on " + ", ".join(str(r["key"]) for r in ports)) if ports else ""
    return Finding(
        "tcp-syn-sent-dominant", WARNING,
        f"{_pct(_share(syn, f.tcp))} of TCP entries are SYN_SENT (connection attempts never answered), "
        f"mostly to {where}{port_txt}: a dependency is down or clients retry in a storm",
        {"syn_sent": syn, "tcp": f.tcp, "share_of_tcp": round(_share(syn, f.tcp), 4),
         "destinations": {str(r["key"]): _int(r["count"]) for r in dests},
         "ports": {str(r["key"]): _int(r["count"]) for r in ports}},
        f"check that {where}{port_txt} is up and reachable, and give its clients backoff and a retry limit: "
        "fix the retries, not the table (a bigger table only holds more dead attempts)",
        weight=_share(syn, f.entries))


def time_wait_churn(f: Facts) -> Finding | None:
    tw = f.states.get("TIME_WAIT", 0)
    if not f.tcp or _share(f.tcp, f.entries) < TCP_SHARE or _share(tw, f.tcp) < STATE_SHARE:
        return None
    dests = [r for r in _rows(f, "top_dports")[:2] if str(r.get("key", "")).startswith("tcp/") and _lower(r) > 0.2 * tw]
    where = (" (mostly " + ", ".join(str(r["key"]) for r in dests) + ")") if dests else ""
    return Finding(
        "tcp-time-wait-churn", WARNING,
        f"{_pct(_share(tw, f.tcp))} of TCP entries are TIME_WAIT{where}: short-lived connections opened and closed "
        "in a churn",
        {"time_wait": tw, "tcp": f.tcp, "share_of_tcp": round(_share(tw, f.tcp), 4),
         "ports": {str(r["key"]): _int(r["count"]) for r in dests}},
        "reuse connections (HTTP keep-alive, connection pools) instead of one per request; each closed "
        "connection holds an entry for nf_conntrack_tcp_timeout_time_wait (120 s)",
        weight=_share(tw, f.entries))


def udp_timeout_raised(f: Facts) -> Finding | None:
    udp = f.protos.get("udp", 0)
    raised = [t for t in f.raised if t.get("name") in UDP_TIMEOUTS]
    if not raised or _share(udp, f.entries) < UDP_SHARE:
        return None
    what = ", ".join(f"{t['name']} = {t['value']} s (default {t['default']} s)" for t in raised)
    revert = "; ".join(f"sysctl -w net.netfilter.{t['name']}={t['default']}" for t in raised)
    return Finding(
        "udp-timeout-raised", WARNING,
        f"UDP holds {_pct(_share(udp, f.entries))} of the table while {what}: every UDP flow stays "
        f"{max(_int(t['value']) / max(1, _int(t['default'])) for t in raised):.0f}x longer than the kernel's default",
        {"udp": udp, "of": f.entries, "timeouts": {str(t["name"]): _int(t["value"]) for t in raised},
         "defaults": {str(t["name"]): _int(t["default"]) for t in raised}},
        f"revert the raised UDP timeout ({revert}) in {f.netns_label}, and remove it from /etc/sysctl.d so it "
        "stays reverted",
        rule=revert, weight=_share(udp, f.entries))


def established_timeout_nat(f: Facts) -> Finding | None:
    t = next((t for t in f.raised if t.get("name") == "nf_conntrack_tcp_timeout_established"), None)
    forwarding = f.nat or any(r in ("NAT gateway", "router", "Kubernetes node") for r in f.roles)
    est = f.states.get("ESTABLISHED", 0)
    stale = _share(f.unreplied, f.entries)
    if t is None or not forwarding or (stale < STALE_SHARE and _share(est, f.entries) < STATE_SHARE):
        return None
    return Finding(
        "tcp-established-timeout-raised-nat", WARNING,
        f"nf_conntrack_tcp_timeout_established is raised to {t['value']} s (default {t['default']} s) on a host that "
        f"forwards or NATs: {est} ESTABLISHED entries, {_pct(stale)} of the table never answered, are kept for days",
        {"timeout": _int(t["value"]), "default": _int(t["default"]), "established": est,
         "unreplied": f.unreplied, "of": f.entries, "role": f.role},
        "lower nf_conntrack_tcp_timeout_established back to the default (432000 s) or below (86400 s is common on "
        "NAT gateways): flows of clients that left without closing hold their entries that long",
        rule=f"sysctl -w net.netfilter.nf_conntrack_tcp_timeout_established={t['default']}",
        weight=max(stale, _share(est, f.entries)))


def _talker(f: Facts, key: str, fid: str, word: str) -> Finding | None:
    rows = _rows(f, key)
    if not rows or not f.entries:
        return None
    top = rows[0]
    share = _share(_lower(top), f.entries)
    if share < TALKER_SHARE:
        return None
    addr = str(top["key"])
    evidence = {"address": addr, "entries": _int(top["count"]), "error": _int(top.get("error")),
                "of": f.entries, "share": round(share, 4)}
    if fid == "top-source-dominant":
        limit = max(100, (_lower(top) // 10) // 100 * 100)
        fam = _family(addr)
        rule = ("# suggestion (ctguard never applies it): at most "
                f"{limit} tracked connections from {addr}\n"
                "nft add table inet ctguard_suggested\n"
                "nft add chain inet ctguard_suggested limit_source "
                "'{ type filter hook prerouting priority filter; policy accept; }'\n"
                f"nft add rule inet ctguard_suggested limit_source {fam} saddr {addr} ct count over {limit} counter drop")
        action = (f"find out why {addr} opens this many connections; if it should not, cap it with an nftables "
                  f"`ct count` limit (below)")
    else:
        rule = ""
        action = (f"check what {addr} serves and who calls it this often; the destination port list "
                  "shows which service")
    return Finding(fid, WARNING, f"one {word} holds {_pct(share)} of the table: {addr} ({_int(top['count'])} entries)",
                   evidence, action, rule=rule, weight=share)


def top_source(f: Facts) -> Finding | None:
    return _talker(f, "top_sources", "top-source-dominant", "source")


def top_destination(f: Facts) -> Finding | None:
    return _talker(f, "top_destinations", "top-destination-dominant", "destination")


def attack_shape(f: Facts) -> Finding | None:
    src = f.table.get("top_sources", {}) or {}
    sources = _int(src.get("tracked"))
    many = sources >= ATTACK_SOURCES or not src.get("exact", True)
    half_open = f.states.get("SYN_RECV", 0)
    unanswered = _share(f.unreplied + half_open, f.entries)
    wd = f.window_drops or {}
    invalid_climb = _int(wd.get("invalid")) > 0 and _int(wd.get("invalid")) >= _int(wd.get("drop")) > 0
    shaped = f.entries > 0 and many and unanswered >= ATTACK_SHARE
    if not shaped and not invalid_climb:
        return None
    why = []
    if shaped:
        why.append(f"{_pct(unanswered)} of entries never answered or half-open, from "
                   f"{'more than ' if not src.get('exact', True) else ''}{sources} sources")
    if invalid_climb:
        why.append(f"the kernel's invalid counter climbed by {wd['invalid']} while it dropped {wd['drop']}")
    return Finding(
        "attack-shape", CRITICAL, "the growth is shaped like an attack: " + "; ".join(why),
        {"unanswered_or_half_open": f.unreplied + half_open, "of": f.entries, "share": round(unanswered, 4),
         "sources": sources, "sources_exact": bool(src.get("exact", True)),
         "invalid_increase": _int(wd.get("invalid")), "drop_increase": _int(wd.get("drop"))},
        "do not raise the table further (a bigger table is a bigger target): filter the flood upstream or "
        "rate-limit new connections (nftables `limit rate` / SYN cookies), and keep [guard] ceiling in place",
        weight=max(unanswered, 0.5))


def namespace_dominant(f: Facts) -> Finding | None:
    if len([s for s in f.series if s.peak > 0]) < 2:
        return None
    # The namespaces at the moment the busiest one peaked.
    top = max(f.series, key=lambda s: s.peak)
    total = sum(max(s.peak if s is top else s.last, 0) for s in f.series)
    share = _share(top.peak, total)
    if share < NAMESPACE_SHARE:
        return None
    return Finding(
        "namespace-dominant", WARNING,
        f"one namespace holds {_pct(share)} of all tracked entries: {top.label} ({top.peak} entries at its peak)",
        {"namespace": top.name, "inode": top.inode, "unit": top.unit, "container": top.container,
         "entries": top.peak, "of": total, "share": round(share, 4)},
        f"look inside {top.label} first (ctguard capture --netns {top.inode}); the limit is global, so this one "
        "namespace fills the table for every other",
        weight=share)


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
        f"{f.buckets} hash buckets for a max of {f.max} ({per_max:.0f} per bucket): lookups walk long chains",
        {"buckets": f.buckets, "max": f.max, "max_per_bucket": round(per_max, 2),
         "entries_per_bucket": round(per_entry, 2), "chaintoolong": chain},
        f"raise the buckets to max/4 ({want}): echo {want} > /sys/module/nf_conntrack/parameters/hashsize, and "
        "let ctguard keep them ([buckets] manage = true)",
        rule=f"echo {want} > /sys/module/nf_conntrack/parameters/hashsize", weight=min(1.0, per_max / 64))


def max_near_cap(f: Facts) -> Finding | None:
    refused = [e for e in f.events if e.get("kind") == "refusal" and e.get("reason") in ("ceiling", "memory", "guard")]
    kmax = max([f.max] + [_int(e.get("new")) for e in f.events if e.get("kind") == "bump"])
    if not f.upper or (kmax < CAP_NEAR * f.upper and not refused):
        return None
    evidence = {"max": kmax, "upper_bound": f.upper, "bound_by": f.upper_by, "ceiling": f.ceiling,
                "refusals": len(refused)}
    if refused:
        last = refused[-1]
        summary = (f"ctguard was refused {len(refused)} bump(s) at the {last.get('reason')} (max {_n(_int(last.get('old')))}, "
                   f"wanted {_n(_int(last.get('new')))}): the next incident cannot be bumped away")
        evidence["refused_at"] = str(last.get("reason"))
    else:
        summary = (f"nf_conntrack_max {_n(kmax)} is {_pct(_share(kmax, f.upper))} of the {f.upper_by} {_n(f.upper)}: "
                   "the next incident cannot be bumped away")
    return Finding(
        "max-near-cap", CRITICAL if refused else WARNING, summary, evidence,
        "deal with what fills the table (the other findings); raise [bump] ceiling only if the host has the memory "
        "and the traffic is legitimate",
        weight=max(_share(kmax, f.upper), 0.9 if refused else 0.0))


def kernel_drops(f: Facts) -> Finding | None:
    d = f.drops
    lines = f.kind_count("kernel")
    total = d["drop"] + d["early_drop"] + d["insert_failed"]
    if not total and not lines:
        return None
    span = "over the recorded window" if f.window_drops is not None else "since the namespace was created"
    parts = [f"{_n(d['drop'])} new flows dropped", f"{_n(d['early_drop'])} entries evicted early",
             f"{_n(d['insert_failed'])} inserts failed"]
    return Finding(
        "kernel-drops", CRITICAL if d["drop"] or lines else WARNING,
        f"the kernel lost traffic {span}: " + ", ".join(parts) + (f"; {lines} table-full line{'s' if lines != 1 else ''}" if lines else ""),
        {**d, "table_full_lines": lines, "span": span},
        "every drop is a connection that failed: size the table for the peak (ctguard recommend) and fix what "
        "filled it",
        weight=1.0)


def host_role(f: Facts) -> Finding | None:
    if f.nat and f.role == "server":
        return Finding(
            "server-does-nat", WARNING,
            f"this host was taken for a plain server, but {f.netns_label} does NAT after all ({f.nat_text}): "
            "its table holds the forwarded flows of every client behind it",
            {"role": f.role, "nat": f.nat_text},
            "size the table for the clients behind the NAT, not for the host's own services; check whether the "
            "NAT rule is meant to be there", weight=0.5)
    if f.role in ("NAT gateway", "router", "Kubernetes node", "container host"):
        return Finding(
            "host-role", INFO, f"this host is a {f.role}: its table holds flows it forwards, not only its own",
            {"role": f.role, "roles": list(f.roles), "nat": f.nat_text},
            "read the talkers as clients behind the host; limits belong where they enter", weight=0.1)
    return None


def no_track_candidate(f: Facts) -> Finding | None:
    if f.nat:
        return None
    for row in _rows(f, "top_dports")[:3]:
        key = str(row.get("key"))
        svc = NO_TRACK_PORTS.get(key)
        share = _share(_lower(row), f.entries)
        if svc is None or share < NO_TRACK_SHARE:
            continue
        port = key.split("/")[1]
        dests = [r for r in _rows(f, "top_destinations")[:1] if _lower(r) >= 0.5 * _lower(row)]
        scope = ""
        if dests:
            scope = f"{_family(str(dests[0]['key']))} daddr {dests[0]['key']} "
        sscope = f"{_family(str(dests[0]['key']))} saddr {dests[0]['key']} " if dests else ""
        rule = ("# suggestion (ctguard never applies it): the local " + svc + " service's traffic is not tracked\n"
                "nft add table inet ctguard_notrack\n"
                "nft add chain inet ctguard_notrack pre '{ type filter hook prerouting priority raw; }'\n"
                "nft add chain inet ctguard_notrack out '{ type filter hook output priority raw; }'\n"
                f"nft add rule inet ctguard_notrack pre {scope}udp dport {port} notrack\n"
                f"nft add rule inet ctguard_notrack out {sscope}udp sport {port} notrack")
        return Finding(
            "no-track-candidate", WARNING,
            f"a local {svc} service ({key}) holds {_pct(share)} of the table on a host with no NAT for it: "
            "this traffic needs no connection state",
            {"port": key, "service": svc, "entries": _int(row["count"]), "of": f.entries, "share": round(share, 4),
             "nat": f.nat_text},
            f"exempt the {svc} traffic from tracking with a `notrack` rule (below); keep any stateful filtering for "
            "it in stateless form", rule=rule, weight=share)
    return None


RULES: tuple[Callable[[Facts], Finding | None], ...] = (
    kernel_drops, attack_shape, max_near_cap, syn_sent_dominant, time_wait_churn, udp_timeout_raised,
    established_timeout_nat, top_source, top_destination, namespace_dominant, buckets_too_few,
    no_track_candidate, host_role, protocol_dominant,
)

# Every id a rule may produce, for docs/findings.md (a test keeps them in step).
FINDING_IDS = (
    "kernel-drops", "attack-shape", "max-near-cap", "tcp-syn-sent-dominant", "tcp-time-wait-churn",
    "udp-timeout-raised", "tcp-established-timeout-raised-nat", "top-source-dominant",
    "top-destination-dominant", "namespace-dominant", "buckets-too-few", "no-track-candidate",
    "server-does-nat", "host-role", "protocol-dominant",
)


def diagnose(data: BundleData, warn: float | None = None) -> tuple[Finding, ...]:
    """Ranked findings: critical first, then by the share of the table each explains."""
    f = facts(data)
    threshold = warn if warn is not None else float(_policy_value(data.policy, "thresholds", "warn", HEALTHY_FILL))
    if healthy(f, threshold):
        return ()
    found = [x for x in (rule(f) for rule in RULES) if x is not None]
    return tuple(sorted(found, key=lambda x: (SEVERITY_RANK[x.severity], -x.weight)))


# --- the verdict ------------------------------------------------------------------------------


def _hms(t: float) -> str:
    s = int(t) % 86400
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d} UTC"


def _n(x: int) -> str:
    return f"{x:,}"


def verdict(data: BundleData, findings: Sequence[Finding] | None = None) -> str:
    """One paragraph: what filled which namespace, how fast, what ctguard did, what the kernel dropped."""
    f = facts(data)
    found = diagnose(data) if findings is None else findings
    if not found:
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
    peak = f.peak
    where = peak.label if peak else f.netns_label
    if peak and peak.peak_max:
        # Peaks are peaks (issue 22): the largest count seen, the dump's too when it is this
        # namespace's (a capture can come after the recorded window's last point).
        most = max(peak.peak, f.count, f.entries) if peak.inode and peak.inode == f.inode else peak.peak
        size = (f"{_n(most)} entries at its peak, {_pct(most / peak.peak_max)} of the max of {_n(peak.peak_max)} "
                "in force then")
        if peak.fullest_max != peak.peak_max and peak.fullest > peak.peak_fill + 0.05:
            size += (f" (and {_pct(peak.fullest)} of the max of {_n(peak.fullest_max)} in force at "
                     f"{_hms(peak.fullest_at)})")
        if peak.rate >= 1 and peak.peak > peak.rise_from:
            size += (f", rising from {_n(peak.rise_from)} in {peak.rise_seconds:.1f} s "
                     f"({_n(int(peak.rate))} entries/s)")
    else:
        size = f"{_n(max(f.count, f.entries))} entries" + (f", {_pct(_share(f.count, f.max))} of max {_n(f.max)}" if f.max else "")
    lead = f"{', '.join(what)} filled {where}" if what else f"The table of {where} filled"
    parts.append(f"{lead}: {size}.")
    bumps = [e for e in f.events if e.get("kind") == "bump"]
    refusals = [e for e in f.events if e.get("kind") == "refusal"]
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
    relief = [e for e in f.events if e.get("kind") == "relief"]
    if relief:
        parts.append(f"Relief acted {len(relief)} time(s) on timeouts ({relief[0].get('text', '')}"
                     + (", ..." if len(relief) > 1 else "") + ").")
    d = f.drops
    lines = f.kind_count("kernel")
    if d["drop"] or d["early_drop"] or lines:
        parts.append(f"The kernel dropped {_n(d['drop'])} new flows and evicted {_n(d['early_drop'])} entries early"
                     + (f", and logged {lines} table-full line{'s' if lines != 1 else ''}" if lines else "") + ".")
    else:
        parts.append("The kernel dropped nothing.")
    parts.append(f"Top finding: {found[0].summary}.")
    return " ".join(parts)
