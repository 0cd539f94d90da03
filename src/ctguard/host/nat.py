"""NAT rules, counted the one way the host role and the evidence both use: statements in
`nft -j list ruleset` (masquerade, snat, dnat, redirect) and targets in the nat table of
`iptables-save`, streamed chunk by chunk so a huge ruleset is never held whole."""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass

NAT_STATEMENTS = ("masquerade", "snat", "dnat", "redirect")
_NFT_NAT = re.compile(rb'"(masquerade|snat|dnat|redirect)"\s*:')
_IPT_NAT = re.compile(r"-j\s+(MASQUERADE|SNAT|DNAT|REDIRECT|NETMAP)\b")


class NftNatCounter:
    """Counts NAT statements in `nft -j list ruleset` output, chunk by chunk.

    In nft's JSON a statement is an object key (`{"masquerade": null}`, `{"snat": {...}}`);
    names and comments are string values, so a key pattern does not mistake them.
    """

    OVERLAP = 32

    def __init__(self) -> None:
        self.found: dict[str, int] = {}
        self._tail = b""

    def feed(self, chunk: bytes) -> None:
        text = self._tail + chunk
        for m in _NFT_NAT.finditer(text):
            if m.end() > len(self._tail):  # not already counted in the previous chunk
                kind = m.group(1).decode()
                self.found[kind] = self.found.get(kind, 0) + 1
        self._tail = text[-self.OVERLAP:]


class IptablesNatCounter:
    """Counts NAT targets in the *nat table of `iptables-save` output, chunk by chunk."""

    def __init__(self) -> None:
        self.found: dict[str, int] = {}
        self._table = ""
        self._partial = b""

    def feed(self, chunk: bytes) -> None:
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            self._line(raw.decode(errors="replace"))

    def close(self) -> None:
        if self._partial:
            self._line(self._partial.decode(errors="replace"))
            self._partial = b""

    def _line(self, line: str) -> None:
        if line.startswith("*"):
            self._table = line[1:].strip()
        elif self._table == "nat" and line.startswith("-A"):
            m = _IPT_NAT.search(line)
            if m:
                self.found[m.group(1)] = self.found.get(m.group(1), 0) + 1


def nft_nat_rules(output: bytes) -> dict[str, int]:
    counter = NftNatCounter()
    counter.feed(output)
    return counter.found


def iptables_nat_rules(text: str) -> dict[str, int]:
    counter = IptablesNatCounter()
    counter.feed(text.encode())
    counter.close()
    return counter.found


# -- the internal side the NAT rules name (issue 22: the guard's host knowledge) --

SOURCE_NAT = ("masquerade", "snat")
_IPT_SOURCE = re.compile(r"(?:^|\s)(!\s+)?(?:-s|--source)\s+(\S+)")
_IPT_IN = re.compile(r"(?:^|\s)(!\s+)?(?:-i|--in-interface)\s+(\S+)")


@dataclass(frozen=True)
class NatSources:
    """What the source-NAT rules (masquerade, snat) say about the namespace's inside.

    `prefixes`: the source prefixes they match (`ip saddr`, `ip6 saddr`, `-s`): the clients a
    gateway translates, which need not sit on a connected network or in the main routing table
    (clients behind an access router reached by policy routing, a VRF, a CGNAT pool). Negated
    matches (`!= 10.0.0.0/8`) say nothing about the inside and are left out. `interfaces`: the
    `iifname` / `-i` the rules match, for the reader (conntrack entries carry no interface).
    `rules`: source-NAT rules seen (the namespace translates for others)."""

    prefixes: tuple[str, ...] = ()
    interfaces: tuple[str, ...] = ()
    rules: int = 0


def _prefixes_of(value) -> list[str]:
    """The prefixes an nft JSON match value names: "10.0.0.5", {"prefix": {"addr", "len"}},
    {"range": [lo, hi]}, {"set": [...]} of those; anything else (a named set "@lan", a map): none."""
    if isinstance(value, str):
        try:
            return [str(ipaddress.ip_network(value, strict=False))]
        except ValueError:
            return []
    if not isinstance(value, dict):
        return []
    if "prefix" in value:
        p = value["prefix"]
        try:
            return [str(ipaddress.ip_network(f"{p['addr']}/{p['len']}", strict=False))]
        except (KeyError, TypeError, ValueError):
            return []
    if "range" in value:
        try:
            lo, hi = (ipaddress.ip_address(a) for a in value["range"])
            return [str(n) for n in ipaddress.summarize_address_range(lo, hi)]  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return []
    if "set" in value and isinstance(value["set"], list):
        return [p for item in value["set"] for p in _prefixes_of(item)]
    return []


def nft_nat_sources(ruleset_json: str) -> NatSources:
    """NatSources of `nft -j list ruleset` output (every table and family: ip, ip6, inet).

    A rule is `{"rule": {..., "expr": [{"match": {"op": "==", "left": {"payload": {"protocol":
    "ip"|"ip6", "field": "saddr"}}, "right": <value>}}, ..., {"masquerade": null}]}}` (nft 1.0.6,
    checked against `nft -j list ruleset` here); iifname is `{"meta": {"key": "iifname"}}`."""
    try:
        doc = json.loads(ruleset_json)
    except ValueError:
        return NatSources()
    prefixes: list[str] = []
    ifaces: list[str] = []
    rules = 0
    for obj in doc.get("nftables", []) if isinstance(doc, dict) else []:
        rule = obj.get("rule") if isinstance(obj, dict) else None
        exprs = rule.get("expr") if isinstance(rule, dict) else None
        if not isinstance(exprs, list):
            continue
        if not any(isinstance(e, dict) and any(k in e for k in SOURCE_NAT) for e in exprs):
            continue
        rules += 1
        for e in exprs:
            m = e.get("match") if isinstance(e, dict) else None
            if not isinstance(m, dict) or m.get("op", "==") not in ("==", "in"):
                continue
            left = m.get("left")
            if not isinstance(left, dict):
                continue
            payload, meta = left.get("payload"), left.get("meta")
            if isinstance(payload, dict) and payload.get("field") == "saddr" and payload.get("protocol") in ("ip", "ip6"):
                prefixes += _prefixes_of(m.get("right"))
            elif isinstance(meta, dict) and meta.get("key") == "iifname" and isinstance(m.get("right"), str):
                ifaces.append(m["right"])
    return NatSources(tuple(dict.fromkeys(prefixes)), tuple(dict.fromkeys(ifaces)), rules)


def iptables_nat_sources(text: str) -> NatSources:
    """NatSources of `iptables-save` / `ip6tables-save` output: `-s` and `-i` of the MASQUERADE
    and SNAT rules of its *nat table (`-s 10.0.0.0/24,10.1.0.0/24` lists are split)."""
    prefixes: list[str] = []
    ifaces: list[str] = []
    rules = 0
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
            continue
        if table != "nat" or not line.startswith("-A") or not re.search(r"-j\s+(MASQUERADE|SNAT)\b", line):
            continue
        rules += 1
        s = _IPT_SOURCE.search(line)
        if s and not s.group(1):
            for part in s.group(2).split(","):
                try:
                    prefixes.append(str(ipaddress.ip_network(part, strict=False)))
                except ValueError:
                    continue
        i = _IPT_IN.search(line)
        if i and not i.group(1):
            ifaces.append(i.group(2))
    return NatSources(tuple(dict.fromkeys(prefixes)), tuple(dict.fromkeys(ifaces)), rules)
