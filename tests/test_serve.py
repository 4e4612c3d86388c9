"""``tafe serve`` as a user runs it: one process, signals, the start-up lines."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time

import pytest

from conftest import ROOT, start_tafe
from test_examples_http import check_response, post, post_bid

DEMO = (ROOT / "tafe" / "data" / "demo-request.json").read_bytes()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_start_up_lines_say_where_and_give_a_curl_that_bids(workers):
    server = start_tafe("--workers", workers)
    try:
        deadline = time.monotonic() + 30
        while not (hint := re.search(r"try: (curl .*)", server.output())) and time.monotonic() < deadline:
            time.sleep(0.05)
        out = server.output()
        assert "listening on " + server.url in out
        assert "admin " + server.admin_url in out
        assert hint, out
        for _ in range(3):  # an empty answer is a 204: a loaded machine may miss the deadline
            curl = subprocess.run(shlex.split(hint.group(1)), capture_output=True, timeout=30)
            assert curl.returncode == 0, curl.stderr
            if curl.stdout:
                break
        assert check_response(json.loads(DEMO), 200, curl.stdout) == 1, curl.stdout
    finally:
        assert server.stop() == 0, server.output()


def test_sighup_reloads_instead_of_killing_a_single_process():
    server = start_tafe()
    try:
        server.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        assert server.proc.poll() is None, server.output()
        status, _, body = post_bid(server.url, DEMO)
        assert check_response(json.loads(DEMO), status, body) == 1
    finally:
        assert server.stop() == 0, server.output()


def test_sigint_stops_cleanly():
    server = start_tafe()
    assert server.stop(signal.SIGINT) == 0, server.output()


def test_a_stopping_worker_writes_its_last_counts_to_the_multiprocess_files(tmp_path):
    """A worker exiting within a second of its last requests (no drain grace) must not
    take them along: the master archives what its files hold (tafe.metrics.retire_worker)."""
    from tafe import metrics

    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    server = start_tafe("--drain-grace-s", "0", "--block-threshold-ms", "10", "--profile-sample", "1", env=env)
    try:
        sent = 7
        for _ in range(sent):
            assert post(server.url, DEMO)[0] in (200, 204)
    finally:
        assert server.stop() == 0, server.output()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    try:
        body, _ = metrics.exposition(None)  # type: ignore[arg-type]
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    text = body.decode()
    counted = sum(
        float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith('tafe_http_requests_total{route="bid"')
    )
    assert counted == sent, text
    assert re.search(r'tafe_eventloop_span_seconds_count\{[^}]*\} [1-9]', text), text
