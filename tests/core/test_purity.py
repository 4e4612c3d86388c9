"""The core stays pure: importing it pulls in neither gevent nor prometheus."""

import subprocess
import sys


def test_core_imports_neither_gevent_nor_prometheus():
    code = (
        "import sys, tafe.core, tafe.core.types\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('gevent', 'prometheus_client', 'greenlet'))\n"
        "print(bad)\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
