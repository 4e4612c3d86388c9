"""The README's profiler example runs as written, on a real port, and finds its culprit."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Profiler"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read()


def start(cmd: list[str], cwd: Path, url: str) -> subprocess.Popen:
    """A server process, once it answers ``url``/."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while True:
        try:
            assert get(url + "/") == b"hello\n"
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                raise AssertionError(proc.stdout.read()) from None
            time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(20)
    proc.stdout.close()


def test_readme_example_finds_the_unpatched_sleep(tmp_path: Path) -> None:
    port = free_port()
    code = readme_example()
    assert '("127.0.0.1", 8000)' in code
    (tmp_path / "example.py").write_text(code.replace('("127.0.0.1", 8000)', f'("127.0.0.1", {port})'))
    culprit = next(n for n, line in enumerate(code.splitlines(), 1) if 'get_original("time", "sleep")(0.03)' in line)
    url = f"http://127.0.0.1:{port}"
    proc = start([sys.executable, "example.py"], tmp_path, url)
    try:
        for _ in range(3):
            assert get(url + "/slow") == b"hello\n"
        report = json.loads(get(url + "/debug/blocking"))
        slow = [site for site in report["top"] if "GET /slow" in site["routes"]]
        assert len(slow) == 1, report["top"]
        assert slow[0]["site"] == f"example.py:{culprit} app" and slow[0]["routes"] == {"GET /slow": 3}, slow
        text = get(url + "/debug/blocking?format=text").decode()
        assert f"example.py:{culprit} app" in text and "stack (while blocked)" in text
        folded = get(url + "/debug/blocking/collapsed").decode()
        assert f"app_(example.py:{culprit})" in folded
    finally:
        stop(proc)


@pytest.mark.parametrize("preload", [False, True], ids=["per-worker", "preload"])
def test_readme_gunicorn_recipe_finds_the_unpatched_sleep(tmp_path: Path, preload: bool) -> None:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("Under `gunicorn -k gevent`"):]
    recipe = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "'myapp:make_app()'" in recipe
    (tmp_path / "myapp.py").write_text(recipe)  # as written: complete, nothing added
    culprit = next(n for n, line in enumerate(recipe.splitlines(), 1) if "(0.03)" in line)
    port = free_port()
    cmd = [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1", "-b", f"127.0.0.1:{port}", "myapp:make_app()"]
    url = f"http://127.0.0.1:{port}"
    proc = start(cmd + (["--preload"] if preload else []), tmp_path, url)
    try:
        for _ in range(3):
            assert get(url + "/slow") == b"hello\n"
        report = json.loads(get(url + "/debug/blocking"))
        slow = [site for site in report["top"] if "GET /slow" in site["routes"]]
        assert [(s["site"], s["routes"]) for s in slow] == [(f"myapp.py:{culprit} app", {"GET /slow": 3})], report["top"]
    finally:
        stop(proc)
