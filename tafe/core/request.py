"""``parse(bytes) -> BidRequest``: a tolerant view of an OpenRTB 2.5/2.6 bid request.

Only the fields TAFE acts on are read; everything else (and every unknown enum value)
is ignored, as the spec demands. 2.5 ``ext`` locations and 2.6 fields are merged, the
2.6 location winning. Fields defined by the spec must have their JSON type
(``BadRequest("wrong_type:<path>")`` otherwise, the path without array indices);
values inside ``ext`` objects are exchange-specific, so a wrongly typed one there is
ignored rather than refused.

Two steps. msgspec decodes the body straight into the wire structs below (``_W*``),
which name the fields TAFE reads with their spec types: the type checks run in C,
and the rest of the document is skipped without becoming Python objects (``ext``
objects are kept as raw bytes, decoded only when they may hold a key we read). Then
plain Python turns that into the ``BidRequest`` view: required ids, merged
locations, bounds. In ``benchmarks/json_parse.py`` ("JSON parsing" in
``benchmarks/RESULTS.md``), parse's median over the real fixtures went from 17.0 us
(orjson, then a Python reader checking every field) to 11-12 us this way.

Hostile input: the body must be UTF-8 (checked in one C call when it is not pure
ASCII), nesting stops at the interpreter's recursion limit (``too_deep``), and a body
msgspec cannot decode is classified by orjson, which names the fault (``not_utf8`` for
lone surrogates, ``too_deep``, else ``not_json``).
"""

from __future__ import annotations

import re
from itertools import chain, islice
from typing import Annotated, Any, overload
from urllib.parse import urlsplit

import msgspec
import orjson
from msgspec import Meta, Raw, Struct

from tafe.core.types import Audio, BidRequest, Deal, Imp, Video

__all__ = ["BadRequest", "MAX_IMPS", "MAX_UIDS", "MAX_VALUES", "parse"]

# Bounds on what one request may make TAFE do; the body size cap alone allows ~25,000
# one-line imps. Real exchanges send a few, rarely more than ~50.
MAX_IMPS = 100
# Bounds the decode itself: every array element and object member but the last is
# followed by a comma, so this caps how many values msgspec can build, counted in one
# C scan before decoding (arrays are decoded whole before their length is checked).
# 100,000 ext keys took 40-70 ms to decode as a dict; at this cap the worst body found
# (thousands of eids) costs ~3 ms to inflate and parse. The largest corpus request
# (deals-at-request-limit) has 2,030 commas.
MAX_VALUES = 5_000
MAX_DEALS = 100  # per imp: every deal is tried against every fitting campaign
# Per request: 100 imps of 100 deals, each imp fitting every media type, held one worker's
# loop 50-80 ms; at this cap parse + decide of 10 imps x 100 deals (the corpus case
# deals-at-request-limit, demo campaigns) take ~2 ms.
MAX_REQUEST_DEALS = 1000
MAX_USER_KEYS = 8
MAX_UIDS = 64  # eids uid entries looked at for those keys
MAX_GPP_SIDS = 64  # section ids assigned so far: under 30
MAX_ID_CHARS = 256  # request, imp and deal ids are echoed in the response and in three notice URLs per bid


class BadRequest(ValueError):
    """The body is not a bid request TAFE can answer; ``reason`` is short and machine-readable."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _fail_type(path: str) -> BadRequest:
    return BadRequest("wrong_type:" + path)


# --- the wire: what TAFE reads, with the spec's JSON types ------------------------------
# Every field is optional here (absent and null alike decode to None); required ids
# and cross-field rules are checked in Python below. ``bool`` is not a JSON number,
# so ``int`` fields refuse true/false; flags (0/1 ints) also take booleans.

_Int = int | float | None  # an integral float (30.0) is a JSON integer to many encoders
_Num = Annotated[float, Meta(ge=0.0)] | None  # prices: ints accepted, negatives refused
_Flag = int | bool | None
_Str = str | None
_Strs = tuple[str, ...] | None
_Ints = tuple[int, ...] | None
_NO_EXT = Raw()


class _W(Struct, gc=False):
    """Decoded JSON holds no cycles, so the structs stay out of the garbage collector."""


class _WFormat(_W):
    w: _Int = None
    h: _Int = None


class _WBanner(_W):
    format: tuple[_WFormat, ...] | None = None
    w: _Int = None
    h: _Int = None
    battr: _Ints = None


class _WVideo(_W):
    mimes: _Strs = None
    w: _Int = None
    h: _Int = None
    minduration: _Int = None
    maxduration: _Int = None
    rqddurs: _Ints = None
    protocols: _Ints = None
    plcmt: _Int = None
    placement: Any = None  # read (and type-checked) only without plcmt
    battr: _Ints = None
    ext: Raw = _NO_EXT


class _WAudio(_W):
    mimes: _Strs = None
    minduration: _Int = None
    maxduration: _Int = None
    battr: _Ints = None


class _WNative(_W):
    request: Raw = _NO_EXT  # a JSON string (<= 2.5 style) or an object; TAFE only needs to know it is there


class _WDeal(_W):
    id: _Str = None
    bidfloor: _Num = None
    bidfloorcur: _Str = None
    wseat: _Strs = None
    wadomain: _Strs = None


class _WPmp(_W):
    private_auction: _Flag = None
    deals: tuple[_WDeal, ...] | None = None


class _WImp(_W):
    id: _Str = None
    banner: _WBanner | None = None
    video: _WVideo | None = None
    audio: _WAudio | None = None
    native: _WNative | None = None
    pmp: _WPmp | None = None
    bidfloor: _Num = None
    bidfloorcur: _Str = None
    secure: _Flag = None
    instl: _Flag = None
    rwdd: _Flag = None
    tagid: _Str = None
    ext: Raw = _NO_EXT


class _WPublisher(_W):
    id: _Str = None


class _WInventory(_W):
    """What site, app and dooh share (dooh adds nothing TAFE reads)."""

    domain: _Str = None
    publisher: _WPublisher | None = None
    cat: _Strs = None
    sectioncat: _Strs = None
    pagecat: _Strs = None


class _WSite(_WInventory):
    page: Any = None  # read (and type-checked) only without domain


class _WApp(_WInventory):
    bundle: _Str = None


class _WGeo(_W):
    country: _Str = None
    region: _Str = None


class _WDevice(_W):
    devicetype: _Int = None
    os: _Str = None
    ifa: _Str = None
    lmt: _Flag = None
    dnt: _Flag = None
    geo: _WGeo | None = None


class _WEid(_W):
    uids: tuple[Any, ...] | None = None  # uid entries are read best effort


class _WUser(_W):
    id: _Str = None
    buyeruid: _Str = None
    consent: _Str = None
    eids: tuple[_WEid, ...] | None = None
    ext: Raw = _NO_EXT


class _WDsa(_W):
    dsarequired: _Int = None


class _WRegs(_W):
    coppa: _Flag = None
    gdpr: _Flag = None
    us_privacy: _Str = None
    gpp: _Str = None
    gpp_sid: _Ints = None
    dsa: _WDsa | None = None  # where some exchanges send it; the DSA extension says regs.ext.dsa
    ext: Raw = _NO_EXT


class _WRequest(_W):
    id: _Str = None
    imp: tuple[_WImp, ...] | None = None
    site: _WSite | None = None
    app: _WApp | None = None
    dooh: _WInventory | None = None
    device: _WDevice | None = None
    user: _WUser | None = None
    regs: _WRegs | None = None
    tmax: _Int = None
    at: _Int = None
    cur: _Strs = None
    bcat: _Strs = None
    badv: _Strs = None
    bapp: _Strs = None
    wseat: _Strs = None
    bseat: _Strs = None
    test: _Flag = None


class _WExt(_W):
    """The ``ext`` keys TAFE reads, wherever they sit: any other key is skipped by the
    decoder, not built (an ``ext`` of 100,000 keys once became a dict of them)."""

    prebid: Raw = _NO_EXT  # imp.ext.prebid.is_rewarded_inventory
    is_rewarded_inventory: Any = None
    rewarded: Any = None  # imp.video.ext
    eids: Any = None  # user.ext (2.5)
    consent: Any = None
    gdpr: Any = None  # regs.ext (2.5)
    us_privacy: Any = None
    gpp: Any = None
    gpp_sid: Any = None
    dsa: Any = None  # regs.ext.dsa, the IAB DSA transparency extension


_NO_EXT_KEYS = _WExt()
_decode_request = msgspec.json.Decoder(_WRequest).decode
_decode_ext = msgspec.json.Decoder(_WExt).decode
_AT = re.compile(r" - at `\$\.?(.*)`$")
_INDEX = re.compile(r"\[\d+\]")


def _undecodable(body: bytes) -> BadRequest:
    """Why a body is not JSON: orjson's message names the fault (run only on refusal)."""
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        msg = str(exc)
        if "depth" in msg or "recursion" in msg:
            return BadRequest("too_deep")
        if "UTF-8" in msg or "surrogate" in msg:
            return BadRequest("not_utf8")
    return BadRequest("not_json")


def _invalid(exc: msgspec.ValidationError) -> BadRequest:
    """``Expected `str | null`, got `int` - at `$.imp[0].id``` -> ``wrong_type:imp.id``."""
    msg = str(exc)
    at = _AT.search(msg)
    if at is None:
        return BadRequest("not_object")  # only the document itself has no path
    path = _INDEX.sub("", at.group(1))
    if " >= " in msg:
        return BadRequest("negative:" + path)
    return _fail_type(path)


# --- from the wire to the view ----------------------------------------------------------


def _ext(raw: Raw) -> _WExt:
    """The keys TAFE reads from an ``ext`` object; anything but an object has none."""
    if not raw:
        return _NO_EXT_KEYS
    try:
        return _decode_ext(raw)
    except (msgspec.DecodeError, RecursionError):  # ValidationError included
        return _NO_EXT_KEYS


def _ext_str(v: Any) -> str:
    return v if type(v) is str else ""


def _ext_ints(v: Any) -> tuple[int, ...]:
    if type(v) is not list or len(v) > MAX_GPP_SIDS:
        return ()
    return tuple([i for i in v if type(i) is int])


def _dsa_required(v: Any) -> int:
    """``dsarequired`` of a DSA object: 0 (not wanted) unless it is 1, 2 or 3."""
    required = v.get("dsarequired") if type(v) is dict else getattr(v, "dsarequired", None)
    return required if type(required) is int and 0 <= required <= 3 else 0


def _ext_flag(v: Any) -> bool:
    return bool(v == 1 or v == "1")


def _has_native(raw: Raw) -> bool:
    """Whether ``native.request`` is a non-empty string or object (its content is the
    creative's business, never decoded here); any other JSON type is refused."""
    if not raw:
        return False
    view: Any = memoryview(raw)  # compared with bytes, which typeshed's memoryview does not declare
    first = view[:1]
    if first == b"n" and view == b"null":
        return False
    if first != b'"' and first != b"{":
        raise _fail_type("imp.native.request")
    return len(view) > 16 or bytes(view[1:-1]).strip(b" \t\r\n") != b""


@overload
def _int(v: int | float, path: str) -> int: ...
@overload
def _int(v: int | float | None, path: str) -> int | None: ...
def _int(v: int | float | None, path: str) -> int | None:
    if isinstance(v, float):
        if not v.is_integer():
            raise _fail_type(path)
        return int(v)
    return v


def _lower(values: tuple[str, ...] | None) -> tuple[str, ...]:
    return tuple([v.lower() for v in values]) if values else ()


def _required_id(value: str | None, reason_prefix: str) -> str:
    """A required id (request, imp, deal): a non-empty string, bounded because it is echoed."""
    if not value:
        raise BadRequest(reason_prefix + "missing_id")
    if len(value) > MAX_ID_CHARS:
        raise BadRequest(reason_prefix + "id_too_long")
    return value


def _sizes(banner: _WBanner) -> tuple[tuple[int, int], ...]:
    sizes: dict[tuple[int, int], None] = {}  # ordered and deduplicated in O(1) per entry
    for fmt in banner.format or ():
        w, h = fmt.w, fmt.h
        if w and h:  # wratio/wmin-only formats carry no size
            if type(w) is not int or type(h) is not int:
                w, h = _int(w, "imp.banner.format.w"), _int(h, "imp.banner.format.h")
            sizes[w, h] = None
    w, h = banner.w, banner.h
    if w and h:
        if type(w) is not int or type(h) is not int:
            w, h = _int(w, "imp.banner.w"), _int(h, "imp.banner.h")
        sizes[w, h] = None
    return tuple(sizes)


def _video(v: _WVideo) -> Video:
    if v.plcmt is not None:
        placement = _int(v.plcmt, "imp.video.plcmt")
    else:
        placement = v.placement
        if placement is not None and (type(placement) is not int and type(placement) is not float):
            raise _fail_type("imp.video.placement")
        placement = _int(placement, "imp.video.placement")
    return Video(
        mimes=v.mimes or (),
        w=_int(v.w, "imp.video.w"),
        h=_int(v.h, "imp.video.h"),
        minduration=_int(v.minduration, "imp.video.minduration"),
        maxduration=_int(v.maxduration, "imp.video.maxduration"),
        rqddurs=v.rqddurs or (),
        protocols=v.protocols or (),
        placement=placement,
        battr=v.battr or (),
    )


def _audio(a: _WAudio) -> Audio:
    return Audio(
        mimes=a.mimes or (),
        minduration=_int(a.minduration, "imp.audio.minduration"),
        maxduration=_int(a.maxduration, "imp.audio.maxduration"),
        battr=a.battr or (),
    )


def _deals(pmp: _WPmp) -> tuple[Deal, ...]:
    raw = pmp.deals
    if not raw:
        return ()
    if len(raw) > MAX_DEALS:
        raise BadRequest("too_many_deals")
    return tuple(
        [
            Deal(
                id=_required_id(d.id, "deal_"),
                bidfloor=d.bidfloor or 0.0,
                bidfloorcur=d.bidfloorcur or "USD",
                wseat=d.wseat or (),
                wadomain=_lower(d.wadomain),
            )
            for d in raw
        ]
    )


def _imp(i: _WImp) -> Imp:
    imp_id = _required_id(i.id, "imp_")
    banner, video, audio, native, pmp = i.banner, i.video, i.audio, i.native, i.pmp
    rewarded = i.rwdd == 1
    if not rewarded and (i.ext or (video is not None and video.ext)):
        rewarded = _ext_flag(_ext(_ext(i.ext).prebid).is_rewarded_inventory) or (
            video is not None and _ext_flag(_ext(video.ext).rewarded)
        )
    return Imp(
        id=imp_id,
        banner_sizes=_sizes(banner) if banner is not None else (),
        has_banner=banner is not None,
        banner_battr=banner.battr or () if banner is not None else (),
        video=_video(video) if video is not None else None,
        audio=_audio(audio) if audio is not None else None,
        native=native is not None and _has_native(native.request),
        bidfloor=i.bidfloor or 0.0,
        bidfloorcur=i.bidfloorcur or "USD",
        secure=i.secure == 1,
        instl=i.instl == 1,
        rewarded=rewarded,
        tagid=i.tagid or "",
        deals=_deals(pmp) if pmp is not None else (),
        private_auction=pmp is not None and pmp.private_auction == 1,
    )


def _user_keys(user: _WUser | None, ifa: str) -> tuple[str, ...]:
    """Keys to look the user up by, in preference order: buyeruid, eids, ifa (unless lmt), user.id.

    Deduplicated, and at most ``MAX_USER_KEYS``: a request carrying thousands of eids
    must not turn into thousands of store lookups.
    """
    if user is None:
        return (ifa,) if ifa else ()
    keys: dict[str, None] = {}
    if user.buyeruid:
        keys[user.buyeruid] = None
    if user.eids is not None:
        uids = [eid.uids for eid in user.eids]
        if None in uids:
            raise _fail_type("user.eids.uids")
        _add_uids(keys, uids)
    elif user.ext:  # the 2.5 ext location: best effort
        eids = _ext(user.ext).eids
        if type(eids) is list:
            _add_uids(keys, [e["uids"] for e in eids[:MAX_UIDS] if type(e) is dict and type(e.get("uids")) is list])
    if ifa:
        keys[ifa] = None
    if user.id:
        keys[user.id] = None
    return tuple(keys)[:MAX_USER_KEYS]


def _add_uids(keys: dict[str, None], uid_lists: list[Any]) -> None:
    """Add the ids of the first ``MAX_UIDS`` uid entries: thousands of entries repeating
    one id would otherwise all be looked at (10,000 took ~25 ms)."""
    for uid in islice(chain.from_iterable(uid_lists), MAX_UIDS):
        uid_id = uid.get("id") if type(uid) is dict else None
        if type(uid_id) is str and uid_id:
            keys[uid_id] = None
        if len(keys) >= MAX_USER_KEYS:
            return


def _host(page: str) -> str:
    try:
        host = urlsplit(page.strip()).hostname
    except ValueError:
        return ""
    return host or ""


def _decode(body: bytes) -> _WRequest:
    if body.count(b",") >= MAX_VALUES:
        raise BadRequest("too_many_values")
    if not body.isascii():
        if body.startswith(b"\xef\xbb\xbf"):  # RFC 8259 8.1: parsers may ignore a BOM
            body = body[3:]
        try:
            body.decode()  # msgspec checks only the strings it reads
        except UnicodeDecodeError:
            raise BadRequest("not_utf8") from None
    try:
        return _decode_request(body)
    except msgspec.ValidationError as exc:
        raise _invalid(exc) from None
    except msgspec.DecodeError:
        raise _undecodable(body) from None
    except RecursionError:
        raise BadRequest("too_deep") from None


def parse(body: bytes) -> BidRequest:
    """Read a bid request; raise ``BadRequest`` when it is not one TAFE can answer."""
    root = _decode(body)
    req_id = _required_id(root.id, "")
    raw_imps = root.imp
    if not raw_imps:
        raise BadRequest("missing_imp")
    if len(raw_imps) > MAX_IMPS:
        raise BadRequest("too_many_imps")
    imps = tuple([_imp(i) for i in raw_imps])
    if len(imps) * MAX_DEALS > MAX_REQUEST_DEALS and sum([len(i.deals) for i in imps]) > MAX_REQUEST_DEALS:
        raise BadRequest("too_many_deals")
    if len(imps) > 1 and len({imp.id for imp in imps}) != len(imps):
        raise BadRequest("duplicate_imp_id")

    site, app, dooh = root.site, root.app, root.dooh
    if site is not None and app is not None:
        raise BadRequest("site_and_app")
    if dooh is not None and (site is not None or app is not None):
        raise BadRequest("dooh_with_site_or_app")
    channel, domain, bundle, publisher_id = "", "", "", ""
    cats: tuple[str, ...] = ()
    inventory = site if site is not None else app if app is not None else dooh
    if inventory is not None:
        channel = "site" if site is not None else "app" if app is not None else "dooh"
        domain = (inventory.domain or "").lower()
        if not domain and site is not None and site.page is not None:
            if type(site.page) is not str:
                raise _fail_type("site.page")
            domain = _host(site.page).lower()
        if app is not None:
            bundle = app.bundle or ""
        if inventory.publisher is not None:
            publisher_id = inventory.publisher.id or ""
        cats = (inventory.cat or ()) + (inventory.sectioncat or ()) + (inventory.pagecat or ())

    device = root.device
    devicetype: int | None = None
    os_name, country, region, ifa, lmt, dnt = "", "", "", "", False, False
    if device is not None:
        dt = device.devicetype
        devicetype = _int(dt, "device.devicetype") if isinstance(dt, float) else dt
        os_name = (device.os or "").lower()
        ifa = device.ifa or ""
        lmt = device.lmt == 1
        dnt = device.dnt == 1
        geo = device.geo
        if geo is not None:
            country = (geo.country or "").upper()
            region = geo.region or ""

    user = root.user
    consent = ""
    if user is not None:
        consent = user.consent or (_ext_str(_ext(user.ext).consent) if user.ext else "")

    regs = root.regs
    coppa = gdpr = False
    us_privacy = gpp = ""
    gpp_sid: tuple[int, ...] = ()
    dsa_required = 0
    if regs is not None:
        coppa = regs.coppa == 1
        us_privacy, gpp, gpp_sid = regs.us_privacy or "", regs.gpp or "", regs.gpp_sid or ()
        if len(gpp_sid) > MAX_GPP_SIDS:
            raise BadRequest("too_many_gpp_sids")
        if regs.gdpr is not None:
            gdpr = regs.gdpr == 1
        if regs.dsa is not None:
            dsa_required = _dsa_required(regs.dsa)
        if regs.ext:  # 2.5 keeps the privacy signals in regs.ext; the DSA extension is there too
            rext = _ext(regs.ext)
            if regs.gdpr is None:
                gdpr = _ext_flag(rext.gdpr)
            us_privacy = us_privacy or _ext_str(rext.us_privacy)
            gpp = gpp or _ext_str(rext.gpp)
            gpp_sid = gpp_sid or _ext_ints(rext.gpp_sid)
            dsa_required = dsa_required or _dsa_required(rext.dsa)

    # Integral floats are rare: _int (a call) only for them.
    tmax, at = root.tmax, root.at
    if isinstance(tmax, float):
        tmax = _int(tmax, "tmax")
    if tmax is not None and tmax <= 0:
        tmax = None  # "unknown": the configured default applies
    if isinstance(at, float):
        at = _int(at, "at")
    return BidRequest(
        id=req_id,
        imps=imps,
        channel=channel,
        domain=domain,
        bundle=bundle,
        publisher_id=publisher_id,
        inventory_cats=cats,
        devicetype=devicetype,
        os=os_name,
        country=country,
        region=region,
        ifa=ifa,
        lmt=lmt,
        dnt=dnt,
        user_keys=_user_keys(user, "" if lmt else ifa),
        tmax=tmax,
        at=at if at == 1 or at == 2 else 2,
        cur=tuple([c.upper() for c in root.cur]) if root.cur else (),  # ISO 4217, like bidfloorcur
        bcat=root.bcat or (),
        badv=_lower(root.badv),
        bapp=root.bapp or (),
        wseat=root.wseat or (),
        bseat=root.bseat or (),
        test=root.test == 1,
        coppa=coppa,
        gdpr=gdpr,
        consent=consent,
        us_privacy=us_privacy,
        gpp=gpp,
        gpp_sid=gpp_sid,
        dsa_required=dsa_required,
    )
