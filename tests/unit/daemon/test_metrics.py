"""The node_exporter textfile: what it holds, read by a real prometheus-node-exporter (a host
without node_exporter, told once that metrics are off: tests/kernel/test_metrics_kernel.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from ctguard import __version__
from ctguard.config.policy import Policy
from ctguard.core.decide import advance
from ctguard.core.model import BumpRecord, History, Instant, KernelLimits, NamespaceReading, Outcome, Refuse, Sample
from ctguard.daemon import metrics
from ctguard.store.state import history_from_json, history_to_json
from helpers.prometheus import NODE_EXPORTER, NodeExporter


def now(t: float = 1000.0) -> Instant:
    return Instant(t, t, "boot")


def rich_sample() -> Sample:
    # Label sets differ between namespaces (unit/container only where known): node_exporter
    # must accept that.
    stats = lambda d, e, i, v: (("drop", d), ("early_drop", e), ("insert_failed", i), ("invalid", v))  # noqa: E731
    return Sample(now(), KernelLimits(8192, 2048, 256, 1 << 34, 1 << 33), (
        NamespaceReading(4026531840, "host", 100, stats(1, 2, 3, 4)),
        NamespaceReading(4026532001, "pid:42 (nginx)", 4096, stats(10, 20, 30, 40), "docker-3f2a.scope",
                         "docker:3f2a1b2c3d4e"),
        NamespaceReading(4026532002, "blue", 7, stats(0, 0, 0, 0), "web.service"),
    ))


def rich_history() -> History:
    return History(bumps=(BumpRecord(now(), 4096, 8192, "fill"),), bumps_total=4, table_full_events=9,
                   refusals=(("budget", 2), ("ceiling", 5)))


def families(text: str) -> dict[str, str]:
    return dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))


def test_per_namespace_counters_slab_refusals_and_build_info() -> None:
    text = metrics.render(rich_sample(), rich_history(), 65536, 3, 65536, slab_bytes=974848)
    ns = 'netns="4026532001",name="pid:42 (nginx)",unit="docker-3f2a.scope",container="docker:3f2a1b2c3d4e"'
    for line in (f"ctguard_conntrack_drops_total{{{ns}}} 10", f"ctguard_conntrack_early_drops_total{{{ns}}} 20",
                 f"ctguard_conntrack_insert_failed_total{{{ns}}} 30", f"ctguard_conntrack_invalid_total{{{ns}}} 40",
                 'ctguard_conntrack_invalid_total{netns="4026531840",name="host"} 4',
                 "ctguard_conntrack_slab_bytes 974848",
                 'ctguard_refusals_total{reason="ceiling"} 5', 'ctguard_refusals_total{reason="budget"} 2',
                 # every reason has a series from the start, so rate() and alerts see the first one
                 'ctguard_refusals_total{reason="memory"} 0', 'ctguard_refusals_total{reason="guard"} 0',
                 f'ctguard_build_info{{version="{__version__}",python="{sys.version.split()[0]}"}} 1'):
        assert line + "\n" in text, line
    assert 'reason="cooldown"' not in text


def test_every_series_has_help_and_type_and_counters_end_in_total() -> None:
    text = metrics.render(rich_sample(), rich_history(), 65536, 3, 65536, slab_bytes=1)
    types = families(text)
    helps = set(re.findall(r"^# HELP (\S+) \S", text, re.M))
    names = set(re.findall(r"^(ctguard_[a-z_]+)[{ ]", text, re.M))
    assert names == set(types) == helps
    for name, kind in types.items():
        assert (kind == "counter") == name.endswith("_total"), f"{name} is a {kind}"


def test_refusals_are_counted_by_reason_and_survive_a_restart() -> None:
    p = Policy()

    def refuse(kind: str) -> Outcome:
        return Outcome(Refuse(16384, 8192, kind, "fill", None, 0.9, "x"), False, "x")  # type: ignore[arg-type]

    h = advance(History(), None, [], [refuse("ceiling"), refuse("cooldown")], now(), p)
    h = advance(h, None, [], [refuse("ceiling"), refuse("budget")], now(1001), p)
    assert h.refusals == (("budget", 1), ("ceiling", 2))
    assert history_from_json(history_to_json(h)).refusals == h.refusals
    old_state = history_to_json(h)
    del old_state["refusals"]   # a state file from before this counter
    assert history_from_json(old_state).refusals == ()


needs_node_exporter = pytest.mark.skipif(
    NODE_EXPORTER is None, reason="needs prometheus-node-exporter (Debian package; scripts/bootstrap test installs it)")


@needs_node_exporter
def test_node_exporter_reads_the_textfile_without_error(tmp_path: Path) -> None:
    folder = tmp_path / "textfile"
    folder.mkdir()
    text = metrics.render(rich_sample(), rich_history(), 65536, 3, 65536, slab_bytes=974848)
    metrics.write(str(folder / "ctguard.prom"), text)
    with NodeExporter(folder, tmp_path / "node_exporter.log") as ne:
        scraped = ne.scrape()
    assert re.search(r"^node_textfile_scrape_error 0$", scraped, re.M), scraped
    # Every family ctguard wrote arrives, with its type (node_exporter re-exposes HELP as its own).
    for name, kind in families(text).items():
        assert f"# TYPE {name} {kind}" in scraped, name
    assert re.search(r'^ctguard_conntrack_entries\{container="",name="blue",netns="4026532002",unit="web.service"\} 7$',
                     scraped, re.M), "node_exporter fills the labels a namespace lacks with empty values"




def test_a_turn_inside_the_limit_is_held_and_written_when_due(tmp_path: Path) -> None:
    """At most one write a second; a turn inside that second is held, not dropped, and written by
    the loop's flush once due (a calm host's next turn may be 5 s away, issue 21 item 5). The slab
    size is read only when the file is written."""
    import time as time_mod
    from ctguard.config.policy import loads
    from ctguard.daemon.saving import Saver

    prom = tmp_path / "ctguard.prom"
    policy = loads(f'[metrics]\ntextfile = "{prom}"\n', "t.toml")
    slab_reads = []

    def slab() -> int:
        slab_reads.append(1)
        return 100

    w = metrics.MetricsWriter(every=0.3)
    saver = Saver(lambda: str(tmp_path))
    first, second = rich_sample(), rich_sample()
    w.write(policy, first, History(), slab, saver)
    assert prom.exists() and len(slab_reads) == 1 and w.timeout() is None
    prom.unlink()
    w.write(policy, second, History(), slab, saver)   # inside the limit: held
    assert not prom.exists() and len(slab_reads) == 1
    assert 0.0 < w.timeout() <= 0.3
    w.flush()
    assert not prom.exists(), "not due yet"
    time_mod.sleep(0.35)
    w.flush()
    assert prom.exists() and len(slab_reads) == 2 and w.timeout() is None
