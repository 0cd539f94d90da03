"""Where this checkout is: the tests read its docs and packaging files and run its src/."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SRC = str(REPO / "src")
