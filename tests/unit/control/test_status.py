"""The status view (control/status.py builds it, cli/status.py renders it): exit codes, worst
first, bars and sparklines on a terminal."""

from __future__ import annotations

import json

import pytest

from ctguard.cli import status as status_cli
from ctguard.config import policy as policy_mod
from ctguard.control import status as status_mod
from ctguard.core.model import History
from helpers.builders import now, status_sample


@pytest.mark.parametrize(
    "max_, counts, history, code",
    [
        (8192, (100,), History(), 0),
        (8192, (100, 6000), History(), 1),
        (8192, (7000,), History(), 2),
        (8192, (100,), History(last_drop=now(0), last_packet_drop=now(0)), 2),   # packets dropped: table full
        (8192, (100,), History(last_drop=now(0)), 1),     # issue 24: entries evicted (early_drop), none dropped
        (65536, (100,), History(), 1),        # at the ceiling: no room left
    ],
)
def test_status_codes(max_, counts, history, code) -> None:
    p = policy_mod.loads("[bump]\nceiling = 65536", "t.toml")
    view = status_mod.build(p, status_sample(max_, *counts), history, now(10))
    assert view.code == code, view.headline
    assert view.headline.startswith(f"CTGUARD {status_mod.LABELS[code]}")
    data = json.loads(status_cli.render_json(view))
    assert data["namespaces"][0]["count"] == max(counts), "worst first"
    assert "worst" in status_cli.render_text(view)


def test_status_on_a_terminal_has_bars_and_sparklines() -> None:
    p = policy_mod.loads("[bump]\nceiling = 65536", "t.toml")
    s = status_sample(8192, 100, 6000)
    view = status_mod.build(p, s, History(), now(10))
    minute = int(s.at.wall // 60) * 60
    hour = {4026531001: [(minute - 120, 0.1), (minute - 60, 0.5), (minute, 0.99)]}
    text = status_cli.render_tty(view, hour, s.at.wall, 0.7, 0.85)
    first_ns = [line for line in text.splitlines() if line.startswith('n"1')][0]
    assert "█" * 15 in first_ns and "73.2%" in first_ns
    assert first_ns.endswith("▁▅█")
    assert "\x1b[33m" in text, "warning colour for a namespace above warn"
    assert "max 8192" in text
    assert status_cli.sparkline([], minute) == " " * 60


@pytest.mark.parametrize("history, says, not_says", [
    (History(last_drop=now(0), last_packet_drop=now(0)), "table full 10 s ago", "evicted"),
    # The dead-upstream lab: SYN_SENT entries evicted to make room, 0 packets dropped (issue 24).
    (History(last_drop=now(0)), "table at its max 10 s ago: the kernel evicted unanswered entries", "table full"),
    (History(last_drop=now(-400)), "", "table"),      # older than status.RECENT_DROPS
])
def test_status_tells_a_drop_from_an_eviction(history, says, not_says) -> None:
    p = policy_mod.loads("[bump]\nceiling = 65536", "t.toml")
    view = status_mod.build(p, status_sample(8192, 100), history, now(10))
    text = status_cli.render_text(view)
    assert says in text and not_says not in view.headline, text


@pytest.mark.parametrize(
    "policy_text, mode, enforced",
    [
        ("", "enforce", ["udp", "tcp_syn_sent", "tcp_syn_recv", "tcp_time_wait", "tcp_fin_wait", "tcp_close_wait",
                         "tcp_last_ack"]),
        ('[relief]\nenforce = ["udp"]', "enforce", ["udp"]),
        ('[relief]\nmode = "advise"', "advise", []),
    ],
)
def test_status_json_names_the_classes_relief_writes(policy_text: str, mode: str, enforced: list[str]) -> None:
    p = policy_mod.loads(policy_text, "t.toml")
    data = json.loads(status_cli.render_json(status_mod.build(p, status_sample(8192, 100), History(), now(10))))
    assert data["relief_mode"] == mode
    assert data["relief_enforced"] == enforced
