"""``parse(bytes) -> BidRequest``: a tolerant view of an OpenRTB 2.5/2.6 bid request.

Only the fields TAFE acts on are read; everything else (and every unknown enum value)
is ignored, as the spec demands. 2.5 ``ext`` locations and 2.6 fields are merged, the
2.6 location winning. Fields defined by the spec must have their JSON type
(``BadRequest("wrong_type:<path>")`` otherwise, the path without array indices);
values inside ``ext`` objects are exchange-specific, so a wrongly typed one there is
ignored rather than refused. A request beyond the bounds of ``tafe.core.limits`` is
refused (``too_many_imps``, ``too_many_deals``, ...), as is one without its required
ids (``missing_id``, ``imp_missing_id``, ...) or with contradictory fields
(``site_and_app``, ``duplicate_imp_id``, ...): ``BadRequest.reason`` names the fault.

Two steps: ``tafe.core.wire`` decodes the body into structs of the fields TAFE reads,
their JSON types checked in C (and refuses a body that is not JSON, not UTF-8 or too
deep); the readers here turn those into the ``BidRequest`` view: required ids, merged
locations, bounds.
"""

from __future__ import annotations

from itertools import chain, islice
from typing import Any, overload
from urllib.parse import urlsplit

from msgspec import Raw

from tafe.core import wire
from tafe.core.limits import MAX_DEALS, MAX_GPP_SIDS, MAX_ID_CHARS, MAX_IMPS, MAX_REQUEST_DEALS, MAX_UIDS, MAX_USER_KEYS
from tafe.core.types import Audio, BidRequest, Deal, Imp, Video
from tafe.core.wire import BadRequest, decode, ext_keys, wrong_type

__all__ = ["BadRequest", "parse"]


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
        raise wrong_type("imp.native.request")
    return len(view) > 16 or bytes(view[1:-1]).strip(b" \t\r\n") != b""


@overload
def _int(v: int | float, path: str) -> int: ...
@overload
def _int(v: int | float | None, path: str) -> int | None: ...
def _int(v: int | float | None, path: str) -> int | None:
    if isinstance(v, float):
        if not v.is_integer():
            raise wrong_type(path)
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


def _sizes(banner: wire.Banner) -> tuple[tuple[int, int], ...]:
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


def _video(v: wire.Video) -> Video:
    if v.plcmt is not None:
        placement = _int(v.plcmt, "imp.video.plcmt")
    else:
        placement = v.placement
        if placement is not None and (type(placement) is not int and type(placement) is not float):
            raise wrong_type("imp.video.placement")
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


def _audio(a: wire.Audio) -> Audio:
    return Audio(
        mimes=a.mimes or (),
        minduration=_int(a.minduration, "imp.audio.minduration"),
        maxduration=_int(a.maxduration, "imp.audio.maxduration"),
        battr=a.battr or (),
    )


def _deals(pmp: wire.Pmp) -> tuple[Deal, ...]:
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


def _imp(i: wire.Imp) -> Imp:
    imp_id = _required_id(i.id, "imp_")
    banner, video, audio, native, pmp = i.banner, i.video, i.audio, i.native, i.pmp
    rewarded = i.rwdd == 1
    if not rewarded and (i.ext or (video is not None and video.ext)):
        rewarded = _ext_flag(ext_keys(ext_keys(i.ext).prebid).is_rewarded_inventory) or (
            video is not None and _ext_flag(ext_keys(video.ext).rewarded)
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


def _user_keys(user: wire.User | None, ifa: str) -> tuple[str, ...]:
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
            raise wrong_type("user.eids.uids")
        _add_uids(keys, uids)
    elif user.ext:  # the 2.5 ext location: best effort
        eids = ext_keys(user.ext).eids
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


def parse(body: bytes) -> BidRequest:
    """Read a bid request; raise ``BadRequest`` when it is not one TAFE can answer."""
    root = decode(body)
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
                raise wrong_type("site.page")
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
        consent = user.consent or (_ext_str(ext_keys(user.ext).consent) if user.ext else "")

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
            rext = ext_keys(regs.ext)
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
