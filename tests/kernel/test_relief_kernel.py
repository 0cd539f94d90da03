"""Relief on the real kernel: timeouts shortened in the namespace that fills, entries trimmed
over ctnetlink, the originals back after calm_for (and after a SIGKILL), nothing changed in
advise or observe mode, and the host namespace never touched.

Every test holds the kernel lock, restores max and hashsize (saved_kernel_values), and deletes
its namespaces (their timeouts go with them); the host's UDP timeout is checked, never written.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctguard.config.policy import sysctl_name
from helpers.daemon import Running, ctguard
from helpers.kernelenv import get_max, needs_kernel, netns_pair, saved_kernel_values, set_max
from helpers.policy import write_policy
from helpers.wait import wait_for

pytestmark = needs_kernel    # the `kernel` marker: tests/conftest.py, by folder

HOST_UDP = Path("/proc/sys/net/netfilter/nf_conntrack_udp_timeout")
MAX = 4096
# Every bump is refused at the ceiling; relief answers within a few fast samples.
POLICY = f"""
[bump]
ceiling = {MAX}
[thresholds]
sustain = 3600
warn = 0.5
[relief]
mode = "MODE"
calm_for = 3
[relief.timeouts]
udp = 5
tcp_syn_sent = 5
tcp_syn_recv = 5
"""


def sysctl(pair, key: str) -> int:
    return int(pair.exec(pair.receiver, "cat", f"/proc/sys/net/netfilter/{sysctl_name(key)}").stdout)


def set_sysctl(pair, key: str, value: int) -> None:
    pair.exec(pair.receiver, "sh", "-c", f"echo {value} > /proc/sys/net/netfilter/nf_conntrack_{key}_timeout")


@contextlib.contextmanager
def udp_raised() -> Iterator:
    """The kernel lock held and every value restored after, a fresh namespace pair, max at MAX
    and the receiver's UDP timeout raised to 600 s (what relief shortens)."""
    with saved_kernel_values(), netns_pair() as pair:
        set_max(MAX)
        set_sysctl(pair, "udp", 600)
        yield pair


def relieve(pair, daemon) -> None:
    """A burst past act at the ceiling: relief shortens the receiver's UDP timeout to 5 s."""
    pair.flood_udp(6000, rate=3000)
    assert wait_for(lambda: sysctl(pair, "udp") == 5, 20), daemon.output()


def background(fn, *args, **kw) -> threading.Thread:
    t = threading.Thread(target=fn, args=args, kwargs=kw, daemon=True)
    t.start()
    return t


def journal(message_id: str, netns: int, since: float = 0.0) -> list[dict]:
    """ctguard's entries of one kind about one namespace (inodes are reused: only those after `since`)."""
    from systemd import journal as j

    r = j.Reader()
    r.this_boot()
    r.add_match(MESSAGE_ID=message_id)
    r.add_match(CTGUARD_NETNS=str(netns))
    return [e for e in r if e["__REALTIME_TIMESTAMP"].timestamp() >= since]


def test_udp_flood_relieved_in_its_namespace_and_undone_when_calm(tmp_path: Path, journald) -> None:
    """(a) A UDP flood into a namespace whose UDP timeout was raised to 600 s, past the ceiling."""
    from ctguard.host import events

    policy = write_policy(tmp_path, POLICY.replace("MODE", "enforce"))
    host_before = HOST_UDP.read_text()
    start = time.time()
    with udp_raised() as pair:
        with Running(policy) as daemon:
            # 600 new flows/s until told to stop (2 s rounds, each from a new source port): under
            # 600 s the table is full in 7 s and drops for good; under 5 s it holds ~3,000
            # entries, below act (85% of 4,096).
            stop = threading.Event()

            def udp_flood() -> None:
                while not stop.is_set():
                    pair.flood_udp(1200, rate=600)

            flood = background(udp_flood)
            assert wait_for(lambda: sysctl(pair, "udp") == 5, 20), daemon.output()
            # (Relief comes at thresholds.act once the bump is refused, often before any drop.)
            # The entries made under 600 s are capped too, so the table drains below act (the
            # kernel's garbage collector removes expired entries lazily: up to a minute here)...
            assert wait_for(lambda: pair.count() < 0.85 * MAX, 60), (pair.count(), daemon.output())
            # ... and the drops stop while the same flood goes on.
            time.sleep(1.0)
            before = pair.drops()
            time.sleep(2.0)
            assert flood.is_alive(), "the flood was still running while the drops stopped"
            assert pair.drops() == before, daemon.output()
            assert get_max() == MAX, "relief, not a bump"
            saved = json.loads((tmp_path / "state/relief.json").read_text())
            assert [(r["key"], r["original"], r["value"]) for r in saved["active"]] == [("udp", 600, 5)]
            status = json.loads(ctguard("status", "--json", "--policy", str(policy)).stdout)
            assert [(r["key"], r["value"]) for r in status["relief"]] == [("udp", 5)]
            prom = daemon.metrics.read_text()
            assert f'ctguard_relief_active{{netns="{pair.receiver_inode}",name="{pair.receiver}",key="udp"}} 5' in prom
            stop.set()
            flood.join()
            # After the flood, the lazy collection of its entries and calm_for, the 600 s is back.
            assert wait_for(lambda: sysctl(pair, "udp") == 600, 90), daemon.output()
            assert wait_for(lambda: not json.loads((tmp_path / "state/relief.json").read_text())["active"], 5)
            assert HOST_UDP.read_text() == host_before, "the host namespace's value never moved"
        # Graduated: entering, each step down (to the emergency 5 s), each step up, leaving.
        steps = journal(events.MESSAGE_ID_RELIEF, pair.receiver_inode, start)
        shortened = [e for e in steps if e["CTGUARD_STEP"] in ("enter", "down")]
        assert {e["CTGUARD_KEY"] for e in steps} == {"udp"}
        assert shortened[0]["CTGUARD_STEP"] == "enter" and shortened[0]["CTGUARD_OLD"] == "600"
        assert shortened[-1]["CTGUARD_NEW"] == "5"
        assert "refused (ceiling)" in shortened[0]["CTGUARD_REASON"]
        restored = journal(events.MESSAGE_ID_RELIEF_RESTORED, pair.receiver_inode, start)
        assert [(e["CTGUARD_KEY"], e["CTGUARD_NEW"], e["CTGUARD_REASON"], e["CTGUARD_STEP"]) for e in restored] == [
            ("udp", "600", "calm", "leave")]
        trimmed = journal(events.MESSAGE_ID_RELIEF_TRIMMED, pair.receiver_inode, start)
        assert trimmed and sum(int(e["CTGUARD_ENTRIES"]) for e in trimmed) > 0
    assert HOST_UDP.read_text() == host_before


def test_syn_flood_stopped_by_the_guard_is_relieved(tmp_path: Path, journald) -> None:
    """(b) A spoofed-source SYN flood held at [guard] ceiling: the SYN timeouts are shortened
    in that namespace and the drop rate falls."""
    policy = write_policy(tmp_path, POLICY.replace("MODE", "enforce").replace(
        f"ceiling = {MAX}", "ceiling = 65536\ncooldown = 0.5\nmax_per_hour = 100")
        + "[guard]\nceiling = 4096\nmin_sources = 500\n")
    with saved_kernel_values(), netns_pair() as pair:
        set_max(MAX)
        stop = threading.Event()

        def syn_flood() -> None:
            # ~1,200 SYNs/s, 600 spoofed sources per round (above guard.min_sources), a new
            # destination port per round so every round makes new entries: past 4,096 within
            # 4 s under the default 120 s SYN_SENT timeout; under 5 s it holds ~6,000 at most
            # (garbage collected lazily), so drops go on, at a lower rate.
            port = 1000
            while not stop.is_set():
                t = time.monotonic()
                pair.flood_syn(600, sources=2000, dport=port)
                port += 1
                time.sleep(max(0.0, 0.5 - (time.monotonic() - t)))

        with Running(policy) as daemon:
            flood = background(syn_flood)
            try:
                assert wait_for(lambda: sysctl(pair, "tcp_syn_sent") == 5, 25), daemon.output()
                assert get_max() == 4096, ("the guard held the table at its ceiling", daemon.output())
                t0, d0 = time.monotonic(), pair.drops()
                time.sleep(1.0)
                early_rate = (pair.drops() - d0) / (time.monotonic() - t0)
                assert wait_for(lambda: pair.count() < 0.85 * MAX, 60), (pair.count(), daemon.output())
                t1, d1 = time.monotonic(), pair.drops()
                time.sleep(2.0)
                late_rate = (pair.drops() - d1) / (time.monotonic() - t1)
                # Relief may come before the first drop (it acts once the arrivals would fill the
                # table at the timeouts in force): then the drops at 5 s stay below half the
                # ~1,200 SYNs/s, where a table full under 120 s refuses ~1,170/s of them.
                assert late_rate < early_rate or late_rate == 0 or (early_rate == 0 and late_rate < 600), (
                    early_rate, late_rate)
            finally:
                stop.set()
                flood.join()
            assert wait_for(lambda: sysctl(pair, "tcp_syn_sent") == 120, 90), daemon.output()


def test_sigkill_during_relief_then_restart_restores(tmp_path: Path) -> None:
    """(c) SIGKILL during relief; the next start puts the originals back."""
    policy = write_policy(tmp_path, POLICY.replace("MODE", "enforce").replace("calm_for = 3", "calm_for = 3600"))
    with udp_raised() as pair:
        with Running(policy) as daemon:
            relieve(pair, daemon)
            daemon.proc.send_signal(signal.SIGKILL)
            daemon.proc.wait()
        assert sysctl(pair, "udp") == 5, "killed: nothing could undo it yet"
        daemon.metrics.unlink()
        # The flood is over (its entries flushed), so the restarted daemon has no reason to relieve again.
        pair.exec(pair.receiver, "conntrack", "-F", check=False)
        # Someone else's change to another relieved timeout would win; here none: all back.
        with Running(policy) as daemon:
            assert wait_for(lambda: sysctl(pair, "udp") == 600, 10), daemon.output()
        assert not json.loads((tmp_path / "state/relief.json").read_text())["active"]


def test_operator_change_during_relief_wins(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, POLICY.replace("MODE", "enforce"))
    with udp_raised() as pair:
        with Running(policy) as daemon:
            relieve(pair, daemon)
            set_sysctl(pair, "udp", 45)             # the operator's own decision
            assert wait_for(lambda: not json.loads((tmp_path / "state/relief.json").read_text())["active"], 30), \
                daemon.output()
            assert sysctl(pair, "udp") == 45


@pytest.mark.parametrize("mode, relief_mode", [("enforce", "advise"), ("observe", "enforce")])
def test_advise_and_observe_change_nothing(tmp_path: Path, mode: str, relief_mode: str) -> None:
    """(d) advise mode and observe mode: the same flood, no timeout changed, advice written."""
    policy = write_policy(tmp_path, f'mode = "{mode}"\n' + POLICY.replace("MODE", relief_mode))
    start = time.time()
    with udp_raised() as pair:
        with Running(policy) as daemon:
            pair.flood_udp(6000, rate=3000)
            assert wait_for(lambda: "relief would lower nf_conntrack_udp_timeout 600 -> 5" in daemon.output()
                            or _advised(pair, start), 20), daemon.output()
            time.sleep(1.0)
            assert sysctl(pair, "udp") == 600
            saved = json.loads((tmp_path / "state/relief.json").read_text())
            assert saved["active"] == [], "nothing changed, nothing to restore"
            assert saved["seen"]["udp"]["original"] == 600, "what it would have done, kept for recommend"
        assert sysctl(pair, "udp") == 600


def _advised(pair, since: float) -> bool:
    from ctguard.host import events

    try:
        return bool(journal(events.MESSAGE_ID_RELIEF_ADVICE, pair.receiver_inode, since))
    except ImportError:
        return False


def test_reload_turning_relief_off_restores_at_once(tmp_path: Path) -> None:
    """SIGHUP with relief.mode = "off": the originals are back without waiting for calm_for."""
    policy = write_policy(tmp_path, POLICY.replace("MODE", "enforce").replace("calm_for = 3", "calm_for = 3600"))
    with udp_raised() as pair:
        with Running(policy) as daemon:
            relieve(pair, daemon)
            policy.write_text(policy.read_text().replace('mode = "enforce"', 'mode = "off"'))
            daemon.proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: sysctl(pair, "udp") == 600, 5), daemon.output()
            time.sleep(1.0)
            assert sysctl(pair, "udp") == 600, "relief off: not shortened again"


def test_bench_relief_quick() -> None:
    """bench/bench_relief.py end to end in its tiny configuration (no timing checked)."""
    from helpers.bench import run_bench

    out = run_bench("bench_relief.py")
    table = [line for line in out.splitlines() if line.startswith("| udp") or line.startswith("| syn")]
    assert [line.split("|")[2].strip() for line in table] == ["off", "enforce", "off", "enforce"], out
    assert "trim:" in out and "entries capped" in out, out
