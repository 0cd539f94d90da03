"""Pseudonymise every IP address in a bundle's files, for a vendor's ticket.

The same address gets the same token throughout one export (so the reader can still follow
"the top source is also the top destination"), and tokens are keyed with a random secret made
for that export and never stored: nobody can reverse a token by hashing guessed addresses, and
two exports of one bundle cannot be joined. The bundle on disk is never changed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets

# Candidates only; each is checked with the ipaddress module before it is replaced.
_V4 = r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)"
_V6 = r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:(?:\d{1,3}\.){3}\d{1,3}|[0-9A-Fa-f]{1,4})?(?:%[\w.-]+)?(?![\w:]|\.\d)"
_CANDIDATE = re.compile(f"{_V6}|{_V4}".encode())


class Redactor:
    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key is not None else secrets.token_bytes(32)
        self.tokens: dict[bytes, bytes] = {}

    def _token(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bytes:
        digest = hmac.new(self._key, addr.packed, hashlib.sha256).hexdigest()[:10]
        return f"ip{addr.version}-{digest}".encode()

    def _replace(self, m: re.Match[bytes]) -> bytes:
        raw = m.group(0)
        text = raw.decode("ascii", errors="replace")
        core = text.split("%", 1)[0]
        try:
            if "." in core and ":" not in core:
                # Leading zeros ("010.1.2.3") are refused by ipaddress but still name an address.
                parts = [int(p) for p in core.split(".")]
                if any(p > 255 for p in parts):
                    return raw
                addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(".".join(map(str, parts)))
            else:
                addr = ipaddress.ip_address(core)
        except ValueError:
            return raw
        if addr.version == 6 and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        token = self.tokens.get(addr.packed)
        if token is None:
            token = self.tokens[addr.packed] = self._token(addr)
        return token

    def bytes(self, data: bytes) -> bytes:
        return _CANDIDATE.sub(self._replace, data)


NOTE = (b"Every IP address in this archive was replaced by a token (ip4-.../ip6-...).\n"
        b"The same address has the same token throughout this archive; tokens were keyed with a\n"
        b"random secret made for this export and not kept, so they cannot be reversed or matched\n"
        b"across exports. The bundle on the host is unchanged.\n")
