"""Builds a Sample from the kernel and namespace adapters."""

from __future__ import annotations

import os
from pathlib import Path

from ctguard.core.model import Sample, TableShape
from ctguard.core.timeouts import classes
from ctguard.host import hostrole
from ctguard.host.clock import Clock
from ctguard.host.ctnetlink import dump_table
from ctguard.host.kernel import Kernel
from ctguard.host.netns import NamespaceRef, StatReaders, discover, named

# A full /proc scan costs ~1 ms per few hundred processes; new namespaces that appear
# through a process are found within this many seconds (those under /run/netns at once).
DISCOVER_EVERY = 5.0
TOP_SOURCES = 8         # busiest sources a guard look keeps (are they the namespace's internal side?)
FACTS_FOR = 60.0        # seconds a namespace's addresses and routes are trusted before they are read again


class Observer:
    def __init__(self, kernel: Kernel, clock: Clock, namespaces: str = "all",
                 proc_root: str | Path = "/proc", run_netns: str | Path = "/run/netns") -> None:
        self.kernel = kernel
        self.clock = clock
        self.namespaces = namespaces
        self.proc_root = Path(proc_root)
        self.run_netns = str(run_netns)
        self.readers = StatReaders(proc_root)
        self._last_discovery = -1e9
        self._run_netns_mtime: float | None = None
        # /run/netns as last listed, and its mtime then: the periodic rediscovery walks /proc for
        # namespaces without a name, but lists and stats /run/netns again only when it changed
        # (~2.6 ms of a 3.7 ms rediscovery at 250 named namespaces).
        self._named: tuple[float | None, list[NamespaceRef]] | None = None
        self.problems: list[str] = []
        self._facts: dict[int, tuple[float, object]] = {}

    def _run_netns_mtime_now(self) -> float | None:
        try:
            return os.stat(self.run_netns).st_mtime
        except OSError:
            return None

    def _run_netns_changed(self) -> bool:
        mtime = self._run_netns_mtime_now()
        changed = mtime != self._run_netns_mtime
        self._run_netns_mtime = mtime
        return changed

    def changed(self) -> str:
        """Why the namespaces being sampled may no longer be all of them ("" when nothing says so),
        for a tick between full turns: /run/netns changed (a namespace added or deleted), or the
        /proc scan is due. Only looks: the next sample() rediscovers."""
        if self.namespaces == "all" and self._run_netns_mtime_now() != self._run_netns_mtime:
            return f"{self.run_netns} changed"
        if self.clock.monotonic() - self._last_discovery >= DISCOVER_EVERY:
            return "the namespaces are due to be found again"
        return ""

    def rediscover(self) -> None:
        if self.namespaces == "host":
            refs = [r for r in discover(self.proc_root, "/nonexistent") if r.name == "host"]
        else:
            mtime = self._run_netns_mtime_now()     # before the listing: a change during it shows next time
            if self._named is None or mtime is None or self._named[0] != mtime:
                self._named = (mtime, named(self.run_netns))
            refs = discover(self.proc_root, self.run_netns, bound=self._named[1])
        self.problems = self.readers.refresh(refs)
        self._last_discovery = self.clock.monotonic()

    def sample(self) -> Sample:
        """One reading of every namespace; raises ConntrackNotLoaded while the module is absent."""
        limits = self.kernel.limits()
        due = self.clock.monotonic() - self._last_discovery >= DISCOVER_EVERY
        if due or (self.namespaces == "all" and self._run_netns_changed()):
            self.rediscover()
        readings, failed = self.readers.read()
        if failed:
            # A namespace vanished mid-sample: drop it now, find the rest again next turn.
            self._last_discovery = -1e9
            self._named = None
        return Sample(self.clock.now(), limits, tuple(readings))

    def counts(self) -> dict[int, int]:
        """{inode: entries} of every namespace being sampled (a tick: no limits, no stats)."""
        return self.readers.counts()

    def shape(self, inode: int, guard) -> TableShape:
        """A time-bounded look into one namespace's table: how much of it is unanswered or
        half-open, and from how many sources. Failures are reported in the shape, not raised."""

        ref = next((r for r in self.readers.refs if r.inode == inode), None)
        path = None if ref is None or ref.name == "host" else ref.path
        try:
            t = dump_table(path, budget=guard.sample_budget, top=TOP_SOURCES, capacity=guard.min_sources + 1)
        except (OSError, ValueError) as exc:
            return TableShape(inode, 0, 0, 0, error=str(exc))
        suspicious = t.unreplied + t.by_tcp_state.get("SYN_RECV", 0)
        dst = t.top_destinations.rows[0] if t.top_destinations.rows else None
        port = t.top_dports.rows[0] if t.top_dports.rows else None
        return TableShape(inode, t.entries, suspicious, t.top_sources.tracked, t.seconds, states=relief_states(t),
                          answered=t.entries - t.unreplied,
                          top_dst=dst.key if dst else "", top_dst_count=dst.count if dst else 0,
                          top_port=port.key if port else "", top_port_count=port.count if port else 0,
                          top_sources=tuple(r.key for r in t.top_sources.rows), host=self.host_facts(inode, path))

    def host_facts(self, inode: int, path: str | None):
        """The namespace's addresses, internal prefixes and role (cached FACTS_FOR seconds)."""
        now = self.clock.monotonic()
        cached = self._facts.get(inode)
        if cached is not None and now - cached[0] < FACTS_FOR:
            return cached[1]
        try:
            found = hostrole.facts(path)
        except OSError:
            found = None
        self._facts[inode] = (now, found)
        return found

    def path_of(self, inode: int) -> tuple[bool, str | None]:
        """(found, path) of a namespace being sampled; the host's path is None (ctguard's own)."""
        ref = next((r for r in self.readers.refs if r.inode == inode), None)
        if ref is None:
            return False, None
        return True, None if ref.name == "host" else ref.path

    def close(self) -> None:
        self.readers.close()
        self.kernel.close()


def relief_states(t) -> tuple[tuple[str, int], ...]:
    """Entries per timeout class (core.timeouts.classes: the timeout the kernel applies to each,
    by protocol, TCP state and the SEEN_REPLY / ASSURED bits), from a table breakdown."""
    got = classes(t.by_proto, t.by_tcp_state, t.udp_assured, t.tcp_unreplied_established)
    return tuple(sorted(got.items(), key=lambda kv: -kv[1]))
