"""``decide(request, models, campaigns, now) -> Decision``: which imps to bid on, with what, at what price.

For each imp, the creatives whose format and size fit are filtered by media details,
targeting, ``imp.secure`` and the request's blocks (bcat, badv, bapp); the user is
scored once (CQS from ``models``); each remaining campaign values the impression at
``base_cpm * score / score_pivot`` clipped to its ``max_cpm``; the best value wins.
The price is that value (second price, ``at=2``) or the value shaded by
``first_price_shade`` (first price, ``at=1``), raised to the floor only when the value
itself clears it. Deals are bid on by the campaigns set up for them, priced against
the deal floor; ``private_auction`` leaves only the deals.

All money is integer micros. The result depends only on the inputs (``now`` included):
bid ids are hashes, not random numbers. Only ``timings_us`` measures the clock.

Costs are stated where they shaped the code: the candidate loop runs for every
candidate of every imp.
"""

from __future__ import annotations

import dataclasses
from time import perf_counter_ns
from typing import Any, Protocol

from xxhash import xxh3_64_hexdigest

from tafe.core.campaigns import MICROS, Campaign, Campaigns
from tafe.core.types import Bid, BidRequest, Creative, Decision, Imp, MediaType, NoBidReason

__all__ = ["Scorer", "decide", "no_bid"]

PRICE_STEP = 100  # micros: prices are sent with 4 decimals

# How far an imp got before it was dropped; the request's reason is the furthest one.
_STAGE = {
    NoBidReason.NO_ELIGIBLE_CAMPAIGN: 0,
    NoBidReason.BLOCKED: 1,
    NoBidReason.UNKNOWN_USER: 2,
    NoBidReason.BELOW_FLOOR: 3,
}


class Scorer(Protocol):
    """What decide needs of a CQS snapshot (``tafe.cqs.Snapshot``)."""

    versions: dict[str, str]

    def score(self, request: BidRequest, imp: Imp, now: float) -> Any:  # -> Score(value, known_user)
        ...


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
        dur = creative.duration
        rqddurs = getattr(media, "rqddurs", ())
        if rqddurs:
            return dur in rqddurs
        if media.minduration is not None and dur < media.minduration:
            return False
        if media.maxduration is not None and dur > media.maxduration:
            return False
    return True


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


def _lanes(imp: Imp, campaigns: Campaigns) -> list[_Lane]:
    if not imp.deals and not imp.private_auction:  # the common case: the open auction alone
        floor = _convert(imp.bidfloor, imp.bidfloorcur, campaigns.fx_micros)
        return [("", floor, ())] if floor is not None else []
    lanes = []
    for deal in imp.deals:
        if deal.wseat and campaigns.seat not in deal.wseat:
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


def decide(request: BidRequest, models: Scorer, campaigns: Campaigns, now: float) -> Decision:
    """Bid on each imp a campaign can serve above its floor, or say why not."""
    t_start = perf_counter_ns()
    cur = campaigns.currency
    versions = models.versions
    seat = campaigns.seat
    if seat in request.bseat or (request.wseat and seat not in request.wseat):
        return no_bid(request.id, NoBidReason.BLOCKED, cur=cur, versions=versions)
    if request.cur and cur not in request.cur:
        return no_bid(request.id, NoBidReason.NO_ELIGIBLE_CAMPAIGN, cur=cur, versions=versions)
    # COPPA, or GDPR without consent: contextual only, the user is not looked up.
    scored = dataclasses.replace(request, user_keys=()) if request.coppa or (request.gdpr and not request.consent) else request
    shade = campaigns.first_price_shade if request.at == 1 else 1.0
    pivot = campaigns.score_pivot
    blocks = bool(request.bcat or request.badv or request.bapp)
    bcat, badv = (frozenset(request.bcat), frozenset(request.badv)) if blocks else (frozenset(), frozenset())
    bapp = request.bapp
    bids: list[Bid] = []
    furthest = -1
    score_ns = 0
    for imp in request.imps:
        lanes = _lanes(imp, campaigns)
        if not lanes:  # private auction with no deal open to our seat, or a floor in an unknown currency
            furthest = max(furthest, 1 if imp.deals else 0)
            continue
        stage = 0
        score = None
        s = 0.0
        best: tuple[tuple[int, int, int], Campaign, Creative, _Lane, int] | None = None
        secure = imp.secure
        for rank, (campaign, creative, media_check, restricts, creative_secure, known_only, base, top) in enumerate(
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
            if score is None:
                t0 = perf_counter_ns()
                score = models.score(scored, imp, now)
                score_ns += perf_counter_ns() - t0
                s = min(max(float(score.value), 0.0), 1.0)
            if known_only and not score.known_user:
                stage = 2
                continue
            stage = 3
            value = min(int(base * s / pivot), top)
            for lane in lanes:  # deals first, then the open auction
                deal_id, floor, wadomain = lane
                if deal_id and (deal_id not in campaign.deals or (wadomain and not any(d in wadomain for d in campaign.adomain))):
                    continue
                price = int(value * shade) // PRICE_STEP * PRICE_STEP  # _price's common case, inlined
                if price < floor or price <= 0:
                    price = _price(value, floor, shade)
                    if price is None:
                        continue
                key = (1 if deal_id else 0, value, -rank)
                if best is None or key > best[0]:
                    best = (key, campaign, creative, lane, price)
                break
        if best is None:
            furthest = max(furthest, stage)
            continue
        _, campaign, creative, lane, price = best
        bids.append(
            Bid(
                bid_id=_bid_id(request.id, imp.id, round(now * 1_000_000)),
                imp_id=imp.id,
                price=price / MICROS,
                campaign_id=campaign.id,
                creative=creative,
                adomain=campaign.adomain,
                cat=campaign.cat,
                deal_id=lane[0],
                cqs=s,
            )
        )
    total_us = (perf_counter_ns() - t_start) / 1000
    timings = {"decide": total_us, "score": score_ns / 1000}
    if bids:
        return Decision(request_id=request.id, bids=tuple(bids), cur=cur, versions=versions, timings_us=timings)
    reason = next((r for r, s in _STAGE.items() if s == furthest), NoBidReason.NO_ELIGIBLE_CAMPAIGN)
    return Decision(request_id=request.id, no_bid=reason, cur=cur, versions=versions, timings_us=timings)
