"""The bid path on the Redis state: one round trip per bid request at most, none when no campaign fits."""

from __future__ import annotations

import json

import redis
from prometheus_client import CollectorRegistry
from test_handlers import call

from tafe.core import campaigns as campaigns_mod
from tafe.cqs import open_snapshot
from tafe.cqs.swap import Holder
from tafe.handlers import make_public_app
from tafe.lifecycle import Lifecycle
from tafe.metrics import Metrics
from tafe.settings import Settings

from .test_money_node import CAMPAIGNS, KEYS


def _calls(client: redis.Redis) -> int:
    """Commands Redis has run on data: INFO and a new connection's handshake (HELLO, CLIENT SETINFO) aside."""
    stats = client.info("commandstats")
    return sum(v["calls"] for k, v in stats.items() if not k.startswith(("cmdstat_info", "cmdstat_hello", "cmdstat_client")))


def _request(w: int, h: int) -> bytes:
    return json.dumps({
        "id": "r1", "imp": [{"id": "1", "banner": {"w": w, "h": h}}], "site": {"domain": "news.example"},
        "user": {"id": "u1"}, "device": {"ip": "192.0.2.1"},
    }).encode()  # fmt: skip


def test_a_request_no_campaign_fits_reads_nothing_and_a_capped_fit_reads_once(redis_server, tmp_path):
    path = tmp_path / "campaigns.json"
    path.write_text(json.dumps(CAMPAIGNS))
    settings = Settings().with_overrides(
        campaigns=str(path), state=redis_server.url, notice_keys=KEYS, notice_base_url="https://bid.test"
    )
    camps = campaigns_mod.load(settings.campaigns)
    app = make_public_app(
        settings, lifecycle=Lifecycle(), metrics=Metrics(CollectorRegistry()), holder=Holder(open_snapshot(settings.model)),
        campaigns=camps,
    )  # fmt: skip
    client = redis.Redis.from_url(redis_server.url)
    before = _calls(client)
    for _ in range(5):
        assert call(app, body=_request(999, 999))[0] == 204  # no campaign has that size
    assert _calls(client) == before
    assert call(app, body=_request(320, 50))[0] == 200  # c-capped fits: its user's counts are read, once
    assert _calls(client) == before + 1
    assert call(app, body=_request(160, 600))[0] == 200  # c-bill: budgeted, no cap: its float is local
    assert _calls(client) == before + 1
