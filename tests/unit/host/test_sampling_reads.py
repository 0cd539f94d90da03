"""The sampler's reads at scale (issue 21 item 5): only the columns a sample keeps, an unchanged
stat file not parsed again, a tick reading only up to the count, /run/netns listed again only when
it changed, and what a tick reports as changed. Against a prepared /proc tree (no root)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ctguard.core.model import SAMPLED_COUNTERS
from ctguard.host import netns
from ctguard.host.kernel import parse_stat_columns, parse_stat_table
from ctguard.host.netns import NamespaceRef, StatReaders
from ctguard.host.observe import DISCOVER_EVERY, Observer

HEADER = ("entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop "
          "icmp_error  expect_new expect_create expect_delete search_restart")
STAT = HEADER + """
00000abc  00000000 00000001 00000000 00000002 00000000 00000000 00000000 00000000 00000000 0000000a 00000001 00000000  00000000 00000000 00000000 00000003
00000abc  00000000 00000001 00000000 00000003 00000000 00000000 00000000 00000000 00000001 00000010 00000000 00000000  00000000 00000000 00000000 00000000
"""
# An older kernel's order (4.x: searched, found, new, ... no clashres): columns are found by name.
OLD = """entries  searched found new invalid ignore delete delete_list insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
00000010  00000000 00000000 00000000 00000007 00000000 00000000 00000000 00000000 00000002 00000003 00000004 00000000  00000000 00000000 00000000 00000000
"""


@pytest.mark.parametrize("text, columns, entries, stats", [
    (STAT, SAMPLED_COUNTERS, 0xABC, (("drop", 0x1A), ("early_drop", 1), ("insert_failed", 1), ("invalid", 5))),
    (OLD, SAMPLED_COUNTERS, 0x10, (("drop", 3), ("early_drop", 4), ("insert_failed", 2), ("invalid", 7))),
    (STAT, ("search_restart", "no_such_column"), 0xABC, (("search_restart", 3),)),   # a column the kernel lacks: left out
    (HEADER + "\n", SAMPLED_COUNTERS, 0, (("drop", 0), ("early_drop", 0), ("insert_failed", 0), ("invalid", 0))),
    (STAT + "0000\n", SAMPLED_COUNTERS, 0xABC, (("drop", 0x1A), ("early_drop", 1), ("insert_failed", 1), ("invalid", 5))),
])
def test_only_the_sampled_columns_are_summed(text, columns, entries, stats):
    assert parse_stat_columns(text.encode(), columns) == (entries, stats)
    full = dict(parse_stat_table(text)[1])
    assert all(full[k] == v for k, v in stats), "the same sums as the whole table's parse"


def host_tree(tmp_path: Path, text: str = STAT) -> Path:
    (tmp_path / "self/net/stat").mkdir(parents=True)
    f = tmp_path / "self/net/stat/nf_conntrack"
    f.write_text(text)
    return f


HOST = NamespaceRef(1, "host", "/proc/self/ns/net", None)


def test_an_unchanged_file_is_not_parsed_again(tmp_path: Path) -> None:
    f = host_tree(tmp_path)
    r = StatReaders(tmp_path)
    assert r.refresh([HOST]) == []
    (first,), _ = r.read()
    (again,), _ = r.read()
    assert again is first, "the same bytes: the same reading"
    f.write_text(STAT.replace("00000abc", "00000abd"))
    (changed,), _ = r.read()
    assert changed is not first and changed.count == 0xABD and dict(changed.stats)["drop"] == 0x1A
    r.close()


def test_a_tick_reads_up_to_the_count_only(tmp_path: Path) -> None:
    host_tree(tmp_path)
    r = StatReaders(tmp_path)
    r.refresh([HOST])
    assert r.counts() == {1: 0xABC}, "before any full read: the first 512 bytes"
    r.read()
    first_row = STAT.index("\n", STAT.index("\n") + 1) + 1
    assert r._head[1] == first_row
    assert r.counts() == {1: 0xABC}
    r.refresh([])
    assert r.counts() == {} and r._last == {} and r._head == {}, "a namespace gone leaves nothing behind"


class FakeClock:
    def __init__(self) -> None:
        self.t = 100.0

    def monotonic(self) -> float:
        return self.t


def test_run_netns_is_listed_again_only_when_it_changed(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run-netns"
    run.mkdir()
    calls = []
    real = netns.named

    def counting(path):
        calls.append(path)
        return real(path)

    monkeypatch.setattr("ctguard.host.observe.named", counting)
    clock = FakeClock()
    obs = Observer(kernel=None, clock=clock, proc_root=tmp_path / "noproc", run_netns=run)   # type: ignore[arg-type]
    obs.rediscover()
    obs.rediscover()
    assert len(calls) == 1, "unchanged /run/netns: the last listing stands"
    (run / "x").write_text("")
    os.utime(run, (1, 1))
    obs.rediscover()
    assert len(calls) == 2


def test_what_a_tick_reports_changed(tmp_path: Path) -> None:
    run = tmp_path / "run-netns"
    run.mkdir()
    clock = FakeClock()
    obs = Observer(kernel=None, clock=clock, proc_root=tmp_path / "noproc", run_netns=run)   # type: ignore[arg-type]
    obs._run_netns_changed()
    obs.rediscover()
    assert obs.changed() == ""
    os.utime(run, (1, 1))
    assert obs.changed() == f"{run} changed"
    assert obs.changed() == f"{run} changed", "only looks: the next sample rediscovers"
    obs._run_netns_changed()
    assert obs.changed() == ""
    clock.t += DISCOVER_EVERY
    assert obs.changed() == "the namespaces are due to be found again"
    obs.namespaces = "host"
    os.utime(run, (2, 2))
    assert obs.changed() == "the namespaces are due to be found again", "`host` only: /run/netns is not watched"
