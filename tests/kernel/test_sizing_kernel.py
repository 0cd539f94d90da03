"""Issue 11 against the real kernel and a real journald: bumps sized to the growth, what
persists, `recommend` after drops, and the incident's start and end in the journal.

Every test holds the shared kernel lock, restores nf_conntrack_max and hashsize, and deletes its
namespaces (kernelenv). No timing assertions: the checks are on sizes, counts and entries.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from ctguard.core.sizing import kernel_default_buckets, kernel_default_max, round_up
from helpers.daemon import Running, ctguard
from helpers.journald import journal_entries
from helpers.kernelenv import get_buckets, get_max, needs_kernel, netns_pair, saved_kernel_values, set_max
from helpers.policy import write_policy
from helpers.wait import wait_for

pytestmark = needs_kernel    # the `kernel` marker: tests/conftest.py, by folder

CEILING = 1048576
ID_START = "6db88ec617644a76ae0f2b5bc77769fb"
ID_END = "d86f06d8bda24112af95694381fa6299"
ID_BUMP = "953e8aba31884714a95257d72e230f9c"


def mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal")


def auto_bumps(daemon: Running) -> list[dict]:
    return [b for b in daemon.bumps() if b["trigger"] not in ("manual", "reapply")]


def state(daemon: Running) -> dict:
    return json.loads(daemon.state.read_text()) if daemon.state.exists() else {}


def test_a_burst_that_stops_gets_what_arrived_not_the_ceiling(tmp_path: Path) -> None:
    # Issue 11: 20,000 flows in one unpaced burst into 4,096 sent max to the 1,048,576 ceiling.
    policy = write_policy(tmp_path, f"[bump]\nceiling = {CEILING}\n", persist_mode="never")
    with saved_kernel_values(), netns_pair() as pair:
        set_max(4096)
        with Running(policy) as daemon:
            time.sleep(1.0)
            pair.flood_udp(20000)
            assert wait_for(lambda: get_max() > 4096, 10), daemon.output()
            time.sleep(2.0)             # the burst is over: nothing more should come
            final = get_max()
            bumps = auto_bumps(daemon)
            inc = state(daemon).get("incident") or state(daemon).get("last_incident")
        assert inc is not None and inc["bumps"] == len(bumps) >= 1
        # Sized on what arrived (count + refused + evicted <= 20,000) plus one second of the
        # highest rate a bump saw while the burst lasted, not rate x the 30 s cooldown; a second
        # bump (x factor at least) may follow while the burst still arrives.
        sized = round_up((20000 + inc["rate"] * 1.0) / 0.85)
        assert final <= 2 * sized, (final, inc, bumps, daemon.output())
        assert final < CEILING, "not the ceiling"
        assert pair.count() <= final


def test_a_ramp_that_continues_is_met_again_before_the_cooldown(tmp_path: Path) -> None:
    # A sustained flood: 30,000 flows at 5,000/s into 4,096 with the default 30 s cooldown.
    policy = write_policy(tmp_path, f"[bump]\nceiling = {CEILING}\ncooldown = 30\n", persist_mode="never")
    with saved_kernel_values(), netns_pair() as pair:
        set_max(4096)
        with Running(policy) as daemon:
            time.sleep(1.0)
            pair.flood_udp(30000, rate=5000)
            time.sleep(1.0)
            bumps = auto_bumps(daemon)
            final = get_max()
            lines = daemon.output()
        assert len(bumps) >= 2, (bumps, lines)
        first, last = bumps[0], bumps[-1]
        assert last["at"]["boot"] - first["at"]["boot"] < 30, "the next bump came before the cooldown"
        assert pair.count() <= final, "the table holds the flood"
        # Each bump after the first says why it did not wait.
        reasons = [line for line in lines.splitlines() if "before the cooldown" in line]
        assert reasons or len(bumps) >= 2
        assert final < CEILING // 4, (final, bumps)


def test_persisted_max_and_buckets_are_a_sizing_never_below_live_or_default(tmp_path: Path) -> None:
    mem = mem_total()
    default_max, default_buckets = kernel_default_max(mem), kernel_default_buckets(mem)
    ceiling = 65536
    policy = write_policy(tmp_path, f"[bump]\nceiling = {ceiling}\n", persist_mode="stable")
    policy.write_text(policy.read_text().replace('mode = "stable"', 'mode = "stable"\nstable_for = 3'))
    sysctl = tmp_path / "etc/sysctl.d/90-ctguard.conf"
    modprobe = tmp_path / "etc/modprobe.d/ctguard.conf"
    with saved_kernel_values(), netns_pair() as pair:
        set_max(4096)
        with Running(policy) as daemon:
            pair.flood_udp(3800, rate=4000)
            assert wait_for(lambda: get_max() > 4096, 10), daemon.output()
            # Pending: status says what will be written and when.
            assert wait_for(lambda: daemon.state.exists(), 5)
            pending = json.loads(ctguard("status", "--json", "--policy", str(policy)).stdout)
            if not sysctl.exists():
                assert pending["pending_persist"] is not None, pending
                assert pending["pending_persist"]["max"] >= min(default_max, ceiling)
            assert wait_for(sysctl.exists, 15), daemon.output()
            live_max, live_buckets = get_max(), get_buckets()
        text = sysctl.read_text()
        persisted = int(text.split("nf_conntrack_max = ")[1].split()[0])
        buckets_line = int(text.split("nf_conntrack_buckets = ")[1].split()[0])
        hashsize = int(modprobe.read_text().split("hashsize=")[1].split()[0])
        # Never below the kernel's default for this machine (within the ceiling) nor the live max.
        assert persisted == max(min(default_max, ceiling), round_up(3800 * 2)) or persisted == max(
            min(default_max, ceiling), round_up(3800 * 3)), (persisted, text)
        assert persisted >= min(live_max, ceiling)
        # Buckets never below the live ones nor the kernel's default.
        assert buckets_line == hashsize >= max(live_buckets, default_buckets)
        status = json.loads(ctguard("status", "--json", "--policy", str(policy)).stdout)
        assert status["persisted_max"] == persisted and status["persisted_buckets"] == hashsize
        assert status["pending_persist"] is None


def test_unmanaged_buckets_write_no_buckets(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, "[bump]\nceiling = 65536\n[buckets]\nmanage = false\n")
    with saved_kernel_values(), netns_pair() as pair:
        set_max(4096)
        with Running(policy) as daemon:
            pair.flood_udp(3800, rate=4000)
            sysctl = tmp_path / "etc/sysctl.d/90-ctguard.conf"
            assert wait_for(sysctl.exists, 10), daemon.output()
        assert "nf_conntrack_buckets" not in sysctl.read_text()
        assert not (tmp_path / "etc/modprobe.d/ctguard.conf").exists()


def test_recommend_after_drops_counts_them_and_never_advises_less_than_the_default(tmp_path: Path) -> None:
    # Observe mode: the kernel drops and nothing is bumped.
    policy = write_policy(tmp_path, 'mode = "observe"\n[thresholds]\ncalm = 1\n')
    with saved_kernel_values(), netns_pair() as pair:
        set_max(2048)
        with Running(policy) as daemon:
            time.sleep(1.0)
            pair.flood_udp(4000, rate=20000)
            assert pair.drops() > 0
            assert wait_for(lambda: (state(daemon).get("incident") or {}).get("drops", 0) > 0, 10), \
                daemon.output()
            drops = pair.drops()
        res = ctguard("recommend", "--json", "--policy", str(policy))
        assert res.returncode == 0, res.stderr
        advice = json.loads(res.stdout)
        assert advice["drops_seen_by_daemon"] and advice["factor"] == 3
        assert 0 < advice["incident"]["drops"] + advice["incident"]["early_drops"] <= drops + 4000
        assert advice["recommended_max"] >= max(advice["boot_default"], round_up(2048 * 3))
        if advice["recommended_max"] == advice["boot_default"]:
            assert any("boot default" in w for w in advice["why"])
        text = ctguard("recommend", "--policy", str(policy)).stdout
        assert "drops seen: yes" in text and "do not edit that file" in text and "drop-in" in text


def test_incident_start_and_end_are_journaled_and_status_warns_after_the_bump(tmp_path: Path, journald) -> None:
    # guard_rate 10,000: an idle sample every ~0.17 s, so the 0.125 s flood is seen whole (peak
    # fill above warn); at the default 100,000 the first sample inside it bumps at ~11%.
    policy = write_policy(tmp_path, "[bump]\nceiling = 65536\n[thresholds]\ncalm = 2\n[watch]\nguard_rate = 10000\n",
                          persist_mode="never")
    with saved_kernel_values(), netns_pair() as pair:
        set_max(2048)
        with Running(policy) as daemon:
            time.sleep(1.0)
            pair.flood_udp(2500, rate=20000)     # x2 leaves it below warn: the incident can end
            assert wait_for(lambda: get_max() > 2048, 10), daemon.output()
            assert wait_for(lambda: state(daemon).get("last_incident") is not None, 20), daemon.output()
            st = state(daemon)
        inc = st["last_incident"]
        incident_id = f"incident-{int(inc['started']['wall'])}"
        starts = [e for e in journal_entries(MESSAGE_ID=ID_START, SYSLOG_IDENTIFIER="ctguard")
                  if e.get("CTGUARD_INCIDENT") == incident_id]
        ends = [e for e in journal_entries(MESSAGE_ID=ID_END, SYSLOG_IDENTIFIER="ctguard")
                if e.get("CTGUARD_INCIDENT") == incident_id]
        assert len(starts) == 1 and len(ends) == 1, daemon.output()
        start, end = starts[0], ends[0]
        # Named by name, not only inode.
        assert start["CTGUARD_NETNS_NAME"] == pair.receiver and pair.receiver in start["MESSAGE"]
        assert str(start["CTGUARD_NETNS"]) == str(pair.receiver_inode)
        assert int(end["CTGUARD_BUMPS"]) == inc["bumps"] >= 1
        assert int(end["CTGUARD_DROPS"]) == inc["drops"] and int(end["CTGUARD_EARLY_DROPS"]) == inc["early_drops"]
        # (The bump may come before the table fills: the peak is what the samples saw.)
        assert float(end["CTGUARD_PEAK_FILL"]) == pytest.approx(inc["peak_fill"], abs=1e-4) and inc["peak_fill"] > 0
        assert float(end["CTGUARD_RATE"]) == pytest.approx(inc["rate"], abs=1)
        assert "ended after" in end["MESSAGE"] and "peak fill" in end["MESSAGE"]
        # The bump entry: the rate, horizon and need it used, the namespace by name, the incident.
        bumps = [e for e in journal_entries(MESSAGE_ID=ID_BUMP, SYSLOG_IDENTIFIER="ctguard")
                 if e.get("CTGUARD_INCIDENT") == incident_id]
        assert bumps and all("CTGUARD_RATE" in b and "CTGUARD_NEED" in b and "CTGUARD_HORIZON" in b for b in bumps)
        assert bumps[0]["CTGUARD_NETNS_NAME"] == pair.receiver and "needs " in bumps[0]["MESSAGE"]
        # status: WARNING after the emergency bump, naming it; the last incident shown.
        res = ctguard("status", "--json", "--policy", str(policy))
        data = json.loads(res.stdout)
        last = st["bumps"][-1]
        assert res.returncode >= 1 and any(f"emergency bump {last['old']} -> {last['new']} ({last['trigger']})" in p
                                           for p in data["problems"]), data
        assert data["last_incident"]["id"] == incident_id
