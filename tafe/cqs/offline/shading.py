"""Learning first-price bid shading from win and loss notices (``tafe cqs pipeline``'s third output).

**Data.** Every first-price open-auction bid TAFE makes carries its context, its value
before shading and its price in the notice token, so its win or loss event is a training
row (notices are not sampled, decisions are). Per bid, the highest competing bid M is:

- exactly the ``min_to_win`` (``${AUCTION_MIN_TO_WIN}``) when the exchange fills it in,
  on a win or a loss (one that contradicts the outcome, above our price on a win or
  under it on a loss, is not believed: the row counts as censored);
- else at most our price on a win (censored), more than our price on a loss with reason
  102 (lost to a higher bid). Other loss reasons say nothing about the competition and
  are skipped.

So it works with win/loss data alone and uses the exact prices when they come.

**Model.** Per context, M is lognormal(mu, sigma), fitted by maximum likelihood (with a
weak prior on sigma, for contexts bid at a single price) on a
(mu, sigma) grid, coarse then fine, from histograms of the observations in log-price
bins of ``BIN`` (the rows sit in SQLite; only histograms per context are in memory, so
memory grows with contexts, not events). A context's likelihood is joined by ``PRIOR``
observations' worth of its parent's (``exchange|inventory|slot`` -> ``exchange||slot``
-> ``exchange||``), so a thin context leans on its parent; a context with fewer than
``MIN_OBS`` rows gets no curve at all (the bid path backs off to its parent, then to the
fixed factor), nor does any context of an exchange with fewer than ``MIN_LOSSES`` losses
(one that sends no loss notices: wins alone would say the competition bids nothing).

**Bid.** For value v the price b in ``[lo * v, v]`` maximizes ``(k * v - b) * F(b)``,
F the context's CDF of M. For a given k that is the least expected cost for the expected
value won (its Lagrangian, k the multiplier); one k for the whole table is set by
bisection so that the expected number of wins over the training rows is what the fixed
``first_price_shade`` would have won on the same rows, plus ``WIN_MARGIN`` (1 %) so that
the model's errors do not cost impressions (the same impressions, least cost among such
policies). In a context without ``MIN_OBS`` exact rows, F is known only
around the prices bid, so b is also at least ``TRUST`` times the context's low bids
(5th percentile): each round explores that much lower, and the next round's notices
show what it cost. A curve holds the shade b/v at ``POINTS`` values spanning the
context's values, for the bid path to interpolate (``tafe.core.shading``).

**Judging.** The rows of the latest ``holdback`` slice (by notice time) are fitted on their
own; under that fit, the learned curves and the fixed factor are each scored on the
slice's values: expected wins and expected cost per win. The table is *better* when it
wins at least ``1 - WIN_TOL`` as many and costs less per win. Floors are left out of
this comparison (they raise both arms' low bids alike).
"""

from __future__ import annotations

import math
import os
import sqlite3
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from tafe.core.shading import FORMAT, MIN_LO, SUFFIX, parents

BIN = 0.02  # log-price bin: 2 %
MIN_OBS = 50  # rows a context needs for a curve of its own
# Losses (reason 102, or min-to-win on a loss) an exchange needs for curves: one that sends
# no loss notices shows only wins, which alone would say the competition bids nothing.
MIN_LOSSES = 10
PRIOR = 20.0  # pseudo-rows of the parent's likelihood added to a context's
POINTS = 25  # values per curve
SHADES = 121  # candidate shades per value, lo..1
WIN_TOL = 0.02  # the judged table may win this much less than the fixed factor (model error)
WIN_MARGIN = 0.01  # k is set for this much more than the fixed factor's expected wins: model error costs no impressions
TRUST = 0.8  # censored-only contexts: prices at least this times the low bids seen (see Bid above)
_MU = np.arange(-7.0, 7.0001, 0.2)  # log CPM: 0.001 .. 1100
_SIGMA = np.arange(0.1, 3.0001, 0.1)
# A weak prior on log sigma (one row's worth): where the rows cannot tell sigma (every bid
# of a context at one price, censored) it is about 0.5, the spread typical of bid landscapes.
_SIGMA_PRIOR = (math.log(0.5), 0.7)
_LOSS_HIGHER_BID = "102"
KINDS = ("le", "gt", "eq_won", "eq_lost")  # M <= bid (win), M > bid (loss 102), M == min_to_win on a win, on a loss

SCHEMA = "CREATE TABLE shade (bid_id TEXT PRIMARY KEY, ts REAL, ctx TEXT, kind INTEGER, bin INTEGER, vbin INTEGER) WITHOUT ROWID;"


def _bin(cpm: float) -> int:
    return round(math.log(cpm) / BIN)


def row(e: dict[str, Any]) -> tuple[str, float, str, int, int, int] | None:
    """The training row of one win, bill or loss event (None: not a first-price row, or no competition in it)."""
    if e.get("at") != 1 or not e.get("context"):
        return None
    kind = e.get("event")
    try:
        bid, value = float(e["bid_price"]), float(e["value"])
    except (KeyError, TypeError, ValueError):
        return None  # not as a node writes it: the rest of the line still counts for the model
    if not (0 < bid < math.inf and 0 < value < math.inf):
        return None
    mtw = e.get("min_to_win")
    try:
        exact = float(mtw) if mtw is not None else 0.0
    except ValueError:
        exact = 0.0
    if kind == "loss" and e.get("loss") != _LOSS_HIGHER_BID:
        return None
    won = kind in ("win", "bill")
    if exact > 0 and math.isfinite(exact) and (exact <= bid if won else exact >= bid):
        obs, price = (2 if won else 3), exact
    else:
        obs, price = (0 if won else 1), bid
    return str(e["bid_id"]), float(e["ts"]), str(e["context"]), obs, _bin(price), _bin(value)


# --- the normal CDF in logs, no scipy ------------------------------------------------------------


def _log_erfc(x: np.ndarray) -> np.ndarray:
    """log(erfc(x)) for x >= 0 (Numerical Recipes' erfcc: relative error under 1.2e-7 everywhere)."""
    t = 1.0 / (1.0 + 0.5 * x)
    poly = -1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (0.27886807 + t * (
        -1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))  # fmt: skip
    out: np.ndarray = np.log(t) - x * x + poly
    return out


def log_cdf(z: np.ndarray) -> np.ndarray:
    """log Phi(z), accurate in both tails."""
    z = np.asarray(z, dtype=np.float64)
    a = np.abs(z) / math.sqrt(2.0)
    lower = _log_erfc(a) - math.log(2.0)  # log Phi(-|z|)
    out: np.ndarray = np.where(z < 0, lower, np.log1p(-np.exp(lower)))
    return out


def cdf(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.exp(log_cdf(z))
    return out


# --- histograms and the fit -------------------------------------------------------------------


@dataclass
class Hist:
    """Counts per log-price bin of one context: observations by kind, and the values bid."""

    obs: dict[int, dict[int, float]] = field(default_factory=lambda: {0: {}, 1: {}, 2: {}, 3: {}})
    values: dict[int, float] = field(default_factory=dict)
    n: float = 0.0

    def add(self, other: Hist) -> None:
        for kind, bins in other.obs.items():
            mine = self.obs[kind]
            for b, c in bins.items():
                mine[b] = mine.get(b, 0.0) + c
        for b, c in other.values.items():
            self.values[b] = self.values.get(b, 0.0) + c
        self.n += other.n

    def low_bid(self) -> float:
        """Log of the price a curve may not go under: -inf with enough exact rows, else TRUST times the low bids."""
        if sum(self.obs[2].values()) + sum(self.obs[3].values()) >= MIN_OBS:
            return -math.inf
        bins = sorted({**self.obs[0], **{b: 0.0 for b in self.obs[1]}})
        counts = [self.obs[0].get(b, 0.0) + self.obs[1].get(b, 0.0) for b in bins]
        total, seen = sum(counts), 0.0
        for b, c in zip(bins, counts, strict=True):
            seen += c
            if seen >= 0.05 * total:
                return b * BIN + math.log(TRUST)
        return -math.inf

    def losses(self) -> float:
        return sum(self.obs[1].values()) + sum(self.obs[3].values())

    def loglik(self, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        """Log-likelihood at each (mu, sigma) pair (1-d arrays of equal length)."""
        total = np.zeros(len(mu))
        m, s = mu[:, None], sigma[:, None]
        for kind, bins in self.obs.items():
            if not bins:
                continue
            x = np.fromiter(bins.keys(), float, len(bins)) * BIN
            c = np.fromiter(bins.values(), float, len(bins))
            z = (x[None, :] - m) / s
            if kind == 0:
                term = log_cdf(z)
            elif kind == 1:
                term = log_cdf(-z)
            else:
                term = -0.5 * z * z - np.log(s)
            total += term @ c
        return total


def fit(hist: Hist, prior: Hist | None) -> tuple[float, float]:
    """(mu, sigma) of log M maximizing the likelihood plus ``PRIOR`` rows' worth of the parent's."""

    def objective(mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        out: np.ndarray = hist.loglik(mu, sigma) - 0.5 * ((np.log(sigma) - _SIGMA_PRIOR[0]) / _SIGMA_PRIOR[1]) ** 2
        if prior is not None and prior.n > 0:
            out += prior.loglik(mu, sigma) * (PRIOR / prior.n)
        return out

    mu, sigma = (g.ravel() for g in np.meshgrid(_MU, _SIGMA))
    best = int(np.argmax(objective(mu, sigma)))
    m0, s0 = mu[best], sigma[best]
    mu, sigma = (g.ravel() for g in np.meshgrid(m0 + np.arange(-0.2, 0.2001, 0.02), np.maximum(s0 + np.arange(-0.1, 0.1001, 0.01), 0.02)))
    best = int(np.argmax(objective(mu, sigma)))
    return float(mu[best]), float(sigma[best])


def histograms(db: sqlite3.Connection, held: bool, cutoff: float) -> dict[str, Hist]:
    """Per leaf context, the training (``held`` False: before ``cutoff``) or held-back rows' histograms."""
    where = "ts >= ?" if held else "ts < ?"
    out: dict[str, Hist] = {}
    for ctx, kind, b, n in db.execute(f"SELECT ctx, kind, bin, count(*) FROM shade WHERE {where} GROUP BY 1, 2, 3", (cutoff,)):
        h = out.setdefault(ctx, Hist())
        h.obs[kind][b] = float(n)
        h.n += n
    for ctx, vb, n in db.execute(f"SELECT ctx, vbin, count(*) FROM shade WHERE {where} GROUP BY 1, 2", (cutoff,)):
        out[ctx].values[vb] = float(n)
    return out


def levels(leaves: dict[str, Hist]) -> dict[str, Hist]:
    """The leaves and their coarser contexts (``exchange||slot``, ``exchange||``), summed."""
    out = {key: Hist() for key in leaves}
    for key, h in leaves.items():
        for k in dict.fromkeys((key, *parents(key))):
            out.setdefault(k, Hist()).add(h)
    return out


def fit_all(hists: dict[str, Hist], min_obs: float, min_losses: float = 0) -> dict[str, tuple[float, float]]:
    """(mu, sigma) of every context with at least ``min_obs`` rows whose exchange has ``min_losses`` losses,
    each with its parent's prior."""
    out: dict[str, tuple[float, float]] = {}
    for key, h in hists.items():
        by_slot, by_exchange = parents(key)
        if h.n < min_obs or hists[by_exchange].losses() < min_losses:
            continue
        parent = by_slot if by_slot != key else by_exchange if by_exchange != key else None
        out[key] = fit(h, hists.get(parent) if parent is not None else None)
    return out


def entry_of(key: str, table: dict[str, Any]) -> str | None:
    """The context whose curve serves ``key`` (as ``Shading.curve`` looks it up)."""
    for k in (key, *parents(key)):
        if k in table:
            return k
    return None


# --- the policy -------------------------------------------------------------------------------


def best_shades(mu: float, sigma: float, k: float, log_v: np.ndarray, lo: float, low_bid: float = -math.inf) -> np.ndarray:
    """For each log-value, the shade in [lo, 1] maximizing (k v - b) F(b), at a price of at least exp(low_bid)."""
    s = np.linspace(lo, 1.0, SHADES)
    v = np.exp(log_v)[:, None]
    b = v * s[None, :]
    gain = (k * v - b) * cdf((np.log(b) - mu) / sigma)
    s_min = np.minimum(np.exp(low_bid - log_v), 1.0)[:, None]  # 1.0 is always a candidate
    gain = np.where(s[None, :] >= s_min - 1e-9, gain, -np.inf)
    out: np.ndarray = s[np.argmax(gain, axis=1)]
    return out


def value_span(h: Hist) -> tuple[float, float, float]:
    """(first log-value, step) of a curve covering the context's values and 0.25 beyond each end; its low bid."""
    bins = list(h.values)
    lo, hi = min(bins) * BIN - 0.25, max(bins) * BIN + 0.25
    return lo, (hi - lo) / (POINTS - 1), h.low_bid()


@dataclass
class Policy:
    k: float
    lo: float
    curves: dict[str, tuple[float, float, list[float]]]


def curves_for(params: dict[str, tuple[float, float]], spans: dict[str, tuple[float, float, float]], k: float, lo: float) -> Policy:
    curves = {}
    for key, (mu, sigma) in params.items():
        log_v0, step, low_bid = spans[key]
        shades = best_shades(mu, sigma, k, log_v0 + step * np.arange(POINTS), lo, low_bid)
        curves[key] = (round(log_v0, 6), round(step, 6), [round(float(x), 4) for x in shades])
    return Policy(k, lo, curves)


def expected(leaves: dict[str, Hist], policy: Policy, judge: dict[str, tuple[float, float]], fixed: float) -> dict[str, float]:
    """Expected wins and cost (CPM units) of the fixed factor and of ``policy`` on the leaves' values, under ``judge``."""
    w_f = c_f = w_l = c_l = n = 0.0
    for key, h in leaves.items():
        entry = entry_of(key, policy.curves)
        if entry is None or not h.values:
            continue
        mu, sigma = judge.get(entry) or judge[entry_of(entry, judge) or entry]
        log_v0, step, shades = policy.curves[entry]
        log_v = np.fromiter(h.values.keys(), float, len(h.values)) * BIN
        c = np.fromiter(h.values.values(), float, len(h.values))
        s = np.interp((log_v - log_v0) / step, np.arange(len(shades)), shades)
        v = np.exp(log_v)
        for shade, is_fixed in ((np.full_like(v, fixed), True), (s, False)):
            p = cdf((np.log(v * shade) - mu) / sigma)
            wins, cost = float(c @ p), float(c @ (p * v * shade))
            if is_fixed:
                w_f, c_f = w_f + wins, c_f + cost
            else:
                w_l, c_l = w_l + wins, c_l + cost
        n += float(c.sum())
    return {"rows": n, "wins_fixed": w_f, "cost_fixed": c_f, "wins_learned": w_l, "cost_learned": c_l}


def calibrate(leaves: dict[str, Hist], params: dict[str, tuple[float, float]], spans: dict[str, tuple[float, float, float]],
              fixed: float, lo: float) -> Policy:
    """The policy whose expected wins on the training rows are the fixed factor's plus WIN_MARGIN (bisection on log k)."""
    a, b = math.log(0.2), math.log(20.0)
    policy = curves_for(params, spans, math.exp(b), lo)
    for _ in range(30):
        mid = (a + b) / 2
        trial = curves_for(params, spans, math.exp(mid), lo)
        e = expected(leaves, trial, params, fixed)
        if e["wins_learned"] < e["wins_fixed"] * (1 + WIN_MARGIN):
            a = mid
        else:
            b, policy = mid, trial
    return policy


# --- the round ---------------------------------------------------------------------------------


def learn(db: sqlite3.Connection, *, fixed: float, lo: float, holdback: float, min_obs: float = MIN_OBS) -> tuple[Policy | None, dict[str, Any]]:
    """Fit on the rows before the held-back slice, judge on the slice; (policy or None, report)."""
    n = db.execute("SELECT count(*) FROM shade").fetchone()[0]
    report: dict[str, Any] = {"rows": n, "fixed_shade": fixed, "lo": lo, "better": False}
    if n < 2:
        report["why_not"] = "no first-price win or loss notices"
        return None, report
    cutoff = db.execute("SELECT ts FROM shade ORDER BY ts LIMIT 1 OFFSET ?", (int(n * (1 - holdback)),)).fetchone()[0]
    report["rows_by_kind"] = {KINDS[k]: c for k, c in db.execute("SELECT kind, count(*) FROM shade GROUP BY 1")}
    train_leaves = histograms(db, False, cutoff)
    train = levels(train_leaves)
    params = fit_all(train, min_obs, MIN_LOSSES)
    if not params:
        losses = sum(h.losses() for h in train_leaves.values())
        report["why_not"] = (
            f"no context with {min_obs:g} rows (of an exchange with {MIN_LOSSES} losses) before the held-back slice" if losses
            else "no loss notices (reason 102): wins alone cannot tell what the competition bids"
        )  # fmt: skip
        return None, report
    spans = {key: value_span(train[key]) for key in params}
    policy = calibrate(train_leaves, params, spans, fixed, lo)
    held_leaves = histograms(db, True, cutoff)
    judge = fit_all(levels(held_leaves), 1)
    e = expected(held_leaves, policy, judge, fixed)
    cpw_f, cpw_l = e["cost_fixed"] / max(e["wins_fixed"], 1e-12), e["cost_learned"] / max(e["wins_learned"], 1e-12)
    wins_ratio = e["wins_learned"] / max(e["wins_fixed"], 1e-12)
    report.update({
        "contexts": len(policy.curves), "k": round(policy.k, 4), "heldback_rows": round(e["rows"]),
        "heldback": {"wins_fixed": round(e["wins_fixed"], 1), "wins_learned": round(e["wins_learned"], 1),
                     "wins_ratio": round(wins_ratio, 4), "cost_per_win_fixed": round(cpw_f / 1000, 7),
                     "cost_per_win_learned": round(cpw_l / 1000, 7), "cost_ratio": round(cpw_l / max(cpw_f, 1e-12), 4)},
        "better": bool(wins_ratio >= 1 - WIN_TOL and cpw_l < cpw_f),
    })  # fmt: skip
    return policy, report


def publish(policy: Policy, out_dir: str, as_of: float, meta: dict[str, Any]) -> tuple[str, str]:
    """Write the table as ``shading-<version>.cqsb`` (a dot-name first, then renamed); (path, version)."""
    body = orjson.dumps(policy.curves, option=orjson.OPT_SORT_KEYS)
    version = "shade-%s-%08x" % (time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(as_of)), zlib.crc32(body))
    doc = {"format": FORMAT, "version": version, "lo": max(policy.lo, MIN_LO), "meta": {"k": policy.k, **meta}, "contexts": policy.curves}
    path = os.path.join(out_dir, f"shading-{version}{SUFFIX}")
    tmp = os.path.join(out_dir, f".shading-{version}{SUFFIX}.tmp")
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(doc))
    os.replace(tmp, path)
    return path, version
