"""contrib/grafana/ctguard.json, fast checks on the file itself: importable JSON, queries everywhere,
only real metrics (proven on a real Prometheus in tests/kernel/test_dashboard_kernel.py)."""

from __future__ import annotations

import json
import re

from helpers.prometheus import DASHBOARD, panel_queries

# -- fast checks on the file itself -------------------------------------------------------------

def test_dashboard_is_importable_json_with_a_datasource_input_and_queries_everywhere() -> None:
    d = json.loads(DASHBOARD.read_text())
    assert d["__inputs"][0]["name"] == "DS_PROMETHEUS" and d["__inputs"][0]["pluginId"] == "prometheus"
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in d["panels"]:
        if p["type"] == "row":
            continue
        assert p["targets"], f"panel {p['title']!r} has no query"
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
    names = {v["name"] for v in d["templating"]["list"]}
    assert {"DS_PROMETHEUS", "instance", "namespace"} <= names


def test_dashboard_covers_what_operators_look_at_and_uses_only_real_metrics() -> None:
    from helpers.contract import documented_metrics

    text = " ".join(q for _, q in panel_queries())
    used = set(re.findall(r"\b(ctguard_[a-z0-9_]+|node_[a-z0-9_]+)", text))
    ctguard = {m for m in used if m.startswith("ctguard_")}
    assert ctguard <= set(documented_metrics()), ctguard - set(documented_metrics())
    for needed in ("ctguard_conntrack_fill_ratio", "ctguard_conntrack_max", "ctguard_ceiling",
                   "ctguard_conntrack_entries", "ctguard_conntrack_slab_bytes", "ctguard_conntrack_drops_total",
                   "ctguard_conntrack_early_drops_total", "ctguard_bumps_total", "ctguard_refusals_total",
                   "ctguard_bump_budget_remaining", "ctguard_last_update_timestamp_seconds"):
        assert needed in ctguard, f"the dashboard shows no {needed}"


# -- the real thing ---------------------------------------------------------------------------


