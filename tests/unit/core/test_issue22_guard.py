"""Issue 22: the guard judges with what it knows of the host. One row per case, naming its input.

A NAT gateway (forwards, NAT rules) with internal network 10.0.0.0/8 and its own addresses
10.0.0.1 / 203.0.113.2; a server 192.0.2.10 (end host) running a resolver on udp/53.
"""

from __future__ import annotations

import pytest

from ctguard.config import policy as policy_mod
from ctguard.core.decide import advance, decide, judge
from ctguard.core.model import (
    History, HostFacts, Instant, KernelLimits, NamespaceReading, Refuse, Sample, SetMax, TableShape,
)

NS = 4026531000
GW = HostFacts(local=("10.0.0.1", "203.0.113.2"), internal=("10.0.0.0/8",), forwarding=True, nat=True)
SERVER = HostFacts(local=("192.0.2.10",), internal=("192.0.2.0/24",), forwarding=False, nat=False)
INTERNAL = tuple(f"10.1.{i}.{j}" for i in range(2) for j in range(1, 5))
SPOOFED = tuple(f"198.18.{i}.{j}" for i in range(2) for j in range(1, 5))
# A CGNAT gateway whose clients (100.64.0.0/10) sit behind an access router reached by policy
# routing: not in its main routing table, named only by its masquerade rule.
CGN_CLIENTS = tuple(f"100.64.{i}.{j}" for i in range(2) for j in range(1, 5))
CGN = HostFacts(local=("10.0.0.1", "203.0.113.2"), internal=("10.0.0.0/30",), forwarding=True, nat=True,
                nat_sources=("100.64.0.0/10",))
CGN_NO_RULES = HostFacts(local=CGN.local, internal=CGN.internal, forwarding=True, nat=True)
# IPv6: a gateway with fd00:10::/64 inside (ULA) and fe80::/64 on its links; a server 2001:db8:5::1.
GW6 = HostFacts(local=("fd00:10::1", "2001:db8:1::2"), internal=("fd00:10::/64", "fe80::/64"), forwarding=True,
                nat=True)
SERVER6 = HostFacts(local=("2001:0db8:0005:0000:0000:0000:0000:0001",), internal=("2001:db8:5::/64",))
INTERNAL6 = tuple(f"fd00:10::{i:x}" for i in range(1, 7)) + ("fe80::1", "fe80::2")
SPOOFED6 = tuple(f"2001:db8:f00d:{i:x}::1" for i in range(1, 9))
POLICY = "[guard]\nceiling = 262144\nmin_sources = 256\n[bump]\nceiling = 4194304"


def at(t: float) -> Instant:
    return Instant(1_800_000_000 + t, 1000 + t, "b")


def smp(max_: int, count: int, shape: TableShape | None, drop: int = 50, invalid: int = 80, t: float = 10) -> Sample:
    return Sample(at(t), KernelLimits(max_, max_, 256, 16 << 30, 8 << 30, "6.1.0"),
                  (NamespaceReading(NS, "host", count, (("drop", drop), ("invalid", invalid))),), shape)


def shape(seen=5000, suspicious=4500, sources=300, answered=-1, dst="", dst_n=0, port="", port_n=0,
          top=INTERNAL, host=GW) -> TableShape:
    return TableShape(NS, seen, suspicious, sources, answered=answered, top_dst=dst, top_dst_count=dst_n,
                      top_port=port, top_port_count=port_n, top_sources=top, host=host)


ROWS = [
    # name, shape, history, attack?, note contains
    ("NAT gateway, internal clients retrying one dead upstream 198.51.100.7 (SYN_SENT): an outage, bumped",
     shape(dst="198.51.100.7", dst_n=4200), History(), False, "outage"),
    ("CGNAT, 55% unanswered UDP from internal clients to many destinations: bumped",
     shape(suspicious=2750, dst="8.8.8.8", dst_n=300), History(), False, "internal clients"),
    ("spoofed SYN flood at a local server from 300+ outside sources: guard",
     shape(dst="203.0.113.2", dst_n=4500, top=SPOOFED), History(), True, ""),
    ("spoofed flood, no host facts (the look could not read them): guard as before",
     shape(top=SPOOFED, host=None), History(), True, ""),
    ("one dominant unanswered destination that is this host's own address: not an outage (a flood at it)",
     shape(dst="203.0.113.2", dst_n=4500, top=SPOOFED), History(), True, ""),
    ("spoofed query flood the local resolver answers: one entry per source to udp/53 locally: guard",
     shape(suspicious=200, sources=4900, answered=4800, dst="192.0.2.10", dst_n=4900, port="udp/53", port_n=4900,
           top=SPOOFED, host=SERVER), History(), True, "query flood"),
    ("busy web server: answered, many entries per client to tcp/443: bumped",
     shape(suspicious=200, sources=400, answered=4800, dst="192.0.2.10", dst_n=4900, port="tcp/443", port_n=4900,
           top=SPOOFED, host=SERVER), History(), False, ""),
    ("answered traffic from internal clients through a gateway to one port: bumped",
     shape(suspicious=200, sources=4900, answered=4800, dst="8.8.8.8", dst_n=4900, port="udp/53", port_n=4900),
     History(), False, ""),
    ("CGNAT clients 100.64/10 named only by the masquerade rule, retrying a dead upstream: an outage, bumped",
     shape(dst="198.51.100.7", dst_n=4200, top=CGN_CLIENTS, host=CGN), History(), False, "outage"),
    ("the same clients without the NAT rule's prefix: outside sources, guard",
     shape(dst="198.51.100.7", dst_n=4200, top=CGN_CLIENTS, host=CGN_NO_RULES), History(), True, ""),
    ("IPv6 gateway, ULA and link-local clients retrying one dead upstream 2001:db8:dead::7: an outage, bumped",
     shape(dst="2001:db8:dead::7", dst_n=4200, top=INTERNAL6, host=GW6), History(), False, "outage"),
    ("IPv6 spoofed SYN flood at the gateway's own address from outside prefixes: guard",
     shape(dst="2001:db8:1::2", dst_n=4500, top=SPOOFED6, host=GW6), History(), True, ""),
    ("IPv6 spoofed query flood the local resolver answers (its address written long-hand): guard",
     shape(suspicious=200, sources=4900, answered=4800, dst="2001:db8:5::1", dst_n=4900, port="udp/53", port_n=4900,
           top=SPOOFED6, host=SERVER6), History(), True, "query flood"),
    ("invalid +80 in 0.1 s with 50 drops, no baseline yet: no judgement, bumped",
     None, History(drops=((NS, 0),), invalid=((NS, 0),), counters_at=1009.9), False, ""),
    ("invalid +80 in 0.1 s on a busy gateway whose calm rate is 700/s: its normal, bumped",
     None, History(drops=((NS, 0),), invalid=((NS, 0),), counters_at=1009.9, invalid_base=((NS, 700.0, 300.0),)),
     False, ""),
    ("invalid +80 in 0.1 s against a calm 20/s watched 300 s: 40x its baseline, guard",
     None, History(drops=((NS, 0),), invalid=((NS, 0),), counters_at=1009.9, invalid_base=((NS, 20.0, 300.0),)),
     True, ""),
]


@pytest.mark.parametrize("name, shp, hist, attack, note", ROWS, ids=[r[0] for r in ROWS])
def test_judge(name, shp, hist, attack, note):
    p = policy_mod.loads(POLICY, "t.toml")
    why, said = judge(p, smp(262144, 240000, shp), hist, NS)
    assert (why is not None) == attack, (name, why, said)
    assert note in (why or said), (name, why, said)


def test_an_outage_is_bumped_past_the_guard_ceiling_and_said_so():
    p = policy_mod.loads(POLICY, "t.toml")
    d = decide(p, smp(262144, 240000, shape(dst="198.51.100.7", dst_n=4200)), History(), at(10))
    bump = d.of(SetMax)[0]
    assert bump.new > 262144 and not bump.attack and "outage" in bump.reason


def test_a_query_flood_is_held_at_the_guard_ceiling():
    p = policy_mod.loads(POLICY, "t.toml")
    s = smp(262144, 240000, shape(suspicious=200, sources=4900, answered=4800, dst="192.0.2.10", dst_n=4900,
                                   port="udp/53", port_n=4900, top=SPOOFED, host=SERVER))
    d = decide(p, s, History(), at(10))
    assert d.of(Refuse)[0].kind == "guard" and "query flood" in d.of(Refuse)[0].reason


def test_the_invalid_baseline_is_learned_while_calm():
    p = policy_mod.loads(POLICY, "t.toml")
    h = History()
    for i in range(40):           # 40 s at 500 invalid/s, calm (10% fill, no drops)
        h = advance(h, smp(262144, 26000, None, drop=0, invalid=500 * i, t=i), (), (), at(i), p)
    (inode, rate, secs), = h.invalid_base
    assert inode == NS and rate == pytest.approx(500) and secs == pytest.approx(39)
    # A burst at the same rate with drops is not an attack; at 10x it is.
    same = smp(262144, 240000, None, drop=100, invalid=500 * 39 + 50, t=39.1)
    assert judge(p, same, h, NS)[0] is None
    hot = smp(262144, 240000, None, drop=100, invalid=500 * 39 + 500, t=39.1)
    assert judge(p, hot, h, NS)[0] is not None
