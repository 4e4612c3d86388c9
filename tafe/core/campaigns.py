"""Campaigns: what TAFE can show and what it is worth, loaded once into an indexed, immutable set.

The file is JSON (the bundled demo set is ``tafe/data/campaigns.json``)::

    {
      "currency": "USD",             # every CPM in this file; must be the bid currency
      "score_pivot": 0.5,            # the CQS at which a user is worth a campaign's base_cpm
      "first_price_shade": 0.85,     # bid this fraction of the value in first-price auctions (at=1)
                                     # where no learned shading table covers the imp (tafe.core.shading)
      "fx": {"EUR": 1.08},           # units of "currency" per unit of another currency (floors)
      "campaigns": [{
        "id": "c1", "advertiser": "Acme", "adomain": ["acme.example"], "cat": ["IAB22"],
        "cattax": 1,                 # taxonomy of "cat" (AdCOM list; default 1, IAB Content Category 1.0)
        "bundle": "",                # the advertised app (app advertisers), matched against bapp
        "language": "en",            # ISO-639-1 language of its creatives (each may say otherwise)
        "dsa": {"behalf": "Acme", "paid": "Acme Group", "adrender": 0},  # DSA transparency: on
                                     # whose behalf the ad is shown, who paid (1-100 characters
                                     # each), and 1 if the creative renders the notice itself;
                                     # absent: no bids where a request requires DSA transparency
        "base_cpm": 1.5, "max_cpm": 4.0,
        "targeting": {"country": ["USA"], "devicetype": [1, 4], "os": ["ios"],
                      "channel": ["site", "app", "dooh"], "known_users_only": false},
        "deals": ["DEAL-1"],         # pmp deal ids this campaign was set up to bid on
        "daily_budget": 250,         # spend per budget period, in "currency"; absent: unlimited
        "pacing": "even",            # "even" (default): spread the budget over the rest of the
                                     # period; "asap": spend as fast as traffic allows
        "frequency_cap": {"impressions": 3, "window_s": 86400},  # per user; absent: no cap
        "landing_url": "https://acme.example/spring",  # where a click goes (absolute http/https)
        "creatives": [
          {"id": "cr1", "format": "banner", "w": 300, "h": 250, "secure": true, "attr": [1],
           "adm": "<a href=\"${TAFE_CLICK_URL}\"><img src=...></a><img src=\"${TAFE_IMP_URL}\">"},
          {"id": "cr2", "format": "video", "mimes": ["video/mp4"], "duration": 15, "adm": "<VAST ...>"},
          {"id": "cr3", "format": "audio", "mimes": ["audio/mpeg"], "duration": 30, "adm": "<VAST ...>"},
          {"id": "cr4", "format": "native", "adm": "{\\"native\\": ...}"}
        ]
      }]
    }

Empty targeting lists mean "any". A creative's ``attr`` (AdCOM creative attributes, e.g. 1
audio auto-play, 6 in-banner video) keeps it from imps whose ``battr`` lists one of them, and
goes out in its bids; ``language`` likewise. Money is held as integer micros (millionths of the
currency unit) so that comparisons with floors and budgets are exact. In ``adm``, besides the
exchange's OpenRTB macros, ``${TAFE_CLICK_URL}`` and ``${TAFE_IMP_URL}`` stand for TAFE's own
click and impression tracking URLs; a campaign whose markup uses ``${TAFE_CLICK_URL}`` must
have a ``landing_url``. Unknown fields are errors (a misspelt ``daily_budget`` would otherwise
mean no budget). ``validate`` reports every error as ``json.path: message`` (what
``tafe campaigns validate FILE`` prints); ``load`` refuses the file with the first of them.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from tafe.core.types import Creative, Dsa, Imp, MediaType

MICROS = 1_000_000
# An interstitial banner that states no size is full screen: phone and tablet portrait/landscape.
INTERSTITIAL_SIZES = ((320, 480), (480, 320), (768, 1024), (1024, 768))
# Ids go into notice URLs unquoted: keep them URL-safe.
_ID = re.compile(r"[A-Za-z0-9._~-]{1,64}")
_ID_RULE = "expected 1-64 of A-Z a-z 0-9 . _ ~ -"
_FORMATS = {"banner": MediaType.BANNER, "video": MediaType.VIDEO, "audio": MediaType.AUDIO, "native": MediaType.NATIVE}
_FORMAT_RULE = f"expected one of {', '.join(sorted(_FORMATS))}"


class CampaignsError(ValueError):
    """The campaigns file cannot be used; the message names the file and the faulty entry."""


@dataclass(frozen=True, slots=True)
class Targeting:
    countries: frozenset[str] = frozenset()  # upper case, as device.geo.country is sent
    devicetypes: frozenset[int] = frozenset()
    os: frozenset[str] = frozenset()  # lower case
    channels: frozenset[str] = frozenset()  # "site", "app", "dooh"
    known_users_only: bool = False
    restricts: bool = False  # any of the four sets above is non-empty (saves checking them per bid)


@dataclass(frozen=True, slots=True)
class FrequencyCap:
    """At most ``impressions`` of a campaign per user in any ``window_s`` seconds."""

    impressions: int
    window_s: int


@dataclass(frozen=True, slots=True)
class Campaign:
    id: str
    advertiser: str
    adomain: tuple[str, ...]
    cat: tuple[str, ...]
    base_cpm_micros: int
    max_cpm_micros: int
    targeting: Targeting = Targeting()
    bundle: str = ""
    deals: frozenset[str] = frozenset()
    creatives: tuple[Creative, ...] = ()
    budget_micros: int = 0  # per budget period; 0: no budget (unlimited)
    pacing: str = "even"  # "even" or "asap"
    frequency_cap: FrequencyCap | None = None
    landing_url: str = ""  # where ${TAFE_CLICK_URL} finally sends a click
    cattax: int = 1  # the taxonomy of ``cat``
    dsa: Dsa | None = None  # DSA transparency; None: no bids where a request requires it
    # Its categories and their tier-1 parents: a bcat of "IAB7" blocks "IAB7-39" too.
    cat_family: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cat_family", frozenset(self.cat) | {c.split("-", 1)[0] for c in self.cat})


class Candidate(NamedTuple):
    """A (campaign, creative) pair with what the bid loop checks, unpacked once at load time."""

    campaign: Campaign
    creative: Creative
    media_check: bool  # video/audio: mimes and duration still to check against the imp
    restricts: bool  # the campaign has targeting
    secure: bool
    known_users_only: bool
    base_cpm_micros: int
    max_cpm_micros: int
    money: bool  # the campaign has a budget or a frequency cap: decide checks them


def _candidate(campaign: Campaign, creative: Creative) -> Candidate:
    t = campaign.targeting
    return Candidate(
        campaign, creative, creative.format in (MediaType.VIDEO, MediaType.AUDIO), t.restricts, creative.secure,
        t.known_users_only, campaign.base_cpm_micros, campaign.max_cpm_micros,
        campaign.budget_micros > 0 or campaign.frequency_cap is not None,
    )


def to_micros(value: Any) -> int:
    """A JSON number as integer micros, rounding half up at the sixth decimal."""
    return int((Decimal(str(value)) * MICROS).to_integral_value(rounding="ROUND_HALF_UP"))


class Campaigns:
    """The immutable campaign set, with creatives indexed by (format, w, h) for cheap matching."""

    def __init__(
        self,
        campaigns: tuple[Campaign, ...],
        *,
        currency: str = "USD",
        seat: str = "tafe",
        fx: dict[str, Decimal] | None = None,
        score_pivot: float = 0.5,
        first_price_shade: float = 1.0,
    ) -> None:
        self.campaigns = campaigns
        self.by_id = {c.id: c for c in campaigns}
        self.currency = currency
        self.seat = seat
        # micro-units of our currency per unit of another one; our own is exact.
        self.fx_micros = {cur: to_micros(rate) for cur, rate in (fx or {}).items()}
        self.fx_micros[currency] = MICROS
        self.score_pivot = score_pivot
        self.first_price_shade = first_price_shade
        index: dict[tuple[MediaType, int | None, int | None], list[Candidate]] = {}
        banners: list[Candidate] = []
        for campaign in campaigns:
            for creative in campaign.creatives:
                key = (creative.format, creative.w, creative.h) if creative.format is MediaType.BANNER else (creative.format, None, None)
                index.setdefault(key, []).append(_candidate(campaign, creative))
                if creative.format is MediaType.BANNER:
                    banners.append(_candidate(campaign, creative))
        self._index = {k: tuple(v) for k, v in index.items()}
        self._banners = tuple(banners)

    def __len__(self) -> int:
        return len(self.campaigns)

    def candidates(self, imp: Imp) -> list[Candidate]:
        """Every (campaign, creative) whose format and size fit the imp; media details checked by the caller."""
        out: list[Candidate] = []
        index = self._index
        if imp.has_banner:
            sizes = imp.banner_sizes or (INTERSTITIAL_SIZES if imp.instl else ())
            for w, h in sizes:
                out.extend(index.get((MediaType.BANNER, w, h), ()))
            if not imp.banner_sizes and not out:
                out.extend(self._banners)  # no size given (e.g. ``banner: {}``): any size, stated in w/h
        if imp.video is not None:
            out.extend(index.get((MediaType.VIDEO, None, None), ()))
        if imp.audio is not None:
            out.extend(index.get((MediaType.AUDIO, None, None), ()))
        if imp.native:
            out.extend(index.get((MediaType.NATIVE, None, None), ()))
        return out


# --- loading -------------------------------------------------------------------------------

_DOCUMENT_KEYS = {"currency", "score_pivot", "first_price_shade", "fx", "campaigns"}
_CAMPAIGN_KEYS = {
    "id", "advertiser", "adomain", "cat", "bundle", "base_cpm", "max_cpm", "daily_budget", "pacing", "frequency_cap",
    "landing_url", "targeting", "deals", "creatives", "cattax", "language", "dsa",
}  # fmt: skip
_TARGETING_KEYS = {"country", "devicetype", "os", "channel", "known_users_only"}
_CREATIVE_KEYS = {"id", "format", "w", "h", "mimes", "duration", "adm", "secure", "attr", "language"}
_DSA_KEYS = {"behalf", "paid", "adrender"}
_LANGUAGE = re.compile(r"[a-z]{2}")
_CAP_KEYS = {"impressions", "window_s"}
PACINGS = ("even", "asap")
CLICK_MACRO = "${TAFE_CLICK_URL}"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _key(path: str, key: str) -> str:
    """``path.key`` as a JSON path (``path["odd key"]`` when the key is not a plain name)."""
    if _IDENT.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


class _Check:
    """Records ``path: message`` for every rule broken and keeps going, so that one pass
    over the file reports all its mistakes; the loaders build nothing unless it is empty."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def need(self, ok: bool, path: str, message: str, key: str = "") -> bool:
        """``ok``; if false, records ``path[.key]: message`` (built only then: most checks pass)."""
        if not ok:
            self.errors.append(f"{_key(path, key) if key else path or '$'}: {message}")
        return ok

    def object(self, value: Any, path: str, known: set[str]) -> bool:
        """Whether ``value`` is an object, with a complaint per unknown key in it: a
        misspelt ``daily_budget`` must not silently mean an unlimited budget."""
        if not self.need(isinstance(value, dict), path, "expected an object"):
            return False
        for k in [k for k in value if k not in known]:  # in file order
            self.need(False, path, f"unknown field (expected one of {', '.join(sorted(known))})", k)
        return True

    def strings(self, d: Mapping[str, Any], key: str, path: str) -> tuple[str, ...]:
        v = d.get(key, [])
        ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
        return tuple(v) if self.need(ok, path, "expected a list of strings", key) else ()

    def ints(self, d: Mapping[str, Any], key: str, path: str) -> tuple[int, ...]:
        v = d.get(key, [])
        ok = isinstance(v, list) and all(type(x) is int and x > 0 for x in v)
        return tuple(v) if self.need(ok, path, "expected a list of positive integers", key) else ()

    def language(self, d: Mapping[str, Any], path: str, default: str = "") -> str:
        v = d.get("language", default)
        ok = isinstance(v, str) and (v == default or bool(_LANGUAGE.fullmatch(v)))
        return v if self.need(ok, path, "expected an ISO-639-1 code (two lower-case letters)", "language") else ""

    def positive_int(self, d: Mapping[str, Any], key: str, path: str, unit: str = "") -> int:
        v = d.get(key)
        ok = type(v) is int and v > 0
        return v if self.need(ok, path, f"expected a positive integer{unit}", key) else 0  # type: ignore[return-value]

    def money(self, d: Mapping[str, Any], key: str, path: str) -> int:
        """A positive amount as micros; one that rounds to 0 micros would read as "none"."""
        v = d.get(key)
        ok = isinstance(v, (int, float)) and type(v) is not bool and math.isfinite(v) and to_micros(v) > 0
        return to_micros(v) if self.need(ok, path, "expected a positive number (at least 0.000001)", key) else 0


def _is_url(value: Any) -> bool:
    if not isinstance(value, str) or any(ch.isspace() or ord(ch) < 32 for ch in value):
        return False
    try:
        parts = urlsplit(value)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


def _creative(c: Any, path: str, check: _Check, language: str) -> Creative | None:
    before = len(check.errors)
    if not check.object(c, path, _CREATIVE_KEYS):
        return None
    check.need(isinstance(c.get("id"), str) and bool(_ID.fullmatch(c["id"])), path, _ID_RULE, "id")
    fmt = _FORMATS.get(c["format"]) if isinstance(c.get("format"), str) else None
    check.need(fmt is not None, path, _FORMAT_RULE, "format")
    w = h = duration = None
    if fmt is MediaType.BANNER:
        w, h = check.positive_int(c, "w", path), check.positive_int(c, "h", path)
    mimes = check.strings(c, "mimes", path)
    if fmt in (MediaType.VIDEO, MediaType.AUDIO):
        duration = check.positive_int(c, "duration", path, " (seconds)")
        check.need(bool(mimes), path, "expected a non-empty list of the markup's media types", "mimes")
    adm = c.get("adm")
    check.need(isinstance(adm, str) and adm != "", path, "expected the markup (macros allowed), a non-empty string", "adm")
    secure = c.get("secure", True)
    check.need(isinstance(secure, bool), path, "expected true or false", "secure")
    attr = check.ints(c, "attr", path)
    language = check.language(c, path, language)
    if len(check.errors) > before:
        return None
    return Creative(
        id=c["id"], format=fmt, w=w, h=h, adm=adm, mimes=mimes, duration=duration, secure=secure,  # type: ignore[arg-type]
        attr=attr, language=language,
    )  # fmt: skip


def _frequency_cap(c: dict[str, Any], path: str, check: _Check) -> FrequencyCap | None:
    if "frequency_cap" not in c:
        return None
    path = _key(path, "frequency_cap")
    cap = c["frequency_cap"]
    if not check.object(cap, path, _CAP_KEYS):
        return None
    impressions = check.positive_int(cap, "impressions", path)
    window_s = check.positive_int(cap, "window_s", path, " (seconds)")
    return FrequencyCap(impressions, window_s) if impressions and window_s else None


def _dsa(c: dict[str, Any], path: str, check: _Check) -> Dsa | None:
    if "dsa" not in c:
        return None
    path = _key(path, "dsa")
    dsa = c["dsa"]
    if not check.object(dsa, path, _DSA_KEYS):
        return None
    for key in ("behalf", "paid"):  # the DSA extension caps both at 100 characters
        v = dsa.get(key)
        check.need(isinstance(v, str) and 0 < len(v) <= 100 and v.strip() == v, path, "expected 1-100 characters, no surrounding spaces", key)
    adrender = dsa.get("adrender", 0)
    ok = check.need(adrender in (0, 1) and type(adrender) is int, path, "expected 0 (the publisher renders the notice) or 1 (the creative does)", "adrender")
    if not ok or not isinstance(dsa.get("behalf"), str) or not isinstance(dsa.get("paid"), str):
        return None
    return Dsa(dsa["behalf"], dsa["paid"], adrender)


def _campaign(c: Any, path: str, check: _Check) -> Campaign | None:
    before = len(check.errors)
    if not check.object(c, path, _CAMPAIGN_KEYS):
        return None
    check.need(isinstance(c.get("id"), str) and bool(_ID.fullmatch(c["id"])), path, _ID_RULE, "id")
    tpath = _key(path, "targeting")
    t = c.get("targeting", {})
    if not check.object(t, tpath, _TARGETING_KEYS):
        t = {}
    devicetypes = t.get("devicetype", [])
    if not check.need(isinstance(devicetypes, list) and all(type(x) is int for x in devicetypes), tpath, "expected a list of integers", "devicetype"):
        devicetypes = []
    channels = check.strings(t, "channel", tpath)
    for i, ch in enumerate(channels):
        if ch not in ("site", "app", "dooh"):
            check.need(False, f"{_key(tpath, 'channel')}[{i}]", "expected site, app or dooh")
    countries = frozenset(x.upper() for x in check.strings(t, "country", tpath))
    os_names = frozenset(x.lower() for x in check.strings(t, "os", tpath))
    known = t.get("known_users_only", False)
    check.need(isinstance(known, bool), tpath, "expected true or false", "known_users_only")
    base, top = check.money(c, "base_cpm", path), check.money(c, "max_cpm", path)
    if base and top:
        check.need(base <= top, path, f"expected at least base_cpm ({c['base_cpm']})", "max_cpm")
    budget = check.money(c, "daily_budget", path) if "daily_budget" in c else 0
    pacing = c.get("pacing", "even")
    check.need(pacing in PACINGS, path, 'expected "even" or "asap"', "pacing")
    cap = _frequency_cap(c, path, check)
    landing = c.get("landing_url", "")
    if "landing_url" in c:
        check.need(_is_url(landing), path, "expected an absolute http or https URL", "landing_url")
    creatives = c.get("creatives")
    cpath = _key(path, "creatives")
    if not check.need(isinstance(creatives, list) and creatives != [], cpath, "expected a non-empty list"):
        creatives = []
    language = check.language(c, path)
    built = [_creative(cr, f"{cpath}[{i}]", check, language) for i, cr in enumerate(creatives)]
    if not landing:
        for i, cr in enumerate(creatives):
            if isinstance(cr, dict) and isinstance(cr.get("adm"), str) and CLICK_MACRO in cr["adm"]:
                check.need(False, path, f"required: {cpath}[{i}].adm uses {CLICK_MACRO}", "landing_url")
                break
    adomain = check.strings(c, "adomain", path)
    cat = check.strings(c, "cat", path)
    deals = check.strings(c, "deals", path)
    cattax = c.get("cattax", 1)
    check.need(type(cattax) is int and cattax > 0, path, "expected a positive integer (AdCOM category taxonomy)", "cattax")
    dsa = _dsa(c, path, check)
    if len(check.errors) > before:
        return None
    return Campaign(
        id=c["id"],
        advertiser=str(c.get("advertiser", "")),
        adomain=tuple(x.lower() for x in adomain),
        cat=cat,
        base_cpm_micros=base,
        max_cpm_micros=top,
        targeting=Targeting(
            countries=countries,
            devicetypes=frozenset(devicetypes),
            os=os_names,
            channels=frozenset(channels),
            known_users_only=known,
            restricts=bool(countries or devicetypes or os_names or channels),
        ),
        bundle=str(c.get("bundle", "")),
        deals=frozenset(deals),
        creatives=tuple(built),  # type: ignore[arg-type]
        budget_micros=budget,
        pacing=pacing,
        frequency_cap=cap,
        landing_url=landing,
        cattax=cattax,
        dsa=dsa,
    )


def validate(data: Any, *, seat: str = "tafe", currency: str | None = None) -> tuple[Campaigns | None, list[str]]:
    """Validate a decoded campaigns document: the indexed set, or None and every error as
    ``json.path: message`` in file order."""
    check = _Check()
    if not check.object(data, "", _DOCUMENT_KEYS):
        return None, check.errors
    doc: dict[str, Any] = data
    file_currency = doc.get("currency", currency or "USD")
    if check.need(isinstance(file_currency, str) and len(file_currency) == 3, "currency", "expected an ISO-4217 code"):
        check.need(currency is None or file_currency == currency, "currency", f"prices are in {file_currency} but TAFE bids in {currency}")
    fx_raw = doc.get("fx", {})
    fx: dict[str, Decimal] = {}
    if check.need(isinstance(fx_raw, dict), "fx", "expected an object of currency -> rate"):
        for cur, rate in fx_raw.items():
            if check.need(type(rate) in (int, float) and math.isfinite(rate) and rate > 0, "fx", "expected a positive number", cur):
                fx[cur] = Decimal(str(rate))
    pivot = doc.get("score_pivot", 0.5)
    check.need(type(pivot) in (int, float) and 0 < pivot <= 1, "score_pivot", "expected a number in (0, 1]")
    shade = doc.get("first_price_shade", 1.0)
    check.need(type(shade) in (int, float) and 0 < shade <= 1, "first_price_shade", "expected a number in (0, 1]")
    raw = doc.get("campaigns")
    if not isinstance(raw, list):
        check.need(False, "campaigns", "expected a list")
        raw = []
    first: dict[str, int] = {}
    built = []
    for i, c in enumerate(raw):
        built.append(_campaign(c, f"campaigns[{i}]", check))
        cid = c.get("id") if isinstance(c, dict) else None
        if isinstance(cid, str):
            check.need(cid not in first, f"campaigns[{i}].id", f"duplicate of campaigns[{first.get(cid)}].id ({cid})")
            first.setdefault(cid, i)
    if check.errors:
        return None, check.errors
    campaigns = Campaigns(
        tuple(built),  # type: ignore[arg-type]
        currency=file_currency, seat=seat, fx=fx, score_pivot=float(pivot), first_price_shade=float(shade),
    )  # fmt: skip
    return campaigns, []


def _refuse(source: str, errors: list[str]) -> CampaignsError:
    more = len(errors) - 1
    tail = f" (and {more} more error{'s' * (more > 1)}: tafe campaigns validate lists them all)" if more else ""
    return CampaignsError(f"{source}: {errors[0]}{tail}")


def from_dict(data: Any, *, seat: str = "tafe", currency: str | None = None, source: str = "campaigns") -> Campaigns:
    """Validate and index an already-decoded campaigns document; ``CampaignsError`` names the first error."""
    campaigns, errors = validate(data, seat=seat, currency=currency)
    if campaigns is None:
        raise _refuse(source, errors)
    return campaigns


def read(path: str | Path) -> Any:
    """The decoded JSON of a campaigns file; ``CampaignsError`` if it cannot be read or decoded."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CampaignsError(f"campaigns file {path}: {exc}") from None


def load(path: str | Path, *, seat: str = "tafe", currency: str | None = None) -> Campaigns:
    """Read a campaigns file; ``CampaignsError`` says, in one line, what is wrong and where."""
    return from_dict(read(path), seat=seat, currency=currency, source=f"campaigns file {path}")
