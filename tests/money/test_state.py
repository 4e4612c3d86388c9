"""The accounting rules on both money states (embedded: a real LMDB environment; Redis: a real redis-server), and pacing."""

from __future__ import annotations

import multiprocessing

import pytest

from tafe.money import pacing
from tafe.money.embedded import EmbeddedState
from tafe.money.redis_state import RedisState
from tafe.money.state import LEASE_S, BidRef, Reservation, State, Want

from .redis_server import RedisServer

NOW = 1_800_000_000.0
PERIOD = 0
END = int(NOW) + 3600
BUDGET = 1_000_000  # nanos


def _open(spec: str) -> State:
    return RedisState(spec) if spec.startswith("redis://") else EmbeddedState(spec)


@pytest.fixture(params=["embedded", "redis"])
def spec(request, tmp_path) -> str:
    """Where a state lives: an LMDB directory, or the URL of a real redis-server."""
    if request.param == "embedded":
        return str(tmp_path / "state")
    server = RedisServer(tmp_path / "redis")
    request.addfinalizer(server.stop)
    return server.url


def want(n: int, pacing_: str = "asap", campaign: str = "c1") -> Want:
    return Want(campaign=campaign, period=PERIOD, period_end=END, budget=BUDGET, pacing=pacing_, want=n)


def ref(bid: str, nanos: int = 1000, campaign: str = "c1", user: str = "u1", until: int = int(NOW) + 60) -> BidRef:
    return BidRef(
        bid_id=bid, campaign=campaign, period=PERIOD, nanos=nanos, user=user, expires=int(NOW) + 3600, reserved_until=until
    )


def test_floats_never_exceed_the_budget_across_workers(spec):
    s = _open(spec)
    a = s.reserve("w1", [], [want(700_000)], NOW)["c1"]
    b = s.reserve("w2", [], [want(700_000)], NOW)["c1"]
    assert (a.nanos, b.nanos) == (700_000, 300_000)
    assert b.account.left == 0 and b.account.floated == BUDGET


def test_used_float_becomes_reservations_and_bill_commits_once(spec):
    s = _open(spec)
    s.reserve("w1", [], [want(5000)], NOW)
    used = [Reservation("b1", "c1", PERIOD, 2000, int(NOW) + 60), Reservation("b2", "c1", PERIOD, 2000, int(NOW) + 60)]
    acct = s.reserve("w1", used, [want(5000)], NOW + 1)["c1"].account
    assert (acct.reserved, acct.floated, acct.spent) == (4000, 5000, 0)
    assert s.commit(ref("b1", 2000), 1500, NOW + 2)
    assert not s.commit(ref("b1", 2000), 1500, NOW + 3)  # a retry, from any worker
    assert s.release("loss", ref("b2", 2000), 0, NOW + 2)
    acct = s.accounts(PERIOD)["c1"]
    assert (acct.spent, acct.reserved) == (1500, 0)


def test_a_bill_before_its_reservation_is_reported_is_not_reserved_again(spec):
    s = _open(spec)
    s.reserve("w1", [], [want(5000)], NOW)
    assert s.commit(ref("b1", 2000), 1200, NOW)  # the bill beat the worker's next sync
    acct = s.reserve("w1", [Reservation("b1", "c1", PERIOD, 2000, int(NOW) + 60)], [want(5000)], NOW + 1)["c1"].account
    assert (acct.spent, acct.reserved) == (1200, 0)


def test_win_lowers_the_reservation_and_expiry_releases_it(spec):
    s = _open(spec)
    s.reserve("w1", [], [want(5000)], NOW)
    s.reserve("w1", [Reservation("b1", "c1", PERIOD, 3000, int(NOW) + 10)], [want(5000)], NOW)
    assert s.release("win", ref("b1", 3000, until=int(NOW) + 10), 1000, NOW)
    assert s.accounts(PERIOD)["c1"].reserved == 1000
    s.reserve("w1", [], [want(5000)], NOW + 11)  # past the reservation's expiry: swept
    assert s.accounts(PERIOD)["c1"].reserved == 0


def test_a_silent_workers_float_comes_back(spec):
    s = _open(spec)
    s.reserve("dead", [], [want(BUDGET)], NOW)
    assert s.reserve("alive", [], [want(BUDGET)], NOW + 1)["c1"].nanos == 0
    assert s.reserve("alive", [], [want(BUDGET)], NOW + LEASE_S + 2)["c1"].nanos == BUDGET


def test_frequency_counts_once_per_bid_and_keeps_the_cap(spec):
    s = _open(spec)
    for i in range(5):
        assert s.count_impression(ref(f"b{i}"), 3, NOW + i)
        assert not s.count_impression(ref(f"b{i}"), 3, NOW + i)  # the same impression again
    assert s.frequency("u1") == {"c1": [int(NOW) + 2, int(NOW) + 3, int(NOW) + 4]}
    assert s.first_seen("click", ref("b0")) and not s.first_seen("click", ref("b0"))


def _hammer(spec: str, worker: str, n: int) -> None:
    s = _open(spec)
    for i in range(n):
        s.commit(ref(f"bid-{i}"), 10, NOW)  # every process bills the same n bids
        s.reserve(worker, [], [want(1000)], NOW)


def test_processes_racing_on_the_same_bills_count_each_once(spec):
    procs = [multiprocessing.get_context("spawn").Process(target=_hammer, args=(spec, f"w{i}", 300)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    acct = _open(spec).accounts(PERIOD)["c1"]
    assert acct.spent == 300 * 10 and acct.floated <= BUDGET - acct.spent


def test_even_pacing_grants_the_rate_and_asap_everything():
    granted, bucket, rate = pacing.grant(pacing="even", want=10**9, left=3600_000, now=NOW, period_end=END, bucket=0, bucket_ts=0)
    assert rate == 1000 and granted == 2 * rate and bucket == 0  # two seconds of the rate at most
    granted, _, _ = pacing.grant(pacing="even", want=10**9, left=3600_000, now=NOW, period_end=END, bucket=0, bucket_ts=NOW - 0.5)
    assert granted == 500
    assert pacing.grant(pacing="asap", want=10**9, left=3600_000, now=NOW, period_end=END, bucket=0, bucket_ts=0)[0] == 3600_000


def _count_one(spec: str, bid: str) -> None:
    _open(spec).count_impression(ref(bid, user="u9"), 5, NOW)


def test_an_impression_counted_by_another_process_is_seen_at_once(spec):
    s = _open(spec)
    assert s.frequency("u9") == {}  # the bid path now holds a read snapshot
    ctx = multiprocessing.get_context("spawn")
    for i, want_seen in enumerate(([int(NOW)], [int(NOW)] * 2)):
        p = ctx.Process(target=_count_one, args=(spec, f"b{i}"))
        p.start()
        p.join(60)
        assert s.frequency("u9") == {"c1": want_seen}


@pytest.mark.parametrize(
    "notices",
    [
        [("win", 1000), ("bill", 1000)],
        [("bill", 1200)],
        [("loss", 0)],
        [("win", 800), ("loss", 0)],
        [("loss", 0), ("win", 800)],
        [("loss", 0), ("bill", 900)],  # an exchange that bills a bid it said was lost: spend counts, no double release
        [("win", 700), ("bill", 700), ("bill", 700), ("loss", 0)],
    ],
)
@pytest.mark.parametrize("before_report", [False, True])
def test_any_order_of_notices_leaves_nothing_reserved_and_spends_each_bill_once(spec, notices, before_report):
    s = _open(spec)
    s.reserve("w1", [], [want(10_000)], NOW)
    used = [Reservation("b1", "c1", PERIOD, 2000, int(NOW) + 60)]
    if not before_report:
        s.reserve("w1", used, [want(10_000)], NOW + 1)
    for kind, price in notices:
        if kind == "bill":
            s.commit(ref("b1", 2000), price, NOW + 2)
        else:
            s.release(kind, ref("b1", 2000), price, NOW + 2)
    if before_report:  # the worker reports the bid after its notices came (they were faster than its sync)
        s.reserve("w1", used, [want(10_000)], NOW + 3)
    acct = s.reserve("w1", [], [want(0)], NOW + 4)["c1"].account
    billed = next((p for k, p in notices if k == "bill"), 0)
    assert (acct.spent, acct.reserved, acct.floated) == (billed, 0, 0)


def test_reservations_time_out_by_the_second_and_late_notices_spend_without_releasing(spec):
    s = _open(spec)
    s.reserve("w1", [], [want(10_000)], NOW)
    used = [Reservation(f"b{i}", "c1", PERIOD, 1000, int(NOW) + 10 + i % 2) for i in range(4)]
    assert s.reserve("w1", used, [want(10_000)], NOW)["c1"].account.reserved == 4000
    assert s.reserve("w1", [], [want(10_000)], NOW + 11)["c1"].account.reserved == 2000  # the first second's two
    s.commit(ref("b0", 1000, until=int(NOW) + 10), 600, NOW + 12.5)  # billed after its reservation timed out
    acct = s.reserve("w1", [], [want(10_000)], NOW + 12.5)["c1"].account
    assert (acct.spent, acct.reserved) == (600, 0)


def test_both_states_end_with_the_same_money(tmp_path):
    """A random run of reserves, bills, wins, losses and expiries, with even and asap pacing, on both states.

    Each notice gets the same answer (first or retry) from both; once every bid is reported
    and timed out, both hold the same spend and nothing reserved. In between they may differ:
    the embedded state takes a notice off its bid's second as it comes (before the bid is
    reported, too), the Redis one when the bid is reported."""
    import random

    server = RedisServer(tmp_path / "redis")
    try:
        states = [EmbeddedState(str(tmp_path / "state")), RedisState(server.url)]
        rng = random.Random(7)
        queued: dict[str, list[Reservation]] = {"w1": [], "w2": []}
        bids: list[Reservation] = []
        now = NOW
        for step in range(400):
            now += rng.random() * 2
            worker = rng.choice(("w1", "w2"))
            op = rng.random()
            if op < 0.3:
                r = Reservation(f"b{step}", rng.choice(("c1", "c2")), PERIOD, rng.randint(1000, 5000), int(now) + rng.randint(5, 60))
                queued[worker].append(r)
                bids.append(r)
            elif op < 0.6:
                wants = [want(rng.randint(0, 20_000)), want(rng.randint(0, 20_000), "even", "c2")]
                for s in states:
                    s.reserve(worker, queued[worker], wants, now)
                queued[worker] = []
            elif bids:
                r = rng.choice(bids)
                b = ref(r.bid_id, r.nanos, r.campaign, until=r.expires)
                kind, price = rng.choice(("bill", "win", "loss")), rng.randint(1, r.nanos)
                if kind == "bill":
                    out = [s.commit(b, price, now) for s in states]
                else:
                    out = [s.release(kind, b, price if kind == "win" else 0, now) for s in states]
                assert out[0] == out[1], step
        end = now + 120  # every reservation timed out, every lease expired
        for s in states:
            for worker in ("w1", "w2"):
                s.reserve(worker, queued[worker], [want(0), want(0, "even", "c2")], now)
            s.reserve("w1", [], [want(0), want(0, "even", "c2")], end)
        accounts = [s.accounts(PERIOD) for s in states]
        for cid in ("c1", "c2"):
            a, b = accounts[0][cid], accounts[1][cid]
            assert (a.spent, a.reserved, a.floated) == (b.spent, b.reserved, b.floated) == (a.spent, 0, 0), cid
        assert accounts[0]["c1"].spent > 0
    finally:
        server.stop()


def test_redis_reserve_reported_twice_reserves_once(redis_server):
    """A reply lost on the way back: the banker reports the same reservations again (or redis-py retries)."""
    s = RedisState(redis_server.url)
    s.reserve("w1", [], [want(5000)], NOW)
    used = [Reservation("b1", "c1", PERIOD, 2000, int(NOW) + 60)]
    s.reserve("w1", used, [want(5000)], NOW + 1)
    acct = s.reserve("w1", used, [want(5000)], NOW + 2)["c1"].account
    assert (acct.reserved, acct.floated) == (2000, 5000)
    assert s.commit(ref("b1", 2000), 1500, NOW + 3)
    assert s.accounts(PERIOD)["c1"].reserved == 0


def test_a_process_without_a_state_directory_leaves_none_behind_even_killed(tmp_path):
    """Its state lives in files unlinked once open: served as before, gone with the process,
    however it ends (benchmarked servers and test apps are often killed, not closed)."""
    import subprocess
    import sys

    code = (
        "import os, sys, tempfile\n"
        f"tempfile.tempdir = {str(tmp_path)!r}\n"
        "from tafe.money import open_state\n"
        "from tafe.settings import Settings\n"
        "state = open_state(Settings())\n"
        "assert os.listdir(tempfile.tempdir) == [], os.listdir(tempfile.tempdir)\n"
        "from tafe.money.state import BidRef\n"
        "for bid in ('b1', 'b2'):\n"
        "    state.count_impression(BidRef(bid, 'c1', 1, 1000, 'u1', 2000), 5, 1000.0)\n"
        "print(len(state.frequency('u1')['c1']), flush=True)\n"
        "os._exit(0)  # no close, no finalizers: as a SIGKILL\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "2"
    assert list(tmp_path.iterdir()) == []
