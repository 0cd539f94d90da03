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
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from test_metrics import NODE_EXPORTER, NodeExporter, free_port

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "contrib" / "grafana" / "ctguard.json"
ALERTS = ROOT / "contrib" / "prometheus" / "ctguard-alerts.yml"
PROMETHEUS = shutil.which("prometheus")

# What Grafana substitutes before a query reaches Prometheus ("All" selected, scrape every 1 s).
GRAFANA_VARIABLES = {"$instance": ".*", "$namespace": ".*", "$__rate_interval": "15s", "$__interval": "5s",
                     "$__range": "5m"}


def panel_queries() -> list[tuple[str, str]]:
    """(panel title / refId, PromQL) for every target of every panel, rows' panels included."""
    out = []

    def walk(panels):
        for p in panels:
            walk(p.get("panels", []))
            for t in p.get("targets", []):
                out.append((f"{p['title']} / {t['refId']}", t["expr"]))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return out


def grafana_to_promql(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


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
    from test_contract import documented_metrics

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

class Prometheus:
    def __init__(self, tmp: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = tmp / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n  - {ALERTS}\n"
            "scrape_configs:\n  - job_name: node\n    static_configs:\n"
            f"      - targets: ['{target}']\n")
        self.log = tmp / "prometheus.log"
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'prometheus-data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))

    def get(self, path: str, **params: str) -> dict:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:   # 400/422: the query did not parse or evaluate
            return json.loads(e.read())

    def query(self, expr: str) -> dict:
        return self.get("/api/v1/query", query=expr)

    def has(self, expr: str) -> bool:
        r = self.query(expr)
        return r.get("status") == "success" and bool(r["data"]["result"])

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise AssertionError(f"prometheus did not start: {self.log.read_text()[-3000:]}")

    def __enter__(self) -> "Prometheus":
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.mark.kernel
@pytest.mark.skipif(PROMETHEUS is None or NODE_EXPORTER is None,
                    reason="needs prometheus and prometheus-node-exporter (Debian packages; scripts/bootstrap test installs them)")
def test_every_panel_query_and_alert_rule_returns_data_from_a_real_flood(tmp_path: Path) -> None:
    from kernelenv import get_max, kernel_ready, netns_pair, saved_kernel_values, set_max, wait_for
    from test_daemon_kernel import Running, write_policy

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
