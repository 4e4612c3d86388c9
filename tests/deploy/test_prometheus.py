"""deploy/prometheus: the alert rules pass promtool's checks and their unit tests, every series
they query is one a running node exposes, and a real Prometheus scrapes a node's admin
/metrics and answers queries for TAFE's series with the rules loaded and healthy.

Needs Debian's ``prometheus`` package (/usr/bin/prometheus and /usr/bin/promtool; .ci/run
installs it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import yaml

from .conftest import ON_FIRST_EVENT, RunningNode, binary, query
from .node import DEPLOY, manifests
from .promql import metric_names

PROM = DEPLOY / "prometheus"


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary("promtool"), *args], capture_output=True, text=True, cwd=cwd, timeout=60)


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for rule in group["rules"]]


def test_rules_check_and_pass_their_unit_tests():
    checked = promtool("check", "rules", "alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = promtool("test", "rules", "alerts_test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Every alert has a case.
    cases = (PROM / "alerts_test.yml").read_text()
    assert all(f"alertname: {r['alert']}" in cases for r in rules())


def test_a_broken_rule_fails_its_unit_test(tmp_path: Path):
    shutil.copy(PROM / "alerts_test.yml", tmp_path)
    text = (PROM / "alerts.yml").read_text().replace("> 0.01\n", "> 0.5\n", 1)  # the 5xx threshold
    (tmp_path / "alerts.yml").write_text(text)
    assert promtool("test", "rules", "alerts_test.yml", cwd=tmp_path).returncode != 0


def test_scrape_config_checks_and_follows_the_pod_annotations(tmp_path: Path):
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    annotations = manifests()["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    used = {label for step in job["relabel_configs"] for label in step["source_labels"]}
    for key in annotations:
        assert "__meta_kubernetes_pod_annotation_" + key.replace(".", "_").replace("/", "_") in used
    # Debian's promtool is built without Kubernetes discovery: check the rest with a static target.
    del job["kubernetes_sd_configs"]
    job["static_configs"] = [{"targets": ["127.0.0.1:1"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    shutil.copy(PROM / "alerts.yml", tmp_path)
    checked = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_series_the_rules_query_is_on_a_running_node(running_node: RunningNode):
    queried = set().union(*(metric_names(r["expr"]) for r in rules()))
    assert {"tafe_http_requests_total", "tafe_worker_restarts_total", "tafe_eventloop_blocking_total"} <= queried
    missing = queried - running_node.names() - ON_FIRST_EVENT
    assert not missing, f"alerts.yml queries series no node exposes: {sorted(missing)}"


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def test_real_prometheus_scrapes_a_node_and_answers_for_tafes_series(running_node: RunningNode, prometheus: str):
    series = query(prometheus, 'tafe_http_requests_total{job="tafe",route="bid",status="200"}')["data"]["result"]
    assert float(series[0]["value"][1]) >= running_node.metrics['tafe_http_requests_total{route="bid",status="200"}']
    up = query(prometheus, 'up{job="tafe"}')["data"]["result"]
    assert [float(s["value"][1]) for s in up] == [1.0]
    # The alert rules, loaded by the real Prometheus, evaluate against real data without error.
    deadline = time.monotonic() + 20
    while True:
        loaded = [r for g in _get(f"{prometheus}/rules")["data"]["groups"] for r in g["rules"]]
        evaluated = len(loaded) == len(rules()) and all(r.get("lastEvaluation", "").startswith("20") for r in loaded)
        if evaluated or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {r["name"] for r in loaded} == {r["alert"] for r in rules()}
    assert all(r["health"] == "ok" for r in loaded), [(r["name"], r.get("lastError")) for r in loaded]
