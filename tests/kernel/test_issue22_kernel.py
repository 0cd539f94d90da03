"""Issue 22 on the real kernel: a spoofed SYN flood never sizes the next boot above the guard's
ceiling; a burst of 20,000 flows sent as fast as one sender can ends within 4x what arrived with
no kernel drop; the dead-upstream NAT scenario (the traffic lab) is bumped and not called an attack.

Every test holds the shared kernel lock, restores nf_conntrack_max and hashsize, and deletes its
namespaces (kernelenv), even on failure.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from helpers.daemon import Running
from helpers.kernelenv import get_max, needs_kernel, netns_pair, saved_kernel_values, set_max
from helpers.policy import write_policy
from helpers.wait import wait_for

from ctguard.boot.persist import read_persisted_max
from ctguard.core.sizing import kernel_default_max

pytestmark = [needs_kernel, pytest.mark.kernel]


def host_default() -> int:
    mem = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal:"))
    return kernel_default_max(mem, Path("/proc/sys/kernel/osrelease").read_text().strip())


def state(daemon: Running) -> dict:
    return json.loads(daemon.state.read_text()) if daemon.state.exists() else {}


def test_a_spoofed_syn_flood_persists_at_or_below_the_guard_ceiling(tmp_path: Path) -> None:
    # Issue 22: a spoofed SYN flood into 262,144 with [guard] ceiling 393,216 and persist.mode
    # "stable" stopped at the guard's ceiling, then persisted 663,552 for the next boot. Here: the
    # guard's ceiling at this host's kernel default (persisted sizes never go below that), a table
    # of half of it, and a flood that fills the guard's ceiling past act.
    guard = max(host_default(), 65536)
    start = guard // 2
    flows = int(guard * 0.95)
    policy = write_policy(tmp_path, f"[bump]\nceiling = {guard * 8}\ncooldown = 0.5\nmax_per_hour = 100\n"
                                    f"[guard]\nceiling = {guard}\nmin_sources = 500\n",
                          persist_mode="stable")
    text = policy.read_text().replace('mode = "stable"', 'mode = "stable"\nstable_for = 3')
    policy.write_text(text)
    sysctl_file = tmp_path / "etc/sysctl.d/90-ctguard.conf"
    with saved_kernel_values(), netns_pair() as pair:
        set_max(start)
        with Running(policy) as daemon:
            time.sleep(1.0)
            pair.flood_syn(flows, sources=4000)
            assert wait_for(lambda: get_max() >= guard, 20), daemon.output()
            assert wait_for(lambda: (state(daemon).get("incident") or state(daemon).get("last_incident") or {})
                            .get("attack"), 20), (state(daemon), daemon.output())
            assert wait_for(lambda: read_persisted_max(sysctl_file) is not None, 30), daemon.output()
            persisted = read_persisted_max(sysctl_file)
            final = get_max()
            st = state(daemon)
        inc = st.get("incident") or st.get("last_incident")
        print(f"SYN flood of {flows}: max {start} -> {final} (guard {guard}), persisted {persisted}, incident peak {inc['peak_count']}, sizing_peak {st['sizing_peak']}")
        assert final == guard, "no table handed to a spoofed flood past the guard's ceiling"
        assert persisted is not None and persisted <= guard, (persisted, guard, inc)
        assert st["sizing_peak"] < flows // 2 or st["sizing_peak"] == 0, st["sizing_peak"]
        assert inc["attack"] and inc["peak_count"] >= int(guard * 0.85), inc


def test_a_burst_of_20000_ends_within_4x_with_no_drops(tmp_path: Path) -> None:
    # Issue 22: 20,000 flows sent as fast as one sender can went to 104,448-138,240 (5-7x), 0 drops.
    policy = write_policy(tmp_path, "[bump]\nceiling = 1048576\n", persist_mode="never")
    with saved_kernel_values(), netns_pair() as pair:
        set_max(4096)
        with Running(policy) as daemon:
            time.sleep(1.0)
            drops_before = pair.drops()
            pair.flood_udp(20000)
            assert wait_for(lambda: get_max() > 4096, 10), daemon.output()
            time.sleep(2.0)
            final = get_max()
            drops = pair.drops() - drops_before
            held = pair.count()
        print(f"burst of 20000: max 4096 -> {final} ({final / 20000:.2f}x), {drops} drops, bumps {[(b['old'], b['new']) for b in daemon.bumps()]}")
        assert final <= 4 * 20000, (final, daemon.bumps(), daemon.output())
        assert drops == 0, f"{drops} packets dropped"
        assert held <= final


def test_dead_upstream_through_nat_is_bumped_not_called_an_attack() -> None:
    # The traffic lab is another engineer's (tests/helpers/lab.py, "What users behind the gateway
    # see"): copied in to run, never committed here.
    try:
        from helpers import lab
    except ImportError:
        pytest.skip("the traffic lab (tests/helpers/lab.py) is not in this tree")
    why = lab.lab_ready()
    if why:
        pytest.skip(why)
    # Internal clients retry one dead upstream through the NAT: 2,000 SYNs/s, SYN_SENT for 120 s,
    # past a guard ceiling of 16,384 (the look happens there).
    out = lab.dead_upstream("ctguard", rate=2000, duration=12, table=8192, ceiling=1_048_576,
                            overrides={"guard": {"ceiling": 16384, "min_sources": 100}}, web_rate=200)
    agent = out.agent
    print(f"dead upstream: bumps {agent.bumps}, refused {agent.count('refused')}, peak {out.kernel.peak_count}, "
          f"verdicts {[b[1][:120] for b in agent.bundles]}, "
          f"outage said in the log's tail: {[ln[:200] for ln in agent.log_tail.splitlines() if 'outage' in ln][:2]}")
    assert agent is not None
    # The daemon's own bump entries (the lab's max readings also see other writers on a shared machine).
    assert agent.count("bump") >= 1, (agent.events, agent.log_tail)
    assert max(agent.bumps, default=0) > 16384, (agent.bumps, agent.log_tail)
    assert agent.count("refused") == 0, agent.log_tail
    assert "attack-shaped" not in agent.log_tail, agent.log_tail
    assert not any("attack" in v for _, v, _ in agent.bundles), agent.bundles


def test_a_look_reads_the_namespaces_own_addresses_and_routes() -> None:
    # The host side of the guard's knowledge, on the real kernel, without a daemon: a look into
    # the receiver of a UDP flood from its neighbour on the same /30 sees the sender as internal
    # (a connected route), its own address as local, and the flood's one destination and port.
    from ctguard.config import policy as policy_mod
    from ctguard.core.decide import judge
    from ctguard.core.model import History, Instant, KernelLimits, NamespaceReading, Sample
    from ctguard.host.clock import Clock
    from ctguard.host.kernel import Kernel
    from ctguard.host.observe import Observer

    with saved_kernel_values(), netns_pair() as pair:
        set_max(65536)
        pair.flood_udp(3000)
        obs = Observer(Kernel(), Clock(), "all")
        obs.rediscover()
        # What the look reads is tested here, not its 50 ms bound: a shared CI machine can stall a
        # look that long, cutting it after a batch or two (seen 262 of 1,500 once).
        p = policy_mod.loads("[guard]\nmin_sources = 1\nsample_budget = 1\n", "t.toml")
        shape = obs.shape(pair.receiver_inode, p.guard)
        assert not shape.error, shape.error
        assert shape.host is not None and pair.receiver_addr in shape.host.local, shape.host
        assert shape.top_sources == (pair.sender_addr,) and shape.host.is_internal(pair.sender_addr), shape
        assert shape.top_dst == pair.receiver_addr and shape.top_port.startswith("udp/"), shape
        s = Sample(Instant(0, 0), KernelLimits(65536, 65536, 256, 1 << 34, 1 << 33),
                   (NamespaceReading(pair.receiver_inode, pair.receiver, shape.seen, ()),), shape)
        attack, note = judge(p, s, History(), pair.receiver_inode)
        assert attack is None and "internal clients" in note, (attack, note)


# Internal IPv6 clients each open `n` TCP connections to one dead upstream: one SYN per flow
# (a non-blocking connect, the socket closed at once: no retransmission, no RST), from
# addresses argv[3:] in turn.
_V6_SYNS = r"""
import socket, sys
dst, n, srcs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
for i in range(n):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setblocking(False)
    s.bind((srcs[i % len(srcs)], 0))
    s.connect_ex((dst, 443))
    s.close()
"""


def test_ipv6_dead_upstream_through_a_gateway_whose_clients_only_its_nat_rule_names() -> None:
    # Issue 22 (IPv6, and the NAT rules as host knowledge), on the real kernel without a daemon:
    # a gateway namespace forwards for clients in fd00:77::/64, which it has no route or address
    # for (in a real network they sit behind an access router reached by policy routing), named
    # only by its `ip6 saddr fd00:77::/64 masquerade` rule. The clients retry one dead upstream
    # 2001:db8:dead::7 (routed to a neighbour that never answers). A look into the gateway's
    # table must read the IPv6 entries, see the clients as internal through the NAT rule, and
    # the guard must call it an outage, not an attack; without the rule's prefix, an attack.
    from dataclasses import replace

    from ctguard.config import policy as policy_mod
    from ctguard.core.decide import judge
    from ctguard.core.model import History, Instant, KernelLimits, NamespaceReading, Sample
    from ctguard.host.clock import Clock
    from ctguard.host.kernel import Kernel
    from ctguard.host.observe import Observer

    with saved_kernel_values(), netns_pair("ctg6") as pair:
        set_max(65536)
        client, gw = pair.sender, pair.receiver
        dev_c = pair.exec(client, "ip", "-o", "link", "show", "type", "veth").stdout.split(":")[1].strip().split("@")[0]
        dev_g = pair.exec(gw, "ip", "-o", "link", "show", "type", "veth").stdout.split(":")[1].strip().split("@")[0]
        clients = [f"fd00:77::{i:x}" for i in range(16, 24)]
        for a in clients:
            pair.exec(client, "ip", "-6", "addr", "add", f"{a}/128", "dev", dev_c, "nodad")
        pair.exec(client, "ip", "-6", "addr", "add", "fd00:10::2/64", "dev", dev_c, "nodad")
        pair.exec(client, "ip", "-6", "route", "add", "default", "via", "fd00:10::1", "dev", dev_c)
        pair.exec(gw, "ip", "-6", "addr", "add", "fd00:10::1/64", "dev", dev_g, "nodad")
        pair.exec(gw, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        # The dead upstream: a route back out of the same link to a neighbour whose address no one
        # answers (a static neighbour entry, so nothing waits for neighbour discovery).
        pair.exec(gw, "ip", "-6", "neigh", "add", "fd00:10::99", "lladdr", "02:00:00:00:00:99", "dev", dev_g)
        pair.exec(gw, "ip", "-6", "route", "add", "2001:db8:dead::/48", "via", "fd00:10::99", "dev", dev_g)
        nat = ("table ip6 ctg6nat {\n chain post { type nat hook postrouting priority 100;\n"
               "  ip6 saddr fd00:77::/64 masquerade\n }\n}\n")
        import subprocess
        import sys
        subprocess.run(["ip", "netns", "exec", gw, "nft", "-f", "-"], input=nat, text=True, check=True, capture_output=True)
        pair.exec(client, sys.executable, "-c", _V6_SYNS, "2001:db8:dead::7", "1500", *clients)

        obs = Observer(Kernel(), Clock(), "all")
        obs.rediscover()
        # What the look reads is tested here, not its 50 ms bound: a shared CI machine can stall a
        # look that long, cutting it after a batch or two (seen 262 of 1,500 once).
        p = policy_mod.loads("[guard]\nmin_sources = 4\nsample_budget = 1\n", "t.toml")
        shape = obs.shape(pair.receiver_inode, p.guard)
        assert not shape.error, shape.error
        host = shape.host
        print(f"IPv6 dead upstream: {shape.seen} entries, {shape.suspicious} unanswered, top {shape.top_dst} "
              f"x{shape.top_dst_count}, sources {shape.top_sources}, host {host}")
        assert host is not None and host.nat and "fd00:77::/64" in host.nat_sources, host
        assert host.is_local("fd00:10::1") and "fd00:10::/64" in host.internal, host
        assert shape.top_dst == "2001:db8:dead::7" and shape.top_dst_count >= 1000, shape
        assert set(shape.top_sources) <= set(clients) and shape.top_sources, shape
        s = Sample(Instant(0, 0), KernelLimits(65536, 65536, 256, 1 << 34, 1 << 33),
                   (NamespaceReading(pair.receiver_inode, gw, shape.seen, ()),), shape)
        attack, note = judge(p, s, History(), pair.receiver_inode)
        assert attack is None and "outage" in note and "NAT gateway" in note, (attack, note)
        # The same look without what the NAT rule says: clients from nowhere it knows.
        blind = replace(shape, host=replace(host, nat_sources=()))
        attack, _ = judge(p, replace(s, shape=blind), History(), pair.receiver_inode)
        assert attack is not None, "without the NAT rule's prefix the clients are outside sources"


def test_steady_churn_right_after_the_start_is_not_growth_and_a_flood_then_is(tmp_path: Path) -> None:
    # Issue 22: a table with steady churn, the daemon just started (no GC window of its own yet):
    # between the kernel's GC passes the count climbs at the arrival rate, which read as growth
    # and was bumped in the first minute. Scaled to this shared machine: 1,000 new UDP flows/s
    # with a 10 s timeout (the receiver's own sysctl) into a table of 262,144, with [thresholds]
    # horizon = 300 so that any climb of the churn reads "full within the horizon" unless it is
    # recognised as churn (the row's 60% table at 12k/s, in small). The kernel's GC is global and
    # lazy here (kernel 6.18, other tests' long-lived entries in the table): a new namespace's
    # first pass came 16 to 45+ s after its first flow, so the daemon starts once one was seen,
    # and must not bump during its first climb, up to the next pass.
    # Then, still in its first minute, a flood of 30,000 new flows/s (150,000 in 5 s: full within
    # the horizon): bumped while the table is below warn, with no kernel drop. (A burst of 20,000
    # into this table is not bumped, before or after: it stops with the table at 15%.)
    import subprocess
    import sys

    from helpers.kernelenv import FLOOD_SCRIPT

    policy = write_policy(tmp_path, "[thresholds]\nhorizon = 300\n[bump]\nceiling = 4194304\n", persist_mode="never")
    with saved_kernel_values(), netns_pair("ctgch") as pair:
        set_max(262144)
        pair.exec(pair.receiver, "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout=10")
        churn = subprocess.Popen(["ip", "netns", "exec", pair.sender, sys.executable, "-c", FLOOD_SCRIPT,
                                  pair.receiver_addr, str(1000 * 180), "1000", "1"], stdout=subprocess.DEVNULL)
        try:
            high = [0]

            def gc_pass() -> bool:
                c = pair.count()
                high[0] = max(high[0], c)
                return c < high[0] * 0.8
            if not wait_for(gc_pass, 90, interval=0.2):
                pytest.skip(f"the kernel made no GC pass in 90 s (count up to {high[0]}): no steady churn to start in")
            counts = []
            with Running(policy) as daemon:
                # The daemon's first climb: from its start to the kernel's next GC pass. (After a
                # pass the high-water rule has the churn's peak to measure against, as after the
                # first minute; a later pass that comes later than the last can still let the count
                # climb past that peak, which horizon = 300 reads as growth and the default 10 s not.)
                t0 = time.monotonic()
                high[0] = 0
                while time.monotonic() - t0 < 40:
                    counts.append(pair.count())
                    if len(counts) > 8 and gc_pass():
                        break
                    time.sleep(0.25)
                climb = time.monotonic() - t0
                churn_bumps = daemon.bumps()
                churn_max = get_max()
                drops_before = pair.drops()
                t1 = time.monotonic()
                flood = subprocess.Popen(["ip", "netns", "exec", pair.sender, sys.executable, "-c", FLOOD_SCRIPT,
                                          pair.receiver_addr, "150000", "30000", "30000"], stdout=subprocess.DEVNULL)
                bumped = wait_for(lambda: get_max() > 262144, 10)
                took = time.monotonic() - t1
                at_bump = pair.count()
                flood.wait(30)
                time.sleep(1.0)
                drops = pair.drops() - drops_before
                final = get_max()
                out = daemon.output()
        finally:
            churn.kill()
            churn.wait()
        print(f"churn 1000/s, 10 s: counts {min(counts)}..{max(counts)} of 262144 over the {climb:.1f} s from the "
              f"start to the next GC pass, "
              f"bumps then {[(b['old'], b['new']) for b in churn_bumps]}; flood of 30,000/s: max -> {final} "
              f"within {took:.1f} s of its start (count then {at_bump}), {drops} drops")
        assert max(counts) > 6000 and max(counts) < 0.7 * 262144, counts   # churn, below warn
        assert not churn_bumps and churn_max == 262144, [ln[:400] for ln in out.splitlines() if "raised" in ln][:3]
        # Bumped while the table is still below warn: the flood first climbs past the churn's peak
        # (the high-water rule), then a 1 s idle sample and a fresh one 20 ms later size it.
        assert bumped and at_bump < 0.7 * 262144, (took, at_bump, out)
        assert drops == 0, f"{drops} packets dropped"
