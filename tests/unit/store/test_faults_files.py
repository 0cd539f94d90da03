"""A SIGKILL mid-write: the file is the old or the new one, never torn; the kill is a real kill.
(A full disk, on a real tiny tmpfs, and a namespace that vanishes while it is being sampled:
tests/kernel/test_faults_files_kernel.py.)"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from ctguard.store.files import atomic_write
from helpers.paths import SRC

_WRITER = r"""
import sys
sys.path.insert(0, sys.argv[1])
from ctguard.store.files import atomic_write
target = sys.argv[2]
i = 0
while True:
    i += 1
    atomic_write(target, (str(i % 10) * 300_000) + "\n")
"""


def test_sigkill_at_any_point_leaves_old_or_new_never_torn(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, "0" * 300_000 + "\n")
    rng = random.Random(7)
    for _ in range(30):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, SRC, str(target)])
        time.sleep(0.15 + rng.random() * 0.3)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = target.read_bytes()
        assert len(data) == 300_001 and data.endswith(b"\n"), len(data)
        assert len(set(data[:-1])) == 1, "a torn file mixes two writes"
    # Temporary files of killed writers are left for the next write to ignore; never the target.
    assert target.exists()


