"""A worker's banker when the money state is gone: it bids from its floats only while their lease lasts."""

from __future__ import annotations

import json

import pytest
import redis

from tafe.core import campaigns as campaigns_mod
from tafe.money.banker import Banker
from tafe.money.redis_state import RedisState
from tafe.money.state import LEASE_S

from .test_money_node import CAMPAIGNS


def test_floats_stop_before_the_state_hands_them_to_other_workers(redis_server, tmp_path):
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
