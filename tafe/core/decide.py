"""``decide(request, inputs) -> Decision``: which imps to bid on, with what, at what price.

The privacy rules come first (``tafe.core.privacy``, with ``Inputs.gvl_vendor_id``): a
request TAFE may not bid on is a no-bid ``privacy``; a user whose history may not be used
is scored from the request alone; either reason goes out in ``Decision.privacy``.

For each imp, the creatives whose format and size fit are filtered by media details,
targeting, ``imp.secure``, the request's blocks (bcat, badv, bapp, the imp's battr) and,
when the request requires DSA transparency, the campaign's DSA fields; the user is
scored once (CQS from ``models``); each remaining campaign values the impression at
``base_cpm * score / score_pivot`` clipped to its ``max_cpm``; the best value wins.
The price is that value (second price, ``at=2``) or the value shaded (first price,
``at=1``): by the learned curve of the imp's context in the open auction when
``Inputs.shading`` has one (``tafe.core.shading``), else by the fixed
``first_price_shade``; raised to the floor only when the value itself clears it. Deals
are bid on by the campaigns set up for them, priced against the deal floor;
``private_auction`` leaves only the deals.

Money comes in as values (``Inputs``): a campaign the user has seen ``frequency_cap``
times is skipped; a budgeted campaign bids only when its price fits in the float this
worker holds for it (what is left is passed in, less what earlier imps of the same
request took), and each such bid comes back as a reservation in the ``Decision`` for
the shell to apply.

All money is integer micros. The result depends only on the inputs (``now`` included):
bid ids are hashes, not random numbers. It reads no clock.

Costs are stated where they shaped the code: the candidate loop runs for every
candidate of every imp.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from xxhash import xxh3_64_hexdigest

from tafe.core.campaigns import MICROS, Campaign, Campaigns
from tafe.core.privacy import may_bid, may_use_history
from tafe.core.shading import Curve, Shading, shade_at
from tafe.core.shading import context as shading_context
from tafe.core.shading import inventory as shading_inventory
from tafe.core.types import Bid, BidRequest, Creative, Decision, Imp, MediaType, NoBidReason

__all__ = ["Inputs", "Scorer", "decide", "no_bid"]

PRICE_STEP = 100  # micros: prices are sent with 4 decimals
_NO_CAPS: frozenset[str] = frozenset()

# How far an imp got before it was dropped; the request's reason is the furthest one.
_STAGE = {
    NoBidReason.NO_ELIGIBLE_CAMPAIGN: 0,
    NoBidReason.BLOCKED: 1,
    NoBidReason.DSA: 2,
    NoBidReason.FREQUENCY_CAP: 3,
    NoBidReason.UNKNOWN_USER: 4,
    NoBidReason.BELOW_FLOOR: 5,
    NoBidReason.PACING: 6,
    NoBidReason.BUDGET: 7,
}


class Scorer(Protocol):
    """What decide needs of a CQS snapshot (``tafe.cqs.Snapshot``)."""

    versions: dict[str, str]

    def score(self, request: BidRequest, imp: Imp, now: float) -> Any:  # -> Score(value, known_user)
        ...


@dataclass(slots=True)
class Inputs:
    """Everything ``decide`` reads besides the request: runtime state comes in as values."""

    models: Scorer
    campaigns: Campaigns
    now: float  # unix seconds
    # Budgeted campaigns: nanos this worker may still reserve for each (its float). A
    # campaign absent from it has no budget. None: no campaign has one.
    budgets: Mapping[str, int] | None = None
    exhausted: frozenset[str] = frozenset()  # budgeted campaigns with nothing left this period
    # The user's impressions per campaign within that campaign's cap window (only
    # campaigns with a frequency cap need be present), or a function that reads them:
    # called at the first capped candidate, so a request no capped campaign fits reads
    # nothing. None: the user is not known or may not be looked up, so nothing can be
    # counted against a cap.
    impressions: Mapping[str, int] | Callable[[], Mapping[str, int] | None] | None = None
    # The seat the request's exchange knows us by (its profile); None: the campaigns' seat.
    seat: str | None = None
    # TAFE's IAB Global Vendor List id (setting gvl_vendor_id), read in TCF consent
    # strings by the privacy rules; 0: not registered.
    gvl_vendor_id: int = 0
    # Learned first-price shading (the snapshot's) and the exchange profile's name, the
    # first part of a shading context; None: the fixed first_price_shade for every bid.
    shading: Shading | None = None
    exchange: str = ""


# A way to bid on an imp: (deal id, "" for the open auction; floor in micros of our
# currency; the deal's allowed advertiser domains). A plain tuple: a NamedTuple's
# constructor is a Python call, made for every imp.
_Lane = tuple[str, int, tuple[str, ...]]


def no_bid(request_id: str, reason: NoBidReason, *, cur: str = "USD", versions: dict[str, str] | None = None) -> Decision:
    """A decision not to bid, e.g. when the deadline leaves no time to decide."""
    return Decision(request_id=request_id, no_bid=reason, cur=cur, versions=versions or {})


def _convert(amount: float, currency: str, fx_micros: dict[str, int]) -> int | None:
    """A floor in our currency's micros, rounded up (never bid under a floor); None if FX unknown."""
    rate = fx_micros.get(currency.upper())
    if rate is None:
        return None
    try:
        micros = round(amount * MICROS)
    except OverflowError:  # amount * MICROS is inf beyond ~1.8e302: int arithmetic instead
        micros = int(amount) * MICROS
    return -(-micros * rate // MICROS)


def _fits(imp: Imp, creative: Creative) -> bool:
    """Media details the (format, w, h) index does not cover."""
    fmt = creative.format
    if fmt is MediaType.VIDEO or fmt is MediaType.AUDIO:
        media = imp.video if fmt is MediaType.VIDEO else imp.audio
        if media is None:
            return False
        if media.mimes and not any(m in media.mimes for m in creative.mimes):
            return False
        dur = creative.duration or 0  # campaigns sets it on every video and audio creative
        rqddurs = getattr(media, "rqddurs", ())
        if rqddurs:
            return dur in rqddurs
        if media.minduration is not None and dur < media.minduration:
            return False
        if media.maxduration is not None and dur > media.maxduration:
            return False
    return True


def _battr(imp: Imp, fmt: MediaType) -> tuple[int, ...]:
    """The creative attributes the imp refuses for creatives of this format."""
    if fmt is MediaType.BANNER:
        return imp.banner_battr
    media = imp.video if fmt is MediaType.VIDEO else imp.audio if fmt is MediaType.AUDIO else None
    return media.battr if media is not None else ()  # native battr sits in the native request, unread


def _targeted(campaign: Campaign, request: BidRequest) -> bool:
    t = campaign.targeting
    if t.countries and request.country not in t.countries:
        return False
    if t.devicetypes and request.devicetype not in t.devicetypes:
        return False
    if t.os and request.os not in t.os:
        return False
    if t.channels and request.channel not in t.channels:
        return False
    return True


def _lanes(imp: Imp, campaigns: Campaigns, seat: str) -> list[_Lane]:
    if not imp.deals and not imp.private_auction:  # the common case: the open auction alone
        floor = _convert(imp.bidfloor, imp.bidfloorcur, campaigns.fx_micros)
        return [("", floor, ())] if floor is not None else []
    lanes = []
    for deal in imp.deals:
        if deal.wseat and seat not in deal.wseat:
            continue
        floor = _convert(deal.bidfloor, deal.bidfloorcur, campaigns.fx_micros)
        if floor is not None:
            lanes.append((deal.id, floor, deal.wadomain))
    if not imp.private_auction:
        floor = _convert(imp.bidfloor, imp.bidfloorcur, campaigns.fx_micros)
        if floor is not None:
            lanes.append(("", floor, ()))
    return lanes


def _price(value: int, floor: int, shade: float) -> int | None:
    """Price in micros: the (shaded) value on the 4-decimal grid, raised to clear the floor if the value allows."""
    price = int(value * shade) // PRICE_STEP * PRICE_STEP
    if price >= floor and price > 0:
        return price
    floor_up = max(-(-floor // PRICE_STEP) * PRICE_STEP, PRICE_STEP)
    return floor_up if floor_up <= value else None


def _bid_id(request_id: str, imp_id: str, now_us: int) -> str:
    # XXH3 of the ids and the time in whole microseconds: formatting ``now`` as a float
    # (repr) cost more than twice the hash itself.
    return xxh3_64_hexdigest(f"{request_id}\x00{imp_id}\x00{now_us}".encode())


def _capped(campaigns: Campaigns, impressions: Mapping[str, int] | Callable[[], Mapping[str, int] | None] | None) -> frozenset[str]:
    if callable(impressions):
        impressions = impressions()
    if not impressions:
        return frozenset()
    out = []
    for cid, n in impressions.items():
        campaign = campaigns.by_id.get(cid)
        cap = campaign.frequency_cap if campaign is not None else None
        if cap is not None and n >= cap.impressions:
            out.append(cid)
    return frozenset(out)


def decide(request: BidRequest, inputs: Inputs) -> Decision:
    """Bid on each imp a campaign can serve above its floor, or say why not."""
    models, campaigns, now = inputs.models, inputs.campaigns, inputs.now
    cur = campaigns.currency
    versions = models.versions
    seat = campaigns.seat if inputs.seat is None else inputs.seat
    refused = may_bid(request, inputs.gvl_vendor_id)
    if refused is not None:
        return Decision(request_id=request.id, no_bid=NoBidReason.PRIVACY, cur=cur, versions=versions, privacy=refused)
    if seat in request.bseat or (request.wseat and seat not in request.wseat):
        return no_bid(request.id, NoBidReason.BLOCKED, cur=cur, versions=versions)
    if request.cur and cur not in request.cur:
        return no_bid(request.id, NoBidReason.NO_ELIGIBLE_CAMPAIGN, cur=cur, versions=versions)
    # A user whose history may not be used is scored from the request alone.
    hidden = may_use_history(request, inputs.gvl_vendor_id)
    scored = dataclasses.replace(request, user_keys=()) if hidden is not None and request.user_keys else request
    budgets = inputs.budgets
    # The campaigns at their frequency cap for this user: read at the first capped candidate
    # (a request no capped campaign fits reads nothing); _NO_CAPS: none, nothing more to check.
    capped: frozenset[str] | None = None
    taken: dict[str, int] = {}  # nanos this request's earlier imps reserved, per campaign
    reservations: list[tuple[str, str, int]] = []
    first = request.at == 1
    shade = campaigns.first_price_shade if first else 1.0
    inventory = shading_inventory(request) if first else ""
    pivot = campaigns.score_pivot
    blocks = bool(request.bcat or request.badv or request.bapp)
    bcat, badv = (frozenset(request.bcat), frozenset(request.badv)) if blocks else (frozenset(), frozenset())
    bapp = request.bapp
    dsa = request.dsa_required >= 2  # a bid must then carry the campaign's DSA transparency
    bids: list[Bid] = []
    furthest = -1
    for imp in request.imps:
        lanes = _lanes(imp, campaigns, seat)
        if not lanes:  # private auction with no deal open to our seat, or a floor in an unknown currency
            furthest = max(furthest, 1 if imp.deals else 0)
            continue
        stage = 0
        score = None
        s = 0.0
        best: tuple[tuple[int, int, int], Campaign, Creative, _Lane, int] | None = None
        secure = imp.secure
        # First price: the open auction's bids are learned from under this context.
        ctx = shading_context(inputs.exchange, inventory, imp) if first else ""
        curve: Curve | None = inputs.shading.curve(ctx) if first and inputs.shading is not None else None
        battrs = bool(imp.banner_battr or (imp.video and imp.video.battr) or (imp.audio and imp.audio.battr))
        for rank, (campaign, creative, media_check, restricts, creative_secure, known_only, base, top, money) in enumerate(
            campaigns.candidates(imp)
        ):
            if media_check and not _fits(imp, creative):
                continue
            if restricts and not _targeted(campaign, request):
                continue
            if secure and not creative_secure:
                continue
            if blocks and (  # bcat, badv, bapp; inlined: it runs per candidate
                not bcat.isdisjoint(campaign.cat_family)
                or not badv.isdisjoint(campaign.adomain)
                or (campaign.bundle != "" and campaign.bundle in bapp)
            ):
                stage = stage or 1
                continue
            if battrs and creative.attr and not frozenset(creative.attr).isdisjoint(_battr(imp, creative.format)):
                stage = stage or 1
                continue
            if dsa and campaign.dsa is None:
                stage = max(stage, 2)
                continue
            if money and capped is not _NO_CAPS and campaign.frequency_cap is not None:
                if capped is None:
                    capped = _capped(campaigns, inputs.impressions) or _NO_CAPS
                if campaign.id in capped:
                    stage = max(stage, 3)
                    continue
            if score is None:
                score = models.score(scored, imp, now)
                s = min(max(float(score.value), 0.0), 1.0)
            if known_only and not score.known_user:
                stage = max(stage, 4)
                continue
            stage = max(stage, 5)
            value = min(int(base * s / pivot), top)
            open_shade = shade if curve is None else shade_at(curve, value)
            for lane in lanes:  # deals first, then the open auction
                deal_id, floor, wadomain = lane
                if deal_id and (deal_id not in campaign.deals or (wadomain and not any(d in wadomain for d in campaign.adomain))):
                    continue
                f = shade if deal_id else open_shade
                price = int(value * f) // PRICE_STEP * PRICE_STEP  # _price's common case, inlined
                if price < floor or price <= 0:
                    priced = _price(value, floor, f)
                    if priced is None:
                        continue
                    price = priced
                key = (1 if deal_id else 0, value, -rank)
                if best is None or key > best[0]:
                    # Its budget is checked only now, when it would win (a lower lane or
                    # campaign would not win either): the float, less what earlier imps took.
                    left = budgets.get(campaign.id) if money and budgets is not None else None
                    if left is not None and price > (left - taken.get(campaign.id, 0) if taken else left):
                        stage = max(stage, 7 if campaign.id in inputs.exhausted else 6)
                        continue
                    best = (key, campaign, creative, lane, price)
                break
        if best is None:
            furthest = max(furthest, stage)
            continue
        (_, value, _), campaign, creative, lane, price = best
        bid_id = _bid_id(request.id, imp.id, round(now * 1_000_000))
        if budgets is not None and campaign.id in budgets:
            reservations.append((campaign.id, bid_id, price))
            if len(request.imps) > 1:
                taken[campaign.id] = taken.get(campaign.id, 0) + price
        bids.append(
            Bid(
                bid_id=bid_id,
                imp_id=imp.id,
                price=price / MICROS,
                price_micros=price,
                campaign_id=campaign.id,
                creative=creative,
                adomain=campaign.adomain,
                cat=campaign.cat,
                deal_id=lane[0],
                cqs=s,
                secure=secure,
                cattax=campaign.cattax,
                bundle=campaign.bundle,
                dsa=campaign.dsa if dsa else None,
                value_micros=value,
                context="" if lane[0] else ctx,
            )
        )
    if bids:
        return Decision(
            request_id=request.id, bids=tuple(bids), cur=cur, versions=versions, reservations=tuple(reservations),
            privacy=hidden,
        )
    reason = next((r for r, s in _STAGE.items() if s == furthest), NoBidReason.NO_ELIGIBLE_CAMPAIGN)
    return Decision(request_id=request.id, no_bid=reason, cur=cur, versions=versions, privacy=hidden)
