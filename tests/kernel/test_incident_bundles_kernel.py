"""Issue 24 on the real kernel: the bundles of one incident.

- When relief acts (its first shortened timeout in an incident), a bundle is taken; it says the
  incident was still open, and `bundles list` puts it under that incident; one incident takes at
  most `[evidence] incident_captures` bundles, however many turns it lasts.
- The peak `status` reports for an incident is the peak the verdict of its end bundle states: the
  largest count seen, against the max in force at that moment, after a real fill past a bump.

Every test holds the kernel lock and restores nf_conntrack_max and hashsize (saved_kernel_values);
its namespaces (and their timeouts) are deleted, the daemon stopped, even on failure. Traffic
flows only between the two namespaces the test creates; the host's timeouts are never written.
"""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

from ctguard.config.policy import Evidence
from helpers.daemon import Running, ctguard
from helpers.kernelenv import get_max, needs_kernel, netns_pair, saved_kernel_values, set_max
from helpers.policy import write_policy
from helpers.wait import wait_for

pytestmark = [needs_kernel, pytest.mark.kernel]

MAX = 4096
HOST_UDP = Path("/proc/sys/net/netfilter/nf_conntrack_udp_timeout")


def bundles(policy: Path) -> list[dict]:
    out = ctguard("bundles", "list", "--json", "--policy", str(policy))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def show(policy: Path, bundle_id: str) -> dict:
    out = ctguard("bundles", "show", bundle_id, "--json", "--policy", str(policy))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def state(tmp_path: Path) -> dict:
    path = tmp_path / "state" / "state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def udp_timeout(pair) -> int:
    return int(pair.exec(pair.receiver, "cat", "/proc/sys/net/netfilter/nf_conntrack_udp_timeout").stdout)


def test_relief_acting_is_captured_in_a_bundle_of_the_open_incident(tmp_path: Path) -> None:
    # Every bump is refused at the ceiling (max = ceiling = 4,096); the receiver's UDP timeout
    # is raised to 600 s, what relief shortens (to 5 s, in that namespace only).
    policy = write_policy(tmp_path, f"""
[bump]
ceiling = {MAX}
[thresholds]
sustain = 3600
warn = 0.5
[relief]
mode = "enforce"
calm_for = 3600
[relief.timeouts]
udp = 5
""")
    host_before = HOST_UDP.read_text()
    with saved_kernel_values(), netns_pair() as pair:
        set_max(MAX)
        pair.exec(pair.receiver, "sh", "-c", "echo 600 > /proc/sys/net/netfilter/nf_conntrack_udp_timeout")
        with Running(policy) as daemon:
            stop = threading.Event()

            def flood() -> None:
                # 600 new flows/s until told to stop: the table is past act within seconds.
                while not stop.is_set():
                    pair.flood_udp(1200, rate=600)

            sender = threading.Thread(target=flood, daemon=True)
            sender.start()
            try:
                assert wait_for(lambda: udp_timeout(pair) < 600, 30), daemon.output()

                def relief_bundle() -> dict | None:
                    return next((b for b in bundles(policy) if b["id"].endswith("-relief") and b["complete"]), None)

                # The capture child runs at SCHED_IDLE beside the flood: give it time.
                assert wait_for(relief_bundle, 40, interval=1.0), ([b["id"] for b in bundles(policy)],
                                                                    daemon.output())
                found = relief_bundle()
                assert found is not None

                def incident_naming_it() -> dict | None:
                    # The state file is written on the daemon's own schedule, after the bundle.
                    inc = state(tmp_path).get("incident")
                    return inc if inc and found["id"] in inc.get("bundles", []) else None

                assert wait_for(incident_naming_it, 20, interval=0.5), state(tmp_path).get("incident")
                inc = incident_naming_it()
            finally:
                stop.set()
                sender.join()
            assert get_max() == MAX, "relief, not a bump"
            listed = ctguard("bundles", "list", "--policy", str(policy)).stdout
        assert inc is not None, "the incident is still open while the flood goes on"
        incident_id = f"incident-{int(inc['started']['wall'])}"
        assert found["incident"] == incident_id and found["incident_open"], found
        line = next(line for line in listed.splitlines() if line.startswith(found["id"]))
        assert f"{incident_id} (still open when taken)" in line, listed
        assert found["id"] in inc["bundles"], ("the incident names its bundles", inc["bundles"])
        view = show(policy, found["id"])
        assert "still open when this bundle was taken" in view["verdict"], view["verdict"]
        assert "Relief acted" in view["verdict"], view["verdict"]
        # Relief's action is in the decision that took the bundle, or (when a capture a few
        # seconds before held it back to the next turn the gap allowed) in its timeline.
        manifest = (tmp_path / "bundles" / found["id"] / "manifest.toml").read_text()
        events = json.loads((tmp_path / "bundles" / found["id"] / "timeline.json").read_text())
        entered = [e for e in events.get("events", []) if e.get("kind") == "relief"
                   and "entering relief" in e.get("text", "")]
        assert 'action = "ShortenTimeout"' in manifest or entered, "the decision that led here: relief's action"
        # Bounded: however many turns the incident lasted, at most [evidence] incident_captures
        # (the default) bundles of it, and the relief moment once.
        of_incident = [b for b in bundles(policy) if b["incident"] == incident_id]
        print("bundles of the incident:", [b["id"] for b in of_incident])
        assert len(of_incident) <= Evidence().incident_captures, [b["id"] for b in of_incident]
        assert sum(b["id"].endswith("-relief") for b in of_incident) == 1, [b["id"] for b in of_incident]
    assert HOST_UDP.read_text() == host_before, "the host namespace's timeout never moved"


VERDICT_PEAK = re.compile(r"([\d,]+) entries at its peak, (\d+)% of the max of ([\d,]+) in force then")


def test_status_states_the_peak_the_incident_bundle_states(tmp_path: Path) -> None:
    # 6,000 UDP flows into a 4,096 table: bumped to hold them; they stay for the receiver's UDP
    # timeout (10 s here, in that namespace only, so the test is short), the incident ends
    # 4 s (calm) after the fill falls below warn, and its end bundle is taken.
    policy = write_policy(tmp_path, "[bump]\nceiling = 65536\ncooldown = 0.5\nmax_per_hour = 100\n"
                                    "[thresholds]\ncalm = 4\n", persist_mode="never")
    with saved_kernel_values(), netns_pair() as pair:
        set_max(MAX)
        pair.exec(pair.receiver, "sh", "-c", "echo 10 > /proc/sys/net/netfilter/nf_conntrack_udp_timeout")
        with Running(policy) as daemon:
            time.sleep(1.0)
            pair.flood_udp(6000, rate=3000)
            assert wait_for(lambda: get_max() > MAX, 15), daemon.output()

            def end_bundle() -> dict | None:
                return next((b for b in bundles(policy) if b["id"].endswith("-incident-end") and b["complete"]), None)

            assert wait_for(end_bundle, 60, interval=1.0), ([b["id"] for b in bundles(policy)], daemon.output())
            found = end_bundle()
            assert found is not None
            status = json.loads(ctguard("status", "--json", "--policy", str(policy)).stdout)
            text = ctguard("status", "--policy", str(policy)).stdout
        last = status["last_incident"]
        assert last is not None and found["incident"] == last["id"] and not found["incident_open"], (found, last)
        verdict = show(policy, found["id"])["verdict"]
        m = VERDICT_PEAK.search(verdict)
        assert m, verdict
        count, pct, max_then = int(m[1].replace(",", "")), int(m[2]), int(m[3].replace(",", ""))
        print(f"status: peak {last['peak_count']} of max {last['peak_max']} (fullest fill {last['peak_fill']:.1%}); "
              f"verdict: {m[0]}")
        assert last["bumps"] >= 1 and last["max_now"] > MAX, last
        assert (count, max_then) == (last["peak_count"], last["peak_max"]), (verdict, last)
        assert pct == round(100 * count / max_then), verdict
        assert f"peak {count} entries ({count / max_then:.1%} of max {max_then} then)" in text, text
