"""``tafe serve`` as a user runs it: one process, signals, the start-up lines."""

from __future__ import annotations

import json
import signal
import time

from conftest import ROOT, start_tafe
from test_examples_http import check_response, post_bid

DEMO = (ROOT / "tafe" / "data" / "demo-request.json").read_bytes()


def test_start_up_lines_say_where_and_give_a_curl_that_bids():
    server = start_tafe()
    try:
        out = server.output()
        assert "listening on " + server.url in out
        assert "admin " + server.admin_url in out
        assert "curl" in out and "demo-request.json" in out
        status, _, body = post_bid(server.url, DEMO)
        assert check_response(json.loads(DEMO), status, body) == 1
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
