"""Campaigns: what TAFE can show and what it is worth, loaded once into an indexed, immutable set.

The file is JSON (the bundled demo set is ``tafe/data/campaigns.json``)::

    {
      "currency": "USD",             # every CPM in this file; must be the bid currency
      "score_pivot": 0.5,            # the CQS at which a user is worth a campaign's base_cpm
      "first_price_shade": 0.85,     # bid this fraction of the value in first-price auctions (at=1)
      "fx": {"EUR": 1.08},           # units of "currency" per unit of another currency (floors)
      "campaigns": [{
        "id": "c1", "advertiser": "Acme", "adomain": ["acme.example"], "cat": ["IAB22"],
        "bundle": "",                # the advertised app, matched against bapp
        "base_cpm": 1.5, "max_cpm": 4.0,
        "targeting": {"country": ["USA"], "devicetype": [1, 4], "os": ["ios"],
                      "channel": ["site", "app", "dooh"], "known_users_only": false},
        "deals": ["DEAL-1"],         # pmp deal ids this campaign was set up to bid on
        "creatives": [
          {"id": "cr1", "format": "banner", "w": 300, "h": 250, "adm": "<a ...>", "secure": true},
          {"id": "cr2", "format": "video", "mimes": ["video/mp4"], "duration": 15, "adm": "<VAST ...>"},
          {"id": "cr3", "format": "audio", "mimes": ["audio/mpeg"], "duration": 30, "adm": "<VAST ...>"},
          {"id": "cr4", "format": "native", "adm": "{\\"native\\": ...}"}
        ]
      }]
    }

Empty targeting lists mean "any". Money is held as integer micros (millionths of the
currency unit) so that comparisons with floors are exact.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, NamedTuple

from tafe.core.types import Creative, Imp, MediaType

MICROS = 1_000_000
# An interstitial banner that states no size is full screen: phone and tablet portrait/landscape.
INTERSTITIAL_SIZES = ((320, 480), (480, 320), (768, 1024), (1024, 768))
# Ids go into notice URLs unquoted: keep them URL-safe.
_ID = re.compile(r"[A-Za-z0-9._~-]{1,64}")
_FORMATS = {"banner": MediaType.BANNER, "video": MediaType.VIDEO, "audio": MediaType.AUDIO, "native": MediaType.NATIVE}


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
    budget_micros: int = 0  # per budget period; 0: no budget
    pacing: str = "even"
    frequency_cap: FrequencyCap | None = None
    landing_url: str = ""
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


def _candidate(campaign: Campaign, creative: Creative) -> Candidate:
    t = campaign.targeting
    return Candidate(
        campaign, creative, creative.format in (MediaType.VIDEO, MediaType.AUDIO), t.restricts, creative.secure,
        t.known_users_only, campaign.base_cpm_micros, campaign.max_cpm_micros,
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


def _need(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise CampaignsError(f"{where}: {what}")


def _strings(d: dict, key: str, where: str) -> tuple[str, ...]:
    v = d.get(key, [])
    _need(isinstance(v, list) and all(isinstance(x, str) for x in v), where, f"{key} must be a list of strings")
    return tuple(v)


def _money(d: dict, key: str, where: str) -> int:
    v = d.get(key)
    _need(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, where, f"{key} must be a positive number")
    return to_micros(v)


def _creative(c: Any, where: str) -> Creative:
    _need(isinstance(c, dict), where, "must be an object")
    _need(isinstance(c.get("id"), str) and bool(_ID.fullmatch(c["id"])), where, "id must be 1-64 of A-Z a-z 0-9 . _ ~ -")
    fmt = _FORMATS.get(c.get("format"))  # type: ignore[arg-type]
    _need(fmt is not None, where, f"format must be one of {sorted(_FORMATS)}")
    w = h = duration = None
    if fmt is MediaType.BANNER:
        w, h = c.get("w"), c.get("h")
        _need(type(w) is int and type(h) is int and w > 0 and h > 0, where, "banner w and h must be positive integers")
    if fmt in (MediaType.VIDEO, MediaType.AUDIO):
        duration = c.get("duration")
        _need(type(duration) is int and duration > 0, where, "duration must be a positive integer (seconds)")
        _need(bool(c.get("mimes")), where, "mimes must list the markup's media types")
    adm = c.get("adm")
    _need(isinstance(adm, str) and adm != "", where, "adm (the markup, OpenRTB macros allowed) must be a non-empty string")
    secure = c.get("secure", True)
    _need(isinstance(secure, bool), where, "secure must be true or false")
    return Creative(
        id=c["id"], format=fmt, w=w, h=h, adm=adm, mimes=_strings(c, "mimes", where), duration=duration, secure=secure
    )


def _campaign(c: Any, where: str) -> Campaign:
    _need(isinstance(c, dict), where, "must be an object")
    _need(isinstance(c.get("id"), str) and bool(_ID.fullmatch(c["id"])), where, "id must be 1-64 of A-Z a-z 0-9 . _ ~ -")
    where = f"{where} ({c['id']})"
    t = c.get("targeting", {})
    _need(isinstance(t, dict), where, "targeting must be an object")
    devicetypes = t.get("devicetype", [])
    _need(isinstance(devicetypes, list) and all(type(x) is int for x in devicetypes), where, "targeting.devicetype must be a list of integers")
    channels = _strings(t, "channel", where + " targeting")
    _need(set(channels) <= {"site", "app", "dooh"}, where, "targeting.channel entries must be site, app or dooh")
    known = t.get("known_users_only", False)
    countries = frozenset(x.upper() for x in _strings(t, "country", where + " targeting"))
    os_names = frozenset(x.lower() for x in _strings(t, "os", where + " targeting"))
    _need(isinstance(known, bool), where, "targeting.known_users_only must be true or false")
    base, top = _money(c, "base_cpm", where), _money(c, "max_cpm", where)
    _need(base <= top, where, "base_cpm must not exceed max_cpm")
    creatives = c.get("creatives")
    _need(isinstance(creatives, list) and creatives != [], where, "creatives must be a non-empty list")
    return Campaign(
        id=c["id"],
        advertiser=str(c.get("advertiser", "")),
        adomain=tuple(x.lower() for x in _strings(c, "adomain", where)),
        cat=_strings(c, "cat", where),
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
        deals=frozenset(_strings(c, "deals", where)),
        creatives=tuple(_creative(cr, f"{where} creatives[{i}]") for i, cr in enumerate(creatives)),
        budget_micros=to_micros(c["daily_budget"]) if "daily_budget" in c else 0,
        pacing=c.get("pacing", "even"),
        frequency_cap=FrequencyCap(**c["frequency_cap"]) if "frequency_cap" in c else None,
        landing_url=c.get("landing_url", ""),
    )


def from_dict(data: Any, *, seat: str = "tafe", currency: str | None = None, source: str = "campaigns") -> Campaigns:
    """Validate and index an already-decoded campaigns document."""
    _need(isinstance(data, dict), source, "must be a JSON object")
    file_currency = data.get("currency", currency or "USD")
    _need(isinstance(file_currency, str) and len(file_currency) == 3, source, "currency must be an ISO-4217 code")
    _need(currency is None or file_currency == currency, source, f"prices are in {file_currency} but TAFE bids in {currency}")
    fx_raw = data.get("fx", {})
    _need(isinstance(fx_raw, dict), source, "fx must be an object of currency -> rate")
    fx: dict[str, Decimal] = {}
    for cur, rate in fx_raw.items():
        try:
            fx[cur] = Decimal(str(rate))
        except InvalidOperation:
            rate = None
        _need(isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0, source, f"fx[{cur}] must be a positive number")
    pivot = data.get("score_pivot", 0.5)
    _need(isinstance(pivot, (int, float)) and 0 < pivot <= 1, source, "score_pivot must be in (0, 1]")
    shade = data.get("first_price_shade", 1.0)
    _need(isinstance(shade, (int, float)) and 0 < shade <= 1, source, "first_price_shade must be in (0, 1]")
    raw = data.get("campaigns")
    _need(isinstance(raw, list), source, "campaigns must be a list")
    campaigns = tuple(_campaign(c, f"{source}: campaigns[{i}]") for i, c in enumerate(raw))
    ids = [c.id for c in campaigns]
    _need(len(set(ids)) == len(ids), source, "campaign ids must be unique")
    return Campaigns(
        campaigns, currency=file_currency, seat=seat, fx=fx, score_pivot=float(pivot), first_price_shade=float(shade)
    )


def load(path: str | Path, *, seat: str = "tafe", currency: str | None = None) -> Campaigns:
    """Read a campaigns file; ``CampaignsError`` says what is wrong and where."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CampaignsError(f"campaigns file {path}: {exc}") from None
    return from_dict(data, seat=seat, currency=currency, source=f"campaigns file {path}")
