"""How an incident (model.Incident, tracked by decide.advance) is told: journal messages and
fields, and the namespace labels bump entries carry. Pure text; the daemon emits it."""

from __future__ import annotations

from ctguard.core.model import Incident, NamespaceReading


def where(name: str, unit: str, inode: int | None) -> str:
    """'netns web (inode 4026532871, unit nginx.service)': by name and unit where known, not only inode."""
    if inode is None and not name:
        return "the host"
    head = f"netns {name}" if name else f"netns {inode}"
    extra = [f"inode {inode}"] if name and inode is not None and name != str(inode) else []
    if unit:
        extra.append(f"unit {unit}")
    return head + (f" ({', '.join(extra)})" if extra else "")


def ns_fields(ns: NamespaceReading | None) -> dict[str, str]:
    if ns is None:
        return {}
    return {"CTGUARD_NETNS_NAME": ns.name, **_labels("", ns.unit)}


def _labels(name: str, unit: str) -> dict[str, str]:
    """The namespace's name and unit fields, each only when known."""
    out = {}
    if name:
        out["CTGUARD_NETNS_NAME"] = name
    if unit:
        out["CTGUARD_UNIT"] = unit
    return out


def start_message(inc: Incident, fill: float, count: int) -> str:
    return (f"conntrack incident {inc.id} began in {where(inc.name, inc.unit, inc.netns)}: "
            f"{count} entries, fill {fill:.1%} of max {inc.max_at_start}")


def start_fields(inc: Incident, fill: float) -> dict[str, str | int | float]:
    out: dict[str, str | int | float] = {
        "CTGUARD_INCIDENT": inc.id, "CTGUARD_NETNS": inc.netns or "", "CTGUARD_FILL": f"{fill:.4f}",
        "CTGUARD_OLD_MAX": inc.max_at_start, "CTGUARD_REASON": "incident-start",
    }
    return {**out, **_labels(inc.name, inc.unit)}


def duration(inc: Incident) -> float:
    return inc.ended.since(inc.started) if inc.ended is not None else 0.0


def peak_text(peak_fill: float, peak_count: int, peak_max: int) -> str:
    """The incident's peaks as `status` and the journal say them: the fullest fill, and the
    largest count with the max in force when it was seen (what a bundle's verdict states as its
    peak). The two differ once a bump raised the max between them."""
    then = f" ({peak_count / peak_max:.1%} of max {peak_max} then)" if peak_max else ""
    return f"peak fill {peak_fill:.1%}, peak {peak_count} entries{then}"


def end_message(inc: Incident) -> str:
    bumps = f"{inc.bumps} bump(s), max {inc.max_at_start} -> {inc.max_now}" if inc.bumps else f"no bump (max {inc.max_now})"
    rate = f", sized on up to {inc.rate:.0f}/s" if inc.rate > 0 else ""
    refused = f", {inc.refusals} refused" if inc.refusals else ""
    bundles = f"; bundles: {', '.join(inc.bundles)}" if inc.bundles else ""
    return (f"conntrack incident {inc.id} in {where(inc.name, inc.unit, inc.netns)} ended after "
            f"{duration(inc):.0f} s: {peak_text(inc.peak_fill, inc.peak_count, inc.peak_max)}, "
            f"{inc.drops} drops, {inc.early_drops} early drops, {inc.table_full_lines} table-full lines; "
            f"{bumps}{rate}{refused}{bundles}"
            + (f"; attack-shaped (the guard: {inc.attack}): left out of the persisted sizing" if inc.attack else ""))


def end_fields(inc: Incident) -> dict[str, str | int | float]:
    out: dict[str, str | int | float] = {
        "CTGUARD_INCIDENT": inc.id, "CTGUARD_NETNS": inc.netns or "", "CTGUARD_PEAK_FILL": f"{inc.peak_fill:.4f}",
        "CTGUARD_DROPS": inc.drops, "CTGUARD_EARLY_DROPS": inc.early_drops, "CTGUARD_TABLE_FULL": inc.table_full_lines,
        "CTGUARD_BUMPS": inc.bumps, "CTGUARD_RATE": f"{inc.rate:.0f}", "CTGUARD_OLD_MAX": inc.max_at_start,
        "CTGUARD_NEW_MAX": inc.max_now, "CTGUARD_DURATION": f"{duration(inc):.1f}", "CTGUARD_REASON": "incident-end",
    }
    if inc.bundles:
        out["CTGUARD_BUNDLE"] = " ".join(inc.bundles)
    return {**out, **_labels(inc.name, inc.unit)}


def summary(inc: Incident) -> dict:
    """The incident for `status --json` and `recommend --json`."""
    return {
        "id": inc.id, "started": inc.started.wall, "ended": inc.ended.wall if inc.ended else None,
        "netns": inc.netns, "name": inc.name, "unit": inc.unit, "peak_fill": round(inc.peak_fill, 6),
        "peak_count": inc.peak_count, "peak_max": inc.peak_max, "drops": inc.drops, "early_drops": inc.early_drops,
        "table_full_lines": inc.table_full_lines, "bumps": inc.bumps, "refusals": inc.refusals,
        "max_at_start": inc.max_at_start, "max_now": inc.max_now, "rate": round(inc.rate, 1),
        "bundles": list(inc.bundles), "attack": inc.attack,
    }
