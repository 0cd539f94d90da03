"""The guard on the real kernel: a spoofed SYN flood stops at [guard] ceiling, while a
legitimate UDP burst of the same size is bumped past it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from helpers.daemon import Running, ctguard
from helpers.kernelenv import get_max, needs_kernel, netns_pair, saved_kernel_values, set_max
from helpers.policy import write_policy
from helpers.wait import wait_for

pytestmark = needs_kernel    # the `kernel` marker: tests/conftest.py, by folder

POLICY = "[bump]\nceiling = 65536\ncooldown = 0.5\nmax_per_hour = 100\n[guard]\nceiling = 8192\nmin_sources = 500\n"


def test_syn_flood_stops_at_the_guard_ceiling(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, POLICY)
    with saved_kernel_values(), netns_pair() as pair:
        set_max(4096)
        with Running(policy) as daemon:
            pair.flood_syn(14000, sources=2000)
            assert wait_for(lambda: get_max() == 8192, 10), daemon.output()
            time.sleep(2.0)
            assert get_max() == 8192, "no table handed to a spoofed flood past the guard's ceiling"
            state = json.loads((tmp_path / "state/state.json").read_text())
            assert max(b["new"] for b in state["bumps"] if b["ok"]) == 8192

            def bundles() -> list[dict]:
                return json.loads(ctguard("bundles", "list", "--json", "--policy", str(policy)).stdout)

            # The bump's capture runs beside the daemon (seconds on a loaded machine): wait for it
            # to complete before stopping the daemon, or the list shows it half-written.
            assert wait_for(lambda: any(b["complete"] and ("guard" in b["reason"] or "bump" in b["reason"])
                                        for b in bundles()), 60), (bundles(), daemon.output())
        assert pair.drops() > 0, "the flood really was bigger than the guard allowed"


def test_udp_burst_of_the_same_size_is_bumped(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, POLICY)
    with saved_kernel_values(), netns_pair() as pair:
        set_max(4096)
        with Running(policy) as daemon:
            pair.flood_udp(14000, rate=10000)
            assert wait_for(lambda: get_max() > 8192, 10), daemon.output()
            assert get_max() <= 65536
