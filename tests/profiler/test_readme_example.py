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


def test_readme_example_finds_the_unpatched_sleep(tmp_path: Path) -> None:
    port = free_port()
    code = readme_example()
    assert '("127.0.0.1", 8000)' in code
    (tmp_path / "example.py").write_text(code.replace('("127.0.0.1", 8000)', f'("127.0.0.1", {port})'))
    culprit = next(n for n, line in enumerate(code.splitlines(), 1) if 'get_original("time", "sleep")(0.03)' in line)
    proc = subprocess.Popen([sys.executable, "example.py"], cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                assert get(url + "/") == b"hello\n"
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else ""
                time.sleep(0.1)
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
        proc.terminate()
        proc.wait(10)
        proc.stdout.close()
