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
