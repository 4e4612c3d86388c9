"""A synthetic world: users, their history, bid requests and outcomes from a KNOWN model.

So that the store, training and evaluation are testable and demonstrable without
private data, ``tafe cqs synth`` writes into one directory:

- ``events.jsonl``: every user's history in the ``tafe.cqs.state`` event format (input
  of ``tafe cqs build-store``). Activity is long-tailed (Pareto sessions per month,
  churned users whose last visit is weeks old), with a latent purchase intent per user
  that shapes carts, purchases and clicks.
- ``decisions.jsonl``: one decision-log record per imp shown (the format
  ``tafe.cqs.decision_log`` writes, with outcomes joined), each with its ``features``,
  its ``outcomes`` (``visit``, ``click``, ``purchase``: 0 or 1) drawn from the hidden
  model, and ``p_true``, the hidden model's probabilities, so evaluation can compare
  a trained model with the best achievable.
- ``requests.jsonl``: the first 10,000 of those bid requests as OpenRTB 2.6 JSON (users
  keyed by ``user.buyeruid``, matching ``events.jsonl``), for load tests and demos.
- ``truth.json``: the hidden model's parameters and a summary.

The hidden model is logistic over exactly the feature strings TAFE extracts
(``tafe.cqs.features.names``): monotone effects of the user's history (recent views
and carts raise every head, a fresh purchase lowers the next one, ad fatigue lowers
clicks) plus a fixed random effect per context value (domain, geo, size, hour...).
Everything is a function of ``--seed``: the same seed writes the same files.
"""

from __future__ import annotations

import bisect
import itertools
import json
import math
import os
import random
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from tafe.core.types import BidRequest, Imp, Video
from tafe.cqs.features import SPEC, names
from tafe.cqs.state import NEVER, UserState

DAY = 86400.0
HEADS = ("visit", "click", "purchase")
BIAS = {"visit": -0.8, "click": -3.9, "purchase": -6.0}
REQUESTS_JSON_MAX = 10_000

# Standard deviation of the random effect of each context feature, per head.
SIGMA = {
    "ch": 0.2, "inv": 0.25, "pub": 0.1, "cat": 0.2, "dt": 0.25, "os": 0.2, "geo": 0.3, "reg": 0.1, "hr": 0.15,
    "dow": 0.05, "priv": 0.1, "dt*hr": 0.03, "os*dt": 0.1, "ch*geo": 0.1, "fmt": 0.3, "slot": 0.2, "floor": 0.15,
    "tag": 0.03, "fmt*dt": 0.1, "sz": 0.25, "geo*hr": 0.1, "rc*dt": 0.1, "rk*ch": 0.1, "v30d*ch": 0.1, "s1d*q": 0.1,
}
# Monotone history effects per head: feature -> list of weights by bucket.
_REC = [2.2, 1.9, 1.6, 1.3, 1.0, 0.7, 0.4, 0.2, 0.0, -0.2, -0.4, -0.6]  # by recency bucket, 11 = never
HISTORY = {
    "visit": {"rv": _REC, "rc": [x * 0.6 for x in _REC], "v30d": [0, 0.2, 0.35, 0.5, 0.6, 0.7, 0.75, 0.8],
              "s1d": [0, 0, -0.05, -0.1, -0.2, -0.35, -0.5, -0.6], "known": [0.0, 0.3]},
    "click": {"rk": [x * 0.5 for x in _REC], "ctr": [-0.3, 0.1, 0.3, 0.6, 0.9, 1.2, 0.0], "rv": [x * 0.4 for x in _REC],
              "s1d": [0, 0, -0.1, -0.2, -0.4, -0.6, -0.8, -1.0], "known": [0.0, 0.2]},
    "purchase": {"rc": [x * 0.9 for x in _REC], "cartab": [1.6, 1.5, 1.3, 1.1, 0.9, 0.7, 0.5, 0.3, 0.1, 0.0, 0.0, 0.0, 0.0],
                 "p30d": [0, -0.8, -0.6, -0.4, -0.2, 0, 0, 0], "p365d": [0, 0.4, 0.6, 0.8, 0.9, 1.0, 1.0, 1.0],
                 "rv": [x * 0.5 for x in _REC], "known": [0.0, 0.3]},
}

_COUNTRIES = [("USA", 0.55, ["CA", "NY", "TX", "FL", "WA", "IL", "GA"]), ("GBR", 0.1, ["ENG", "SCT", "WLS"]),
              ("DEU", 0.08, ["BE", "BY", "HH"]), ("FRA", 0.07, ["IDF", "ARA"]), ("CAN", 0.06, ["ON", "QC", "BC"]),
              ("BRA", 0.06, ["SP", "RJ"]), ("IND", 0.05, ["MH", "KA", "DL"]), ("JPN", 0.03, ["13", "27"])]
_GDPR = {"GBR", "DEU", "FRA"}
_SIZES = [((300, 250), 0.35), ((728, 90), 0.2), ((320, 50), 0.2), ((300, 600), 0.08), ((160, 600), 0.07),
          ((320, 480), 0.05), ((970, 250), 0.05)]
_CATS = ["IAB1", "IAB2", "IAB3", "IAB9", "IAB12", "IAB13", "IAB15", "IAB17", "IAB18", "IAB19", "IAB20", "IAB22"]
_OS_JSON = {"ios": "iOS", "android": "Android", "windows": "Windows", "macos": "macOS", "linux": "Linux", "tvos": "tvOS", "roku": "Roku"}


def _gauss(key: str) -> float:
    """A fixed standard normal draw per key: the hidden model's random effects."""
    return random.Random(zlib.crc32(key.encode())).gauss(0.0, 1.0)


class Truth:
    """The hidden generating model: logistic over feature strings, one head per outcome."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._cache: dict[str, tuple[float, ...]] = {}

    def weights(self, name: str) -> tuple[float, ...]:
        w = self._cache.get(name)
        if w is None:
            key, _, value = name.partition("=")
            out = []
            for head in HEADS:
                table = HISTORY[head].get(key)
                if table is not None:
                    out.append(table[int(value)])
                else:
                    out.append(SIGMA.get(key, 0.0) * _gauss(f"{self.seed}:{head}:{name}"))
            w = self._cache[name] = tuple(out)
        return w

    def logits(self, feature_names: list[str]) -> list[float]:
        z = [BIAS[h] for h in HEADS]
        for n in feature_names:
            for k, x in enumerate(self.weights(n)):
                z[k] += x
        return z


def aggregate(events: list[tuple[float, str]], as_of: float) -> UserState | None:
    """A user's state at ``as_of`` from their (ts, type) events, or None if none is kept.

    The same semantics as ``tafe.cqs.store``: only events with ``0 <= as_of - ts < 365
    days`` count, in windows ``age < W``; recencies are whole hours.
    """
    counts = dict.fromkeys(UserState._fields, 0)
    last: dict[str, float] = {}
    windows = {"view": (("views_1d", 1), ("views_7d", 7), ("views_30d", 30)), "cart": (("carts_7d", 7), ("carts_30d", 30)),
               "purchase": (("purchases_30d", 30), ("purchases_365d", 365)), "shown": (("shown_1d", 1), ("shown_7d", 7)),
               "click": (("clicks_7d", 7), ("clicks_30d", 30))}
    for ts, kind in events:
        age = as_of - ts
        if not 0 <= age < 365 * DAY:
            continue
        for fieldname, days in windows[kind]:
            if age < days * DAY:
                counts[fieldname] += 1
        if ts > last.get(kind, -1.0):
            last[kind] = ts
    for kind, fieldname in (("view", "hours_since_view"), ("cart", "hours_since_cart"),
                            ("purchase", "hours_since_purchase"), ("click", "hours_since_click")):
        counts[fieldname] = min(int((as_of - last[kind]) // 3600), NEVER - 1) if kind in last else NEVER
    return UserState(**counts) if last else None


@dataclass
class User:
    key: str
    activity: float  # sessions per 30 days
    events: list[tuple[float, str]]
    state: UserState | None  # None: nothing in the last 365 days, so not in the store


def _user(rng: random.Random, as_of: float) -> User:
    key = "u-%016x" % rng.getrandbits(64)
    activity = min(60.0, 0.3 * rng.paretovariate(1.3))
    intent = rng.gauss(0.0, 1.0)
    last_active = as_of - rng.expovariate(1 / (12 * DAY))
    span = rng.uniform(15, 365) * DAY
    events: list[tuple[float, str]] = []
    n_sessions = min(400, _poisson(rng, activity * span / (30 * DAY)))
    for _ in range(n_sessions):
        t = rng.uniform(last_active - span, last_active)
        for _ in range(1 + int(rng.expovariate(0.5))):
            events.append((t, "view"))
            t += rng.uniform(20, 300)
        if rng.random() < _sig(intent - 1.8):
            events.append((t, "cart"))
            if rng.random() < _sig(intent - 0.3):
                events.append((t + rng.uniform(60, 3 * DAY), "purchase"))
    if events:  # retargeting: ads follow visitors for a month after their last visit
        for _ in range(_poisson(rng, 2 + 4 * activity)):
            t = rng.uniform(as_of - 30 * DAY, as_of)
            events.append((t, "shown"))
            if rng.random() < _sig(intent - 3.5):
                events.append((t + rng.uniform(1, 60), "click"))
    events = sorted((min(t, as_of), k) for t, k in events)
    return User(key, activity, events, aggregate(events, as_of))


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _poisson(rng: random.Random, lam: float) -> int:
    # Knuth for small means, normal approximation above; enough for a synthetic world.
    if lam > 30:
        return max(0, int(rng.gauss(lam, lam**0.5) + 0.5))
    n, p, limit = 0, 1.0, math.exp(-lam)
    while True:
        p *= rng.random()
        if p < limit:
            return n
        n += 1


T = TypeVar("T")


def _pick(rng: random.Random, pairs: Sequence[tuple[T, float]]) -> T:
    return rng.choices([p[0] for p in pairs], weights=[p[1] for p in pairs])[0]


_ZIPF = {n: list(itertools.accumulate(1.0 / (k + 1) for k in range(n))) for n in (300, 600)}


def _zipf(rng: random.Random, n: int) -> int:
    """Rank of a Zipf(1) draw among n: a few big publishers, a long tail."""
    return bisect.bisect_left(_ZIPF[n], rng.uniform(0.0, _ZIPF[n][-1]))


def _context(rng: random.Random, now: float, user_keys: tuple[str, ...], rid: str) -> tuple[BidRequest, dict[str, Any]]:
    """One bid request (one imp) as TAFE's parsed view and as OpenRTB 2.6 JSON."""
    app = rng.random() < 0.38
    if app:
        k = _zipf(rng, 300)
        inv, channel = f"com.example.app{k}", "app"
        dt = _pick(rng, [(4, 0.72), (5, 0.16), (3, 0.12)])
    else:
        k = _zipf(rng, 600)
        inv, channel = f"news{k}.example.com", "site"
        dt = _pick(rng, [(2, 0.45), (4, 0.4), (5, 0.15)])
    os_ = {2: lambda: _pick(rng, [("windows", 0.7), ("macos", 0.25), ("linux", 0.05)]),
           3: lambda: _pick(rng, [("tvos", 0.3), ("roku", 0.4), ("android", 0.3)])}.get(dt, lambda: _pick(rng, [("ios", 0.45), ("android", 0.55)]))()
    crng = random.Random(zlib.crc32(inv.encode()))
    cats = tuple(crng.sample(_CATS, 1 + crng.randrange(2)))
    publisher = f"pub{zlib.crc32(inv.encode()) % 97}"
    country = _pick(rng, [(c, w) for c, w, _ in _COUNTRIES])
    region = rng.choice(next(r for c, _, r in _COUNTRIES if c == country))
    gdpr = country in _GDPR
    lmt = dt in (4, 5) and rng.random() < 0.15
    fmt = _pick(rng, [("banner", 0.74), ("video", 0.16 if dt != 3 else 0.9), ("native", 0.1)])
    tag = f"{inv}/slot{rng.randrange(4)}"
    floor = round(min(20.0, rng.lognormvariate(-1.0, 0.8)), 2)
    instl = rng.random() < (0.15 if app else 0.03)
    rewarded = app and fmt == "video" and rng.random() < 0.3
    sizes: tuple[tuple[int, int], ...] = ()
    video = None
    if fmt == "banner":
        sizes = (_pick(rng, _SIZES),)
        if rng.random() < 0.2:
            sizes += (_pick(rng, _SIZES),)
        sizes = tuple(dict.fromkeys(sizes))
    elif fmt == "video":
        video = Video(mimes=("video/mp4",), w=640, h=360, minduration=5, maxduration=30, protocols=(2, 3, 5, 6), placement=1)
    imp = Imp(id="1", banner_sizes=sizes, has_banner=bool(sizes), video=video, native=fmt == "native", bidfloor=floor,
              tagid=tag, instl=instl, rewarded=rewarded)
    request = BidRequest(id=rid, imps=(imp,), channel=channel, domain=inv if not app else "", bundle=inv if app else "",
                         publisher_id=publisher, inventory_cats=cats, devicetype=dt, os=os_, country=country, region=region,
                         lmt=lmt, gdpr=gdpr, consent="CPc0nsent" if gdpr else "", user_keys=user_keys, tmax=100, cur=("USD",))
    jimp: dict[str, Any] = {"id": "1", "bidfloor": floor, "bidfloorcur": "USD", "tagid": tag, "secure": 1}
    if instl:
        jimp["instl"] = 1
    if rewarded:
        jimp["rwdd"] = 1
    if sizes:
        jimp["banner"] = {"format": [{"w": w, "h": h} for w, h in sizes]}
    elif video is not None:
        jimp["video"] = {"mimes": ["video/mp4"], "w": 640, "h": 360, "minduration": 5, "maxduration": 30, "protocols": [2, 3, 5, 6], "plcmt": 1}
    else:
        jimp["native"] = {"ver": "1.2", "request": json.dumps({"ver": "1.2", "assets": [{"id": 1, "required": 1, "title": {"len": 90}}]})}
    inv_obj: dict[str, Any] = {"id": inv, "cat": list(cats), "publisher": {"id": publisher}}
    inv_obj.update({"bundle": inv} if app else {"domain": inv, "page": f"https://{inv}/article/{rng.randrange(10**6)}"})
    body: dict[str, Any] = {
        "id": rid, "at": 1, "tmax": 100, "cur": ["USD"], "imp": [jimp], ("app" if app else "site"): inv_obj,
        "device": {"devicetype": dt, "os": _OS_JSON[os_], "lmt": int(lmt), "geo": {"country": country, "region": region},
                   "ip": "203.0.113.%d" % rng.randrange(1, 255), "ua": "Mozilla/5.0 (synthetic)"},
        "regs": {"gdpr": int(gdpr)},
    }
    if user_keys:
        body["user"] = {"buyeruid": user_keys[0]}
        if gdpr:
            body["user"]["consent"] = "CPc0nsent"
    return request, body


def simulate(users: int, requests: int, unknown: float, seed: int, as_of: float) -> tuple[list[User], Iterator[tuple[dict[str, Any], dict[str, Any]]]]:
    """The population, and a generator of (decision record, OpenRTB request) pairs."""
    rng = random.Random(seed)
    population = [_user(rng, as_of) for _ in range(users)]
    truth = Truth(seed)

    def stream() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        srng = random.Random(seed * 7919 + 1)
        known = [u for u in population if u.state is not None]
        cum = []
        total = 0.0
        for u in known:
            total += 0.2 + u.activity
            cum.append(total)
        for n in range(requests):
            now = as_of + srng.uniform(0, 7 * DAY)
            if srng.random() < unknown or not known:
                user, keys = None, (() if srng.random() < 0.15 else ("x-%016x" % srng.getrandbits(64),))
            else:
                user = known[min(len(known) - 1, bisect.bisect_left(cum, srng.uniform(0, total)))]
                keys = (user.key,)
            rid = "%s-%d" % ("%08x" % seed, n)
            request, body = _context(srng, now, keys, rid)
            state = user.state if user is not None else None  # as the store would answer
            feats = names(request, request.imps[0], state, now, as_of)
            z = truth.logits(feats)
            p = [_sig(x) for x in z]
            outcomes = {h: int(srng.random() < q) for h, q in zip(HEADS, p)}
            record = {
                "ts": round(now, 3), "request_id": rid, "imp_id": "1", "model": "synth-truth", "store": f"synth-{seed}",
                "spec": SPEC, "known": state is not None, "features": feats, "outcomes": outcomes,
                "p_true": {h: round(q, 6) for h, q in zip(HEADS, p)},
            }
            yield record, body

    return population, stream()


def write(out: str, users: int = 20_000, requests: int = 100_000, unknown: float = 0.3, seed: int = 1,
          as_of: float = 1_767_225_600.0) -> dict[str, Any]:
    """Write the synthetic world into directory ``out``; returns a summary."""
    os.makedirs(out, exist_ok=True)
    population, stream = simulate(users, requests, unknown, seed, as_of)
    n_events = 0
    with open(os.path.join(out, "events.jsonl"), "w") as f:
        for u in population:
            for ts, kind in u.events:
                f.write(f'{{"user":"{u.key}","ts":{ts:.0f},"type":"{kind}"}}\n')
                n_events += 1
    rates = dict.fromkeys(HEADS, 0)
    known = 0
    with open(os.path.join(out, "decisions.jsonl"), "w") as fd, open(os.path.join(out, "requests.jsonl"), "w") as fr:
        for n, (record, body) in enumerate(stream):
            fd.write(json.dumps(record, separators=(",", ":")) + "\n")
            if n < REQUESTS_JSON_MAX:
                fr.write(json.dumps(body, separators=(",", ":")) + "\n")
            known += record["known"]
            for h in HEADS:
                rates[h] += record["outcomes"][h]
    summary = {
        "out": out, "seed": seed, "as_of": as_of, "users": users, "events": n_events, "requests": requests,
        "known_share": round(known / max(1, requests), 4),
        "outcome_rates": {h: round(c / max(1, requests), 5) for h, c in rates.items()},
        "users_in_store": sum(1 for u in population if u.state is not None),
    }
    with open(os.path.join(out, "truth.json"), "w") as f:
        json.dump({**summary, "spec": SPEC, "bias": BIAS, "sigma": SIGMA, "history": HISTORY}, f, indent=1)
    return summary
