"""Exchange-like OpenRTB traffic, and the rules an answer to it must follow.

Requests are generated (not copied) from templates modelled on the shapes real exchanges
send (IAB 2.5/2.6 examples, Prebid Server adapters): banner, video, native and audio imps,
site and app inventory, single and multi-imp, floors, ``pmp`` deals, 2.5 ``ext`` and 2.6
top-level privacy fields, ``tmax``. Users follow a Zipf law over a fixed population (a
few users are seen very often, most rarely), plus a share of users never seen before.

Stdlib only, so the load test, the benchmarks and the unit tests share one definition,
and ``validate`` is a pure function the tests can feed hand-made answers.
"""

from __future__ import annotations

import functools
import gzip
import itertools
import json
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

FORMATS = ("banner", "video", "native", "audio")
BANNER_SIZES = ((300, 250), (728, 90), (320, 50), (300, 600), (160, 600), (970, 250), (336, 280), (320, 480))
BANNER_WEIGHTS = (40, 15, 15, 8, 5, 3, 3, 2)  # 300x250 dominates real display traffic
VIDEO_SIZES = ((640, 480), (1280, 720), (1920, 1080), (940, 560))
TMAX_CHOICES = (80, 100, 100, 100, 100, 120, 150, 200, 300)
COUNTRIES = ("USA", "USA", "USA", "GBR", "DEU", "FRA", "CAN", "BRA", "JPN", "IND")
CATEGORIES = ("IAB1", "IAB2", "IAB3-1", "IAB7", "IAB9", "IAB12", "IAB17", "IAB19", "IAB20")
UAS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Mobile Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15",
)
NATIVE_REQUEST = json.dumps(
    {
        "ver": "1.2",
        "plcmttype": 1,
        "assets": [
            {"id": 1, "required": 1, "title": {"len": 90}},
            {"id": 2, "required": 1, "img": {"type": 3, "wmin": 600, "hmin": 300}},
            {"id": 3, "required": 0, "data": {"type": 2, "len": 140}},
        ],
    },
    separators=(",", ":"),
)


@dataclass(frozen=True)
class Mix:
    """Shares and sizes of the generated traffic; every field is also ``TRAFFIC_<NAME>``."""

    banner: float = 0.60
    video: float = 0.20
    native: float = 0.12
    audio: float = 0.08
    app: float = 0.35  # share of app inventory (the rest is site)
    multi_imp: float = 0.20  # share of requests with 2..max_imps imps
    max_imps: int = 5
    known_user: float = 0.70  # share of requests whose user comes from the Zipf population
    users: int = 100_000  # size of the known population
    zipf_s: float = 1.1  # Zipf exponent of user popularity
    user_prefix: str = "u"  # known users are <prefix><rank, 7 digits>, rank 1 the most frequent
    users_file: str = ""  # or: buyeruids from a file (lines, or events.jsonl of a CQS store), the first the most frequent
    floor: float = 0.70  # share of imps carrying a bidfloor
    floor_median: float = 0.40  # CPM; floors are log-normal around it
    pmp: float = 0.10  # share of imps carrying pmp deals
    private_auction: float = 0.30  # of those, the share with private_auction=1
    gzip: float = 0.10  # share of request bodies sent Content-Encoding: gzip
    win_notice: float = 0.20  # share of bids whose nurl is called back as a win
    openrtb26: float = 0.50  # share of 2.6-shaped requests (the rest put privacy in ext, 2.5 style)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Mix:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get("TRAFFIC_" + f.name.upper())
            if raw is not None:
                values[f.name] = type(f.default)(raw)
        return cls(**values)


@functools.lru_cache(maxsize=4)
def _zipf_cum_weights(users: int, s: float) -> tuple[float, ...]:
    """Shared by all generators in a process (a locust worker runs many users)."""
    return tuple(itertools.accumulate(1.0 / rank**s for rank in range(1, users + 1)))


@functools.lru_cache(maxsize=2)
def _user_keys(path: str) -> tuple[str, ...]:
    """Plain lines of keys, or JSON lines with a ``user`` field (``tafe cqs synth``'s events.jsonl)."""
    with open(path) as fh:
        lines = (line.strip() for line in fh)
        keys = tuple(dict.fromkeys(json.loads(x)["user"] if x.startswith("{") else x for x in lines if x))
    if not keys:
        raise ValueError(f"{path}: no user keys")
    return keys


@dataclass
class Generator:
    """Deterministic for a given seed: the same seed replays the same traffic."""

    mix: Mix = field(default_factory=Mix)
    seed: int | None = None

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self._keys = _user_keys(self.mix.users_file) if self.mix.users_file else None
        population = len(self._keys) if self._keys else self.mix.users
        self._cum = _zipf_cum_weights(population, self.mix.zipf_s)
        self._ranks = range(1, population + 1)
        self._fmt_weights = [getattr(self.mix, name) for name in FORMATS]
        self._serial = itertools.count(1)

    # --- the request ---------------------------------------------------------------------
    def request(self) -> dict[str, Any]:
        """One BidRequest as a dict."""
        rng, mix = self.rng, self.mix
        n_imps = rng.randint(2, max(2, mix.max_imps)) if rng.random() < mix.multi_imp else 1
        is_26 = rng.random() < mix.openrtb26
        req: dict[str, Any] = {
            "id": f"{rng.getrandbits(64):016x}-{next(self._serial)}",
            "imp": [self._imp(str(i + 1)) for i in range(n_imps)],
            "at": rng.choice((1, 2, 2)),
            "tmax": rng.choice(TMAX_CHOICES),
            "cur": ["USD"],
        }
        if rng.random() < mix.app:
            req["app"] = self._app()
        else:
            req["site"] = self._site()
        req["device"] = self._device("app" in req)
        user = self._user()
        if user:
            req["user"] = user
        if rng.random() < 0.3:
            req["bcat"] = rng.sample(CATEGORIES, 2)
        if rng.random() < 0.2:
            req["badv"] = ["blocked-example.com"]
        self._privacy(req, is_26)
        req["source"] = {"tid": f"{rng.getrandbits(96):024x}"}
        return req

    def encode(self, req: Mapping[str, Any]) -> tuple[bytes, dict[str, str]]:
        """Body and headers as an exchange would send them (a share gzipped)."""
        body = json.dumps(req, separators=(",", ":")).encode()
        version = "2.6" if "gdpr" in req.get("regs", {}) else "2.5"
        headers = {"Content-Type": "application/json", "x-openrtb-version": version}
        if self.rng.random() < self.mix.gzip:
            body = gzip.compress(body, compresslevel=5)
            headers["Content-Encoding"] = "gzip"
        return body, headers

    def user_id(self) -> str:
        rank = self.rng.choices(self._ranks, cum_weights=self._cum)[0]
        if self._keys:
            return self._keys[rank - 1]
        return f"{self.mix.user_prefix}{rank:07d}"

    def _imp(self, imp_id: str) -> dict[str, Any]:
        rng, mix = self.rng, self.mix
        fmt = rng.choices(FORMATS, weights=self._fmt_weights)[0]
        imp: dict[str, Any] = {"id": imp_id, "secure": rng.choice((0, 1, 1)), "tagid": f"slot-{rng.randint(1, 400)}"}
        if fmt == "banner":
            sizes = rng.choices(BANNER_SIZES, weights=BANNER_WEIGHTS, k=rng.choice((1, 1, 2)))
            w, h = sizes[0]
            imp["banner"] = {"w": w, "h": h, "format": [{"w": a, "h": b} for a, b in dict.fromkeys(sizes)], "pos": rng.choice((0, 1, 3))}
        elif fmt == "video":
            w, h = rng.choice(VIDEO_SIZES)
            imp["video"] = {
                "mimes": ["video/mp4", "application/javascript"][: rng.choice((1, 2))],
                "minduration": 5,
                "maxduration": rng.choice((15, 30, 60)),
                "protocols": [2, 3, 5, 6],
                "w": w,
                "h": h,
                "plcmt": rng.choice((1, 2, 4)),
                "linearity": 1,
            }
        elif fmt == "native":
            imp["native"] = {"request": NATIVE_REQUEST, "ver": "1.2"}
        else:
            imp["audio"] = {"mimes": ["audio/mpeg", "audio/mp4"], "minduration": 5, "maxduration": 30, "protocols": [2, 3]}
        if rng.random() < mix.floor:
            imp["bidfloor"] = round(mix.floor_median * rng.lognormvariate(0.0, 0.6), 4)
            imp["bidfloorcur"] = "USD"
        if rng.random() < mix.pmp:
            deals = [
                {"id": f"deal-{rng.randint(1, 50)}", "bidfloor": round(rng.uniform(0.5, 3.0), 2), "at": 1}
                for _ in range(rng.randint(1, 2))
            ]
            imp["pmp"] = {"private_auction": int(rng.random() < mix.private_auction), "deals": deals}
        return imp

    def _site(self) -> dict[str, Any]:
        rng = self.rng
        n = min(int(rng.paretovariate(1.2)), 5000)  # long tail of publishers too
        domain = f"pub{n}.example.com"
        return {
            "id": f"site-{n}",
            "domain": domain,
            "page": f"https://{domain}/article/{rng.randint(1, 10**6)}.html",
            "ref": "https://www.google.com/",
            "cat": [rng.choice(CATEGORIES)],
            "publisher": {"id": f"pub-{n}", "name": domain},
            "mobile": rng.choice((0, 1)),
        }

    def _app(self) -> dict[str, Any]:
        rng = self.rng
        n = min(int(rng.paretovariate(1.2)), 5000)
        return {
            "id": f"app-{n}",
            "bundle": f"com.example.game{n}",
            "name": f"Game {n}",
            "storeurl": f"https://play.google.com/store/apps/details?id=com.example.game{n}",
            "cat": [rng.choice(CATEGORIES)],
            "publisher": {"id": f"apppub-{n}"},
        }

    def _device(self, is_app: bool) -> dict[str, Any]:
        rng = self.rng
        device: dict[str, Any] = {
            "ua": rng.choice(UAS),
            "ip": f"{rng.randint(11, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
            "geo": {"country": rng.choice(COUNTRIES), "type": 2},
            "devicetype": rng.choice((1, 2, 4, 5)),
            "os": rng.choice(("Android", "iOS", "Windows", "macOS")),
            "language": "en",
            "connectiontype": rng.choice((2, 3, 6)),
            "dnt": 0,
            "lmt": int(rng.random() < 0.1),
        }
        if is_app:
            device["ifa"] = f"{rng.getrandbits(128):032x}"
        return device

    def _user(self) -> dict[str, Any] | None:
        rng = self.rng
        if rng.random() < self.mix.known_user:
            return {"id": f"x-{rng.getrandbits(40):010x}", "buyeruid": self.user_id()}
        if rng.random() < 0.5:
            return {"id": f"x-{rng.getrandbits(40):010x}"}  # never seen: no buyeruid
        return None

    def _privacy(self, req: dict[str, Any], is_26: bool) -> None:
        rng = self.rng
        gdpr = int(rng.random() < 0.2)
        consent = "CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA" if gdpr else ""
        if is_26:
            req["regs"] = {"gdpr": gdpr, "us_privacy": "1YNN"}
            if consent and "user" in req:
                req["user"]["consent"] = consent
        else:
            req["regs"] = {"ext": {"gdpr": gdpr, "us_privacy": "1YNN"}}
            if consent and "user" in req:
                req["user"]["ext"] = {"consent": consent}


def sample_body(target_bytes: int = 1500, seed: int = 7) -> bytes:
    """A single-imp 300x250 site request of about ``target_bytes``, the same every run."""
    mix = Mix(banner=1, video=0, native=0, audio=0, app=0, multi_imp=0, known_user=1, floor=1, pmp=0, gzip=0)
    gen = Generator(mix, seed=seed)
    req = gen.request()
    req["imp"][0]["banner"] = {"w": 300, "h": 250, "format": [{"w": 300, "h": 250}], "pos": 1}
    req["imp"][0]["bidfloor"] = 0.05
    req["tmax"] = 1000  # a CPU benchmark must not turn into a deadline benchmark
    body = json.dumps(req, separators=(",", ":"))
    pad = target_bytes - len(body)
    if pad > 40:  # exchanges send page keywords; they fill the body to size realistically
        words = ",".join(itertools.islice(itertools.cycle(("sports", "news", "cars", "travel", "food")), pad))
        req["site"]["keywords"] = words[: pad - len(',"keywords":""')]
        body = json.dumps(req, separators=(",", ":"))
    return body.encode()


# --- validating the answer ----------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """A verdict on one answer: ``reason`` is empty when the answer is acceptable."""

    reason: str = ""
    bids: tuple[dict[str, Any], ...] = ()
    nbr: int | None = None

    @property
    def ok(self) -> bool:
        return not self.reason


def _floor_of(imp: Mapping[str, Any], deal_id: str | None) -> tuple[float, str]:
    """The floor a bid on ``imp`` must clear, or a reason why it cannot be judged."""
    floor = float(imp.get("bidfloor") or 0.0)
    pmp = imp.get("pmp") or {}
    deals = {d.get("id"): d for d in pmp.get("deals") or ()}
    if deal_id:
        if deal_id not in deals:
            return 0.0, f"dealid {deal_id!r} not offered on imp {imp.get('id')!r}"
        return max(floor, float(deals[deal_id].get("bidfloor") or 0.0)), ""
    if pmp.get("private_auction") == 1:
        return 0.0, f"open-auction bid on private imp {imp.get('id')!r}"
    return floor, ""


def validate(request: Mapping[str, Any], status: int, body: bytes) -> Outcome:
    """Judge one answer to ``request`` by the OpenRTB rules TAFE promises to keep.

    Acceptable: 204 with an empty body; 200 with ``{id, nbr}`` and no bids; or 200 with
    a BidResponse echoing ``id`` whose bids each name a known imp (at most once), carry a
    positive price that clears that imp's floor (its deal's floor for a deal bid), have
    markup or a win-notice URL and a currency the request accepts.
    """
    if status == 204:
        return Outcome() if not body else Outcome("204 with a body")
    if status != 200:
        return Outcome(f"HTTP {status}")
    if body[:2] == b"\x1f\x8b":
        body = gzip.decompress(body)
    try:
        resp = json.loads(body)
    except ValueError:
        return Outcome("200 body is not JSON")
    if not isinstance(resp, dict):
        return Outcome("200 body is not a JSON object")
    if resp.get("id") != request.get("id"):
        return Outcome("response id does not echo the request id")
    seatbids = resp.get("seatbid") or []
    if not isinstance(seatbids, list):
        return Outcome("seatbid is not an array")
    if not seatbids:
        nbr = resp.get("nbr")
        return Outcome(nbr=nbr) if isinstance(nbr, int) else Outcome("200 without seatbid or nbr")
    cur = resp.get("cur", "USD")
    if cur not in (request.get("cur") or ["USD"]):
        return Outcome(f"currency {cur!r} not accepted by the request")
    imps = {imp.get("id"): imp for imp in request.get("imp") or ()}
    seen: set[str] = set()
    bids: list[dict[str, Any]] = []
    for seatbid in seatbids:
        if not isinstance(seatbid, dict) or not isinstance(seatbid.get("bid"), list) or not seatbid["bid"]:
            return Outcome("seatbid without a non-empty bid array")
        for bid in seatbid["bid"]:
            reason = _check_bid(bid, imps, seen)
            if reason:
                return Outcome(reason)
            bids.append(bid)
    return Outcome(bids=tuple(bids))


def _check_bid(bid: Any, imps: Mapping[str, Mapping[str, Any]], seen: set[str]) -> str:
    if not isinstance(bid, dict):
        return "bid is not an object"
    if not isinstance(bid.get("id"), str) or not bid["id"]:
        return "bid without an id"
    impid = bid.get("impid")
    if impid not in imps:
        return f"bid for unknown impid {impid!r}"
    if impid in seen:
        return f"two bids for impid {impid!r}"
    seen.add(impid)
    price = bid.get("price")
    if isinstance(price, bool) or not isinstance(price, (int, float)) or price <= 0:
        return f"bad price {price!r} on impid {impid!r}"
    floor, reason = _floor_of(imps[impid], bid.get("dealid"))
    if reason:
        return reason
    if price < floor - 1e-9:
        return f"price {price} under floor {floor} on impid {impid!r}"
    if not bid.get("adm") and not bid.get("nurl"):
        return f"bid on impid {impid!r} has neither adm nor nurl"
    imp = imps[impid]
    banner = imp.get("banner")
    only_banner = banner and not (imp.get("video") or imp.get("audio") or imp.get("native"))
    if only_banner and "w" in bid and "h" in bid:
        sizes = {(f.get("w"), f.get("h")) for f in banner.get("format") or ()} | {(banner.get("w"), banner.get("h"))}
        if (bid["w"], bid["h"]) not in sizes:
            return f"bid size {bid['w']}x{bid['h']} not offered on impid {impid!r}"
    return ""


def win_url(bid: Mapping[str, Any], request: Mapping[str, Any], clearing: float | None = None) -> str:
    """The bid's ``nurl`` with the exchange macros filled in, as an exchange calls it on a win."""
    price = bid["price"] * 0.8 if clearing is None else clearing
    url = str(bid.get("nurl") or "")
    for macro, value in (
        ("${AUCTION_PRICE}", f"{price:.4f}"),
        ("${AUCTION_ID}", str(request.get("id", ""))),
        ("${AUCTION_BID_ID}", str(bid.get("id", ""))),
        ("${AUCTION_IMP_ID}", str(bid.get("impid", ""))),
        ("${AUCTION_SEAT_ID}", "tafe"),
        ("${AUCTION_AD_ID}", str(bid.get("adid", ""))),
        ("${AUCTION_CURRENCY}", "USD"),
        ("${AUCTION_LOSS}", "0"),
    ):
        url = url.replace(macro, value)
    return url
