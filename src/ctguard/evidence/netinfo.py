"""The namespace's network, for the evidence bundle: interfaces, addresses, routes, whether it
forwards, and which interface each top source arrives on. Read over rtnetlink with pyroute2.

Runs in the capture child only, in a thread that has joined the inspected namespace (the
netlink socket belongs to the namespace of the thread that opens it). pyroute2 is imported
inside `network()`, never at module import: its import costs about 15-25 MB of RSS (measured:
Debian 12's python3-pyroute2 0.7.2 takes a Python 3.11 process from 8 to 33 MB, pyroute2 0.9.7
from 19 to 34 MB, with `VmRSS` read before and after `from pyroute2 import IPRoute` and a dump
of links, addresses and routes), which the daemon, resident on every gateway, does not carry.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# rtnetlink constants (linux/rtnetlink.h, linux/if_arp.h): stable kernel ABI.
_AF_NAMES = {2: "ipv4", 10: "ipv6"}
_MAIN_TABLE = 254
_LOCAL_TABLE = 255
ROUTES_LISTED = 200          # a full BGP table has ~a million routes: keep the bundle small
SOURCES_LOOKED_UP = 20       # route lookups for the top sources (one netlink round trip each)


def _forwarding(proc_root: Path) -> dict[str, bool | None]:
    out: dict[str, bool | None] = {}
    for family, rel in (("ipv4", "sys/net/ipv4/ip_forward"), ("ipv6", "sys/net/ipv6/conf/all/forwarding")):
        try:
            out[family] = (proc_root / rel).read_text().strip() not in ("", "0")
        except OSError:
            out[family] = None    # IPv6 disabled, or /proc/sys not readable
    return out


def _verdict(forwarding: dict[str, bool | None], interfaces: int) -> str:
    on = [f for f, v in forwarding.items() if v]
    if on:
        return (f"this namespace forwards ({' and '.join(on)}): a router or NAT gateway, whose table "
                f"holds the flows of everything routed through it")
    if interfaces <= 1:
        return "this namespace does not forward and has no interface but loopback"
    return "this namespace does not forward: its table holds only its own flows"


def network(proc_root: Path, top_sources: Sequence[str] = ()) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Interfaces, addresses, routes (main table, at most ROUTES_LISTED), forwarding, and for each
    of the top sources the interface the kernel routes it through (where its packets arrive,
    with symmetric routing and rp_filter)."""
    from pyroute2 import IPRoute   # here, not at the top: see the module's docstring

    with IPRoute() as ipr:
        links = list(ipr.get_links())
        addrs = list(ipr.get_addr())
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in links}
        interfaces = []
        for link in links:
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
            interfaces.append({
                "name": names[link["index"]],
                "index": link["index"],
                "state": link.get_attr("IFLA_OPERSTATE") or "UNKNOWN",
                "mtu": link.get_attr("IFLA_MTU"),
                "kind": kind or "device",
                "master": names.get(link.get_attr("IFLA_MASTER")) if link.get_attr("IFLA_MASTER") else None,
                "addresses": [f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}" for a in addrs
                              if a["index"] == link["index"] and a.get_attr("IFA_ADDRESS")],
            })
        routes = []
        total_routes = 0
        for r in ipr.get_routes():
            table = r.get_attr("RTA_TABLE") or r["table"]
            if table == _LOCAL_TABLE:
                continue
            total_routes += 1
            if len(routes) >= ROUTES_LISTED:
                continue
            dst = r.get_attr("RTA_DST")
            family = _AF_NAMES.get(r["family"], str(r["family"]))
            routes.append({
                "family": family,
                "dst": f"{dst}/{r['dst_len']}" if dst else "default",
                "via": r.get_attr("RTA_GATEWAY"),
                "dev": names.get(r.get_attr("RTA_OIF")),
                **({"table": table} if table != _MAIN_TABLE else {}),
            })
        arrive: dict[str, str | None] = {}
        errors: list[str] = []
        for source in list(top_sources)[:SOURCES_LOOKED_UP]:
            try:
                ipaddress.ip_address(source)
                found = list(ipr.route("get", dst=source))
                arrive[source] = names.get(found[0].get_attr("RTA_OIF")) if found else None
            except ValueError:
                continue   # not an address (a top key of another kind)
            except Exception as exc:  # noqa: BLE001  (an unroutable source is a finding, not a failure)
                arrive[source] = None
                errors.append(f"{source}: {exc}")
    forwarding = _forwarding(proc_root)
    data: dict[str, Any] = {
        "forwarding": forwarding,
        "verdict": _verdict(forwarding, len(interfaces)),
        "interfaces": [{k: v for k, v in i.items() if v is not None} for i in interfaces],
        "routes_total": total_routes,
        "routes": [{k: v for k, v in r.items() if v is not None} for r in routes],
    }
    if arrive:
        data["top_sources_arrive_on"] = {k: v or "(no route)" for k, v in arrive.items()}
        by_iface: dict[str, int] = {}
        for dev in arrive.values():
            by_iface[dev or "(no route)"] = by_iface.get(dev or "(no route)", 0) + 1
        data["top_sources_by_interface"] = by_iface
    if total_routes > len(routes):
        data["routes_cut"] = f"listed {len(routes)} of {total_routes} routes"
    if errors:
        data["errors"] = errors
    return data, {"network.json": (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()}
