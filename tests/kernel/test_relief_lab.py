"""Relief on real traffic (the lab, tests/helpers/lab.py): the right timeout, in its namespace
only, a long-lived UDP flow never cut, a flood that goes on entered once.

A NAT gateway namespace between a client and a server (the lab's topology), the gateway's
table at nf_conntrack_max = [bump] ceiling = 8,192 so every bump is refused and relief is the
lever left. Each scenario is one lab call: it holds the kernel lock, restores max, hashsize and
every conntrack timeout, deletes its namespaces and stops its servers, whatever happens.
"""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.kernel

try:
    from helpers import lab
except ImportError:     # the lab is written on another branch (issue 21)
    lab = None

TABLE = 8192
# DNS stubs, a new source port per query, answered at once: each entry is held by
# nf_conntrack_udp_timeout (30 s): 500 queries/s hold 15,000 entries (the table is full after
# ~16 s); relief goes at once to the level 500/s needs (8 s: ~4,000, 49%).
DNS_RATE, DNS_SECONDS = 500, 40


def _ready() -> str | None:
    import os

    if os.geteuid() != 0:
        return "needs root (network namespaces, nf_conntrack sysctls)"
    if lab is None:
        return "needs the traffic lab tests/helpers/lab.py (issue 21's branch); copy it there to run"
    return lab.lab_ready()


@pytest.fixture(autouse=True)
def _skip_unless_ready():
    why = _ready()
    if why:
        pytest.skip(why)


def _held(*outcomes) -> None:
    """ctguard cannot bump here (ceiling = table): a max that moved is another writer's (another
    session's daemon defending its own value, say), and the run says nothing about relief."""
    for o in outcomes:
        if o.kernel.peak_max != TABLE or o.kernel.start_max != TABLE:
            pytest.skip(f"nf_conntrack_max moved to {o.kernel.peak_max} during the run (not {TABLE}): another "
                        "writer on this host; the table never filled")


def _lines(outcome, word: str) -> list[str]:
    return [ln for ln in outcome.agent.relief if word in ln]


def _lost(outcome) -> int:
    gw = outcome.kernel.of("gateway")
    return gw.drop + gw.early_drop


def test_a_dns_storm_at_the_ceiling_is_served_as_the_ideal_and_only_udp_timeout_moves():
    # The ideal (nf_conntrack_max 1,048,576, no agent) and relief enforcing at the ceiling, the
    # same load in the same test: relief must serve >= 0.97x the ideal's answers (issue 23).
    ideal = lab.dns("ideal", rate=DNS_RATE, duration=DNS_SECONDS, table=TABLE, ceiling=TABLE, capture_wait=0)
    on = lab.dns("ctguard", rate=DNS_RATE, duration=DNS_SECONDS, table=TABLE, ceiling=TABLE,
                 overrides={"relief": {"mode": "enforce"}}, longlived=3, capture_wait=0)
    _held(on)
    ratio = on.users.completed / max(1, ideal.users.completed)
    print(f"\nDNS {DNS_RATE}/s at {TABLE}: ideal answered {ideal.users.completed} of {ideal.users.attempted}, relief "
          f"enforce {on.users.completed} of {on.users.attempted} ({ratio:.3f}x), lost {_lost(on)}; long-lived flow "
          f"{on.longlived}; relief {on.agent.relief}")
    lowered = _lines(on, "relief: lowered")
    assert lowered, on.agent.log_tail
    # The timeout that holds answered-once UDP, never the stream timeout ...
    assert all("nf_conntrack_udp_timeout " in ln for ln in lowered), lowered
    assert not [ln for ln in on.agent.relief if "udp_timeout_stream" in ln], on.agent.relief
    # ... in the gateway's namespace only (the only one that fills; the host's never moves).
    names = {m.group(1) for ln in lowered for m in [re.search(r" in netns (\S+?):", ln)] if m}
    assert len(names) == 1 and "host" not in names, names
    assert on.agent.timeouts_left_changed == (), "every timeout back after the daemon stopped"
    # Users served as by the ideal table.
    assert ratio >= 0.97, (ideal.users, on.users, on.agent.relief)
    # The long-lived UDP flow beside it (a stream: ASSURED, udp_timeout_stream) is never cut.
    assert on.longlived is not None and on.longlived.cuts == 0 and on.longlived.answered == on.longlived.sent, \
        on.longlived


def test_a_long_lived_udp_flow_is_never_cut_by_relief():
    # A packet every 5 s: the entry is an ASSURED stream; relief shortens what fills the table.
    on = lab.dns("ctguard", rate=DNS_RATE, duration=30, table=TABLE, ceiling=TABLE,
                 overrides={"relief": {"mode": "enforce", "calm_for": 8}}, longlived=5, capture_wait=0)
    _held(on)
    assert _lines(on, "relief: lowered"), on.agent.log_tail
    ll = on.longlived
    assert ll is not None and ll.cuts == 0 and ll.answered >= ll.sent - 1, ll


def test_a_sustained_syn_flood_enters_relief_once():
    # SYN_RECV entries (60 s) at 500/s fill 8,192 in ~16 s; at 10 s they hold ~5,000 (61%),
    # below the low watermark, but at the next level up (15 s) they would be back above it:
    # relief stays in instead of leaving after its calm and entering again.
    out = lab.syn_flood("ctguard", rate=500, duration=70, table=TABLE, ceiling=TABLE, web_rate=50,
                        overrides={"relief": {"mode": "enforce", "calm_for": 8}}, capture_wait=0)
    _held(out)
    print(f"\nSYN flood: relief lines {out.agent.relief}")
    entering = _lines(out, "entering relief")
    assert entering, out.agent.log_tail
    assert len({re.search(r"timeout_(\w+) ", ln).group(1) for ln in entering}) == len(entering), entering
    # No return to the originals while the flood goes on (the lab stops the daemon at the end:
    # that restore is the one at stop).
    assert not [ln for ln in _lines(out, "relief over") if "ctguard stopping" not in ln], out.agent.relief
    assert not _lines(out, "relief: raised"), out.agent.relief
    assert "nf_conntrack_tcp_timeout_syn_recv" in " ".join(entering), entering
