"""Relief's pure core: when, what and where timeouts are shortened, and when they go back.

Tables of (policy, sample, history) -> actions, through decide() itself (relief is more actions
from the same decision), plus advance() folding outcomes into the relief state.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from ctguard.config import policy as policy_mod
from ctguard.core import relief
from ctguard.core.decide import advance, decide
from ctguard.core.model import (
    BumpRecord, History, KernelLimits, NamespaceReading, Outcome, Refuse, ReliefState, Relieved, RestoreTimeout, Sample,
    SetMax, ShortenTimeout, TableShape, TrimEntries,
)
from helpers.builders import at
from helpers.paths import SRC

NS = 4026532001
HOST = 4026531840
UDP_TIMEOUTS = (("tcp_syn_recv", 60), ("tcp_syn_sent", 120), ("tcp_time_wait", 120), ("udp", 600),
                ("udp_stream", 120))


def pol(text: str = "") -> policy_mod.Policy:
    # A ceiling equal to max: every bump is refused at the ceiling. Top-level keys come first.
    top, _, rest = text.rpartition("#top\n")
    return policy_mod.loads(top + "[bump]\nceiling = 8192\n[guard]\nceiling = 8192\n" + rest, "t.toml")


ENFORCE = '[relief]\nmode = "enforce"\ncalm_for = 30\n'


def sample(t: float, count: int, *, drops: int = 0, max_: int = 8192, states=(("udp", 900), ("tcp_syn_sent", 50)),
           timeouts=UDP_TIMEOUTS, looked: bool = True) -> Sample:
    nss = (NamespaceReading(HOST, "host", 10, (("drop", 0),)),
           NamespaceReading(NS, "tenant", count, (("drop", drops),)))
    s = Sample(at(t), KernelLimits(max_, max_ // 4, 320, 16 << 30, 8 << 30), nss)
    if looked:
        s = replace(s, shape=TableShape(NS, 1000, 950, 3, states=states), timeouts=((NS, timeouts),))
    return s


def hist(drops: int = 0, **kw) -> History:
    return History(drops=((HOST, 0), (NS, drops)), **kw)


def relief_actions(d):
    return [a for a in d.actions if isinstance(a, (ShortenTimeout, RestoreTimeout, TrimEntries))]


# --- when ------------------------------------------------------------------------------------

@pytest.mark.parametrize("count, drops, mode, expect", [
    (8000, 0, "enforce", ["udp"]),           # refused at the ceiling, at 98%: shorten what fills it
    (8000, 0, "advise", ["udp"]),            # advised (not written)
    (8000, 0, "off", []),                    # off: nothing
    (5000, 0, "enforce", []),                # below act and not dropping: no bump due, no relief
])
def test_when_a_bump_is_refused_and_the_table_stays_full(count, drops, mode, expect):
    d = decide(pol(f'[relief]\nmode = "{mode}"\n'), sample(10, count, drops=drops), hist(), at(10))
    shorten = [a for a in d.actions if isinstance(a, ShortenTimeout)]
    assert [a.key for a in shorten] == expect
    for a in shorten:
        assert a.netns == NS and a.old == 600 and a.new == 5
        assert a.advise == (mode == "advise")
        assert "refused (ceiling)" in a.reason and "unanswered UDP" in a.reason


def test_no_relief_when_the_bump_can_still_grow():
    p = policy_mod.loads(ENFORCE, "t.toml")          # ceiling 1M: the bump goes ahead
    d = decide(p, sample(10, 8000), hist(), at(10))
    assert any(isinstance(a, SetMax) for a in d.actions)
    assert not relief_actions(d)


def test_a_capped_bump_counts_as_blocked():
    p = policy_mod.loads("[bump]\nceiling = 10240\n" + ENFORCE, "t.toml")
    d = decide(p, sample(10, 8000), hist(), at(10))
    assert [a.clipped_by for a in d.actions if isinstance(a, SetMax)] == ["ceiling"]
    assert [a.key for a in d.actions if isinstance(a, ShortenTimeout)] == ["udp"]


def test_still_dropping_in_the_cooldown_cannot_keep_up():
    p = policy_mod.loads(ENFORCE, "t.toml")
    h = replace(hist(drops=100), bumps=(BumpRecord(at(5), 4096, 8192, "fill"),))
    d = decide(p, sample(10, 8100, drops=500), h, at(10))
    assert any(isinstance(a, Refuse) and a.kind == "cooldown" for a in d.actions)
    assert [a.key for a in d.actions if isinstance(a, ShortenTimeout)] == ["udp"]


def test_dropping_below_act_still_counts():
    # Refused at the ceiling (a table-full line), fill under act, but the kernel drops there.
    p = pol(ENFORCE)
    from ctguard.core.model import TableFull
    d = decide(p, sample(10, 6000, drops=50), hist(drops=10), at(10), [TableFull(at(10), NS)])
    assert [a.key for a in d.actions if isinstance(a, ShortenTimeout)] == ["udp"]


# --- what ------------------------------------------------------------------------------------

@pytest.mark.parametrize("states, expect", [
    ((("udp", 900), ("tcp_syn_sent", 50)), ["udp"]),                       # 5% SYN_SENT: under SHARE
    ((("tcp_syn_sent", 600), ("tcp_syn_recv", 300)), ["tcp_syn_sent", "tcp_syn_recv"]),
    ((("tcp_time_wait", 800), ("udp", 150)), ["tcp_time_wait", "udp"]),
    ((("tcp_established", 990),), []),                                      # not named in the policy: never
    ((), []),                                                               # look failed: nothing
])
def test_what_follows_the_table_shape(states, expect):
    d = decide(pol(ENFORCE), sample(10, 8000, states=states), hist(), at(10))
    assert [a.key for a in d.actions if isinstance(a, ShortenTimeout)] == expect


def test_tcp_established_only_when_named():
    p = pol(ENFORCE + "[relief.timeouts]\ntcp_established = 3600\n")
    s = sample(10, 8000, states=(("tcp_established", 990),), timeouts=(("tcp_established", 432000),))
    d = decide(p, s, hist(), at(10))
    assert [(a.key, a.old, a.new) for a in d.actions if isinstance(a, ShortenTimeout)] == [
        ("tcp_established", 432000, 3600)]


def test_never_a_timeout_already_at_or_below_its_emergency_value():
    s = sample(10, 8000, timeouts=(("udp", 5), ("tcp_syn_sent", 120)))
    d = decide(pol(ENFORCE), s, hist(), at(10))
    assert not [a for a in d.actions if isinstance(a, ShortenTimeout)]


def test_needs_a_look_first_then_not_again_within_look_every():
    d = decide(pol(ENFORCE), sample(10, 8000, looked=False), hist(), at(10))
    assert d.needs_relief == NS and not relief_actions(d)
    recently = hist(relief=ReliefState(last_look=((NS, at(8)),)))
    assert decide(pol(ENFORCE), sample(10, 8000, looked=False), recently, at(10)).needs_relief is None
    assert decide(pol(ENFORCE), sample(20, 8000, looked=False), recently, at(20)).needs_relief == NS


def test_where_only_the_namespace_that_fills():
    d = decide(pol(ENFORCE), sample(10, 8000), hist(), at(10))
    assert {a.netns for a in relief_actions(d)} == {NS}


def test_trim_goes_with_the_shortening_and_repeats_every_trim_every():
    d = decide(pol(ENFORCE), sample(10, 8000), hist(), at(10))
    trims = [a for a in d.actions if isinstance(a, TrimEntries)]
    assert [t.timeouts for t in trims] == [(("udp", 5),)]
    active = ReliefState(active=(Relieved(NS, "tenant", "udp", 600, 10, at(10)),), last_trim=((NS, at(10)),))
    h = hist(relief=active)
    assert not [a for a in decide(pol(ENFORCE), sample(12, 8000), h, at(12)).actions if isinstance(a, TrimEntries)]
    later = [a for a in decide(pol(ENFORCE), sample(16, 8000), h, at(16)).actions if isinstance(a, TrimEntries)]
    assert [t.timeouts for t in later] == [(("udp", 10),)]
    advised = decide(pol('[relief]\nmode = "advise"\n'), sample(10, 8000), hist(), at(10))
    assert not [a for a in advised.actions if isinstance(a, TrimEntries)]


def test_observe_mode_only_advises():
    d = decide(pol('mode = "observe"\n#top\n' + ENFORCE), sample(10, 8000), hist(), at(10))
    assert [a.advise for a in d.actions if isinstance(a, ShortenTimeout)] == [True]
    assert not [a for a in d.actions if isinstance(a, TrimEntries)]


# --- undo ------------------------------------------------------------------------------------

def _active(calm_since=None) -> History:
    st = ReliefState(active=(Relieved(NS, "tenant", "udp", 600, 10, at(0)),),
                     calm_since=((NS, calm_since),) if calm_since else ())
    return hist(relief=st)


@pytest.mark.parametrize("text, calm_since, t, restore_reason", [
    (ENFORCE + "steps = 1\n", at(0), 31, "calm for 31 s"),   # one step: straight back to the original
    (ENFORCE, at(0), 29, None),                       # not calm for long enough
    (ENFORCE, None, 100, None),                       # never calm
    ('[relief]\nmode = "off"\n', None, 1, "relief.mode is off"),
    ('[relief]\nmode = "advise"\n', None, 1, "relief.mode is advise"),
    ('mode = "observe"\n#top\n' + ENFORCE, None, 1, "mode is observe"),
    (ENFORCE + "[relief.timeouts]\n", None, 1, None),
])
def test_restore(text, calm_since, t, restore_reason):
    d = decide(pol(text), sample(t, 100), _active(calm_since), at(t))
    restores = [a for a in d.actions if isinstance(a, RestoreTimeout)]
    if restore_reason is None:
        assert not restores
    else:
        assert [(a.key, a.original, a.relieved) for a in restores] == [("udp", 600, 10)]
        assert restore_reason in restores[0].reason


def test_a_vanished_namespace_is_restored_or_forgotten():
    s = Sample(at(5), KernelLimits(8192, 2048, 320, 16 << 30, 8 << 30), (NamespaceReading(HOST, "host", 10),))
    d = decide(pol(ENFORCE), s, _active(), at(5))
    assert [a.reason for a in d.actions if isinstance(a, RestoreTimeout)] == ["the namespace is gone"]


def test_advance_tracks_calm_and_restores():
    p = pol(ENFORCE)
    h = _active()
    h = advance(h, sample(1, 8000), [], [], at(1), p)
    assert h.relief.calm_since == ()
    h = advance(h, sample(2, 100), [], [], at(2), p)
    assert h.relief.calm_since == ((NS, at(2)),)
    h2 = advance(h, sample(3, 100, drops=5), [], [], at(3), p)
    assert h2.relief.calm_since == ()                                 # a new drop ends the calm
    r = RestoreTimeout(NS, "tenant", "udp", 600, 10, "calm")
    done = advance(h, sample(40, 100), [], [Outcome(r, True, "", read_back=600)], at(40), p)
    assert done.relief.active == () and done.relief.calm_since == ()
    kept = advance(h, sample(40, 100), [], [Outcome(r, False, "EIO")], at(40), p)
    assert len(kept.relief.active) == 1                               # a failed write is retried
    operator = advance(h, sample(40, 100), [], [Outcome(r, False, "", extra={"forget": True})], at(40), p)
    assert operator.relief.active == ()


def test_advance_records_shortenings_and_advice():
    p = pol(ENFORCE)
    s = ShortenTimeout(NS, "tenant", "udp", 600, 10, "why")
    h = advance(hist(), sample(1, 8000), [], [Outcome(s, True, "", read_back=10)], at(1), p)
    assert h.relief.active == (Relieved(NS, "tenant", "udp", 600, 10, at(1)),) and h.relief.total == 1
    assert h.relief.last_look == ((NS, at(1)),)
    adv = replace(s, advise=True)
    h = advance(hist(), sample(1, 8000), [], [Outcome(adv, False, "advise")], at(1), p)
    assert h.relief.advised == ((NS, "udp"),) and h.relief.active == ()
    # advised once per episode: not again until calm for calm_for
    d = decide(pol('[relief]\nmode = "advise"\ncalm_for = 30\n'), sample(2, 8000), h, at(2))
    assert not [a for a in d.actions if isinstance(a, ShortenTimeout)]


def test_at_start_restores_this_boot_and_forgets_another():
    st = ReliefState(active=(Relieved(NS, "tenant", "udp", 600, 10, at(0, "b1")),
                             Relieved(NS, "tenant", "tcp_syn_sent", 120, 10, at(0, "b0"))), total=4)
    restores, kept = relief.at_start(st, "b1", [(NS, "udp", "b1"), (NS, "tcp_syn_sent", "b0")])
    assert [(a.key, a.original, a.relieved) for a in restores] == [("udp", 600, 10)]
    assert [x.key for x in kept.active] == ["udp"] and kept.total == 4


# --- the adapters, over a temp tree ------------------------------------------------------------

def test_sysctl_names_follow_the_kernel():
    from ctguard.config.policy import RELIEF_TIMEOUTS, sysctl_name

    names = {k: sysctl_name(k) for k in RELIEF_TIMEOUTS}
    assert names["udp"] == "nf_conntrack_udp_timeout"
    assert names["udp_stream"] == "nf_conntrack_udp_timeout_stream"
    assert names["tcp_syn_sent"] == "nf_conntrack_tcp_timeout_syn_sent"
    assert names["tcp_established"] == "nf_conntrack_tcp_timeout_established"


def test_timeout_writer_reads_back_and_compares(tmp_path):
    from ctguard.host.timeouts import TimeoutChanged, read_timeouts, write_timeout

    (tmp_path / "nf_conntrack_udp_timeout").write_text("600\n")
    (tmp_path / "nf_conntrack_tcp_timeout_syn_sent").write_text("120\n")
    d = str(tmp_path)
    assert read_timeouts(None, ["udp", "tcp_syn_sent", "tcp_syn_recv"], d) == {"udp": 600, "tcp_syn_sent": 120}
    assert write_timeout(None, "udp", 10, expect=600, sysctl_dir=d) == 10
    with pytest.raises(TimeoutChanged) as exc:
        write_timeout(None, "udp", 600, expect=5, sysctl_dir=d)     # someone else's value: left alone
    assert exc.value.found == 10 and read_timeouts(None, ["udp"], d) == {"udp": 10}


def test_store_keeps_the_originals_and_sets_a_damaged_file_aside(tmp_path):
    from ctguard.store.relief import Record, ReliefStore

    store = ReliefStore(tmp_path)
    store.records[(NS, "udp")] = Record(NS, "tenant", "/run/netns/tenant", "udp", 600, 10, at(1))
    store.total = 3
    store.calm[NS] = at(5)
    store.save()
    again = ReliefStore(tmp_path)
    again.load()
    assert again.state() == ReliefState(active=(Relieved(NS, "tenant", "udp", 600, 10, at(1)),), total=3,
                                        calm_since=((NS, at(5)),))
    assert again.boot_ids() == [(NS, "udp", "b1")]
    (tmp_path / "relief.json").write_text("{not json")
    warned = []
    broken = ReliefStore(tmp_path)
    broken.load(warn=warned.append)
    assert broken.records == {} and warned and (tmp_path / "relief.json.bad").exists()


def test_actor_saves_the_original_before_writing_and_restores_by_compare_and_set(tmp_path):
    from ctguard.daemon.relief import ReliefActor
    from ctguard.store.relief import ReliefStore

    sysctl = tmp_path / "sys"
    sysctl.mkdir()
    (sysctl / "nf_conntrack_udp_timeout").write_text("600\n")
    store = ReliefStore(tmp_path / "state")
    actor = ReliefActor(store, lambda n: (True, None), lambda: at(1), sysctl_dir=str(sysctl))
    o = actor.carry_out(ShortenTimeout(NS, "tenant", "udp", 600, 10, "why"), pol(ENFORCE))
    assert o.ok and o.read_back == 10
    saved = ReliefStore(tmp_path / "state")
    saved.load()
    assert [(r.key, r.original, r.value) for r in saved.records.values()] == [("udp", 600, 10)]
    # The operator sets 45 meanwhile: the restore leaves it and forgets the relief.
    (sysctl / "nf_conntrack_udp_timeout").write_text("45\n")
    o = actor.carry_out(RestoreTimeout(NS, "tenant", "udp", 600, 10, "calm"), pol(ENFORCE))
    assert not o.ok and o.extra["why"] == "operator" and (sysctl / "nf_conntrack_udp_timeout").read_text() == "45\n"
    assert store.records == {}
    # A namespace that vanished is forgotten.
    gone = ReliefActor(store, lambda n: (False, None), lambda: at(1), sysctl_dir=str(sysctl))
    o = gone.carry_out(RestoreTimeout(NS, "tenant", "udp", 600, 10, "calm"), pol(ENFORCE))
    assert not o.ok and o.extra["why"] == "gone"


def test_trim_selects_only_unanswered_half_open_and_time_wait():
    from ctguard.host.ctnetlink import IPS_ASSURED, IPS_SEEN_REPLY
    from ctguard.host.trim import key_of

    assert key_of(17, 0, None) == "udp"
    assert key_of(17, IPS_SEEN_REPLY | IPS_ASSURED, None) is None
    assert key_of(6, 0, 1) == "tcp_syn_sent"
    assert key_of(6, IPS_SEEN_REPLY, 2) == "tcp_syn_recv"
    assert key_of(6, IPS_SEEN_REPLY | IPS_ASSURED, 2) is None
    assert key_of(6, IPS_SEEN_REPLY | IPS_ASSURED, 7) == "tcp_time_wait"
    assert key_of(6, IPS_SEEN_REPLY | IPS_ASSURED, 3) is None          # never an established connection


def test_every_bundle_carries_the_relief_in_force(tmp_path):
    from ctguard.evidence import collect
    from ctguard.store.relief import Record, ReliefStore

    store = ReliefStore(tmp_path / "state")
    store.records[(NS, "udp")] = Record(NS, "tenant", "/run/netns/tenant", "udp", 600, 10, at(1))
    store.save()
    ctx = collect.Context(policy_text=f'[state]\ndir = "{tmp_path}/state"\n[relief]\nmode = "enforce"\n')
    got = collect.run_collector("relief", collect.relief, ctx)
    assert got.error is None
    assert got.data["mode"] == "enforce"
    assert [(r["key"], r["original"], r["value"]) for r in got.data["active"]] == [("udp", 600, 10)]
    assert b'"original": 600' in got.files["relief.json"]
    assert ("relief", collect.relief) in collect.HOST_COLLECTORS
    empty = collect.run_collector("relief", collect.relief, collect.Context(policy_text=f'[state]\ndir = "{tmp_path}/none"\n'))
    assert empty.error is None and empty.data["active"] == []


# --- recommend's timeout advice --------------------------------------------------------------

def test_timeout_advice_from_what_relief_saw_and_raised_timeouts():
    from ctguard.host.hostrole import DEFAULT_TIMEOUTS

    seen = {"udp": {"times": 3, "original": 600, "value": 10, "held": 0.92},
            "tcp_syn_recv": {"times": 1, "original": 60, "value": 10, "held": 0.7}}
    raised = [("nf_conntrack_udp_timeout", 600), ("nf_conntrack_tcp_timeout_established", 864000)]
    adv = relief.timeout_advice(seen, dict(DEFAULT_TIMEOUTS), raised)
    by = {a["sysctl"]: a for a in adv}
    udp = by["nf_conntrack_udp_timeout"]
    assert udp["recommended"] == 30 and udp["line"] == "net.netfilter.nf_conntrack_udp_timeout = 30"
    assert "raised to 600 s" in udp["why"] and "92%" in udp["why"]
    syn = by["nf_conntrack_tcp_timeout_syn_recv"]
    assert syn["recommended"] == 10 and "SYN flood" in syn["why"] and "tcp_syncookies" in syn["why"]
    est = by["nf_conntrack_tcp_timeout_established"]
    assert est["recommended"] == 432000 and "above the kernel default" in est["why"]
    assert relief.timeout_advice({}, dict(DEFAULT_TIMEOUTS), [("nf_conntrack_udp_timeout", 30)]) == []


def test_recommend_prints_timeout_lines(tmp_path):
    import subprocess
    import sys

    from ctguard.store.relief import ReliefStore

    store = ReliefStore(tmp_path / "state")
    store.note("udp", 600, 10, 0.9, 1.0)
    store.save()
    policy = tmp_path / "p.toml"
    policy.write_text(f'[state]\ndir = "{tmp_path}/state"\n[persist]\nsysctl_file = "{tmp_path}/s.conf"\n'
                      f'modprobe_file = "{tmp_path}/m.conf"\n')
    src = SRC
    out = subprocess.run([sys.executable, "-m", "ctguard", "recommend", "--policy", str(policy)],
                         capture_output=True, text=True, env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert "net.netfilter.nf_conntrack_udp_timeout = 30" in out.stdout
    assert "ctguard never writes timeouts to /etc" in out.stdout


# --- the policy ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, problem", [
    ("[relief.timeouts]\nudp = 4\n", "[relief.timeouts] udp: 4 is below the floor of 5 s for nf_conntrack_udp_timeout"),
    ("[relief.timeouts]\ntcp_time_wait = 1\n", "[relief.timeouts] tcp_time_wait: 1 is below the floor of 2 s"),
    ("[relief.timeouts]\ntcp_established = 300\n", "below the floor of 600 s for nf_conntrack_tcp_timeout_established"),
    ("[relief.timeouts]\nicmp = 5\n", "[relief.timeouts] icmp: unknown timeout"),
    ("[relief.timeouts]\nudp = 7.5\n", "[relief.timeouts] udp: must be an integer number of seconds"),
    ('[relief]\nmode = "on"\n', '[relief] mode: must be one of "off", "advise", "enforce"'),
    ("[relief]\ncalm_for = -1\n", "[relief] calm_for: must be seconds between 0 and 86400"),
    ("[relief]\ntimeouts = 5\n", "[relief] timeouts: must be a table"),
    # [relief] enforce: only classes relief can shorten, as a list
    ('[relief]\nenforce = ["udp", "tcp_close"]\n', "[relief] enforce: unknown relief class 'tcp_close' (known: udp,"),
    ('[relief]\nenforce = ["icmp"]\n', "[relief] enforce: unknown relief class 'icmp'"),
    ('[relief]\nenforce = ["UDP"]\n', "[relief] enforce: unknown relief class 'UDP'"),
    ("[relief]\nenforce = [5]\n", "[relief] enforce: unknown relief class 5"),
    ('[relief]\nenforce = "udp"\n', "[relief] enforce: must be a list, not str 'udp'"),
])
def test_a_bad_relief_policy_is_refused_naming_file_and_key(text, problem):
    with pytest.raises(policy_mod.PolicyError) as exc:
        policy_mod.loads(text, "p.toml")
    assert any(p.startswith("p.toml: ") and problem in p for p in exc.value.problems), exc.value.problems


def test_relief_defaults_and_named_timeouts():
    p = policy_mod.loads("", "p.toml")
    assert p.relief.mode == "enforce" and p.relief.calm_for == 300
    assert p.relief.enforce == ("udp", "tcp_syn_sent", "tcp_syn_recv", "tcp_time_wait", "tcp_fin_wait",
                                "tcp_close_wait", "tcp_last_ack")
    assert dict(p.relief.timeouts) == {"udp": 5, "udp_stream": 30, "tcp_syn_sent": 10, "tcp_syn_recv": 10,
                                       "tcp_time_wait": 10, "tcp_close_wait": 15, "tcp_fin_wait": 15,
                                       "tcp_last_ack": 10, "tcp_unacknowledged": 30}
    named = policy_mod.loads("[relief.timeouts]\ntcp_established = 3600\nudp = 8\n", "p.toml")
    assert named.relief.emergency("tcp_established") == 3600 and named.relief.emergency("udp") == 8


# --- the packaged default (issue 23 item 6): enforce the unanswered, half-open and closing
# classes, only advise those that hold live flows --------------------------------------------

DEFAULT_TIMEOUTS = (("udp", 30), ("udp_stream", 120), ("tcp_syn_sent", 120), ("tcp_syn_recv", 60),
                    ("tcp_time_wait", 120), ("tcp_fin_wait", 120), ("tcp_close_wait", 60), ("tcp_last_ack", 30),
                    ("tcp_unacknowledged", 300), ("tcp_established", 432000))


@pytest.mark.parametrize("text, fills, written", [
    ("", "udp", True),                      # DNS answered at once / unanswered UDP
    ("", "tcp_syn_recv", True),             # a SYN flood
    ("", "tcp_syn_sent", True),
    ("", "tcp_time_wait", True),            # a flash crowd's closed connections
    ("", "tcp_fin_wait", True),
    ("", "tcp_close_wait", True),
    ("", "tcp_last_ack", True),
    ("", "udp_stream", False),              # VPN, QUIC: a live flow, advised only
    ("", "tcp_unacknowledged", False),      # every live connection under asymmetric routing
    ('[relief]\nenforce = ["udp_stream"]\n', "udp_stream", True),    # the operator asks for it
    ('[relief]\nenforce = ["udp_stream"]\n', "udp", False),          # ... and then only for it
    ('[relief]\nenforce = []\n', "tcp_time_wait", False),            # none: enforce advises all
    ('[relief]\nmode = "advise"\n', "tcp_time_wait", False),          # advise changes nothing
])
def test_the_default_policy_enforces_only_what_holds_no_live_flow(text, fills, written):
    d = decide(pol(text), sample(10, 8000, states=((fills, 950),), timeouts=DEFAULT_TIMEOUTS), hist(), at(10))
    shorten = [a for a in d.actions if isinstance(a, ShortenTimeout)]
    assert [(a.key, a.advise) for a in shorten] == [(fills, not written)]
    trims = [a for a in d.actions if isinstance(a, TrimEntries)]
    assert bool(trims) == (written and fills in relief.TRIMMABLE)


def test_established_is_never_shortened_by_default_even_when_it_fills():
    # No emergency value unless named in [relief.timeouts]; named, still only advised by default.
    states = (("tcp_established", 950),)
    d = decide(pol(""), sample(10, 8000, states=states, timeouts=DEFAULT_TIMEOUTS), hist(), at(10))
    assert not [a for a in d.actions if isinstance(a, ShortenTimeout)]
    d = decide(pol("[relief.timeouts]\ntcp_established = 600\n"),
               sample(10, 8000, states=states, timeouts=DEFAULT_TIMEOUTS), hist(), at(10))
    assert [(a.key, a.advise) for a in d.actions if isinstance(a, ShortenTimeout)] == [("tcp_established", True)]


def test_a_mixed_table_writes_the_closing_class_and_advises_the_stream():
    states = (("tcp_time_wait", 600), ("udp_stream", 350))
    d = decide(pol(""), sample(10, 8000, states=states, timeouts=DEFAULT_TIMEOUTS), hist(), at(10))
    got = {a.key: a.advise for a in d.actions if isinstance(a, ShortenTimeout)}
    assert got == {"tcp_time_wait": False, "udp_stream": True}
    trims = [a for a in d.actions if isinstance(a, TrimEntries)]
    assert [dict(t.timeouts).keys() for t in trims] == [{"tcp_time_wait": 0}.keys()]


def test_a_class_taken_out_of_enforce_is_restored():
    st = ReliefState(active=(Relieved(NS, "tenant", "tcp_time_wait", 120, 10, at(0)),))
    d = decide(pol('[relief]\nenforce = ["udp"]\n'), sample(1, 100, timeouts=DEFAULT_TIMEOUTS),
               hist(relief=st), at(1))
    assert [(a.key, a.reason) for a in d.actions if isinstance(a, RestoreTimeout)] == [
        ("tcp_time_wait", "tcp_time_wait is no longer in [relief] enforce")]


def test_the_effective_policy_prints_enforce_as_a_list_it_loads_back():
    p = policy_mod.loads('[relief]\nenforce = ["udp", "udp_stream"]\n', "p.toml")
    text = policy_mod.effective(p)
    assert 'enforce = ["udp", "udp_stream"]' in text
    assert policy_mod.loads(text, "again.toml").relief.enforce == ("udp", "udp_stream")


@pytest.mark.parametrize("restore", ["calm", "predicted"])
def test_leaving_a_mixed_namespace_restores_what_was_written_and_advises_the_rest(restore):
    # tcp_time_wait written (120 -> 10), udp_stream only advised; calm for longer than calm_for.
    st = ReliefState(active=(Relieved(NS, "tenant", "tcp_time_wait", 120, 10, at(0)),),
                     advised=((NS, "udp_stream"),), calm_since=((NS, at(0)),), levels=((NS, 1),))
    timeouts = (("tcp_time_wait", 10), ("udp_stream", 120))
    d = decide(pol(f'[relief]\ncalm_for = 30\nsteps = 1\nrestore = "{restore}"\n'),
               sample(31, 100, states=(("tcp_time_wait", 50), ("udp_stream", 50)), timeouts=timeouts),
               hist(relief=st), at(31))
    got = sorted((a.key, a.original, a.relieved, a.advise) for a in d.actions if isinstance(a, RestoreTimeout))
    assert got == [("tcp_time_wait", 120, 10, False), ("udp_stream", 120, 30, True)]
