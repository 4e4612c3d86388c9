"""The values that flow through the pure bidding core.

``parse`` turns bytes into a ``BidRequest`` view holding only what TAFE reads
(2.5 ``ext`` locations and 2.6 fields already merged); ``decide`` turns that into a
``Decision``; ``render`` turns a decision into bytes. All are plain data: no sockets,
no clocks, no gevent, no prometheus.

Treat them as read-only. Those built for every request are not ``frozen`` only
because a frozen dataclass's ``__init__`` costs twice as much (one
``object.__setattr__`` call per field), which shows on the bid path; ``Creative``,
built once at start-up, is frozen.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class NoBidReason(enum.Enum):
    """Why TAFE did not bid; ``nbr`` is the OpenRTB 2.6 / 3.0 no-bid reason code."""

    NO_ELIGIBLE_CAMPAIGN = ("no_eligible_campaign", 0)
    BELOW_FLOOR = ("below_floor", 0)
    BLOCKED = ("blocked", 0)  # bcat / badv / bapp / coppa rules left nothing
    UNKNOWN_USER = ("unknown_user", 8)
    DEADLINE = ("deadline", 15)
    FREQUENCY_CAP = ("frequency_cap", 0)  # the user saw the fitting campaigns often enough
    PACING = ("pacing", 0)  # budget left, but not yet: even pacing holds it for later
    BUDGET = ("budget", 0)  # the fitting campaigns' budgets are spent (or reserved) for the period
    DSA = ("dsa", 0)  # DSA transparency required, and the fitting campaigns have no dsa fields
    PRIVACY = ("privacy", 0)  # the privacy rules forbid bidding at all (``Decision.privacy`` says which)

    def __init__(self, label: str, nbr: int) -> None:
        self.label = label
        self.nbr = nbr


class MediaType(enum.IntEnum):
    """Bid ``mtype`` (OpenRTB 2.6 / AdCOM): the creative's format."""

    BANNER = 1
    VIDEO = 2
    AUDIO = 3
    NATIVE = 4


@dataclass(slots=True)
class Deal:
    id: str
    bidfloor: float = 0.0
    bidfloorcur: str = "USD"
    wseat: tuple[str, ...] = ()
    wadomain: tuple[str, ...] = ()


@dataclass(slots=True)
class Video:
    mimes: tuple[str, ...] = ()
    w: int | None = None
    h: int | None = None
    minduration: int | None = None
    maxduration: int | None = None
    rqddurs: tuple[int, ...] = ()
    protocols: tuple[int, ...] = ()
    placement: int | None = None  # 2.6 ``plcmt`` preferred, 2.5 ``placement`` otherwise
    battr: tuple[int, ...] = ()  # blocked creative attributes (AdCOM list)


@dataclass(slots=True)
class Audio:
    mimes: tuple[str, ...] = ()
    minduration: int | None = None
    maxduration: int | None = None
    battr: tuple[int, ...] = ()


@dataclass(slots=True)
class Imp:
    id: str
    banner_sizes: tuple[tuple[int, int], ...] = ()  # from banner.format[] or banner.w/h
    has_banner: bool = False
    banner_battr: tuple[int, ...] = ()  # banner.battr: creative attributes the banner refuses
    video: Video | None = None
    audio: Audio | None = None
    native: bool = False  # a native object with a request (string or object) is present
    bidfloor: float = 0.0
    bidfloorcur: str = "USD"
    secure: bool = False
    instl: bool = False
    rewarded: bool = False  # 2.6 rwdd, or ext.prebid.is_rewarded_inventory
    tagid: str = ""
    deals: tuple[Deal, ...] = ()
    private_auction: bool = False


@dataclass(slots=True)
class BidRequest:
    id: str
    imps: tuple[Imp, ...]
    # inventory: exactly one of site / app / dooh (or none)
    channel: str = ""  # "site", "app", "dooh" or ""
    domain: str = ""  # site.domain, else the host of site.page
    bundle: str = ""  # app.bundle
    publisher_id: str = ""
    inventory_cats: tuple[str, ...] = ()  # site/app cat + sectioncat + pagecat
    # device
    devicetype: int | None = None
    os: str = ""  # lower-cased device.os
    country: str = ""  # device.geo.country (ISO-3166-1 alpha-3 as sent)
    region: str = ""
    ifa: str = ""
    lmt: bool = False
    dnt: bool = False
    # user keys, in the project's preference order: buyeruid, eids, ifa (unless lmt), user.id
    user_keys: tuple[str, ...] = ()
    # auction rules
    tmax: int | None = None
    at: int = 2
    cur: tuple[str, ...] = ()  # accepted currencies; empty means USD
    bcat: tuple[str, ...] = ()
    badv: tuple[str, ...] = ()
    bapp: tuple[str, ...] = ()
    wseat: tuple[str, ...] = ()
    bseat: tuple[str, ...] = ()
    test: bool = False
    # privacy (2.5 ext and 2.6 top-level merged)
    coppa: bool = False
    gdpr: bool = False
    consent: str = ""
    us_privacy: str = ""
    gpp: str = ""
    gpp_sid: tuple[int, ...] = ()  # GPP section ids that apply (regs.gpp_sid, 2.5 regs.ext.gpp_sid)
    # DSA transparency (regs.ext.dsa, or regs.dsa): 0 not wanted, 1 supported, 2 required,
    # 3 required and the publisher is an online platform. At 2 and up a bid must carry ext.dsa.
    dsa_required: int = 0


@dataclass(frozen=True, slots=True)
class Creative:
    id: str
    format: MediaType
    w: int | None = None
    h: int | None = None
    adm: str = ""  # markup sent as the bid's adm, OpenRTB macros left for the exchange
    mimes: tuple[str, ...] = ()
    duration: int | None = None  # seconds, video and audio
    secure: bool = True  # markup is https-safe
    attr: tuple[int, ...] = ()  # creative attributes (AdCOM list), matched against the imp's battr
    language: str = ""  # ISO-639-1 language of the creative; "": not stated


@dataclass(frozen=True, slots=True)
class Dsa:
    """A campaign's DSA transparency: who the ad is shown on behalf of, who paid, and
    whether the creative renders the transparency notice itself (``adrender`` 1)."""

    behalf: str
    paid: str
    adrender: int = 0


@dataclass(slots=True)
class Bid:
    bid_id: str
    imp_id: str
    price: float  # CPM in the decision's currency, rounded to the cent-of-a-cent (4 d.p.)
    campaign_id: str
    creative: Creative
    adomain: tuple[str, ...]
    cat: tuple[str, ...]
    deal_id: str = ""
    cqs: float = 0.0
    secure: bool = False  # the imp needs https markup: tracking URLs in the markup are https too
    price_micros: int = 0  # ``price`` exact: CPM micros (an impression at this price costs as many nanos)
    cattax: int = 1  # taxonomy of ``cat`` (AdCOM: 1 is IAB Content Category Taxonomy 1.0)
    bundle: str = ""  # the advertised app, for app advertisers (what bapp blocks)
    dsa: Dsa | None = None  # set when the request requires DSA transparency
    value_micros: int = 0  # what the campaign valued the imp at, before shading (CPM micros)
    context: str = ""  # first-price open-auction bids: the shading context (tafe.core.shading)


@dataclass(slots=True)
class Decision:
    request_id: str
    bids: tuple[Bid, ...] = ()
    no_bid: NoBidReason | None = None  # set when bids is empty
    cur: str = "USD"
    versions: dict[str, str] = field(default_factory=dict)  # active model/store versions
    # The budget each bid of a budgeted campaign holds until it is billed, lost or times
    # out: (campaign id, bid id, nanos). The shell applies them to the worker's floats.
    reservations: tuple[tuple[str, str, int], ...] = ()
    # Why the privacy rules forbade bidding (no_bid PRIVACY) or using the user's history;
    # None: they allowed both (``tafe.core.privacy``).
    privacy: str | None = None
