"""The wire: what TAFE reads of a bid request, decoded and type-checked in C, and why a body is refused.

Rules (``tafe.core.request`` turns the result into the ``BidRequest`` view):

- What is read: only the fields named by the structs below, with their OpenRTB 2.5/2.6
  JSON types; msgspec skips the rest of the document without building Python objects.
  Every field is optional here (absent and null alike decode to None): required ids
  and cross-field rules are the reader's.
- JSON types are checked in C by msgspec while decoding: a spec field of the wrong type
  is ``BadRequest("wrong_type:<path>")`` and a negative price ``negative:<path>`` (the
  path without array indices). ``bool`` is not a JSON number, so ``int`` fields refuse
  true/false; flags (0/1 ints) also take booleans.
- ``ext`` objects are exchange-specific: they are kept as raw bytes, decoded only when
  they may hold a key TAFE reads (``ext_keys``, which skips every other key), and a
  wrongly typed value there is ignored rather than refused.
- Hostile input: at most ``MAX_VALUES`` values (``too_many_values``, counted before
  decoding); the body must be UTF-8 (checked in one C call when it is not pure ASCII);
  nesting stops at the interpreter's recursion limit (``too_deep``); a body msgspec
  cannot decode is classified by orjson, which names the fault (``not_utf8`` for lone
  surrogates, ``too_deep``, else ``not_json``); a body that is not an object is
  ``not_object``.

In ``benchmarks/json_parse.py`` ("JSON parsing" in ``benchmarks/RESULTS.md``), parse's
median over the real fixtures went from 17.0 us (orjson, then a Python reader checking
every field) to 11-12 us this way.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec
import orjson
from msgspec import Meta, Raw, Struct

from tafe.core.limits import MAX_VALUES

__all__ = ["BadRequest", "ExtKeys", "Request", "decode", "ext_keys", "wrong_type"]


class BadRequest(ValueError):
    """The body is not a bid request TAFE can answer; ``reason`` is short and machine-readable."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def wrong_type(path: str) -> BadRequest:
    """The refusal of a spec field (``imp.video.w``) that does not have its JSON type."""
    return BadRequest("wrong_type:" + path)


# --- the structs: what TAFE reads, with the spec's JSON types ---------------------------

_Int = int | float | None  # an integral float (30.0) is a JSON integer to many encoders
_Num = Annotated[float, Meta(ge=0.0)] | None  # prices: ints accepted, negatives refused
_Flag = int | bool | None
_Str = str | None
_Strs = tuple[str, ...] | None
_Ints = tuple[int, ...] | None
_NO_EXT = Raw()


class _Struct(Struct, gc=False):
    """Decoded JSON holds no cycles, so the structs stay out of the garbage collector."""


class Format(_Struct):
    w: _Int = None
    h: _Int = None


class Banner(_Struct):
    format: tuple[Format, ...] | None = None
    w: _Int = None
    h: _Int = None
    battr: _Ints = None


class Video(_Struct):
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


class Audio(_Struct):
    mimes: _Strs = None
    minduration: _Int = None
    maxduration: _Int = None
    battr: _Ints = None


class Native(_Struct):
    request: Raw = _NO_EXT  # a JSON string (<= 2.5 style) or an object; TAFE only needs to know it is there


class Deal(_Struct):
    id: _Str = None
    bidfloor: _Num = None
    bidfloorcur: _Str = None
    wseat: _Strs = None
    wadomain: _Strs = None


class Pmp(_Struct):
    private_auction: _Flag = None
    deals: tuple[Deal, ...] | None = None


class Imp(_Struct):
    id: _Str = None
    banner: Banner | None = None
    video: Video | None = None
    audio: Audio | None = None
    native: Native | None = None
    pmp: Pmp | None = None
    bidfloor: _Num = None
    bidfloorcur: _Str = None
    secure: _Flag = None
    instl: _Flag = None
    rwdd: _Flag = None
    tagid: _Str = None
    ext: Raw = _NO_EXT


class Publisher(_Struct):
    id: _Str = None


class Inventory(_Struct):
    """What site, app and dooh share (dooh adds nothing TAFE reads)."""

    domain: _Str = None
    publisher: Publisher | None = None
    cat: _Strs = None
    sectioncat: _Strs = None
    pagecat: _Strs = None


class Site(Inventory):
    page: Any = None  # read (and type-checked) only without domain


class App(Inventory):
    bundle: _Str = None


class Geo(_Struct):
    country: _Str = None
    region: _Str = None


class Device(_Struct):
    devicetype: _Int = None
    os: _Str = None
    ifa: _Str = None
    lmt: _Flag = None
    dnt: _Flag = None
    geo: Geo | None = None


class Eid(_Struct):
    uids: tuple[Any, ...] | None = None  # uid entries are read best effort


class User(_Struct):
    id: _Str = None
    buyeruid: _Str = None
    consent: _Str = None
    eids: tuple[Eid, ...] | None = None
    ext: Raw = _NO_EXT


class Dsa(_Struct):
    dsarequired: _Int = None


class Regs(_Struct):
    coppa: _Flag = None
    gdpr: _Flag = None
    us_privacy: _Str = None
    gpp: _Str = None
    gpp_sid: _Ints = None
    dsa: Dsa | None = None  # where some exchanges send it; the DSA extension says regs.ext.dsa
    ext: Raw = _NO_EXT


class Request(_Struct):
    id: _Str = None
    imp: tuple[Imp, ...] | None = None
    site: Site | None = None
    app: App | None = None
    dooh: Inventory | None = None
    device: Device | None = None
    user: User | None = None
    regs: Regs | None = None
    tmax: _Int = None
    at: _Int = None
    cur: _Strs = None
    bcat: _Strs = None
    badv: _Strs = None
    bapp: _Strs = None
    wseat: _Strs = None
    bseat: _Strs = None
    test: _Flag = None


class ExtKeys(_Struct):
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


# --- decoding and the reasons for a refusal ---------------------------------------------

_NO_EXT_KEYS = ExtKeys()
_decode_request = msgspec.json.Decoder(Request).decode  # benchmarks/json_parse.py times it alone
_decode_ext = msgspec.json.Decoder(ExtKeys).decode
_AT = re.compile(r" - at `\$\.?(.*)`$")
_INDEX = re.compile(r"\[\d+\]")


def decode(body: bytes) -> Request:
    """The fields TAFE reads from ``body``; raise ``BadRequest`` when it is not a JSON object of the spec's types."""
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


def ext_keys(raw: Raw) -> ExtKeys:
    """The keys TAFE reads from an ``ext`` object; anything but an object has none."""
    if not raw:
        return _NO_EXT_KEYS
    try:
        return _decode_ext(raw)
    except (msgspec.DecodeError, RecursionError):  # ValidationError included
        return _NO_EXT_KEYS


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
    return wrong_type(path)
