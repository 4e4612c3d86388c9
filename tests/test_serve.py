"""``tafe serve`` as a user runs it: one process, signals, the start-up lines."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, start_tafe
from test_examples_http import check_response, post, post_bid

import tafe.settings

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


@pytest.mark.parametrize("batch_us", ["500", "0"])
def test_metrics_count_the_answers_held_for_a_batch_and_the_batches_sent(batch_us):
    """Keep-alive bids on one connection: each answer is held (the outbox is empty when it
    is made) and leaves alone at the connection's next step; the last answer closes its
    connection and is sent at once, uncounted. With --send-batch-us 0 nothing is held."""
    import http.client
    from urllib.parse import urlsplit

    server = start_tafe("--send-batch-us", batch_us)
    try:
        where = urlsplit(server.url)
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
        kept = 6
        for i in range(kept + 1):
            headers = {"Content-Type": "application/json"}
            if i == kept:
                headers["Connection"] = "close"
            conn.request("POST", "/openrtb2/bid", body=DEMO, headers=headers)
            answer = conn.getresponse()
            answer.read()
            assert answer.status in (200, 204)
        conn.close()
        text = urllib.request.urlopen(server.admin_url + "/metrics", timeout=30).read().decode()
        values = {name: float(v) for name, v in re.findall(r"^(tafe_answers_held_total|tafe_answer_batches_total) (\S+)$", text, re.M)}
        want = kept if batch_us != "0" else 0
        assert values == {"tafe_answers_held_total": want, "tafe_answer_batches_total": want}, text
    finally:
        assert server.stop() == 0, server.output()


# --- start-up mistakes: one line naming what is wrong, a non-zero exit, no traceback ------

MODES = {
    "serve-1": ["serve", "--workers", "1"],
    "serve-2": ["serve", "--workers", "2"],
    "up": ["up", "--workers", "2"],
}


def run_tafe(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TAFE_")}
    return subprocess.run(
        [sys.executable, "-m", "tafe", *args], capture_output=True, text=True, timeout=90, env={**full_env, **(env or {})}
    )


def assert_one_line(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def _broken_files(tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "bad.json").write_text("{not json")
    (tmp / "model.cqsm").write_bytes(b"CQSM" + b"\0" * 60)
    (tmp / "store.bin").write_bytes(os.urandom(100))
    return {
        "missing campaigns": (["--campaigns", str(tmp / "none.json")], str(tmp / "none.json")),
        "malformed campaigns": (["--campaigns", str(tmp / "bad.json")], str(tmp / "bad.json")),
        "corrupt model": (["--model", str(tmp / "model.cqsm")], str(tmp / "model.cqsm")),
        "corrupt store": (["--store", str(tmp / "store.bin")], str(tmp / "store.bin")),
        "money state not a directory": (["--state", str(tmp / "store.bin")], str(tmp / "store.bin")),
        "missing notice keys file": (["--notice-keys-file", str(tmp / "keys")], str(tmp / "keys")),
        "event log not a directory": (["--event-log", str(tmp / "store.bin")], str(tmp / "store.bin")),
        "decision log in a missing directory": (["--decision-log", str(tmp / "no" / "d.jsonl")], str(tmp / "no" / "d.jsonl")),
    }


def _needs_nginx(mode: str) -> None:
    if mode == "up":
        from tafe import nginx
        from tafe.settings import Settings

        if nginx.find_binary(Settings()) is None:
            pytest.skip("nginx not installed (.ci/run installs it)")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "case",
    ["missing campaigns", "malformed campaigns", "corrupt model", "corrupt store", "money state not a directory",
     "missing notice keys file", "event log not a directory", "decision log in a missing directory"],
)  # fmt: skip
def test_a_bad_file_is_one_line_naming_it(tmp_path, mode, case):
    _needs_nginx(mode)
    args, needle = _broken_files(tmp_path)[case]
    scratch = tmp_path / "tmp"  # the process's temporary directory: a refusal leaves nothing in it
    scratch.mkdir()
    result = run_tafe(*MODES[mode], "--port", "0", "--admin-port", "0", *args, env={"TMPDIR": str(scratch)})
    assert_one_line(result, "tafe: ", needle)
    assert not list(scratch.iterdir())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "args, env, needle",
    [
        (["--profile-sample", "5"], {}, "profile_sample must be 0..1"),
        (["--port", "70000"], {}, "port must be 0..65535, got 70000"),
        (["--max-body-bytes", "-1"], {}, "max_body_bytes must be >= 1"),
        ([], {"TAFE_WORKERS": "-1"}, "TAFE_WORKERS: workers must be >= 0"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(mode, args, env, needle):
    cmd = [a for a in MODES[mode] if not (env and a in ("--workers", "1", "2"))]  # the env gives the workers
    result = run_tafe(*cmd, "--port", "0", "--admin-port", "0", *args, env=env)
    assert_one_line(result, "tafe: ", needle)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("which", ["--port", "--admin-port"])
def test_a_taken_port_is_one_line_naming_it(mode, which):
    _needs_nginx(mode)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        other = "--admin-port" if which == "--port" else "--port"
        result = run_tafe(*MODES[mode], which, port, other, "0")
    assert_one_line(result, f"127.0.0.1:{port}", "Address already in use")


# --- log noise ------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["info", "debug"])
def test_notices_log_at_debug_and_versions_are_json_fields(level):
    server = start_tafe("--log-json", "--log-level", level)
    try:
        demo = (Path(tafe.settings.DATA_DIR) / "demo-request.json").read_bytes()
        req = urllib.request.Request(server.url + "/openrtb2/bid", data=demo, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            nurl = json.loads(resp.read())["seatbid"][0]["bid"][0]["nurl"]
        path = nurl.split("/notice/", 1)[1].replace("${AUCTION_PRICE}", "0.5").replace("${AUCTION_CURRENCY}", "USD")
        for _ in range(3):
            with urllib.request.urlopen(server.url + "/notice/" + path, timeout=10) as resp:
                assert resp.status == 204
    finally:
        assert server.stop() == 0, server.output()
    records = [json.loads(line) for line in server.lines if line.startswith("{")]
    assert len(records) == len(server.lines), server.output()  # every line is a JSON record
    listening = next(r for r in records if r["msg"].startswith("listening on "))
    assert listening["model"] == "demo-1" and "store" in listening, listening
    assert "{" not in listening["msg"], listening
    notices = [r for r in records if r["logger"] == "tafe.notice"]
    if level == "info":
        assert notices == [], notices
    else:
        assert len(notices) == 3 and {r["level"] for r in notices} == {"debug"}, notices
        assert [r["outcome"] for r in notices] == ["accepted", "duplicate", "duplicate"]
        assert notices[0]["request_id"] == json.loads(demo)["id"] and notices[0]["price"] == 0.5
