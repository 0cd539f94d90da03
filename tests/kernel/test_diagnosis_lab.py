"""Issue 24 against the real kernel: in the traffic lab (tests/helpers/lab.py: clients -> NAT
gateway -> server namespaces, real nginx, wrk, unbound, stub resolvers), each scenario's bundles,
taken by a real `ctguard run`, name its cause as their top finding.

The lab holds the tests' kernel lock for each scenario, restores nf_conntrack_max, the hash
size and the timeouts it changes, deletes its namespaces and stops every server, even on failure.
All traffic stays between the lab's own namespaces. Skipped with the reason when the lab (or a
tool it needs, or root) is missing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
try:
    from helpers import lab  # noqa: E402
except ImportError:        # the lab lives on its own branch until it merges (issue 21)
    lab = None

READY = "the traffic lab tests/helpers/lab.py is not in this checkout (issue 21)" if lab is None else lab.lab_ready()
pytestmark = [pytest.mark.kernel, pytest.mark.skipif(READY is not None, reason=str(READY))]


def tops(o) -> list[tuple[str, str, tuple[str, ...]]]:
    """(bundle id, verdict, finding ids) of the ctguard arm's bundles."""
    assert o.agent is not None and o.agent.bundles, f"no bundle was taken\n{lab.summary(o)}\n{o.agent and o.agent.log_tail}"
    return list(o.agent.bundles)


def why(o) -> str:
    text = f"\n{lab.summary(o)}\n" + "\n".join(f"{b}: {ids}\n  {v}" for b, v, ids in o.agent.bundles)
    print(text)             # what each bundle said, for `pytest -s`
    return text


def test_nat_flash_crowd_is_time_wait_churn_through_the_gateway():
    o = lab.flash_crowd("ctguard", duration=8, table=8192, capture_wait=10)
    first = tops(o)[0]
    assert first[2][0] == "tcp-time-wait-churn", why(o)
    assert "behind" in first[1] and "TIME_WAIT" in first[1], why(o)
    # No client is cut off: nothing suggests a limit on the gateway's own client.
    for _b, _v, ids in tops(o):
        assert "top-source-dominant" not in ids and "server-does-nat" not in ids, why(o)
    why(o)


def test_dead_upstream_is_the_unreachable_destination():
    o = lab.dead_upstream("ctguard", rate=2000, duration=8, web_rate=300, capture_wait=10)
    first = tops(o)[0]
    assert first[2][0] == "unreachable-destination", why(o)
    assert lab.SERVER_ADDR in first[1] and f"tcp/{lab.DEAD_PORT}" in first[1], why(o)
    assert "tcp/80" not in first[1].split("Top finding:")[1], "the live web server is not named with it" + why(o)
    why(o)


def test_dns_through_the_nat_past_the_ceiling_is_answered_once_udp_held_by_udp_timeout():
    # Relief advises only: enforcing (the packaged default) keeps this table from ever dropping
    # (tests/kernel/test_relief_lab.py), and this test is about the diagnosis of the drops.
    o = lab.dns("ctguard", rate=3000, duration=20, table=8192, ceiling=32768, capture_wait=15,
                overrides={"relief": {"mode": "advise"}})
    found = tops(o)
    assert o.kernel.drop > 0, "the scenario must go past the ceiling" + why(o)
    for bid, text, ids in found:
        assert ids[0] == "udp-answered-once", why(o)
        assert "each DNS query through the NAT holds an entry for nf_conntrack_udp_timeout" in text, why(o)
    # Besides the first bump's bundle (8% fill, nothing dropped yet), one from the moment it got worse.
    refused = [b for b in found if b[0].endswith("-refused-ceiling")]
    dropping = [b for b in found if b[0].endswith("-drops-began")]
    assert refused and dropping, "bundles when the ceiling refused a bump and when the drops began" + why(o)
    bid, text, ids = dropping[0]
    assert "dropped nothing" not in text and "users lost" in text and "kernel-drops" in ids, why(o)
    assert "still open when this bundle was taken" in text, why(o)
    why(o)


def test_spoofed_syn_flood_is_an_attack():
    o = lab.syn_flood("ctguard", rate=5000, duration=8, table=8192, capture_wait=10)
    first = tops(o)[0]
    assert first[2][0] == "attack-shape", why(o)
    why(o)
