"""contrib/grafana/ctguard.json and the alert rules, proven on a real Prometheus.

A running ctguard meets a real flood in test namespaces; Debian's prometheus-node-exporter
reads the textfile it writes; Debian's prometheus (127.0.0.1, a free port, its own data folder
under the test's tmp) scrapes it every second with the shipped alert rules loaded. Then every
query of every dashboard panel, every template variable, and every alert rule is evaluated
through Prometheus's HTTP API: each must parse and return data.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from helpers.prometheus import (
    DASHBOARD, NODE_EXPORTER, PROMETHEUS, NodeExporter, Prometheus, grafana_to_promql, panel_queries,
)


@pytest.mark.skipif(PROMETHEUS is None or NODE_EXPORTER is None,
                    reason="needs prometheus and prometheus-node-exporter (Debian packages; scripts/bootstrap test installs them)")
def test_every_panel_query_and_alert_rule_returns_data_from_a_real_flood(tmp_path: Path) -> None:
    from helpers.daemon import Running
    from helpers.kernelenv import get_max, kernel_ready, netns_pair, saved_kernel_values, set_max
    from helpers.policy import write_policy
    from helpers.wait import wait_for

    if kernel_ready():
        pytest.skip(str(kernel_ready()))
    # The textfile folder is the test's own: node_exporter reads tmp_path/*.prom.
    textfiles = tmp_path / "textfile"
    textfiles.mkdir()
    policy = write_policy(textfiles, "[bump]\nceiling = 8192\ncooldown = 1\n[guard]\nenabled = false\n")
    with saved_kernel_values(), netns_pair() as pair:
        set_max(4096)
        with Running(policy) as daemon, \
                NodeExporter(textfiles, tmp_path / "node_exporter.log", collectors=("textfile", "meminfo")) as ne, \
                Prometheus(tmp_path, f"127.0.0.1:{ne.port}") as prom:
            prom.wait_ready()
            assert wait_for(lambda: prom.has("ctguard_conntrack_max"), 30), prom.log.read_text()[-2000:]

            def why() -> str:
                # The kernel's max is global: name it, in case something outside the lock moved it.
                state = daemon.state.read_text() if daemon.state.exists() else "(no state yet)"
                return (f"nf_conntrack_max is now {get_max()} (this test set 4096, ceiling 8192); "
                        f"state: {state[-1500:]}; log: {daemon.output()[-1500:]}")

            # The flood: met by a bump to the ceiling, then more than the ceiling holds, so the
            # table is full (drops) and the next bump is refused (refusals{reason="ceiling"}).
            pair.flood_udp(3900, rate=4000)
            assert wait_for(lambda: prom.has("ctguard_bumps_total > 0"), 20), why()
            pair.flood_udp(6000, rate=6000, first_port=4000)
            assert wait_for(lambda: prom.has('ctguard_refusals_total{reason="ceiling"} > 0'), 20), why()
            assert wait_for(lambda: prom.has("ctguard_conntrack_drops_total > 0"), 20), why()
            assert prom.has("node_textfile_scrape_error == 0")
            time.sleep(3)   # a few more scrapes, so every rate() window holds samples from during the flood

            failures = []
            for where, expr in panel_queries():
                r = prom.query(grafana_to_promql(expr))
                if r.get("status") != "success":
                    failures.append(f"panel {where}: {expr}\n    does not evaluate: {r.get('error')}")
                elif not r["data"]["result"]:
                    failures.append(f"panel {where}: {expr}\n    returns no data")

            # Template variables: label_values(metric, label) must find values.
            d = json.loads(DASHBOARD.read_text())
            for var in d["templating"]["list"]:
                if var["type"] != "query":
                    continue
                m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]["query"])
                assert m, var["query"]["query"]
                series = prom.get("/api/v1/series", **{"match[]": grafana_to_promql(m.group(1))})
                if not any(m.group(2) in s for s in series.get("data", [])):
                    failures.append(f"variable ${var['name']}: {var['query']['query']} finds no values")

            # Alert rules: each expression evaluates, and every series it reads holds data. (An
            # alert's own result is empty while it does not fire, as `absent(...)` always is.)
            rules = prom.get("/api/v1/rules")["data"]["groups"]
            assert rules, "prometheus loaded no alert rules"
            for group in rules:
                for rule in group["rules"]:
                    if rule.get("health") != "ok":
                        failures.append(f"rule {rule['name']}: health {rule.get('health')}: {rule.get('lastError')}")
                    r = prom.query(rule["query"])
                    if r.get("status") != "success":
                        failures.append(f"rule {rule['name']}: {rule['query']} does not evaluate: {r.get('error')}")
                    for metric in set(re.findall(r"\b(ctguard_[a-z0-9_]+)", rule["query"])):
                        if not prom.has(metric):
                            failures.append(f"rule {rule['name']}: {metric} returns no data")
            fired = {a["labels"]["alertname"] for a in prom.get("/api/v1/alerts")["data"]["alerts"]}
            assert "ConntrackDropping" in fired, f"the flood dropped packets but the alert did not fire: {fired}"
            assert not failures, "\n".join(failures)
