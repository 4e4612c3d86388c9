"""deploy/grafana: the dashboard's queries name only series a running node exposes (the
profiler's included, on with --block-threshold-ms), and each one, run by a real Prometheus
scraping that node, parses and returns data."""

from __future__ import annotations

import json

from .conftest import ON_FIRST_EVENT, RunningNode, query
from .node import DEPLOY
from .promql import metric_names

DASHBOARD = json.loads((DEPLOY / "grafana" / "tafe.json").read_text())
# Grafana's variables, as a query over all nodes would fill them in.
VARIABLES = {"$__rate_interval": "1m", "$instance": ".*"}


def expressions() -> list[str]:
    return [t["expr"] for p in DASHBOARD["panels"] for t in p.get("targets", [])]


def filled(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


def test_dashboard_shows_what_the_issue_asks_for():
    queried = set().union(*map(metric_names, expressions()))
    assert queried >= {
        "tafe_http_requests_total", "tafe_bids_total", "tafe_no_bids_total", "tafe_http_request_duration_seconds_bucket",
        "tafe_campaign_spend", "tafe_campaign_budget", "tafe_campaign_pacing_rate", "tafe_worker_restarts_total",
        "tafe_eventloop_blocking_total",
    }  # fmt: skip
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    for panel in DASHBOARD["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_every_series_the_dashboard_queries_is_on_a_running_node(running_node: RunningNode):
    variable_queries = [v["definition"] for v in DASHBOARD["templating"]["list"] if "definition" in v]
    queried = set().union(*map(metric_names, expressions() + variable_queries))
    missing = queried - running_node.names() - ON_FIRST_EVENT
    assert not missing, f"the dashboard queries series no node exposes: {sorted(missing)}"


def test_every_panel_query_returns_data_from_a_real_prometheus(prometheus: str):
    empty, failed = [], []
    for expr in expressions():
        answer = query(prometheus, filled(expr))
        if answer["status"] != "success":
            failed.append((expr, answer.get("error")))
        elif not answer["data"]["result"]:
            empty.append(expr)
    assert not failed, failed
    assert not empty, empty
