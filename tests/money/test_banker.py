"""A worker's banker: floats in, reservations out; nothing bid on a float it may no longer own."""

from __future__ import annotations

import json

import pytest
import redis

from tafe.core import campaigns as campaigns_mod
from tafe.core.campaigns import from_dict
from tafe.core.types import Decision
from tafe.money.banker import FLOAT_TRUST_S, Banker
from tafe.money.embedded import EmbeddedState
from tafe.money.redis_state import RedisState
from tafe.money.state import LEASE_S

from .test_money_node import CAMPAIGNS

NOW = 1_800_000_000.0
DOC = {
    "campaigns": [
        {"id": "c1", "adomain": ["a.example"], "base_cpm": 1, "max_cpm": 2, "daily_budget": 10, "pacing": "asap",
         "creatives": [{"id": "cr", "format": "banner", "w": 1, "h": 1, "adm": "<a>"}]},
        {"id": "c2", "adomain": ["b.example"], "base_cpm": 1, "max_cpm": 2,
         "creatives": [{"id": "cr", "format": "banner", "w": 1, "h": 1, "adm": "<a>"}]},
    ]
}  # fmt: skip


class Down:
    def reserve(self, *args, **kwargs):
        raise ConnectionError("state unreachable")


def banker() -> Banker:
    return Banker(from_dict(DOC).campaigns, worker="w", period_s=86400, reservation_ttl_s=60)


def test_only_budgeted_campaigns_have_floats_and_reservations_come_off_them(tmp_path):
    b = banker()
    b.sync(EmbeddedState(str(tmp_path)), NOW)
    floats = b.floats_at(NOW)
    assert set(floats) == {"c1"} and floats["c1"] > 0
    before = floats["c1"]
    b.apply(Decision("r", reservations=(("c1", "bid-1", 1500),)), NOW)
    assert b.floats_at(NOW)["c1"] == before - 1500


def test_a_failed_sync_keeps_the_queue_and_a_float_goes_stale(tmp_path):
    b = banker()
    b.sync(EmbeddedState(str(tmp_path)), NOW)
    b.apply(Decision("r", reservations=(("c1", "bid-1", 1500),)), NOW)
    with pytest.raises(ConnectionError):
        b.sync(Down(), NOW + 1)
    assert b.floats_at(NOW + 1)["c1"] > 0  # still ours: the lease holds
    assert b.floats_at(NOW + FLOAT_TRUST_S + 0.5) == {"c1": 0} and b.short  # the lease may be gone: bid on nothing
    state = EmbeddedState(str(tmp_path / "again"))
    b.sync(state, NOW + 6)  # the queued reservation is reported at the next good sync
    assert state.accounts(int(NOW // 86400))["c1"].reserved == 1500


def test_a_new_period_starts_with_no_float(tmp_path):
    b = banker()
    b.sync(EmbeddedState(str(tmp_path)), NOW)
    assert b.floats_at(NOW)["c1"] > 0
    assert b.floats_at((NOW // 86400 + 1) * 86400) == {"c1": 0} and b.short



def test_on_redis_a_float_stops_before_the_state_hands_it_to_another_worker(redis_server, tmp_path):
    path = tmp_path / "campaigns.json"
    path.write_text(json.dumps(CAMPAIGNS))
    camps = campaigns_mod.load(str(path)).campaigns
    state = RedisState(redis_server.url)
    cut_off = Banker(camps, worker="cut-off", period_s=100_000_000, reservation_ttl_s=60)
    t0 = 1_800_000_000.0
    cut_off.sync(state, t0)
    assert cut_off.floats_at(t0)["c-asap"] > 0
    redis_server.stop()
    with pytest.raises(redis.ConnectionError):
        cut_off.sync(state, t0 + 1)
    assert cut_off.floats_at(t0 + 1)["c-asap"] > 0  # a short outage: it bids from what it holds
    redis_server.start()
    # Another worker, which reaches the state, finds the cut-off worker's float back in the budget once its
    # lease is over (the state floats only its own now)...
    other = Banker(camps, worker="other", period_s=100_000_000, reservation_ttl_s=60)
    other.sync(state, t0 + LEASE_S + 0.5)
    assert other.accounts["c-asap"].floated == other.floats_at(t0 + LEASE_S + 0.5)["c-asap"] > 0
    # ...by which time the cut-off worker has stopped bidding from it: no budget is floated twice.
    assert cut_off.floats_at(t0 + LEASE_S + 0.5) == {cid: 0 for cid in cut_off.budgeted}
    assert cut_off.short  # and its money loop keeps trying to sync
