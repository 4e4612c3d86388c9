"""The event sink: one JSON line per decision, win, bill, loss, impression and click."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry

from tafe.events import RotatingFiles
from tafe.handlers import build
from tafe.settings import DATA_DIR, Settings


def _call(app, method: str, path: str, body: bytes = b"", query: str = "") -> tuple[str, bytes]:
    seen = {}
    env = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query, "wsgi.input": io.BytesIO(body),
           "CONTENT_LENGTH": str(len(body)), "HTTP_HOST": "bid.test"}  # fmt: skip
    out = b"".join(app(env, lambda status, headers, exc_info=None: seen.update(status=status)))
    return seen["status"], out


def test_a_bids_whole_story_lands_in_the_event_files(tmp_path):
    apps = build(Settings(event_log=str(tmp_path / "events"), decision_log_sample=1.0), registry=CollectorRegistry())
    status, body = _call(apps.public, "POST", "/openrtb2/bid", (DATA_DIR / "demo-request.json").read_bytes())
    assert status.startswith("200")
    bid = json.loads(body)["seatbid"][0]["bid"][0]
    fill = {"${AUCTION_PRICE}": "0.5", "${AUCTION_CURRENCY}": "USD", "${AUCTION_LOSS}": "102", "${AUCTION_MIN_TO_WIN}": "0.7"}
    pixel = re.search(r'(http://bid\.test/track/imp\?t=[^"]+)', bid["adm"]).group(1)
    urls = [bid["nurl"], bid["burl"], bid["burl"], pixel]
    for url in urls:
        for macro, value in fill.items():
            url = url.replace(macro, value)
        path, _, query = url.removeprefix("http://bid.test").partition("?")
        assert _call(apps.public, "GET", path, query=query)[0][:3] in ("204", "200")
    apps.money.events.flush()
    events = [json.loads(line) for f in sorted((tmp_path / "events").iterdir()) for line in f.read_text().splitlines()]
    kinds = [(e["event"], e.get("outcome")) for e in events]
    assert kinds == [("decision", None), ("win", "accepted"), ("bill", "accepted"), ("bill", "duplicate"), ("imp", "accepted")]
    decision, win = events[0], events[1]
    assert decision["bid_id"] == win["bid_id"] == bid["id"] and decision["features"] and win["price"] == 0.5
    assert win["campaign"] == bid["cid"] and win["bid_price"] == bid["price"]


def test_files_rotate_by_period_and_a_stuck_disk_drops_with_a_count(tmp_path):
    sink = RotatingFiles(str(tmp_path), rotate_s=3600, max_buffered=100)
    sink.emit({"n": 1})
    sink.write(sink.take(), now=3600 * 10)
    sink.emit({"n": 2})
    sink.write(sink.take(), now=3600 * 11 + 5)
    files = sorted(Path(tmp_path).iterdir())
    assert len(files) == 2 and [f.read_text() for f in files] == ['{"n":1}\n', '{"n":2}\n']
    for i in range(20):  # nothing taken: the buffer fills, then drops and counts
        sink.emit({"i": i})
    assert sink.dropped > 0 and len(sink.take()) <= 100
    sink.close()
