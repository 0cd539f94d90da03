"""The eight-step block characters the status view and the bundle timeline draw fills with."""

from __future__ import annotations

SPARKS = "▁▂▃▄▅▆▇█"


def spark(fill: float | None) -> str:
    """One character for a fill from 0 to 1 (a blank where nothing was recorded)."""
    if fill is None:
        return " "
    return SPARKS[max(0, min(len(SPARKS) - 1, int(fill * len(SPARKS))))]
