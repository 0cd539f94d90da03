"""Issue 22: a namespace's own addresses and internal prefixes, from /proc/net/route and fib_trie."""

from ctguard.host.hostrole import parse_local, parse_routes

ROUTE = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
lan0\t0000000A\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0
"""

FIB = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.0.0.0/8 2 0 2
        |-- 10.0.0.1
           /32 host LOCAL
     |-- 127.0.0.1
        /32 host LOCAL
     |-- 192.0.2.2
        /32 host LOCAL
        /24 link UNICAST
"""


def test_routes_without_the_default_are_the_internal_side():
    assert parse_routes(ROUTE) == ("192.0.2.0/24", "10.0.0.0/8")


def test_local_addresses_leave_out_loopback():
    assert parse_local(FIB) == ("10.0.0.1", "192.0.2.2")


# -- the internal side the source-NAT rules name (nft JSON as `nft -j list ruleset` 1.0.6 writes it) --

import json  # noqa: E402

import pytest  # noqa: E402

from ctguard.host.hostrole import nat_sources, parse_local6, parse_routes6  # noqa: E402
from ctguard.host.nat import iptables_nat_sources, nft_nat_sources  # noqa: E402


def nft_rule(*expr: dict, family: str = "ip") -> str:
    return json.dumps({"nftables": [{"metainfo": {"json_schema_version": 1}},
                                    {"rule": {"family": family, "table": "nat", "chain": "post", "handle": 3,
                                              "expr": list(expr)}}]})


def saddr(right, op: str = "==", proto: str = "ip") -> dict:
    return {"match": {"op": op, "left": {"payload": {"protocol": proto, "field": "saddr"}}, "right": right}}


IIF = {"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": "lan0"}}
MASQ = {"masquerade": None}

NFT_ROWS = [
    ("ip saddr 10.20.0.0/16 masquerade", nft_rule(saddr({"prefix": {"addr": "10.20.0.0", "len": 16}}), MASQ),
     ("10.20.0.0/16",), 1),
    ("ip saddr { 10.30.0.0/24, 10.31.0.5 } snat to 192.0.2.1",
     nft_rule(saddr({"set": [{"prefix": {"addr": "10.30.0.0", "len": 24}}, "10.31.0.5"]}), {"snat": {"addr": "192.0.2.1"}}),
     ("10.30.0.0/24", "10.31.0.5/32"), 1),
    ("ip saddr 10.40.0.0-10.40.0.255 masquerade (a range)",
     nft_rule(saddr({"range": ["10.40.0.0", "10.40.0.255"]}), MASQ), ("10.40.0.0/24",), 1),
    ("ip saddr != 10.50.0.0/16 masquerade: a negation names no inside",
     nft_rule(saddr({"prefix": {"addr": "10.50.0.0", "len": 16}}, op="!="), MASQ), (), 1),
    ("ip6 saddr fd00:1::/64 masquerade (table ip6 or inet)",
     nft_rule(saddr({"prefix": {"addr": "fd00:1::", "len": 64}}, proto="ip6"), MASQ, family="ip6"), ("fd00:1::/64",), 1),
    ("iifname lan0 masquerade: an interface, no prefix", nft_rule(IIF, MASQ), (), 1),
    ("ip saddr 10.60.0.0/24 dnat to 10.0.0.2: destination NAT names no inside",
     nft_rule(saddr({"prefix": {"addr": "10.60.0.0", "len": 24}}), {"dnat": {"addr": "10.0.0.2"}}), (), 0),
    ("ip saddr @lan masquerade: a named set is not read", nft_rule(saddr("@lan"), MASQ), (), 1),
    ("not JSON", "nft: command not found", (), 0),
]


@pytest.mark.parametrize("name, ruleset, prefixes, rules", NFT_ROWS, ids=[r[0] for r in NFT_ROWS])
def test_nft_source_nat_prefixes(name, ruleset, prefixes, rules):
    got = nft_nat_sources(ruleset)
    assert (got.prefixes, got.rules) == (prefixes, rules), name


def test_nft_iifname_is_kept_for_the_reader():
    assert nft_nat_sources(nft_rule(IIF, MASQ)).interfaces == ("lan0",)


IPT_ROWS = [
    ("-s 10.20.0.0/16 -o wan0 -j MASQUERADE", "-A POSTROUTING -s 10.20.0.0/16 -o wan0 -j MASQUERADE", ("10.20.0.0/16",)),
    ("-s a,b -j SNAT --to-source 192.0.2.1", "-A POSTROUTING -s 10.30.0.0/24,10.31.0.5/32 -j SNAT --to-source 192.0.2.1",
     ("10.30.0.0/24", "10.31.0.5/32")),
    ("! -s 10.50.0.0/16 -j MASQUERADE: a negation", "-A POSTROUTING ! -s 10.50.0.0/16 -j MASQUERADE", ()),
    ("-s 10.60.0.0/24 -j DNAT: not source NAT", "-A PREROUTING -s 10.60.0.0/24 -j DNAT --to-destination 10.0.0.2", ()),
    ("ip6tables: -s fd00:1::/64 -j MASQUERADE", "-A POSTROUTING -s fd00:1::/64 -j MASQUERADE", ("fd00:1::/64",)),
]


@pytest.mark.parametrize("name, line, prefixes", IPT_ROWS, ids=[r[0] for r in IPT_ROWS])
def test_iptables_source_nat_prefixes(name, line, prefixes):
    assert iptables_nat_sources(f"*filter\n-A FORWARD -s 10.99.0.0/16 -j ACCEPT\nCOMMIT\n*nat\n{line}\nCOMMIT\n").prefixes == prefixes


def test_nft_is_read_first_iptables_when_nft_could_not_be():
    rule = nft_rule(saddr({"prefix": {"addr": "10.20.0.0", "len": 16}}), MASQ)
    ipt = "*nat\n-A POSTROUTING -s 10.9.0.0/16 -j MASQUERADE\nCOMMIT\n"
    assert nat_sources(rule, ipt).prefixes == ("10.20.0.0/16",)
    assert nat_sources(None, ipt).prefixes == ("10.9.0.0/16",)
    assert nat_sources(None, None).rules == 0


# -- IPv6: /proc/net/ipv6_route and /proc/net/if_inet6 as kernel 6.18 writes them (a namespace with
# fd00:10::1/64 and 2001:db8:5::1/64 on c6a, fd00:99::/48 via fd00:10::2, a default route; forwarding
# on adds the subnet-router anycast fd00:10::/128, flags 0x00300001) --

ROUTE6 = """\
20010db8000500000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001      c6a
fd000010000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000002 00000000 00000001      c6a
fd000099000000000000000000000000 30 00000000000000000000000000000000 00 fd000010000000000000000000000002 00000400 00000001 00000000 00000003      c6a
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000002 00000000 00000001      c6a
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd0000100000000000000000000000fe 00000400 00000001 00000000 00000003      c6a
00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000003 00000000 80200001       lo
20010db8000500000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001      c6a
fd000010000000000000000000000000 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000003 00000000 00300001      c6a
ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000002 00000000 00000001      c6a
fd000077000000000000000000000000 30 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00200200       lo
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
"""

IF_INET6 = """\
fd000010000000000000000000000001 02 40 00 82      c6a
20010db8000500000000000000000001 02 40 00 82      c6a
00000000000000000000000000000001 01 80 10 80       lo
fe80000000000000d450f6fffedaf840 02 40 20 c0      c6a
"""


def test_ipv6_routes_without_default_local_reject_or_multicast():
    assert parse_routes6(ROUTE6) == ("2001:db8:5::/64", "fd00:10::/64", "fd00:99::/48", "fe80::/64")


def test_ipv6_local_addresses_leave_out_loopback():
    assert parse_local6(IF_INET6) == ("fd00:10::1", "2001:db8:5::1", "fe80::d450:f6ff:feda:f840")
