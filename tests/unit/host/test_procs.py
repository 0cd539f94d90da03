"""The one /proc walk and the background priority of ctguard's children (ctguard.host.procs)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ctguard.host import procs

SRC = Path(__file__).resolve().parents[3] / "src"


def test_pids_and_comm_read_a_prepared_proc(tmp_path: Path) -> None:
    for pid, comm in ((12, "kube-proxy"), (3, "sshd")):
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "comm").write_text(comm + "\n")
    (tmp_path / "self").mkdir()
    (tmp_path / "sys").mkdir()
    assert procs.pids(tmp_path) == [3, 12]
    assert procs.comm(tmp_path, 12) == "kube-proxy"
    assert procs.comm(tmp_path, 99) is None


def test_to_background_lowers_cpu_and_io_priority() -> None:
    # In a child: a lowered priority cannot be raised again without CAP_SYS_NICE.
    code = ("import os, sys; from ctguard.host import procs; missed = procs.to_background(7); "
            "print(os.getpriority(os.PRIO_PROCESS, 0), os.sched_getscheduler(0) == os.SCHED_IDLE, missed)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)}).stdout.split(maxsplit=2)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert int(out[0]) == min(19, base + 7)
    assert out[1] == "True"
    assert out[2].strip() == "[]"
