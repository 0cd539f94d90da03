"""What this host is (server, NAT gateway, Kubernetes node, container host) and which
conntrack timeouts were raised above the kernel's defaults.

Both change what a full table means: a NAT gateway's table holds everyone's flows, a node's
holds its pods', and a "be safe" timeout raise keeps dead entries for days. Read from /proc,
/sys and the NAT rules; every source may be missing, and the answer says what it saw.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ctguard.core.timeouts import DEFAULT_TIMEOUTS, HOLDS
from ctguard.host import procs
from ctguard.host.ctnetlink import dump_table
from ctguard.host.nat import nft_nat_rules
from ctguard.host.netns import NamespaceRef, resolve

KUBE_PROCESSES = {"kube-proxy", "kubelet", "k3s", "k3s-server", "k3s-agent", "rke2", "cilium-agent", "calico-node",
                  "flanneld", "kube-router"}
CONTAINER_PROCESSES = {"dockerd", "containerd", "podman", "conmon", "crio", "lxc-start", "systemd-nspawn", "incusd",
                       "lxd"}


@dataclass(frozen=True)
class HostRole:
    role: str                                   # the one-line answer
    roles: tuple[str, ...]                      # everything that applies
    evidence: tuple[str, ...]                   # what was seen, for the reader to check
    unknown: tuple[str, ...] = field(default=())  # sources that could not be read

    def as_dict(self) -> dict:
        """The one dict form, in bundles and in `status --json` alike (bundles have called the
        evidence "seen" since the first release, and reviews of old bundles read that key)."""
        return {"role": self.role, "roles": list(self.roles), "seen": list(self.evidence), "unknown": list(self.unknown)}


@dataclass(frozen=True)
class RaisedTimeout:
    name: str
    value: int
    default: int
    entries: int | None                         # entries in the states it keeps, when a breakdown is known

    def as_dict(self) -> dict:
        # No "entries" key when unknown: bundles are TOML, which has no null.
        return {"name": self.name, "value": self.value, "default": self.default,
                **({"entries": self.entries} if self.entries is not None else {})}

    def line(self) -> str:
        held = f", holding about {self.entries} entries" if self.entries is not None else ""
        return f"{self.name} = {self.value} s (kernel default {self.default} s, x{self.value / self.default:.0f}){held}"


def _processes(proc: Path) -> set[str]:
    try:
        return {c for c in (procs.comm(proc, pid) for pid in procs.pids(proc)) if c is not None}
    except OSError:
        return set()


def _bridges(sys_root: Path) -> list[str]:
    try:
        return sorted(d for d in os.listdir(sys_root / "class/net") if (sys_root / "class/net" / d / "bridge").exists())
    except OSError:
        return []


def nat_rule_counts(ruleset_json: str) -> dict[str, int]:
    """NAT statements in `nft -j list ruleset` output: masquerade, snat and dnat always (0 when
    none), redirect when there is one (ctguard.host.nat counts them)."""
    return {"masquerade": 0, "snat": 0, "dnat": 0, **nft_nat_rules(ruleset_json.encode())}


def _nft_ruleset(timeout: float = 5.0) -> str | None:
    return _run(["nft", "-j", "list", "ruleset"], timeout)


def detect(proc_root: str | Path = "/proc", sys_root: str | Path = "/sys", etc_root: str | Path = "/etc",
           nft_ruleset: str | None = "", processes: set[str] | None = None) -> HostRole:
    """Classify the host. `nft_ruleset=""` runs `nft -j list ruleset`; None means none available."""
    proc, sysr, etc = Path(proc_root), Path(sys_root), Path(etc_root)
    seen: list[str] = []
    unknown: list[str] = []
    roles: list[str] = []

    names = processes if processes is not None else _processes(proc)
    kube = sorted(names & KUBE_PROCESSES)
    cni = etc / "cni/net.d"
    cni_configs = sorted(os.listdir(cni)) if cni.is_dir() else []
    if kube or cni_configs:
        roles.append("Kubernetes node")
        seen += [f"process {k}" for k in kube] + [f"CNI config {c}" for c in cni_configs[:3]]

    engines = sorted(names & CONTAINER_PROCESSES)
    bridges = _bridges(sysr)
    if engines or any(b.startswith(("docker", "cni", "virbr", "lxcbr", "lxdbr", "podman", "br-")) for b in bridges):
        roles.append("container host")
        seen += [f"process {e}" for e in engines] + [f"bridge {b}" for b in bridges]

    ruleset = _nft_ruleset() if nft_ruleset == "" else nft_ruleset
    if ruleset is None:
        unknown.append("NAT rules (nft not available)")
        nat = {"masquerade": 0, "snat": 0, "dnat": 0}
    else:
        nat = nat_rule_counts(ruleset)
    try:
        forwarding = (proc / "sys/net/ipv4/ip_forward").read_text().strip() == "1"
    except OSError:
        forwarding = False
        unknown.append("ip_forward")
    if nat["masquerade"] or nat["snat"]:
        roles.append("NAT gateway")
        seen.append(f"{nat['masquerade']} masquerade and {nat['snat']} snat rules")
    elif forwarding and "Kubernetes node" not in roles and "container host" not in roles:
        roles.append("router")
    for kind in ("dnat", "redirect"):
        if nat.get(kind):
            seen.append(f"{nat[kind]} {kind} rules")
    if forwarding:
        seen.append("IPv4 forwarding on")

    if not roles:
        roles.append("server")
        seen.append("no NAT, no forwarding, no container engine or Kubernetes seen")
    # The most specific role first: a node is also a container host and usually NATs.
    order = ["Kubernetes node", "NAT gateway", "container host", "router", "server"]
    roles.sort(key=order.index)
    return HostRole(roles[0], tuple(roles), tuple(seen), tuple(unknown))


def raised_timeouts(proc_root: str | Path = "/proc", by_proto: dict[str, int] | None = None,
                    by_tcp_state: dict[str, int] | None = None) -> list[RaisedTimeout]:
    """Timeouts set above the kernel's defaults, with the entries they likely hold when a
    table breakdown (entries by protocol and by TCP state) is given."""
    nf = Path(proc_root) / "sys/net/netfilter"
    out = []
    for name, default in DEFAULT_TIMEOUTS.items():
        try:
            value = int((nf / name).read_text())
        except (OSError, ValueError):
            continue
        if value <= default:
            continue
        entries = None
        proto, state = HOLDS.get(name, (None, None))
        if state is not None and by_tcp_state is not None:
            entries = by_tcp_state.get(state, 0)
        elif proto is not None and state is None and by_proto is not None:
            entries = by_proto.get(proto, 0)
        out.append(RaisedTimeout(name, value, default, entries))
    return out


def role_and_timeouts(netns: NamespaceRef | str | None) -> tuple[HostRole, list[RaisedTimeout]]:
    """The host's role, and the raised timeouts with the entries they hold in `netns` (a
    namespace the caller's sample found, or a name/inode/PID to resolve; None: no table look).

    The table look is a dump bounded to a fifth of a second, taken only when some timeout was
    raised; the command line takes it, never the daemon, whose loop it must not hold up."""
    role = detect()
    timeouts = raised_timeouts()
    if timeouts and netns is not None:
        try:
            ref = resolve(netns) if isinstance(netns, str) else netns
            t = dump_table(None if ref.name == "host" else ref.path, budget=0.2, top=1)
            timeouts = raised_timeouts(by_proto=t.by_proto, by_tcp_state=t.by_tcp_state)
        except (OSError, ValueError):
            pass
    return role, timeouts


# -- what a namespace's own network says about an address (issue 22: the guard's host knowledge) --

def parse_routes(text: str) -> tuple[str, ...]:
    """IPv4 prefixes of /proc/net/route reached without the default route (connected networks
    and specific routes): the namespace's internal side. Addresses are little-endian hex."""
    import ipaddress
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 8:
            continue
        try:
            dst, mask = int(f[1], 16), int(f[7], 16)
        except ValueError:
            continue
        if mask == 0:
            continue        # the default route: the outside
        net = ipaddress.IPv4Network((int.from_bytes(dst.to_bytes(4, "little"), "big"),
                                     bin(mask).count("1")), strict=False)
        if not net.is_loopback:
            out.append(str(net))
    return tuple(dict.fromkeys(out))


def parse_local(fib_trie: str) -> tuple[str, ...]:
    """The namespace's own IPv4 addresses: /32 host LOCAL leaves of /proc/net/fib_trie."""
    out = []
    last = None
    for line in fib_trie.splitlines():
        s = line.strip()
        if s.startswith("|--"):
            last = s[3:].strip()
        elif s.startswith("/32 host LOCAL") and last and not last.startswith("127."):
            out.append(last)
    return tuple(dict.fromkeys(out))


RTF_REJECT = 0x0200           # include/uapi/linux/route.h: an unreachable/prohibit route, not a network
RTF_LOCAL = 0x80000000        # include/uapi/linux/ipv6_route.h: the namespace's own address (local table)
RTF_ANYCAST = 0x00100000      # ... and a subnet-router anycast address of its own (fd00:10::/128): not a network


def parse_routes6(text: str) -> tuple[str, ...]:
    """IPv6 prefixes of /proc/net/ipv6_route reached without the default route: connected
    networks (global, ULA, fe80::/64) and specific routes. Each line is `dest plen src src_plen
    nexthop metric refcnt use flags iface`, addresses as 32 hex digits, plen and flags hex. Left
    out: the default (plen 0), unreachable routes (RTF_REJECT), the namespace's own /128s
    (RTF_LOCAL, RTF_ANYCAST: local, not a network), multicast and loopback."""
    import ipaddress
    out = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 10:
            continue
        try:
            addr = ipaddress.IPv6Address(bytes.fromhex(f[0]))
            plen, flags = int(f[1], 16), int(f[8], 16)
        except ValueError:
            continue
        if plen == 0 or flags & (RTF_REJECT | RTF_LOCAL | RTF_ANYCAST) or addr.is_multicast or addr.is_loopback:
            continue
        out.append(str(ipaddress.IPv6Network((addr, plen), strict=False)))
    return tuple(dict.fromkeys(out))


def parse_local6(if_inet6: str) -> tuple[str, ...]:
    """The namespace's own IPv6 addresses (link-local included, loopback left out) from
    /proc/net/if_inet6: `address ifindex plen scope flags name`, the address as 32 hex digits."""
    import ipaddress
    out = []
    for line in if_inet6.splitlines():
        f = line.split()
        if len(f) < 6:
            continue
        try:
            addr = ipaddress.IPv6Address(bytes.fromhex(f[0]))
        except ValueError:
            continue
        if not addr.is_loopback:
            out.append(str(addr))
    return tuple(dict.fromkeys(out))


def nat_sources(ruleset: str | None, iptables: str | None = None):
    """NatSources of a namespace: its nft ruleset (JSON) when read, else `iptables-save` text."""
    from ctguard.host.nat import NatSources, iptables_nat_sources, nft_nat_sources
    if ruleset:
        return nft_nat_sources(ruleset)
    if iptables:
        return iptables_nat_sources(iptables)
    return NatSources()


def _run(argv: list[str], timeout: float = 1.0) -> str | None:
    """A program's output, or None (missing, failed, or slower than `timeout`: a guard look must
    stay short, and a huge kube-proxy ruleset can take seconds to list)."""
    exe = shutil.which(argv[0])
    if exe is None:
        return None
    try:
        res = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout if res.returncode == 0 else None


def facts(netns_path: str | None):
    """HostFacts of the namespace at `netns_path` (None: ctguard's own), read from inside it in a
    short thread (IPv4 and IPv6 routes and local addresses, forwarding, the source-NAT rules;
    /proc/thread-self/net is the thread's namespace, and programs it starts run there). A source
    that cannot be read leaves its part empty."""
    from ctguard.core.model import HostFacts
    from ctguard.host.netns import run_in_netns

    def read() -> HostFacts:
        def text(path: str) -> str:
            try:
                with open(path) as fh:
                    return fh.read()
            except OSError:
                return ""
        net = "/proc/thread-self/net/"
        forwarding = (text("/proc/sys/net/ipv4/ip_forward").strip() == "1"
                      or text("/proc/sys/net/ipv6/conf/all/forwarding").strip() == "1")
        ruleset = _nft_ruleset(timeout=1.0)
        nat = nat_sources(ruleset, None if ruleset is not None else _run(["iptables-save", "-t", "nat"]))
        return HostFacts(local=parse_local(text(net + "fib_trie")) + parse_local6(text(net + "if_inet6")),
                         internal=parse_routes(text(net + "route")) + parse_routes6(text(net + "ipv6_route")),
                         forwarding=forwarding, nat=nat.rules > 0, nat_sources=nat.prefixes)

    return run_in_netns(netns_path, read)
