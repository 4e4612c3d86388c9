"""Hot swap in one process: real greenlets score while new files are swapped in."""

from __future__ import annotations

import json
import logging
import os
import tempfile

import gevent
import pytest

from tafe.core.types import BidRequest, Imp
from tafe.cqs import Snapshot, open_snapshot
from tafe.cqs import model as model_mod
from tafe.cqs.state import UserState
from tafe.cqs.store import key_hash, write_store
from tafe.cqs.swap import Holder, Watcher
from tafe.logs import JsonFormatter, TextFormatter
from tafe.settings import Settings

AS_OF = 1_750_000_000.0
REQUEST = BidRequest(id="r", imps=(Imp(id="1", banner_sizes=((300, 250),), has_banner=True),), user_keys=("buyer-1", "ifa-1"))


def make_store(path: str, version: str, views: int) -> str:
    """A store where user "buyer-1" has ``views`` views today (the test's version marker)."""
    np = pytest.importorskip("numpy")
    names = ["buyer-1"] + [f"other-{i}" for i in range(2000)]
    hashes = np.array([key_hash(k) for k in names], dtype=np.uint64)
    records = np.zeros((len(names), len(UserState._fields)), dtype=np.uint16)
    records[0, UserState._fields.index("views_1d")] = views
    order = np.argsort(hashes)
    write_store(hashes[order], records[order], path, as_of=AS_OF, version=version)
    return path


def make_model(path: str, version: str) -> str:
    model_mod.constant(version, {"visit": 0.0}).save(path)
    return path


def drop(directory, name: str, data: bytes) -> str:
    """Write under a hidden name, then rename into place, as producers must."""
    tmp = os.path.join(directory, "." + name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    final = os.path.join(directory, name)
    os.replace(tmp, final)
    return final


@pytest.fixture
def setup(tmp_path, monkeypatch):
    # Sealed copies are shared by every process of the user holding the same header
    # (tafe.cqs.sealed): a test run elsewhere holding a good "s1" would hand the corrupt
    # one below its good copy. The copies of this test are its own.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    watch_dir = tmp_path / "watch"
    watch_dir.mkdir()
    model = make_model(str(tmp_path / "m0.cqsm"), "m0")
    store = make_store(str(tmp_path / "s0.cqss"), "s0", views=1)
    settings = Settings(model=model, store=store, watch_dir=str(watch_dir))
    holder = Holder(open_snapshot(model, store))
    log = logging.getLogger("test.cqs.swap")
    return settings, holder, log, watch_dir, tmp_path


def wait_for(predicate, timeout: float = 10.0) -> None:
    with gevent.Timeout(timeout):
        while not predicate():
            gevent.sleep(0.005)


def test_swaps_under_concurrent_greenlets_lose_no_request(setup):
    settings, holder, log, watch_dir, tmp_path = setup
    watcher = Watcher(holder, settings, log, poll_s=0.005, grace_s=0.05).start()
    stop = False
    served: list[int] = []
    errors: list[BaseException] = []
    seen_stores = []

    def bidder() -> None:
        n = 0
        try:
            while not stop:
                snap = holder.current  # once per request, as the bid path does
                if snap.store not in seen_stores:
                    seen_stores.append(snap.store)
                expected_views = int(snap.versions["store"][1:]) + 1
                state = snap.lookup(REQUEST)
                assert state is not None and state.views_1d == expected_views, (snap.versions, state)
                for _ in range(3):
                    gevent.sleep(0)  # other requests interleave mid-request
                    score = snap.score(REQUEST, REQUEST.imps[0], AS_OF + 60)
                    assert score.known_user and 0.0 < score.value < 1.0
                n += 1
                gevent.sleep(0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        served.append(n)

    bidders = [gevent.spawn(bidder) for _ in range(20)]
    try:
        for i in range(1, 6):
            make_store(str(watch_dir / f"users-{i}.cqss"), f"s{i}", views=i + 1)
            if i == 3:
                make_model(str(watch_dir / "model-1.cqsm"), "m1")
            wait_for(lambda i=i: holder.current.versions["store"] == f"s{i}")
            gevent.sleep(0.02)
        wait_for(lambda: holder.current.versions == {"model": "m1", "store": "s5"})
    finally:
        stop = True
        gevent.joinall(bidders, timeout=10)
        watcher.stop()
    assert not errors, errors[0]
    assert len(served) == 20 and min(served) > 0
    assert watcher.swaps in (5, 6)  # the model may arrive in the same check as store 3
    # every replaced store was unmapped after the grace; the serving one was not
    gevent.sleep(0.3)
    assert len(seen_stores) >= 2
    for store in seen_stores[:-1]:
        assert store.lookup(["buyer-1"]) is None
    assert holder.current.lookup(REQUEST).views_1d == 6


def errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]


def test_bad_files_are_refused_and_the_old_snapshot_keeps_serving(setup, caplog):
    settings, holder, log, watch_dir, tmp_path = setup
    watcher = Watcher(holder, settings, log, grace_s=0.01)
    before = holder.current
    good = open(make_store(str(tmp_path / "s1.cqss"), "s1", views=2), "rb").read()
    caplog.set_level(logging.INFO, logger="test.cqs.swap")

    bad = drop(watch_dir, "truncated.cqss", good[:-7])
    assert watcher.check() is False
    assert holder.current is before
    (message,) = errors(caplog)
    assert "refused store" in message and bad in message and "truncated" in message and "{" not in message
    # What still serves, as log fields (JSON keys / key=value), not a dict inside the message.
    refused = caplog.records[-1]
    assert refused.fields == {"model": "m0", "store": "s0"}
    assert json.loads(JsonFormatter().format(refused))["store"] == "s0"
    assert TextFormatter().format(refused).endswith(" model=m0 store=s0")

    assert watcher.check() is False  # refused once, not retried (or re-logged) every poll
    assert len(errors(caplog)) == 1
    watcher.hangup()  # SIGHUP retries it
    assert watcher.check() is False
    assert len(errors(caplog)) == 2

    corrupt = bytearray(good)
    corrupt[-1] ^= 1
    bad2 = drop(watch_dir, "corrupt.cqss", bytes(corrupt))
    assert watcher.check() is False
    assert len(errors(caplog)) == 3 and "corrupt data" in errors(caplog)[-1] and bad2 in errors(caplog)[-1]

    model_bytes = open(settings.model, "rb").read()
    drop(watch_dir, "m9.cqsm", model_bytes[: len(model_bytes) // 2])
    assert watcher.check() is False
    assert "refused model" in errors(caplog)[-1] and "m9.cqsm" in errors(caplog)[-1]
    assert holder.current is before and holder.current.lookup(REQUEST).views_1d == 1

    drop(watch_dir, "s1.cqss", good)
    assert watcher.check() is True
    assert holder.current.versions == {"model": "m0", "store": "s1"}
    swapped = caplog.records[-1]
    assert swapped.getMessage() == f"cqs: swapped in store {watch_dir / 's1.cqss'}"
    assert swapped.fields == {"model": "m0", "store": "s1", "was_model": "m0", "was_store": "s0"}
    line = json.loads(JsonFormatter().format(swapped))
    assert (line["store"], line["was_store"]) == ("s1", "s0")
    assert watcher.check() is False  # nothing new
    assert len(errors(caplog)) == 4


def test_a_fresh_watcher_skips_a_bad_newest_file_for_the_last_good_one(setup, caplog):
    """A worker (re)started after a bad drop serves what its siblings serve."""
    settings, holder, log, watch_dir, tmp_path = setup
    good = make_store(str(watch_dir / "s1.cqss"), "s1", views=2)
    os.utime(good, ns=(10**18, 10**18))
    drop(watch_dir, "s2.cqss", b"TAFEUSR\0 and then nothing useful")
    os.utime(watch_dir / "s2.cqss", ns=(2 * 10**18, 2 * 10**18))  # the newest
    caplog.set_level(logging.INFO, logger="test.cqs.swap")
    assert Watcher(holder, settings, log).check() is True
    assert holder.current.versions["store"] == "s1"
    assert len(errors(caplog)) == 1 and "s2.cqss" in errors(caplog)[0]


def test_a_good_model_is_swapped_in_even_if_the_store_beside_it_is_bad(setup, caplog):
    settings, holder, log, watch_dir, tmp_path = setup
    make_model(str(watch_dir / "m1.cqsm"), "m1")
    drop(watch_dir, "s1.cqss", b"garbage")
    caplog.set_level(logging.INFO, logger="test.cqs.swap")
    assert Watcher(holder, settings, log).check() is True
    assert holder.current.versions == {"model": "m1", "store": "s0"}
    assert len(errors(caplog)) == 1 and "refused store" in errors(caplog)[0]


def test_a_model_swap_reuses_the_open_store(setup):
    settings, holder, log, watch_dir, tmp_path = setup
    watcher = Watcher(holder, settings, log, grace_s=0.01)
    old = holder.current
    make_model(str(watch_dir / "m1.cqsm"), "m1")
    assert watcher.check() is True
    assert holder.current.versions == {"model": "m1", "store": "s0"}
    assert holder.current.store is old.store
    gevent.sleep(0.05)
    assert holder.current.lookup(REQUEST).views_1d == 1  # not retired


def test_on_swap_callbacks_see_old_and_new(setup):
    settings, holder, log, watch_dir, tmp_path = setup
    calls = []
    holder.on_swap.append(lambda old, new: calls.append((old.versions["store"], new.versions["store"])))
    new = Snapshot(holder.current.model, None)
    holder.swap(new)
    assert holder.current is new and calls == [("s0", "")]


def test_the_event_loop_keeps_running_while_a_store_loads(setup):
    """Loading happens in the hub's thread pool: a ticking greenlet keeps ticking."""
    settings, holder, log, watch_dir, tmp_path = setup
    np = pytest.importorskip("numpy")
    n = 1_000_000
    keys = np.unique(np.frombuffer(np.random.default_rng(1).bytes(8 * n), dtype=np.uint64))
    write_store(keys, np.ones((len(keys), len(UserState._fields)), dtype=np.uint16), str(watch_dir / "big.cqss"),
                as_of=AS_OF, version="big")
    ticks = []

    def ticker() -> None:
        while True:
            ticks.append(1)
            gevent.sleep(0.001)

    tick = gevent.spawn(ticker)
    gevent.sleep(0.01)
    before = len(ticks)
    watcher = Watcher(holder, settings, log, grace_s=0.01)
    assert watcher.check() is True
    tick.kill()
    assert holder.current.versions["store"] == "big"
    assert len(ticks) > before  # the loop ran during the load (how long it stalled is a benchmark's business)


def shading_table(version: str, shade: float) -> bytes:
    from tafe.core import shading

    doc = {"format": shading.FORMAT, "version": version, "lo": 0.3, "contexts": {"ex||": [0.0, 1.0, [shade, shade]]}}
    return json.dumps(doc).encode()


def test_a_shading_table_swaps_in_beside_model_and_store_and_a_bad_one_is_refused(setup, caplog):
    settings, holder, log, watch_dir, tmp_path = setup
    watcher = Watcher(holder, settings, log, grace_s=0.01)
    caplog.set_level(logging.INFO, logger="test.cqs.swap")
    assert holder.current.shading is None and "shading" not in holder.current.versions
    old = holder.current
    drop(watch_dir, "shading-a.cqsb", shading_table("shade-a", 0.6))
    assert watcher.check() is True
    assert holder.current.versions == {"model": "m0", "store": "s0", "shading": "shade-a"}
    assert holder.current.shading.curve("ex|pub|300x250")[2] == (0.6, 0.6)
    assert holder.current.store is old.store and holder.current.model is old.model  # reused, not re-read

    bad = drop(watch_dir, "shading-b.cqsb", shading_table("shade-b", 1.5))  # a shade above the value
    assert watcher.check() is False
    (message,) = errors(caplog)
    assert message.startswith("cqs: refused shading ") and bad in message and "within [lo, 1]" in message
    assert holder.current.versions["shading"] == "shade-a"  # the old table keeps serving

    drop(watch_dir, "shading-c.cqsb", shading_table("shade-c", 0.7))
    assert watcher.check() is True
    assert holder.current.versions["shading"] == "shade-c" and caplog.records[-1].fields["was_shading"] == "shade-a"
