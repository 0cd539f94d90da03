"""Debian's prometheus-node-exporter and prometheus for the tests: free ports, the shipped
dashboard's queries with Grafana's variables filled in."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from helpers.paths import REPO

DASHBOARD = REPO / "contrib" / "grafana" / "ctguard.json"
ALERTS = REPO / "contrib" / "prometheus" / "ctguard-alerts.yml"
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

NODE_EXPORTER = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeExporter:
    """Debian's prometheus-node-exporter on 127.0.0.1, reading only the given textfile folder."""

    def __init__(self, folder: Path, log: Path, collectors: tuple[str, ...] = ("textfile",)) -> None:
        self.port = free_port()
        self.log = log
        self.proc = subprocess.Popen(
            [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{self.port}", "--collector.disable-defaults",
             *(f"--collector.{c}" for c in collectors), f"--collector.textfile.directory={folder}"],
            stdout=subprocess.DEVNULL, stderr=open(log, "w"))

    def scrape(self) -> str:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
                    return r.read().decode()
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise AssertionError(f"node_exporter did not answer: {self.log.read_text()}") from None
                time.sleep(0.1)

    def __enter__(self) -> "NodeExporter":
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


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
