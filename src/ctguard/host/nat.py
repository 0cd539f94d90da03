"""NAT rules, counted the one way the host role and the evidence both use: statements in
`nft -j list ruleset` (masquerade, snat, dnat, redirect) and targets in the nat table of
`iptables-save`, streamed chunk by chunk so a huge ruleset is never held whole."""

from __future__ import annotations

import re

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
