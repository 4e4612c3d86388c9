"""Feature extraction on the real OpenRTB 2.5 and 2.6 examples, fast path against reference."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest

from tafe.core.request import parse
from tafe.cqs import Snapshot
from tafe.cqs import model as model_mod
from tafe.cqs.features import SPEC, Extractor, hash_names, names
from tafe.cqs.state import NEVER, UserState

EXAMPLES = Path(__file__).resolve().parents[2].parent / "shared" / "openrtb" / "examples"
AS_OF = 1_767_225_600.0  # 2026-01-01 00:00 UTC, a Thursday
NOW = AS_OF + 13 * 3600 + 120  # 13:02 the same day
STATE = UserState(views_1d=2, views_7d=6, views_30d=40, carts_7d=1, carts_30d=1, purchases_30d=0, purchases_365d=3,
                  shown_1d=5, shown_7d=20, clicks_7d=1, clicks_30d=2, hours_since_view=3, hours_since_cart=20,
                  hours_since_purchase=900, hours_since_click=NEVER)


def _example(name: str):
    return parse((EXAMPLES / name).read_bytes())


def test_iab_25_mobile_app() -> None:
    request = _example("iab-2.5-mobile.json")
    f = names(request, request.imps[0], None, NOW)
    for expected in ("ch=app", "inv=12345", "os=ios", "dt=1", "geo=USA", "reg=USA/CA", "hr=13", "dow=3", "known=0",
                     "cat=IAB15", "cat=IAB15-10", "fmt=1", "sz=728x90", "slot=0", "floor=4", "os*dt=ios|1", "ch*geo=app|USA"):
        assert expected in f, expected
    assert not [x for x in f if x.startswith(("v1d=", "rv=", "ctr="))]  # unknown user: request features only
    interstitial = names(request, request.imps[1], None, NOW)
    assert "slot=1" in interstitial and not [x for x in interstitial if x.startswith("sz=")]


def test_iab_26_simple_banner_site() -> None:
    request = _example("iab-2.6-simple-banner.json")
    f = names(request, request.imps[0], None, NOW)
    for expected in ("ch=site", "inv=www.foobar.com", "pub=8953", "cat=IAB3-1", "sz=300x250", "floor=1", "dt=0", "os=",
                     "inv*fmt=www.foobar.com|1", "known=0"):
        assert expected in f, expected


def test_iab_26_video_and_native_formats() -> None:
    video = _example("iab-2.6-video.json")
    assert "fmt=2" in names(video, video.imps[0], None, NOW)
    native = _example("iab-2.5-native-ad.json")
    assert "fmt=8" in names(native, native.imps[0], None, NOW)


def test_known_user_history_about_fifty_features() -> None:
    request = _example("pbs-kargo-native.json")
    f = names(request, request.imps[0], STATE, NOW, AS_OF)
    assert "known=1" in f and 40 <= len(f) <= 55
    # counts in log2 buckets; recencies aged by now - as_of (13 h): view 3 h -> 16 h, cart 20 h -> 33 h
    for expected in ("v1d=2", "v30d=7", "c7d=1", "p30d=0", "p365d=3", "s1d=4", "rv=4", "rc=5", "rp=10", "rk=11",
                     "cartab=5", "ctr=3", "rv*dt=4|2"):
        assert expected in f, expected
    later = names(request, request.imps[0], STATE, AS_OF + 40 * 24 * 3600, AS_OF)
    assert "rv=10" in later and "rc=10" in later  # a stale store ages its users


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.stem)
def test_fast_path_matches_reference(path: Path) -> None:
    request = parse(path.read_bytes())
    for dims in (1 << 10, 1 << 18):
        x = Extractor(dims)
        for imp in request.imps:
            for state in (None, STATE):
                fast = x.indices(request, imp, state, NOW, AS_OF)
                assert Counter(fast) == Counter(hash_names(names(request, imp, state, NOW, AS_OF), dims))


def test_odd_values_do_not_break_extraction() -> None:
    request = _example("iab-2.6-simple-banner.json")
    odd = dataclasses.replace(request, devicetype=99, channel="weird", os="ÿ系统", country="", region="Ω", inventory_cats=tuple("abcdefg"))
    imp = dataclasses.replace(request.imps[0], bidfloor=1e9, banner_sizes=((1, 1),) * 9, tagid="ü")
    state = STATE._replace(views_1d=65535, hours_since_view=65534, clicks_7d=9, shown_7d=0)
    f = names(odd, imp, state, NOW, AS_OF)
    assert "dt=0" in f and "ch=" in f and sum(x.startswith("cat=") for x in f) == 4 and sum(x.startswith("sz=") for x in f) == 3
    assert "v1d=7" in f and "rv=10" in f and "ctr=6" in f
    x = Extractor(4096)
    assert Counter(x.indices(odd, imp, state, NOW, AS_OF)) == Counter(hash_names(f, 4096))


def test_snapshot_scores_like_the_reference_and_reuses_request_part() -> None:
    heads = tuple(model_mod.Head(n, b, model_mod.array("f", [((i * 31) % 17 - 8) / 20 for i in range(4096)]))
                  for n, b in (("visit", -0.4), ("click", -3.0)))
    snap = Snapshot(model_mod.Model("t", 4096, heads))
    request = _example("pbs-ix-multi-imp-5.json")
    for imp in request.imps + request.imps:
        expected = model_mod.sigmoid(snap.model.logit(hash_names(names(request, imp, None, NOW), 4096)))
        score = snap.score(request, imp, NOW)
        assert score.value == pytest.approx(expected, rel=1e-9) and not score.known_user
    assert snap.predict(request, request.imps[0], NOW)["visit"] == pytest.approx(snap.score(request, request.imps[0], NOW).value)
    assert SPEC == snap.model.feature_spec


class _DictStore:
    def __init__(self, states: dict, as_of: float) -> None:
        self.states, self.as_of, self.version = states, as_of, "dict-1"

    def lookup(self, keys):  # type: ignore[no-untyped-def]
        return next((self.states[k] for k in keys if k in self.states), None)


def test_memoized_scores_equal_reference_on_a_synthetic_stream(tmp_path: Path) -> None:
    from tafe.cqs.offline import synth

    population, _ = synth.simulate(users=400, requests=0, unknown=0.3, seed=9, as_of=AS_OF)
    synth.write(str(tmp_path), users=400, requests=600, unknown=0.3, seed=9, as_of=AS_OF)
    store = _DictStore({u.key: u.state for u in population if u.state is not None}, AS_OF)
    heads = (model_mod.Head("visit", -0.7, model_mod.array("f", [((i * 37) % 23 - 11) / 30 for i in range(1 << 14)])),)

    class Small(Snapshot):
        __slots__ = ()
        MEMO_MAX = 16  # forces the memos to fill and clear many times

    snap = Small(model_mod.Model("m", 1 << 14, heads), store)
    requests = [parse(line) for line in (tmp_path / "requests.jsonl").read_bytes().splitlines()]
    known = 0
    for n, request in enumerate(requests * 2):
        now = AS_OF + (n % 50) * 3571.0
        state = store.lookup(request.user_keys)
        expected = model_mod.sigmoid(snap.model.logit(hash_names(names(request, request.imps[0], state, now, AS_OF), 1 << 14)))
        score = snap.score(request, request.imps[0], now)
        assert score.value == pytest.approx(expected, rel=1e-6, abs=1e-9)
        assert score.known_user == (state is not None)
        known += score.known_user
    assert 0.5 * len(requests) < known < 1.8 * len(requests)
