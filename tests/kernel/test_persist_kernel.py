"""Someone else lowers nf_conntrack_max under a running daemon (real kernel, real journald):
noticed at the next sample, journaled with its own MESSAGE_ID, counted, and set back — or left
alone with `[persist] defend = false`."""

from __future__ import annotations

import time
from pathlib import Path

from ctguard.host.events import MESSAGE_ID_MAX_LOWERED
from helpers.daemon import Running
from helpers.kernelenv import get_max, needs_kernel, set_max
from helpers.policy import write_policy
from helpers.wait import wait_for

pytestmark = needs_kernel    # the `kernel` marker: tests/conftest.py, by folder

QUIET = "[watch]\ninterval = 0.2\nfast_interval = 0.1\n[thresholds]\nwarn = 0.99\nact = 1.0\nhorizon = 0\n"


def lowered_entries(since: float, old: int, new: int) -> list[dict]:
    from systemd import journal

    r = journal.Reader()
    r.this_boot()
    r.add_match(MESSAGE_ID=MESSAGE_ID_MAX_LOWERED)
    r.seek_realtime(since)
    return [e for e in r if e.get("CTGUARD_OLD_MAX") == str(old) and e.get("CTGUARD_NEW_MAX") == str(new)]


def metric(path: Path, name: str) -> int | None:
    for line in path.read_text().splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    return None


def test_lowered_max_is_noticed_journaled_and_set_back(tmp_path: Path, journald, kernel_values) -> None:
    policy = write_policy(tmp_path, QUIET + "[bump]\nceiling = 262144\ncooldown = 30\n", defend=True)
    set_max(131072)
    with Running(policy) as daemon:
        since = time.time()
        set_max(65536)                        # kube-proxy, a `sysctl --system`, ...
        assert wait_for(lambda: get_max() == 131072, 10, interval=0.05), daemon.output()
        assert wait_for(lambda: lowered_entries(since, 131072, 65536), 5), daemon.output()
        e = lowered_entries(since, 131072, 65536)[0]
        assert e["CTGUARD_REASON"] == "defend" and e["PRIORITY"] == 4
        assert "CTGUARD_WRITER" in e
        assert wait_for(lambda: metric(daemon.metrics, "ctguard_max_lowered_total") == 1, 5)
        assert wait_for(lambda: metric(daemon.metrics, "ctguard_max_defended_total") == 1, 5)
        # Lowered again inside the cooldown: ctguard gives up and says so, once.
        since = time.time()
        set_max(32768)
        assert wait_for(lambda: lowered_entries(since, 131072, 32768), 5), daemon.output()
        assert lowered_entries(since, 131072, 32768)[0]["CTGUARD_REASON"] == "gave-up"
        time.sleep(1.0)
        assert get_max() == 32768
        assert metric(daemon.metrics, "ctguard_max_lowered_total") == 2
        assert metric(daemon.metrics, "ctguard_max_defended_total") == 1


def test_not_set_back_with_defend_false(tmp_path: Path, journald, kernel_values) -> None:
    policy = write_policy(tmp_path, QUIET + "[bump]\nceiling = 262144\n")
    assert "defend = false" in policy.read_text()
    set_max(131072)
    with Running(policy) as daemon:
        since = time.time()
        set_max(65536)
        assert wait_for(lambda: lowered_entries(since, 131072, 65536), 10), daemon.output()
        assert lowered_entries(since, 131072, 65536)[0]["CTGUARD_REASON"] == "not-defended"
        time.sleep(1.0)
        assert get_max() == 65536
        assert wait_for(lambda: metric(daemon.metrics, "ctguard_max_lowered_total") == 1, 5)
        assert metric(daemon.metrics, "ctguard_max_defended_total") == 0
