"""CQS features: what a request, an imp and a user's history say, as hashed indices.

Every feature is a string ``"<name>=<value>"`` (e.g. ``"geo=USA"``, ``"rv=3"``,
``"os*dt=ios|4"``); its weight index is ``crc32(utf-8 bytes) & (dims - 1)``. The
string form is what the decision log writes and what training reads, so a model can
be retrained with another hash size from the same logs. ``names()`` is that reference
form; ``Extractor`` computes the same indices without building strings: CRC-32
chains (``crc32(b, crc32(a)) == crc32(a + b)``), so each feature's prefix is hashed
once at load and finite-valued features (hour, buckets, flags) are plain table
look-ups. A test proves the two paths agree.

Spec ``tafe-cqs-features/1``:

- request: ``ch`` channel, ``inv`` site domain or app bundle, ``pub`` publisher,
  ``cat`` up to 4 inventory categories, ``dt`` device type (0 = unknown or other),
  ``os``, ``geo`` country, ``reg`` country/region, ``hr`` hour and ``dow`` day (UTC,
  from ``now``), ``priv`` lmt + 2*dnt + 4*gdpr, crosses ``dt*hr``, ``os*dt``,
  ``ch*geo``, ``geo*hr`` (local time of day), and ``known`` (1 when the store knows
  the user, else 0);
- imp: ``fmt`` bit set (1 banner, 2 video, 4 audio, 8 native), ``sz`` up to 3
  banner sizes, ``slot`` instl + 2*rewarded, ``floor`` bucket, ``tag``, crosses
  ``fmt*dt`` and ``inv*fmt``;
- user (known users only): 11 window counts as log2 buckets, 4 recencies aged by
  ``now - as_of`` as hour buckets (11 = never), ``cartab`` (cart newer than the
  last purchase, by cart recency), ``ctr`` (clicks_7d / shown_7d bucket), and crosses
  with the context: ``rv*dt``, ``rc*dt``, ``rk*ch``, ``v30d*ch``, ``s1d*q`` (ads shown
  today by quarter of the UTC day).

An unknown user is scored on the request alone plus ``known=0``: about 25 features;
a known user about 50.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

from tafe.core.types import BidRequest, Imp
from tafe.cqs.state import NEVER, UserState

SPEC = "tafe-cqs-features/1"

COUNT_FIELDS = ("v1d", "v7d", "v30d", "c7d", "c30d", "p30d", "p365d", "s1d", "s7d", "k7d", "k30d")
RECENCY_FIELDS = ("rv", "rc", "rp", "rk")
MAX_CATS = 4
MAX_SIZES = 3

# log2 count buckets: 0, 1, 2, 3-4, 5-8, 9-16, 17-32, 33+
_COUNT_CAP = 33
COUNT_BUCKET = tuple(0 if v == 0 else min(7, (v - 1).bit_length() + 1) for v in range(_COUNT_CAP + 1))
# recency buckets (hours): <1, <3, <6, <12, <24, <48, <96, <168, <336, <720, older; 11 = never
_RECENCY_EDGES = (1, 3, 6, 12, 24, 48, 96, 168, 336, 720)
_RECENCY_CAP = 720
RECENCY_BUCKET = tuple(sum(h >= e for e in _RECENCY_EDGES) for h in range(_RECENCY_CAP + 1))
RECENCY_NEVER = 11
_FLOOR_EDGES = (0.01, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
_CTR_EDGES = (0.02, 0.05, 0.1, 0.25)  # bucket 0: no click, 1..5 by ratio; 6: nothing shown
_CHANNELS = {"site": 1, "app": 2, "dooh": 3}
_CH_CODE = {"": 0, **_CHANNELS}


def _floor_bucket(price: float) -> int:
    b = 0
    for e in _FLOOR_EDGES:
        if price < e:
            return b
        b += 1
    return b


def _ctr_bucket(clicks: int, shown: int) -> int:
    if shown <= 0:
        return 6
    if clicks <= 0:
        return 0
    ratio = clicks / shown
    return 1 + sum(ratio >= e for e in _CTR_EDGES)


def _recency(hours: int, age_h: int) -> int:
    if hours >= NEVER:
        return RECENCY_NEVER
    return RECENCY_BUCKET[min(hours + age_h, _RECENCY_CAP)]


def clock(now: float) -> tuple[int, int]:
    """UTC hour of day and day of week (Monday 0) of a unix time."""
    days, secs = divmod(int(now), 86400)
    return secs // 3600, (days + 3) % 7


def age_hours(now: float, as_of: float) -> int:
    return max(0, int((now - as_of) // 3600))


def _device(request: BidRequest) -> int:
    dt = request.devicetype
    return dt if dt is not None and 1 <= dt <= 7 else 0


def _fmt(imp: Imp) -> int:
    return (imp.has_banner or bool(imp.banner_sizes)) | (imp.video is not None) << 1 | (imp.audio is not None) << 2 | imp.native << 3


def _priv(request: BidRequest) -> int:
    return request.lmt | request.dnt << 1 | request.gdpr << 2


def names(request: BidRequest, imp: Imp, state: UserState | None, now: float, as_of: float = 0.0) -> list[str]:
    """The reference feature strings of one imp (decision log, training, tests)."""
    hr, dow = clock(now)
    dt = _device(request)
    ch = request.channel if request.channel in _CHANNELS else ""
    inv = request.domain or request.bundle
    out = [
        f"ch={ch}", f"inv={inv}", f"pub={request.publisher_id}", f"dt={dt}", f"os={request.os}",
        f"geo={request.country}", f"reg={request.country}/{request.region}", f"hr={hr}", f"dow={dow}",
        f"priv={_priv(request)}", f"dt*hr={dt}|{hr}", f"os*dt={request.os}|{dt}", f"ch*geo={ch}|{request.country}",
        f"geo*hr={request.country}|{hr}", f"known={int(state is not None)}",
    ]
    out += [f"cat={c}" for c in request.inventory_cats[:MAX_CATS]]
    fmt = _fmt(imp)
    out += [f"fmt={fmt}", f"slot={imp.instl | imp.rewarded << 1}", f"floor={_floor_bucket(imp.bidfloor)}",
            f"tag={imp.tagid}", f"fmt*dt={fmt}|{dt}", f"inv*fmt={inv}|{fmt}"]
    out += [f"sz={w}x{h}" for w, h in imp.banner_sizes[:MAX_SIZES]]
    if state is not None:
        age = age_hours(now, as_of)
        out += [f"{n}={COUNT_BUCKET[min(v, _COUNT_CAP)]}" for n, v in zip(COUNT_FIELDS, state[:11])]
        rec = [_recency(h, age) for h in state[11:15]]
        out += [f"{n}={r}" for n, r in zip(RECENCY_FIELDS, rec)]
        abandoned = state.hours_since_cart < state.hours_since_purchase
        chc = _CH_CODE[ch]
        out += [f"cartab={rec[1] if abandoned else 12}", f"ctr={_ctr_bucket(state.clicks_7d, state.shown_7d)}",
                f"rv*dt={rec[0]}|{dt}", f"rc*dt={rec[1]}|{dt}", f"rk*ch={rec[3]}|{chc}",
                f"v30d*ch={COUNT_BUCKET[min(state.views_30d, _COUNT_CAP)]}|{chc}",
                f"s1d*q={COUNT_BUCKET[min(state.shown_1d, _COUNT_CAP)]}|{hr // 6}"]
    return out


def index_of(name: str, dims: int) -> int:
    return zlib.crc32(name.encode("utf-8")) & (dims - 1)


class Extractor:
    """Fast path: the indices of ``names()`` for a model with ``dims`` weights.

    Three parts, so a scorer can memoize each by what it depends on: ``context``
    (inventory, device, geo, clock), ``user`` (a known user's history) and
    ``imp_part`` (the slot).
    """

    def __init__(self, dims: int) -> None:
        if dims <= 0 or dims & (dims - 1):
            raise ValueError(f"dims must be a power of two, got {dims}")
        self.dims = dims
        m = self.mask = dims - 1

        def h(s: str) -> int:
            return zlib.crc32(s.encode("utf-8")) & m

        def seed(prefix: str) -> int:
            return zlib.crc32(prefix.encode("utf-8"))

        self.s_inv, self.s_pub, self.s_os, self.s_geo = seed("inv="), seed("pub="), seed("os="), seed("geo=")
        self.s_reg, self.s_cat, self.s_tag, self.s_sz = seed("reg="), seed("cat="), seed("tag="), seed("sz=")
        self.s_osdt, self.s_invfmt, self.s_geohr = seed("os*dt="), seed("inv*fmt="), seed("geo*hr=")
        self.s_chgeo = {c: seed(f"ch*geo={c}|") for c in ("", *_CHANNELS)}
        self.t_ch = {c: h(f"ch={c}") for c in ("", *_CHANNELS)}
        self.t_dt = [h(f"dt={d}") for d in range(8)]
        self.t_hr = [h(f"hr={x}") for x in range(24)]
        self.t_dow = [h(f"dow={x}") for x in range(7)]
        self.t_priv = [h(f"priv={x}") for x in range(8)]
        self.t_dthr = [[h(f"dt*hr={d}|{x}") for x in range(24)] for d in range(8)]
        self.t_known = [h("known=0"), h("known=1")]
        self.t_fmt = [h(f"fmt={x}") for x in range(16)]
        self.t_slot = [h(f"slot={x}") for x in range(4)]
        self.t_floor = [h(f"floor={x}") for x in range(len(_FLOOR_EDGES) + 1)]
        self.t_fmtdt = [[h(f"fmt*dt={f}|{d}") for d in range(8)] for f in range(16)]
        self.b_dt = [f"|{d}".encode() for d in range(8)]
        self.b_hr = [f"|{x}".encode() for x in range(24)]
        self.b_fmt = [f"|{f}".encode() for f in range(16)]
        # user tables: [field][raw value, capped] -> index
        self.t_counts = tuple(tuple(h(f"{n}={COUNT_BUCKET[v]}") for v in range(_COUNT_CAP + 1)) for n in COUNT_FIELDS)
        self.t_rec = tuple(tuple(h(f"{n}={b}") for b in range(RECENCY_NEVER + 1)) for n in RECENCY_FIELDS)
        self.t_cartab = [h(f"cartab={b}") for b in range(RECENCY_NEVER + 2)]
        self.t_ctr = [h(f"ctr={b}") for b in range(7)]
        self.t_rvdt = [[h(f"rv*dt={b}|{d}") for d in range(8)] for b in range(RECENCY_NEVER + 1)]
        self.t_rcdt = [[h(f"rc*dt={b}|{d}") for d in range(8)] for b in range(RECENCY_NEVER + 1)]
        self.t_rkch = [[h(f"rk*ch={b}|{c}") for c in range(4)] for b in range(RECENCY_NEVER + 1)]
        self.t_v30dch = [[h(f"v30d*ch={COUNT_BUCKET[v]}|{c}") for c in range(4)] for v in range(_COUNT_CAP + 1)]
        self.t_s1dq = [[h(f"s1d*q={COUNT_BUCKET[v]}|{q}") for q in range(4)] for v in range(_COUNT_CAP + 1)]

    def context(self, request: BidRequest, hr: int, dow: int) -> tuple[list[int], int, bytes, int]:
        """Request-level indices but ``known``, plus what the other parts need: device
        code, inventory bytes, channel code.

        A function of the request's inventory, device, geo and clock only, so callers
        may memoize it by those fields (``tafe.cqs.Snapshot`` does).
        """
        crc, m = zlib.crc32, self.mask
        dt = request.devicetype
        if dt is None or not 1 <= dt <= 7:
            dt = 0
        ch = request.channel
        if ch not in _CHANNELS:
            ch = ""
        inv = (request.domain or request.bundle).encode()
        os_b = request.os.encode()
        geo = request.country.encode()
        out = [
            self.t_ch[ch], crc(inv, self.s_inv) & m, crc(request.publisher_id.encode(), self.s_pub) & m,
            self.t_dt[dt], crc(os_b, self.s_os) & m, crc(geo, self.s_geo) & m,
            crc(b"/" + request.region.encode(), crc(geo, self.s_reg)) & m, self.t_hr[hr], self.t_dow[dow],
            self.t_priv[request.lmt | request.dnt << 1 | request.gdpr << 2], self.t_dthr[dt][hr],
            crc(self.b_dt[dt], crc(os_b, self.s_osdt)) & m, crc(geo, self.s_chgeo[ch]) & m,
            crc(self.b_hr[hr], crc(geo, self.s_geohr)) & m,
        ]
        s_cat = self.s_cat
        for c in request.inventory_cats[:MAX_CATS]:
            out.append(crc(c.encode(), s_cat) & m)
        return out, dt, inv, _CH_CODE[ch]

    def user(self, state: UserState, dt: int, chc: int, hr: int, age: int) -> list[int]:
        """A known user's history indices (``known=1`` included); ``age``: hours since ``as_of``."""
        v1, v7, v30, c7, c30, p30, p365, s1, s7, k7, k30, hv, hc, hp, hk = state
        t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10 = self.t_counts
        cap, rcap, never, rb = _COUNT_CAP, _RECENCY_CAP, NEVER, RECENCY_BUCKET
        rv = 11 if hv >= never else rb[hv + age if hv + age < rcap else rcap]
        rc = 11 if hc >= never else rb[hc + age if hc + age < rcap else rcap]
        rp = 11 if hp >= never else rb[hp + age if hp + age < rcap else rcap]
        rk = 11 if hk >= never else rb[hk + age if hk + age < rcap else rcap]
        tv, tc, tp, tk = self.t_rec
        return [
            self.t_known[1],
            t0[v1 if v1 < cap else cap], t1[v7 if v7 < cap else cap], t2[v30 if v30 < cap else cap],
            t3[c7 if c7 < cap else cap], t4[c30 if c30 < cap else cap], t5[p30 if p30 < cap else cap],
            t6[p365 if p365 < cap else cap], t7[s1 if s1 < cap else cap], t8[s7 if s7 < cap else cap],
            t9[k7 if k7 < cap else cap], t10[k30 if k30 < cap else cap],
            tv[rv], tc[rc], tp[rp], tk[rk],
            self.t_cartab[rc if hc < hp else 12], self.t_ctr[_ctr_bucket(k7, s7)], self.t_rvdt[rv][dt],
            self.t_rcdt[rc][dt], self.t_rkch[rk][chc], self.t_v30dch[v30 if v30 < cap else cap][chc],
            self.t_s1dq[s1 if s1 < cap else cap][hr // 6],
        ]

    def imp_part(self, imp: Imp, dt: int, inv: bytes) -> list[int]:
        crc, m = zlib.crc32, self.mask
        fmt = (imp.has_banner or bool(imp.banner_sizes)) | (imp.video is not None) << 1 | (imp.audio is not None) << 2 | imp.native << 3
        out = [
            self.t_fmt[fmt], self.t_slot[imp.instl | imp.rewarded << 1], self.t_floor[_floor_bucket(imp.bidfloor)],
            crc(imp.tagid.encode(), self.s_tag) & m, self.t_fmtdt[fmt][dt], crc(self.b_fmt[fmt], crc(inv, self.s_invfmt)) & m,
        ]
        s_sz = self.s_sz
        for w, h in imp.banner_sizes[:MAX_SIZES]:
            out.append(crc(b"%dx%d" % (w, h), s_sz) & m)
        return out

    def indices(self, request: BidRequest, imp: Imp, state: UserState | None, now: float, as_of: float = 0.0) -> list[int]:
        """Every index of one imp, unmemoized: the same multiset as hashing ``names()``."""
        hr, dow = clock(now)
        out, dt, inv, chc = self.context(request, hr, dow)
        if state is None:
            out.append(self.t_known[0])
        else:
            out += self.user(state, dt, chc, hr, age_hours(now, as_of))
        return out + self.imp_part(imp, dt, inv)


def hash_names(feature_names: Sequence[str], dims: int) -> list[int]:
    return [index_of(n, dims) for n in feature_names]
