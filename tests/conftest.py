import sys
from pathlib import Path

# Tests import their helpers (kernelenv) from this folder and ctguard from src/ when it is
# not installed, so `pytest` works from a plain checkout too.
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
