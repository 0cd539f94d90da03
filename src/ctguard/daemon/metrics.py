"""Prometheus node_exporter textfile: rendered purely, written atomically."""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import get_args

from ctguard import __version__
from ctguard.config.policy import Policy
from ctguard.core.decide import budget_left, upper_bound
from ctguard.daemon.saving import Saver
from ctguard.store.files import atomic_write
from ctguard.core.model import History, RefusalKind, Sample

# Refusal reasons with a series from the start (0 until one happens), so that rate() and
# alerts see them before the first refusal. "cooldown" is the normal wait between two bumps,
# not a refusal an operator acts on: it is neither logged nor counted.
log = logging.getLogger(__name__)

REFUSAL_REASONS = tuple(k for k in get_args(RefusalKind) if k != "cooldown")

# Per-namespace kernel counters (columns of /proc/net/stat/nf_conntrack) beside `drop`.
NAMESPACE_COUNTERS = (
    ("ctguard_conntrack_early_drops_total", "early_drop",
     "Entries the kernel evicted early to make room for a new one (kernel early_drop counter)."),
    ("ctguard_conntrack_insert_failed_total", "insert_failed",
     "Entries that could not be inserted into the table (kernel insert_failed counter)."),
    ("ctguard_conntrack_invalid_total", "invalid",
     "Packets conntrack could not track (kernel invalid counter)."),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(ns) -> str:
    out = f'netns="{ns.inode}",name="{_label(ns.name)}"'
    if ns.unit:
        out += f',unit="{_label(ns.unit)}"'
    if ns.container:
        out += f',container="{_label(ns.container)}"'
    return out


def render(sample: Sample, history: History, ceiling: int, budget_left: int | None = None,
           upper_bound: int | None = None, slab_bytes: int | None = None) -> str:
    """The metrics of docs/contract.md, plus budget, bound and freshness for alerting.

    The per-namespace `_total` series are the kernel's own counters (they restart with the
    namespace); `slab_bytes` is the nf_conntrack slab's objects x object size (None: unreadable).
    """
    lim = sample.limits
    out = []

    def head(name: str, kind: str, text: str) -> None:
        out.append(f"# HELP {name} {text}\n# TYPE {name} {kind}\n")

    # Six series a namespace: its labels are made once (1,000 namespaces are 6,000 lines).
    labelled = [(ns, _labels(ns), dict(ns.stats)) for ns in sample.namespaces]
    head("ctguard_conntrack_entries", "gauge", "Conntrack entries in the namespace.")
    for ns, labels, _ in labelled:
        out.append(f'ctguard_conntrack_entries{{{labels}}} {ns.count}\n')
    head("ctguard_conntrack_fill_ratio", "gauge", "Entries divided by the global nf_conntrack_max.")
    for ns, labels, _ in labelled:
        out.append(f'ctguard_conntrack_fill_ratio{{{labels}}} {sample.fill(ns):.6f}\n')
    head("ctguard_conntrack_drops_total", "counter", "Packets dropped because the table was full (kernel drop counter).")
    for _, labels, stats in labelled:
        out.append(f'ctguard_conntrack_drops_total{{{labels}}} {stats.get("drop", 0)}\n')
    for name, column, text in NAMESPACE_COUNTERS:
        head(name, "counter", text)
        for _, labels, stats in labelled:
            out.append(f'{name}{{{labels}}} {stats.get(column, 0)}\n')
    head("ctguard_conntrack_max", "gauge", "net.netfilter.nf_conntrack_max.")
    out.append(f"ctguard_conntrack_max {lim.max}\n")
    head("ctguard_conntrack_buckets", "gauge", "net.netfilter.nf_conntrack_buckets.")
    out.append(f"ctguard_conntrack_buckets {lim.buckets}\n")
    head("ctguard_ceiling", "gauge", "The policy's bump.ceiling.")
    out.append(f"ctguard_ceiling {ceiling}\n")
    ok = [b for b in history.bumps if b.ok and b.trigger != "reapply"]
    head("ctguard_bumps_total", "counter", "Bumps of nf_conntrack_max made by ctguard.")
    out.append(f"ctguard_bumps_total {history.bumps_total}\n")
    head("ctguard_table_full_events_total", "counter", "Kernel 'table full' lines seen in the journal.")
    out.append(f"ctguard_table_full_events_total {history.table_full_events}\n")
    head("ctguard_refusals_total", "counter", "Bumps ctguard may not make, by reason (one per refused bump, not per sample refused).")
    counted = dict(history.refusals)
    for reason in sorted({*REFUSAL_REASONS, *counted}):
        out.append(f'ctguard_refusals_total{{reason="{_label(reason)}"}} {counted.get(reason, 0)}\n')
    head("ctguard_last_bump_timestamp_seconds", "gauge", "Unix time of the last bump, 0 if none.")
    out.append(f"ctguard_last_bump_timestamp_seconds {ok[-1].at.wall if ok else 0:.3f}\n")
    if budget_left is not None:
        head("ctguard_bump_budget_remaining", "gauge", "Automatic bumps still allowed in the current hour.")
        out.append(f"ctguard_bump_budget_remaining {budget_left}\n")
    if upper_bound is not None:
        head("ctguard_upper_bound", "gauge", "Highest max ctguard may set: the ceiling or the memory cap, the lower.")
        out.append(f"ctguard_upper_bound {upper_bound}\n")
    if history.relief.active:      # (a family with no series would be a HELP without a sample)
        head("ctguard_relief_active", "gauge",
             "Timeouts relief holds shortened: the emergency value in seconds, per namespace and timeout key.")
    for x in history.relief.active:
        out.append(f'ctguard_relief_active{{netns="{x.netns}",name="{_label(x.name)}",key="{x.key}"}} {x.value}\n')
    head("ctguard_relief_total", "counter", "Conntrack timeouts shortened by relief.")
    out.append(f"ctguard_relief_total {history.relief.total}\n")
    if slab_bytes is not None:
        head("ctguard_conntrack_slab_bytes", "gauge", "Bytes of the nf_conntrack slab cache (objects x object size).")
        out.append(f"ctguard_conntrack_slab_bytes {slab_bytes}\n")
    head("ctguard_build_info", "gauge", "Always 1; the labels say which ctguard and Python write these metrics.")
    out.append(f'ctguard_build_info{{version="{_label(__version__)}",python="{platform.python_version()}"}} 1\n')
    head("ctguard_last_update_timestamp_seconds", "gauge", "Unix time of the sample these metrics come from.")
    out.append(f"ctguard_last_update_timestamp_seconds {sample.at.wall:.3f}\n")
    return "".join(out)


class MetricsWriter:
    """When to rewrite the textfile: at most every `every` seconds (even at fast_interval), and
    only while node_exporter's folder exists (said once when it is missing, once when it comes)."""

    def __init__(self, every: float = 1.0, under_systemd: bool = False) -> None:
        self.every = every
        self.under_systemd = under_systemd
        self._at = -1e9
        self._said: bool | None = None        # what was last said about the folder
        # A turn's metrics not yet due, written once they are (flush): a calm host's next turn
        # may be 5 s away (ctguard.core.ticks), and what a turn changed must show within `every`.
        self._held: tuple[str, Callable[[], None]] | None = None

    def due(self, path: str, now: float) -> bool:
        if not path or now - self._at < self.every:
            return False
        self._at = now
        ready = folder_ready(path)
        if ready != self._said:
            if not ready:
                # Under systemd the sandbox's writable folders are fixed when the service starts:
                # a folder made later stays read-only to ctguard until it is restarted.
                then = ("; once it exists, `systemctl restart ctguard` (the sandbox fixes its writable "
                        "folders at start)") if self.under_systemd else ""
                log.info("metrics are off until %s exists (node_exporter's textfile folder: install "
                         "prometheus-node-exporter, or set [metrics] textfile)%s", Path(path).parent, then)
            elif self._said is not None:
                log.info("%s exists: metrics are written to %s", Path(path).parent, path)
            self._said = ready
        return ready


    def write(self, policy: Policy, sample: Sample, history: History, slab_bytes: Callable[[], int | None],
              saver: Saver, extra: Callable[[], str] = str) -> None:
        """Render and write the textfile when it is due (`extra`: the recorder's and persistence's
        series). The slab size and `extra` are asked for only then: reading /proc/slabinfo costs
        ~0.5 ms, more than a calm turn's own work."""
        path = policy.metrics.textfile

        def out() -> None:
            text = render(sample, history, policy.bump.ceiling, budget_left(policy, history, sample.at),
                          upper_bound(policy, sample.limits)[0], slab_bytes()) + extra()
            saver.save("metrics", lambda: write(path, text), where=path)

        now = time.monotonic()
        if path and now - self._at < self.every:
            self._held = (path, out)
            return
        self._held = None
        if self.due(path, now):
            out()

    def timeout(self) -> float | None:
        """Seconds until held metrics are due, or None when none are held."""
        if self._held is None:
            return None
        return max(0.0, self._at + self.every - time.monotonic())

    def flush(self) -> None:
        """Write held metrics once they are due."""
        if self._held is None or time.monotonic() - self._at < self.every:
            return
        (path, out), self._held = self._held, None
        if self.due(path, time.monotonic()):
            out()


def folder_ready(path: str) -> bool:
    """Whether the textfile's folder exists. It is node_exporter's (the package makes it):
    ctguard never creates it, so a host without node_exporter simply has metrics off."""
    return bool(path) and Path(path).parent.is_dir()


def write(path: str, text: str) -> None:
    if not path:
        return
    atomic_write(Path(path), text, 0o644)


def render_persist(shadowed: list[tuple[str, int]], lowered_total: int, defended_total: int) -> str:
    """What the boot will not take from ctguard, and max lowered by other writers (issue 16)."""
    out = [
        "# HELP ctguard_persist_shadowed Value a file applied after ctguard's sets at boot (by file); absent when "
        "ctguard's own files decide.\n# TYPE ctguard_persist_shadowed gauge\n",
    ]
    for file, value in shadowed:
        out.append(f'ctguard_persist_shadowed{{file="{_label(file)}"}} {value}\n')
    out.append("# HELP ctguard_max_lowered_total Times another writer lowered nf_conntrack_max below what ctguard "
               "set or found.\n# TYPE ctguard_max_lowered_total counter\n")
    out.append(f"ctguard_max_lowered_total {lowered_total}\n")
    out.append("# HELP ctguard_max_defended_total Times ctguard set a lowered nf_conntrack_max back "
               "([persist] defend).\n# TYPE ctguard_max_defended_total counter\n")
    out.append(f"ctguard_max_defended_total {defended_total}\n")
    return "".join(out)
