"""docs/contract.md read by the tests that keep it true (the contract test, the dashboard's)."""

from __future__ import annotations

import re

from helpers.paths import REPO

CONTRACT = REPO / "docs" / "contract.md"


def section(title: str) -> str:
    """The text of `## <title>...` in the contract, up to the next `## `."""
    text = CONTRACT.read_text()
    m = re.search(rf"^## {re.escape(title)}.*?$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"{CONTRACT} has no '## {title}' section"
    return m.group(1)


# -- metrics --------------------------------------------------------------------------------


def documented_metrics() -> dict[str, str]:
    """{metric: type} from the table under '## Metrics'."""
    return dict(re.findall(r"^\| `(ctguard_[a-z0-9_]+)` \| (\w+) \|", section("Metrics"), re.M))
