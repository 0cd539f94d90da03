"""The nouns: readings, instants, journal events, actions, decisions, history.

All frozen: a reading or a decision is a value that can be logged, compared and tested;
nothing downstream can change what the core decided on.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from typing import Literal, Union

# Columns of /proc/net/stat/nf_conntrack that are per-CPU event counters (hex). The first
# column, "entries", is the namespace's table count, not a counter, and is read separately.
STAT_COUNTERS = (
    "found", "invalid", "ignore", "insert", "insert_failed", "drop", "early_drop",
    "icmp_error", "expect_new", "expect_create", "expect_delete", "search_restart",
    "clashres", "chaintoolong", "new", "delete", "delete_list", "searched",
)
# The counters a sample keeps (issue 21, scale): decide's demand and drops (drop, early_drop,
# insert_failed), the attack guard's `invalid` sign, and what metrics and the flight recorder
# show (the same four). Summing only these is a third of the parse of every column.
SAMPLED_COUNTERS = ("drop", "early_drop", "insert_failed", "invalid")


@dataclass(frozen=True)
class Instant:
    """A point in time on two clocks.

    `wall` is for records read by people and for history across reboots; `boot` is
    CLOCK_BOOTTIME, which never steps, so cooldowns and budgets measured within one boot
    (`boot_id`) are immune to the wall clock being stepped back or forward.
    """

    wall: float
    boot: float
    boot_id: str = ""

    def since(self, earlier: "Instant") -> float:
        """Seconds from `earlier` to self; never negative (a wall clock stepped back counts as 0)."""
        if self.boot_id and self.boot_id == earlier.boot_id:
            return max(0.0, self.boot - earlier.boot)
        return max(0.0, self.wall - earlier.wall)


@dataclass(frozen=True)
class NamespaceReading:
    inode: int
    name: str                       # "host", a /run/netns name, or "pid:N"
    count: int
    stats: tuple[tuple[str, int], ...] = ()
    unit: str = ""                  # systemd unit of a process inside, "" when unknown
    container: str = ""             # container label of a process inside, "" when unknown

    def stat(self, key: str) -> int:
        for k, v in self.stats:
            if k == key:
                return v
        return 0

    @property
    def drops(self) -> int:
        return self.stat("drop")


@dataclass(frozen=True)
class KernelLimits:
    max: int
    buckets: int
    slab_object_size: int | None    # bytes per nf_conntrack object; None when /proc/slabinfo is unreadable
    mem_total: int                  # bytes
    mem_available: int              # bytes
    release: str = ""               # the running kernel's release (/proc/sys/kernel/osrelease): its defaults differ
    # What ctguard may write here (probed at start; containers and LXC mount /proc/sys and /sys
    # read-only): "" when both are writable, else why not ("max: read-only", ...).
    cannot: tuple[str, ...] = ()


@dataclass(frozen=True)
class HostFacts:
    """What a namespace's own network says about an address (host.hostrole.facts): its local
    addresses, the prefixes it routes without its default route (connected networks and specific
    routes: the internal side), the source prefixes its NAT rules translate (clients a gateway
    reaches by policy routing or through an access router need not be in the main table), whether
    it forwards and has source-NAT rules (its role). IPv4 and IPv6 alike."""

    local: tuple[str, ...] = ()         # addresses of this namespace
    internal: tuple[str, ...] = ()      # CIDR prefixes reached without the default route
    forwarding: bool = False
    nat: bool = False
    nat_sources: tuple[str, ...] = ()   # CIDR prefixes its masquerade/snat rules match as sources

    def is_local(self, addr: str) -> bool:
        ip = _ip(addr)
        if ip is None:
            return addr in self.local
        return any(_ip(a) == ip for a in self.local)

    def is_internal(self, addr: str) -> bool:
        ip = _ip(addr)
        if ip is None:
            return False
        if ip.version == 6 and ip.is_link_local:
            return True     # fe80::/10 never crosses a router: the sender is on one of our links
        for prefix in self.internal + self.nat_sources:
            try:
                if ip in ipaddress.ip_network(prefix, strict=False):
                    return True
            except ValueError:
                continue
        return False

    @property
    def role(self) -> str:
        if self.nat and self.forwarding:
            return "NAT gateway"
        if self.forwarding:
            return "router"
        return "end host"


def _ip(addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address as the kernel and the tools write it ("fd00::1", "fe80::1%eth0"), or None."""
    try:
        return ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return None


@dataclass(frozen=True)
class TableShape:
    """What a bounded look into one namespace's table found (for the attack guard)."""

    netns: int
    seen: int                       # entries read (a time-bounded sample of the table)
    suspicious: int                 # never answered (unreplied) or half-open TCP (SYN_RECV)
    sources: int                    # distinct source addresses seen (capped by the summary's size)
    seconds: float = 0.0
    error: str = ""                 # the look failed: the guard then cannot tell, and does not hold back
    # Entries per relief timeout key ("udp": unreplied UDP, "tcp_syn_sent", "tcp_time_wait", ...):
    # which timeouts hold what fills the table (see relief.py).
    states: tuple[tuple[str, int], ...] = ()
    # Issue 22: what the guard needs to tell an outage or a query flood from a spoofed flood.
    answered: int = -1              # entries that saw a reply (-1: not counted)
    top_dst: str = ""               # the destination most entries go to, and how many
    top_dst_count: int = 0
    top_port: str = ""              # the destination port most entries go to ("udp/53"), and how many
    top_port_count: int = 0
    top_sources: tuple[str, ...] = ()   # the busiest sources (a handful)
    host: HostFacts | None = None   # the namespace's own addresses, prefixes and role

    @property
    def share(self) -> float:
        return self.suspicious / self.seen if self.seen else 0.0


@dataclass(frozen=True)
class Sample:
    at: Instant
    limits: KernelLimits
    namespaces: tuple[NamespaceReading, ...]
    shape: TableShape | None = None  # taken only when a bump would pass the guard's ceiling
    resizing: int | None = None     # buckets a hashsize resize in flight (beside the loop) asks for
    # (netns inode, ((relief timeout key, seconds), ...)): read only for a namespace relief looks at
    timeouts: tuple[tuple[int, tuple[tuple[str, int], ...]], ...] = ()

    def fill(self, ns: NamespaceReading) -> float:
        return ns.count / self.limits.max if self.limits.max > 0 else 1.0

    @property
    def worst(self) -> NamespaceReading | None:
        return max(self.namespaces, key=lambda n: n.count, default=None)

    @property
    def worst_fill(self) -> float:
        worst = self.worst
        return self.fill(worst) if worst else 0.0


@dataclass(frozen=True)
class TableFull:
    """The kernel said `table full` (journald, kernel transport only)."""

    at: Instant
    netns: int | None               # inode from "table full in netns N", None for older wordings
    suppressed: int = 0             # from "net_ratelimit: N callbacks suppressed"
    backlog: bool = False           # written while ctguard was down: history, not an emergency
    # No sampled namespace shows it (decide.attribute_lines): the namespace it names is not one
    # ctguard samples (another tenant's, or a gone namespace whose inode was reused), or none
    # dropped nor sits near its max. Counted as a line the kernel wrote, never acted on.
    unattributed: bool = False

    @property
    def live(self) -> bool:
        """A line of this moment in a namespace ctguard guards: acted on, an incident's, `status`'s."""
        return not self.backlog and not self.unattributed


Trigger = Literal["fill", "growth", "table-full", "drops", "manual", "reapply"]
RefusalKind = Literal["ceiling", "memory", "budget", "cooldown", "observe", "guard", "lower", "unchanged"]


@dataclass(frozen=True)
class SetMax:
    old: int
    new: int
    trigger: Trigger
    netns: int | None
    fill: float
    reason: str
    clipped_by: str | None = None   # "ceiling" / "memory" when the wanted value was cut down
    rate: float = 0.0               # the one growth rate the size was computed with (entries/s)
    need: int = 0                   # entries the new max must hold below act (sizing.BumpSize.need)
    cover: float = 0.0              # seconds of that growth made room for
    attack: str = ""                # the guard judged the growth attack-shaped: why ("" when not)


@dataclass(frozen=True)
class SetBuckets:
    old: int
    new: int
    reason: str


@dataclass(frozen=True)
class Refuse:
    wanted: int
    current: int
    kind: RefusalKind
    trigger: Trigger
    netns: int | None
    fill: float
    reason: str
    # The same refused bump as the last one counted (same bound, same max, within the bump
    # cooldown: core.refusals): status shows it, the journal, metrics and incident do not count it again.
    repeat: bool = False


@dataclass(frozen=True)
class RefusalMark:
    """The last refused bump that was counted (core.refusals.repeats compares with it)."""

    at: float                       # seconds (boot time in the daemon, wall time in a timeline)
    kind: str
    current: int                    # the max it was refused at


@dataclass(frozen=True)
class Warn:
    kind: Literal["pressure", "table-full"]
    netns: int | None
    fill: float
    reason: str


@dataclass(frozen=True)
class Persist:
    max: int
    buckets: int | None
    reason: str


@dataclass(frozen=True)
class Capture:
    reason: str
    netns: int | None


@dataclass(frozen=True)
class ShortenTimeout:
    """Relief: lower one conntrack timeout in one namespace (or, advising, say so)."""

    netns: int
    name: str
    key: str                        # sysctl name without nf_conntrack_ and _timeout: "udp", "tcp_syn_sent"
    old: int
    new: int
    reason: str
    advise: bool = False            # relief.mode = "advise": reported, never written
    held: float = 0.0               # share of the sampled table these entries held (for `recommend`)
    # The graduated schedule (relief.py): "enter" (the first step), "down" (a further step as the
    # fill climbs) or "up" (a step back towards the original as the fill falls below the low
    # watermark; new > old); the level it moves to out of `steps`, the namespace's fill, and the
    # entries freed since relief entered (its count then minus now).
    step: str = "enter"
    level: int = 0
    steps: int = 0
    fill: float = 0.0
    freed: int = 0


@dataclass(frozen=True)
class RestoreTimeout:
    """Relief over: put the original back, unless someone else changed the value meanwhile."""

    netns: int
    name: str
    key: str
    original: int
    relieved: int                   # what ctguard wrote; any other value found is the operator's
    reason: str
    advise: bool = False            # advise mode: relief would leave now (nothing was changed)
    fill: float = 0.0
    freed: int = 0                  # entries freed since relief entered


@dataclass(frozen=True)
class TrimEntries:
    """Relief: cap the remaining timeout of the existing entries the shortened timeouts hold."""

    netns: int
    name: str
    timeouts: tuple[tuple[str, int], ...]
    reason: str
    # The value each key had before the step that asks for this trim: the entries made under it
    # are aged as if the new value had been in force (host.trim.plan_entry). Empty: cap only.
    previous: tuple[tuple[str, int], ...] = ()


Action = Union[SetMax, SetBuckets, Refuse, Warn, Persist, Capture, ShortenTimeout, RestoreTimeout, TrimEntries]


@dataclass(frozen=True)
class Decision:
    actions: tuple[Action, ...]
    worst_netns: int | None
    worst_fill: float
    rate: float                     # entries/s of the worst namespace, 0 when unknown
    pressure: bool                  # above thresholds.warn
    summary: str
    seconds_to_full: float = float("inf")   # at the current growth; inf when not growing
    headroom: int | None = None     # entries the worst namespace may still add before thresholds.act
    confirm: bool = False           # the rate is stale (a bump waits for it, or was sized without it): sample again at once
    needs_shape: int | None = None  # a bump would pass [guard] ceiling: look at this namespace's table, decide again
    incident_ends: bool = False     # the open incident ends with this turn (advance closes it: History.last_incident)
    needs_relief: int | None = None  # relief needs this namespace's table shape and timeouts: look, decide again

    def of(self, kind: type) -> list:
        return [a for a in self.actions if isinstance(a, kind)]


@dataclass(frozen=True)
class BumpRecord:
    at: Instant
    old: int
    new: int
    trigger: str
    ok: bool = True                 # False when the write failed (counts for cooldown, not budget)


@dataclass(frozen=True)
class Incident:
    """One episode of pressure, from its first sign to `thresholds.calm` seconds of calm.

    Opened by `decide.advance` when the worst fill reaches `warn`, the kernel reports the
    table full, or a bump is made or refused; closed when none of that happened for `calm`
    seconds. The daemon journals both ends (`incident-start`, `incident-end`); `status` and
    `recommend` read the last one from the state file.
    """

    started: Instant
    netns: int | None               # worst namespace when it started
    name: str = ""                  # its name ("host", a /run/netns name, "pid:N")
    unit: str = ""                  # the systemd unit of a process inside, "" when unknown
    max_at_start: int = 0
    peak_fill: float = 0.0
    peak_count: int = 0             # highest count of the worst namespace
    # nf_conntrack_max in force when peak_count was sampled (0: not known, a state file written
    # before it was kept): the peak every view states is that count against that max (issue 24).
    peak_max: int = 0
    drops: int = 0                  # kernel `drop` counters, all namespaces, during it
    early_drops: int = 0            # kernel `early_drop` counters (entries evicted to make room)
    table_full_lines: int = 0       # the kernel's `table full` lines (+ those it suppressed)
    bumps: int = 0                  # bumps made
    refusals: int = 0               # bumps refused (ceiling, memory, budget, guard), each once (core.refusals)
    max_now: int = 0                # nf_conntrack_max at the last sample
    rate: float = 0.0               # the highest rate a bump of this incident was sized with
    bundles: tuple[str, ...] = ()   # evidence bundles captured during it
    loss_base: tuple[tuple[int, int], ...] = ()   # (inode, early_drop + insert_failed) before it started
    last_active: Instant | None = None             # last sample above warn, table-full line, bump or refusal
    ended: Instant | None = None
    # The guard judged this incident's growth attack-shaped (why; "" when not): its peaks are kept
    # out of what sizing persists, and the sizing peak goes back to `sizing_base`, its value before.
    attack: str = ""
    sizing_base: int = 0
    # The worst namespace's count when the incident's first bundle was asked for (0: none yet): a
    # table that has since grown GROWN_FACTOR-fold gets a bundle of its own (core.decide, "grown").
    first_bundle_count: int = 0

    @property
    def id(self) -> str:
        """Stable name for the journal and for bundles: the start's wall-clock second."""
        return f"incident-{int(self.started.wall)}"


@dataclass(frozen=True)
class Relieved:
    """One timeout ctguard shortened and has not yet put back."""

    netns: int
    name: str
    key: str
    original: int
    value: int                      # what ctguard wrote (read back)
    since: Instant


@dataclass(frozen=True)
class ReliefState:
    active: tuple[Relieved, ...] = ()
    advised: tuple[tuple[int, str], ...] = ()               # (netns, key) advised this episode (advise mode)
    calm_since: tuple[tuple[int, Instant], ...] = ()        # per relieved namespace
    last_look: tuple[tuple[int, Instant], ...] = ()
    last_trim: tuple[tuple[int, Instant], ...] = ()
    total: int = 0                  # timeouts shortened, ever (a counter for metrics)
    # The graduated schedule, per namespace: the level in force (1..steps; a namespace with
    # relieved timeouts and no level is at the last), when relief entered and the count then
    # (entries freed = that count minus now), how often it re-entered soon after leaving (each
    # re-entry doubles the calm a step back up waits for), and when it last left.
    levels: tuple[tuple[int, int], ...] = ()
    entered: tuple[tuple[int, Instant, int], ...] = ()
    reentries: tuple[tuple[int, int], ...] = ()
    left: tuple[tuple[int, Instant], ...] = ()

    def of(self, netns: int) -> list[Relieved]:
        return [r for r in self.active if r.netns == netns]


@dataclass(frozen=True)
class History:
    """What the core remembers between decisions; pure data, advanced by `decide.advance`."""

    bumps: tuple[BumpRecord, ...] = ()
    points: tuple[tuple[float, tuple[tuple[int, int], ...]], ...] = ()   # (boot time, ((inode, demand), ...)): count + early_drop + insert_failed
    drops: tuple[tuple[int, int], ...] = ()                               # last drop counter per inode
    invalid: tuple[tuple[int, int], ...] = ()                             # last invalid counter per inode
    pressure_since: Instant | None = None
    last_warn: Instant | None = None
    last_drop: Instant | None = None         # last loss: packets dropped, or entries evicted (early_drop) at warn
    # Last packet the kernel dropped (a `drop` counter moved, or a table-full line a sampled namespace
    # shows): `status`'s CRITICAL "table full". An eviction alone is not one (issue 24: the dead-upstream
    # lab's SYN_SENT entries evicted to make room, 0 packets dropped, read "table full").
    last_packet_drop: Instant | None = None
    last_capture: Instant | None = None
    persisted_max: int | None = None
    persisted_buckets: int | None = None
    unpersisted_max: int | None = None
    table_full_events: int = 0
    bumps_total: int = 0
    relief: ReliefState = field(default_factory=ReliefState)
    buckets_failed: Instant | None = None     # last failed hashsize write: not retried every sample            # successful bumps ever (a counter for metrics; survives restarts)
    early: tuple[tuple[int, int], ...] = ()   # last early_drop counter per inode
    lost: tuple[tuple[int, int], ...] = ()    # last early_drop + insert_failed per inode (flows lost, decide.flows_lost)
    # Each namespace's own `invalid` rate while calm: (inode, per second, seconds observed), and the
    # boot time of the sample the counters above were read at (decide.attack_shape compares with it).
    invalid_base: tuple[tuple[int, float, float], ...] = ()
    counters_at: float | None = None
    # When each namespace was first sampled and its demand then (inode, boot time, demand;
    # decide.held_in_first_window). Not saved: a restarted daemon has no GC window of its own yet.
    watched: tuple[tuple[int, float, int], ...] = ()
    incident: Incident | None = None          # the open incident
    last_incident: Incident | None = None     # the last one that ended
    sizing_peak: int = 0                      # highest worst count since the last persist (what persists is sized on)
    recorded_p99: int = 0                     # p99 of the recorded per-minute peaks (state.PeakRecorder), for sizing
    recorded_high: int = 0                    # the highest of them (legitimate load: attack-shaped minutes left out)
    recorded_minutes: int = 0                 # minutes recorded in sizing.PEAK_WINDOW
    recorded_attack_minutes: int = 0          # of them, attack-shaped (left out of the two above)
    persisted_at: Instant | None = None       # when ctguard last wrote the persisted sizing
    refusals: tuple[tuple[str, int], ...] = ()  # refused bumps by reason, cooldown and repeats aside (a counter for metrics; survives restarts)
    last_refusal: RefusalMark | None = None     # the last counted automatic refusal (core.refusals)

    def with_(self, **changes) -> "History":
        return replace(self, **changes)


@dataclass(frozen=True)
class Outcome:
    """What carrying out one action did: written and read back, or failed with advice."""

    action: Action
    ok: bool
    detail: str = ""
    read_back: int | None = None
    extra: dict = field(default_factory=dict, compare=False)
    pending: bool = False           # handed to a worker beside the loop; its real outcome comes later
