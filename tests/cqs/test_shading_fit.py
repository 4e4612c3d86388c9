"""Learning first-price shading from notices: the fit, the bounds, the back-off, the pipeline's verdict."""

from __future__ import annotations

import json
import math
import random
import sqlite3
from pathlib import Path

import pytest

pytest.importorskip("numpy")

from test_pipeline import write_world  # noqa: E402

from tafe.core import shading as serving  # noqa: E402
from tafe.cqs.offline import pipeline, shading  # noqa: E402
from tafe.settings import DATA_DIR  # noqa: E402

DEMO = str(DATA_DIR / "model.cqsm")


def events(n: int, ctx: str, mu: float, sigma: float, *, exact: bool, seed: int = 1, fixed: float = 0.85, t0: float = 0.0) -> list[dict]:
    """Win and loss events of first-price bids at ``fixed`` times a spread of values, against lognormal(mu, sigma)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        value = math.exp(rng.gauss(0.3, 0.5))
        bid = round(fixed * value, 4)
        theirs = math.exp(rng.gauss(mu, sigma))
        e = {"event": "win" if theirs <= bid else "loss", "outcome": "accepted", "bid_id": f"{ctx}-{seed}-{i}", "ts": t0 + i,
             "bid_ts": t0 + i, "bid_price": bid, "at": 1, "context": ctx, "value": value}  # fmt: skip
        if e["event"] == "loss":
            e["loss"] = "102"
        if exact:
            e["min_to_win"] = f"{theirs:.4f}"
        out.append(e)
    return out


def db_of(rows: list[dict]) -> sqlite3.Connection:
    db = sqlite3.connect(":memory:")
    db.executescript(shading.SCHEMA)
    db.executemany("INSERT OR IGNORE INTO shade VALUES (?, ?, ?, ?, ?, ?)", [r for e in rows if (r := shading.row(e))])
    return db


@pytest.mark.parametrize("exact,tolerance", [(True, 0.03), (False, 0.08)])
def test_the_fit_recovers_the_competition_from_exact_or_censored_notices(exact, tolerance):
    db = db_of(events(4000, "ex|pub|300x250", -0.2, 0.6, exact=exact))
    hist = shading.levels(shading.histograms(db, False, math.inf))["ex|pub|300x250"]
    mu, sigma = shading.fit(hist, None)
    assert mu == pytest.approx(-0.2, abs=tolerance) and sigma == pytest.approx(0.6, abs=tolerance)


def test_losses_for_other_reasons_and_second_price_bids_are_not_rows():
    (win,) = events(1, "ex||", 0, 0.5, exact=False)
    assert shading.row({**win, "event": "loss", "loss": "102"})[3] == 1  # lost to a higher bid: M > our price
    assert shading.row({**win, "event": "loss", "loss": "100"}) is None  # under the floor: not competition
    assert shading.row({**win, "at": 2}) is None
    assert shading.row({k: v for k, v in win.items() if k != "value"}) is None  # not as a node writes it
    assert shading.row({**win, "bid_price": "nan"}) is None
    assert shading.row({**win, "min_to_win": "${AUCTION_MIN_TO_WIN}"})[3] == 0  # not filled in: censored
    assert shading.row({**win, "event": "win", "min_to_win": str(win["bid_price"] / 2)})[3] == 2  # exact, on a win
    assert shading.row({**win, "event": "win", "min_to_win": str(win["bid_price"] * 2)})[3] == 0  # above a winning bid: not believed
    assert shading.row({**win, "event": "loss", "loss": "102", "min_to_win": str(win["bid_price"] / 2)})[3] == 1  # not believed
    assert shading.row({**win, "event": "loss", "loss": "102", "min_to_win": str(win["bid_price"] * 2)})[3] == 3  # exact, on a loss


def test_learned_shades_stay_in_bounds_and_thin_contexts_back_off():
    rows = events(3000, "ex|big|300x250", 0.0, 0.4, exact=False) + events(20, "ex|thin|300x250", 2.0, 0.1, exact=False, seed=2)
    policy, report = shading.learn(db_of(rows), fixed=0.85, lo=0.4, holdback=0.2)
    assert policy is not None and report["better"], report
    assert "ex|big|300x250" in policy.curves and "ex|thin|300x250" not in policy.curves  # too few rows: its parent serves
    assert {"ex||300x250", "ex||"} <= set(policy.curves)
    assert all(0.4 <= s <= 1.0 for _, _, shades in policy.curves.values() for s in shades)
    assert report["heldback"]["wins_ratio"] >= 1 - shading.WIN_TOL and report["heldback"]["cost_ratio"] < 1


def test_no_first_price_rows_no_table():
    policy, report = shading.learn(db_of([]), fixed=0.85, lo=0.3, holdback=0.2)
    assert policy is None and report["why_not"] == "no first-price win or loss notices"


@pytest.mark.parametrize("exact", [True, False])
def test_wins_alone_make_no_table(exact):
    """An exchange that never sends a loss notice: its wins alone would say the competition bids nothing."""
    wins = [e for e in events(3000, "ex|pub|300x250", -0.5, 0.5, exact=exact) if e["event"] == "win"]
    policy, report = shading.learn(db_of(wins), fixed=0.85, lo=0.3, holdback=0.2)
    assert policy is None and report["why_not"].startswith("no loss notices"), report


def write_first_price(directory: Path, **kw: object) -> None:
    rows = events(3000, "ex|pub-a|300x250", -0.3, 0.4, **kw) + events(3000, "ex|pub-b|728x90", 0.4, 0.3, seed=2, **kw)  # type: ignore[arg-type]
    rows.sort(key=lambda e: e["ts"])
    (directory / "events-fp.jsonl").write_text("".join(json.dumps(e) + "\n" for e in rows))


@pytest.mark.parametrize("exact", [True, False])
def test_the_pipeline_publishes_a_table_that_beats_the_fixed_factor(tmp_path: Path, exact: bool) -> None:
    write_world(tmp_path / "events")
    write_first_price(tmp_path / "events", exact=exact, t0=1_767_225_600.0)
    out = tmp_path / "watch"
    out.mkdir()
    report = pipeline.run(str(tmp_path / "events"), str(out), serving_default=DEMO, dims=1 << 14)
    s = report["shading"]
    assert s["better"] and s["rows"] == 6000 and s["heldback"]["cost_ratio"] < 0.95, s
    (path,) = [p for p in report["published"] if p.endswith(".cqsb")]
    table = serving.load(path)
    assert table.version == s["version"] and "ex|pub-a|300x250" in table.curves
    assert not list(out.glob(".*"))  # written under a dot-name, then renamed


def test_a_table_is_published_even_when_there_is_no_model_to_train(tmp_path: Path) -> None:
    """Notices of first-price bids but no logged decisions: no model, the shading table all the same."""
    (tmp_path / "events").mkdir()
    write_first_price(tmp_path / "events", exact=True, t0=1_767_225_600.0)
    out = tmp_path / "watch"
    out.mkdir()
    report = pipeline.run(str(tmp_path / "events"), str(out), serving_default=DEMO, dims=1 << 14)
    assert "too few to train on" in report["model"]["skipped"], report
    (path,) = report["published"]
    assert path.endswith(".cqsb") and serving.load(path).version == report["shading"]["version"]
    assert not list(out.glob("*.cqsm")) and not list(out.glob("*.cqss"))


def test_no_model_and_no_table_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "events").mkdir()
    write_first_price(tmp_path / "events", exact=True, t0=1_767_225_600.0)
    out = tmp_path / "watch"
    out.mkdir()
    with pytest.raises(pipeline.CqsError, match="too few to train on"):  # the table is no cheaper, so not published
        pipeline.run(str(tmp_path / "events"), str(out), serving_default=DEMO, dims=1 << 14, fixed_shade=0.3, shade_min=0.3)
    assert not list(out.iterdir())


def test_a_table_no_cheaper_than_the_fixed_factor_is_published_only_when_forced(tmp_path: Path) -> None:
    write_world(tmp_path / "events")
    write_first_price(tmp_path / "events", exact=True, t0=1_767_225_600.0)
    out = tmp_path / "watch"
    out.mkdir()
    # The fixed factor already at the lowest shade allowed: nothing learned can cost less at as many wins.
    report = pipeline.run(str(tmp_path / "events"), str(out), serving_default=DEMO, dims=1 << 14, fixed_shade=0.3, shade_min=0.3)
    assert not report["shading"]["better"] and not list(out.glob("*.cqsb")), report["shading"]
    report = pipeline.run(str(tmp_path / "events"), str(out), serving_default=DEMO, dims=1 << 14, fixed_shade=0.3, shade_min=0.3,
                          force=True)  # fmt: skip
    assert len(list(out.glob("*.cqsb"))) == 1 and report["shading"]["version"]


def test_a_context_that_always_wins_still_learns_when_its_exchange_sends_losses():
    cheap = events(2000, "ex|cheap|300x250", -2.0, 0.3, exact=False)  # every bid wins: no loss from this context
    assert all(e["event"] == "win" for e in cheap)
    rows = cheap + events(2000, "ex|dear|300x250", 0.3, 0.4, exact=False, seed=2)
    policy, _ = shading.learn(db_of(rows), fixed=0.85, lo=0.3, holdback=0.2)
    assert policy is not None and "ex|cheap|300x250" in policy.curves
    low = min(policy.curves["ex|cheap|300x250"][2])
    assert low < 0.85  # shaded below the fixed factor, within the trust region's step
