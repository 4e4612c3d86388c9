"""One running node for the Prometheus and Grafana tests, with every series they query made to appear."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest
import yaml
from conftest import stop_process
from test_master import bid, request, scrape, worker_pids
from test_up import free_port

from tafe import nginx as nginx_mod
from tafe.settings import Settings

from .node import DEPLOY, start_node

# Series a node exposes only once the thing they count has happened, and that the test cannot
# make happen on a healthy node: the alerts treat their first appearance as an event
# (deploy/prometheus/alerts.yml; unit-tested by deploy/prometheus/alerts_test.yml).
ON_FIRST_EVENT = {"tafe_money_state_errors_total"}


@dataclass
class RunningNode:
    url: str
    admin_url: str
    metrics: dict[str, float]

    def names(self) -> set[str]:
        """Metric names as exposed, histogram suffixes included."""
        return {key.partition("{")[0] for key in self.metrics}


@pytest.fixture(scope="package")
def running_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """The pod's node (tafe up, two workers, the ConfigMap's settings), the profiler's threshold
    at 1 ms so it reports something, after bids, a no-bid, a bad request, a notice and a
    worker killed (restarted)."""
    if nginx_mod.find_binary(Settings()) is None:
        pytest.skip("nginx not installed (.ci/run installs it)")
    proc, up = start_node(tmp_path_factory.mktemp("node"), TAFE_BLOCK_THRESHOLD_MS="1")
    try:
        url, admin = up.group(1), up.group(5)
        for _ in range(10):
            status, _, body = bid(url)
        assert status == 200, body
        nurl = json.loads(body)["seatbid"][0]["bid"][0]["nurl"].replace("${AUCTION_PRICE}", "0.5")
        parts = urlsplit(nurl)
        assert request(url, path=f"{parts.path}?{parts.query}")[0] == 204
        no_bid = json.dumps({"id": "nb", "imp": [{"id": "1", "banner": {"w": 1, "h": 1}}]}).encode()
        assert request(url, "POST", "/openrtb2/bid", no_bid, {"Content-Type": "application/json"})[0] == 204
        assert request(url, "POST", "/openrtb2/bid", b"{", {"Content-Type": "application/json"})[0] == 400
        victim = min(worker_pids(proc) - {int(up.group(2))})
        mark = len(proc.lines)
        os.kill(victim, signal.SIGKILL)  # a worker of the node this fixture started
        proc.wait_for(r"worker \d ready", start=mark)
        time.sleep(1.5)  # each worker folds its counts into the shared files once a second
        yield RunningNode(url, admin, scrape(admin))
    finally:
        proc.stop()


def binary(name: str) -> str:
    """A tool of Debian's prometheus package, or the test is skipped."""
    found = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
    if found is None:
        pytest.skip(f"{name} not installed (Debian's prometheus package; .ci/run installs it)")
    return found


def query(api: str, expr: str) -> dict:
    """Prometheus' answer to an instant query (its JSON, errors included)."""
    try:
        with urllib.request.urlopen(f"{api}/query?query={urllib.parse.quote(expr)}", timeout=5) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # 400 for an expression that does not parse
        return json.loads(exc.read())


@pytest.fixture(scope="package")
def prometheus(running_node: RunningNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus (Debian's) scraping the node's admin /metrics every second, with
    deploy/prometheus/alerts.yml loaded; its HTTP API's URL, once it has two scrapes."""
    tmp = tmp_path_factory.mktemp("prometheus")
    admin = urllib.parse.urlsplit(running_node.admin_url).netloc
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(DEPLOY / "prometheus" / "alerts.yml")],
        "scrape_configs": [{"job_name": "tafe", "static_configs": [{"targets": [admin]}]}],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    cmd = [
        binary("prometheus"), f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=(tmp / "log").open("w"))
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        deadline = time.monotonic() + 40
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if query(api, 'rate(tafe_http_requests_total{job="tafe"}[1m])')["data"]["result"]:
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError(f"Prometheus has no TAFE series (exit {proc.poll()}): {(tmp / 'log').read_text()[-2000:]}")
        yield api
    finally:
        stop_process(proc, timeout=15)
