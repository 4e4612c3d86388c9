"""Metrics across pre-forked workers: Prometheus multiprocess files, merged and retired.

Real worker-like processes write their values to the multiprocess directory; the
merged exposition must add them up, and stay exactly the same when a dead worker's
files are folded into the archive (totals never go back, nothing counted twice).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tafe import metrics

WRITER = """
from prometheus_client import CollectorRegistry
from tafe.metrics import Metrics
m = Metrics(CollectorRegistry())
for _ in range({n}):
    m.requests.labels("bid", "200").inc()
    m.latency.labels("bid").observe(0.004)
m.in_flight.inc()
m.model_info.labels("model", "v{n}").set(1)
print(__import__("os").getpid())
"""


def write_values(path: Path, n: int) -> int:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(path)}
    out = subprocess.run([sys.executable, "-c", WRITER.format(n=n)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def samples(text: bytes) -> dict[str, float]:
    out = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def merged(path: Path) -> dict[str, float]:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    try:
        body, content_type = metrics.exposition(None)  # type: ignore[arg-type]
    finally:
        del os.environ["PROMETHEUS_MULTIPROC_DIR"]
    assert content_type.startswith("text/plain")
    return samples(body)


def test_workers_add_up_and_retiring_them_keeps_every_total(tmp_path: Path):
    first, second = write_values(tmp_path, 3), write_values(tmp_path, 4)
    before = merged(tmp_path)
    assert before['tafe_http_requests_total{route="bid",status="200"}'] == 7
    assert before['tafe_http_request_duration_seconds_count{route="bid"}'] == 7
    assert before['tafe_http_request_duration_seconds_bucket{le="0.005",route="bid"}'] == 7

    metrics.retire_worker(str(tmp_path), first)
    metrics.retire_worker(str(tmp_path), second)
    after = merged(tmp_path)
    totals = {k: v for k, v in after.items() if "requests_total" in k or "duration_seconds" in k}
    assert totals == {k: v for k, v in before.items() if "requests_total" in k or "duration_seconds" in k}
    # Live gauges of dead workers are gone: in-flight and model versions of the living only.
    assert after.get("tafe_http_requests_in_flight", 0.0) == 0.0
    assert not any(k.startswith("tafe_cqs_active_info") for k in after)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_archive.db", "histogram_archive.db", "lock"]

    third = write_values(tmp_path, 5)
    assert merged(tmp_path)['tafe_http_requests_total{route="bid",status="200"}'] == 12
    metrics.retire_worker(str(tmp_path), third)
    assert merged(tmp_path)['tafe_http_requests_total{route="bid",status="200"}'] == 12
