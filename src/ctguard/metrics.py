"""Prometheus node_exporter textfile: rendered purely, written atomically."""

from __future__ import annotations

from pathlib import Path

from ctguard.files import atomic_write
from ctguard.model import History, Sample


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
           upper_bound: int | None = None) -> str:
    """The metrics of docs/contract.md, plus budget, bound and freshness for alerting.

    `drops_total` is the kernel's per-namespace `drop` counter (it restarts with the namespace).
    """
    lim = sample.limits
    out = []

    def head(name: str, kind: str, text: str) -> None:
        out.append(f"# HELP {name} {text}\n# TYPE {name} {kind}\n")

    head("ctguard_conntrack_entries", "gauge", "Conntrack entries in the namespace.")
    for ns in sample.namespaces:
        out.append(f'ctguard_conntrack_entries{{{_labels(ns)}}} {ns.count}\n')
    head("ctguard_conntrack_fill_ratio", "gauge", "Entries divided by the global nf_conntrack_max.")
    for ns in sample.namespaces:
        out.append(f'ctguard_conntrack_fill_ratio{{{_labels(ns)}}} {sample.fill(ns):.6f}\n')
    head("ctguard_conntrack_drops_total", "counter", "Packets dropped because the table was full (kernel drop counter).")
    for ns in sample.namespaces:
        out.append(f'ctguard_conntrack_drops_total{{{_labels(ns)}}} {ns.drops}\n')
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
    head("ctguard_last_bump_timestamp_seconds", "gauge", "Unix time of the last bump, 0 if none.")
    out.append(f"ctguard_last_bump_timestamp_seconds {ok[-1].at.wall if ok else 0:.3f}\n")
    if budget_left is not None:
        head("ctguard_bump_budget_remaining", "gauge", "Automatic bumps still allowed in the current hour.")
        out.append(f"ctguard_bump_budget_remaining {budget_left}\n")
    if upper_bound is not None:
        head("ctguard_upper_bound", "gauge", "Highest max ctguard may set: the ceiling or the memory cap, the lower.")
        out.append(f"ctguard_upper_bound {upper_bound}\n")
    head("ctguard_last_update_timestamp_seconds", "gauge", "Unix time of the sample these metrics come from.")
    out.append(f"ctguard_last_update_timestamp_seconds {sample.at.wall:.3f}\n")
    return "".join(out)


def write(path: str, text: str) -> None:
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, text, 0o644)


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
