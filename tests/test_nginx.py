"""The shipped Nginx config and ``tafe nginx render|run``.

Rendering is checked as text (the choices issue 5 asks for, derived from the
settings); the rendered config is then checked by a real ``nginx -t`` and served by a
real Nginx in front of a small echo upstream that shows what reaches TAFE.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from test_master import ROOT, Proc, alive, children, request
from test_up import free_port

from tafe import nginx
from tafe.settings import Settings

needs_nginx = pytest.mark.skipif(nginx.find_binary(Settings()) is None, reason="nginx not installed (.ci/run installs it)")


def ms(text: str, directive: str) -> int:
    m = re.search(rf"^\s*{directive}\s+(\d+)ms;", text, re.M)
    assert m, directive
    return int(m.group(1))


def test_render_derives_every_limit_from_the_settings(tmp_path: Path):
    s = Settings(port=9000, max_body_bytes=123456, max_tmax_ms=300, keepalive_timeout_s=30.0, drain_grace_s=4.0)
    text = nginx.render(s, upstream="127.0.0.1:7000", prefix=tmp_path)
    assert "{{" not in text and "}}" not in text
    assert re.search(r"^\s*listen 127\.0\.0\.1:9000\b", text, re.M)
    assert re.search(r"server 127\.0\.0\.1:7000 max_fails=0;", text)
    assert re.search(r"^\s*keepalive \d+;", text, re.M)
    assert re.search(r"^\s*proxy_http_version 1\.1;", text, re.M)
    assert re.search(r'^\s*proxy_set_header Connection "";', text, re.M)
    # A made-up request id only when there is an access log to carry it (random bytes per request).
    assert not re.search(r"^\s*proxy_set_header X-Request-Id", text, re.M)
    logged = nginx.render(Settings(port=9000, access_log=True), upstream="127.0.0.1:7000", prefix=tmp_path)
    assert re.search(r"^\s*proxy_set_header X-Request-Id \$tafe_request_id;", logged, re.M)
    assert re.search(r"^\s*client_max_body_size\s+123456;", text, re.M)
    assert re.search(r"^\s*client_header_buffer_size\s+16384;", text, re.M)  # a bid's head and body in one read
    # The 502 race: Nginx closes idle upstream connections before TAFE would, and
    # before a draining worker's grace ends.
    upstream_idle = re.search(r"upstream tafe_workers \{.*?keepalive_timeout (\d+)ms;", text, re.S)
    assert upstream_idle and int(upstream_idle.group(1)) < min(30_000, 4_000)
    assert ms(text, "proxy_read_timeout") > 300 and ms(text, "proxy_connect_timeout") == 300
    # Retries only on connection errors, never a POST that reached a worker.
    assert re.findall(r"^\s*proxy_next_upstream\s+([^;]*);", text, re.M) == ["error"]
    assert "non_idempotent" not in re.sub(r"#.*", "", text)
    assert re.search(r"location = /metrics \{ return 404; \}", text)
    assert re.search(r"location \^~ /debug/ \{ return 404; \}", text)
    assert str(tmp_path / "tmp" / "client_body") in text
    # A drain (the flag file) closes every connection after its answer, with no reload.
    assert f"if (-f {tmp_path}/draining)" in text
    draining = re.search(r"location \^~ /_draining/ \{(.*?)\n        \}", text, re.S)
    assert draining and re.search(r"^\s*keepalive_timeout 0;", draining.group(1), re.M)


def test_the_template_is_package_data_and_the_shipped_file():
    # In the package (so a wheel carries it), and the very file nginx/ holds.
    package = Path(nginx.__file__).resolve().parent
    assert nginx.TEMPLATE.parent.parent == package and nginx.TEMPLATE.is_file()
    assert nginx.TEMPLATE.resolve() == (ROOT / "nginx" / "tafe.conf.template").resolve()


def test_every_directive_is_explained():
    """Every paragraph of directives in the template carries a comment saying why."""
    paragraphs = re.split(r"\n\s*\n", nginx.TEMPLATE.read_text())
    unexplained = []
    for para in paragraphs:
        lines = [line.strip() for line in para.splitlines() if line.strip()]
        directives = [line for line in lines if not line.startswith("#") and line not in ("}", "{")]
        if directives and not any(line.startswith("#") for line in lines):
            unexplained.append(para)
    assert not unexplained, unexplained


def test_render_refuses_unknown_placeholders(tmp_path: Path):
    template = tmp_path / "t.conf"
    template.write_text("listen {{ listen }}; foo {{ nope }};\n")
    with pytest.raises(nginx.NginxError, match="nope"):
        nginx.render(Settings(), upstream="127.0.0.1:1", prefix=tmp_path, template=template)


def test_render_command_needs_a_run_dir_and_says_so_in_one_line():
    out = subprocess.run([sys.executable, "-m", "tafe", "nginx", "render"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "--run-dir" in out.stderr, out.stderr


def test_render_command_prints_a_config_nginx_can_use_as_is(tmp_path: Path):
    """The config names paths under --run-dir, which exist after the command (they used
    to be in a temporary directory removed before the command returned)."""
    out = subprocess.run(
        [sys.executable, "-m", "tafe", "nginx", "render", "--port", "8123", "--upstream", "127.0.0.1:8999",
         "--run-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "listen 127.0.0.1:8123" in out.stdout and "server 127.0.0.1:8999" in out.stdout
    prefix = tmp_path / "nginx"
    assert f"pid {prefix}/nginx.pid;" in out.stdout
    assert (prefix / "tmp").is_dir()
    binary = nginx.find_binary(Settings())
    if binary is not None:  # what the README says to run, checked by Nginx itself
        (prefix / "nginx.conf").write_text(out.stdout)
        check = subprocess.run([binary, "-t", "-p", str(prefix), "-c", "nginx.conf", "-e", "stderr"],
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stderr


@pytest.mark.nginx
@needs_nginx
@pytest.mark.parametrize("log_json", [False, True])
@pytest.mark.parametrize("access_log", [False, True])
def test_nginx_accepts_the_rendered_config(tmp_path: Path, log_json: bool, access_log: bool):
    s = Settings(port=free_port(), log_json=log_json, access_log=access_log)
    ngx = nginx.Nginx(nginx.find_binary(s), tmp_path)
    ngx.write(nginx.render(s, upstream="127.0.0.1:9", prefix=tmp_path))  # runs nginx -t
    assert (tmp_path / "nginx.conf").exists()
    with pytest.raises(nginx.NginxError, match="refused"):
        ngx.write("http { nonsense; }")
    assert "nonsense" not in (tmp_path / "nginx.conf").read_text()  # the good one stays


@pytest.mark.nginx
@needs_nginx
def test_reload_and_quit_before_start_signal_nothing(tmp_path: Path):
    s = Settings(port=free_port())
    ngx = nginx.Nginx(nginx.find_binary(s), tmp_path)
    assert ngx.running() is None
    assert ngx.reload(nginx.render(s, upstream="127.0.0.1:9", prefix=tmp_path)) is True  # written, no process to signal
    ngx.quit()
    assert ngx.stop() == 0


class Echo(http.server.BaseHTTPRequestHandler):
    """Stands in for TAFE: answers what it received (path, request id, body length)."""

    protocol_version = "HTTP/1.1"

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        out = json.dumps(
            {"path": self.path, "request_id": self.headers.get("X-Request-Id"), "len": len(body),
             "connection": self.headers.get("Connection")}
        ).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_GET = do_POST = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def echo():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.nginx
@needs_nginx
def test_nginx_run_proxies_reloads_and_stops(tmp_path: Path, echo: str):
    port = free_port()
    config = tmp_path / "tafe.toml"
    config.write_text("max_body_bytes = 1000\n")
    proc = Proc("nginx", "run", "--port", str(port), "--upstream", echo, "--run-dir", str(tmp_path), "--config", str(config))
    try:
        proc.wait_for(r"nginx listening on http://127\.0\.0\.1:\d+", timeout=30)
        url = f"http://127.0.0.1:{port}"
        nginx_pid = int((tmp_path / "nginx" / "nginx.pid").read_text())
        status, _, body = request(url, "POST", "/openrtb2/bid", b"x" * 500)
        seen = json.loads(body)
        assert status == 200 and seen["len"] == 500 and seen["connection"] is None
        assert seen["request_id"] is None  # access log off: no id made up, ...
        assert json.loads(request(url, path="/ping", headers={"X-Request-Id": "abc"})[2])["request_id"] == "abc"  # ... the exchange's passes
        assert request(url, "POST", "/openrtb2/bid", b"x" * 2000)[0] == 413  # client_max_body_size
        assert request(url, path="/metrics")[0] == 404
        assert request(url, path="/debug/blocking")[0] == 404
        # SIGHUP with the same settings: nothing to reload.
        mark = len(proc.lines)
        proc.proc.send_signal(signal.SIGHUP)
        proc.wait_for("config unchanged", start=mark)
        assert request(url)[0] == 200
        # SIGHUP after an edit: re-rendered and reloaded, the new limit applies.
        config.write_text("max_body_bytes = 400\n")
        mark = len(proc.lines)
        proc.proc.send_signal(signal.SIGHUP)
        proc.wait_for("nginx reloading its config", start=mark)
        deadline = time.monotonic() + 10
        while request(url, "POST", "/openrtb2/bid", b"x" * 500)[0] != 413:
            assert time.monotonic() < deadline, "the reloaded limit never applied"
            time.sleep(0.1)
        tree = {nginx_pid} | children(nginx_pid)
        assert len(tree) >= 2
        # The workers forked by the reload are batch tasks too (tafe.nginx.Nginx.start).
        assert {os.sched_getscheduler(p) for p in tree} == {os.SCHED_BATCH}
        assert proc.stop(signal.SIGTERM) == 0
        assert not [p for p in tree if alive(p)]
    finally:
        proc.stop(signal.SIGKILL)



@pytest.mark.nginx
@needs_nginx
def test_nginx_start_fails_when_another_process_holds_the_port(tmp_path: Path):
    # The port taken between tafe up's check and Nginx's bind: connecting succeeds (the
    # other process listens), but Nginx is not the one listening, so start-up fails.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        assert nginx.holds_listener(os.getpid(), port) and not nginx.holds_listener(os.getppid(), port)
        s = Settings(port=port)
        ngx = nginx.Nginx(nginx.find_binary(s), tmp_path)
        try:
            with pytest.raises(nginx.NginxError, match=rf"127\.0\.0\.1:{port}"):
                ngx.start(nginx.render(s, upstream="127.0.0.1:9", prefix=tmp_path), wait_for=("127.0.0.1", port))
        finally:
            ngx.stop()


@pytest.mark.nginx
@needs_nginx
@pytest.mark.parametrize("batch", [True, False])
def test_nginx_batch_setting_chooses_the_scheduling_policy_of_master_and_workers(tmp_path: Path, batch: bool):
    s = Settings(port=free_port(), nginx_batch=batch)
    ngx = nginx.Nginx(nginx.find_binary(s), tmp_path, batch=s.nginx_batch)
    try:
        proc = ngx.start(nginx.render(s, upstream="127.0.0.1:9", prefix=tmp_path), wait_for=("127.0.0.1", s.port))
        deadline = time.monotonic() + 10
        while len(tree := {proc.pid} | children(proc.pid)) < 2:  # the master forks its workers after listening
            assert time.monotonic() < deadline, "nginx started no worker"
            time.sleep(0.05)
        assert {os.sched_getscheduler(p) for p in tree} == {os.SCHED_BATCH if batch else os.SCHED_OTHER}
    finally:
        ngx.stop()
