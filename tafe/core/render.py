"""``render(decision, ...) -> bytes``: the OpenRTB BidResponse body (or the empty no-bid body).

Markup (``adm``) is sent as the campaign wrote it, OpenRTB macros included: the
exchange substitutes them. ``nurl``/``burl``/``lurl`` point at TAFE's own notice
endpoints and carry all the state needed to join a notice with the bid log (request,
imp and bid ids, campaign, creative, model version, our price) so that no server-side
state is kept per bid.
"""

from __future__ import annotations

import re
from urllib.parse import quote

import orjson

from tafe.core.types import Bid, Decision, MediaType

__all__ = ["notice_query", "render"]

_dumps = orjson.dumps
_URL_SAFE = re.compile(r"[A-Za-z0-9._~-]*").fullmatch


def _q(value: str) -> str:
    """Percent-encode a query value; most ids need nothing, so skip quote() for them."""
    return value if _URL_SAFE(value) else quote(value, safe="")


def notice_query(decision: Decision, bid: Bid) -> str:
    """The query string shared by a bid's win, billing and loss notices."""
    # Campaign and creative ids are URL-safe by construction (tafe.core.campaigns); the
    # others nearly always are, so one check covers all three. Prices are on a
    # 4-decimal grid: "%.4f" says so and costs less than the shortest repr.
    rid, iid, model = decision.request_id, bid.imp_id, decision.versions.get("model", "")
    if not _URL_SAFE(rid + iid + model):
        rid, iid, model = _q(rid), _q(iid), _q(model)
    return (
        f"r={rid}&i={iid}&b={bid.bid_id}&c={bid.campaign_id}&cr={bid.creative.id}"
        f"&m={model}&bp={bid.price:.4f}"
        + (f"&d={_q(bid.deal_id)}" if bid.deal_id else "")
        + "&p=${AUCTION_PRICE}&cur=${AUCTION_CURRENCY}"
    )


def _bid(decision: Decision, bid: Bid, notice_base: str) -> dict:
    creative = bid.creative
    query = notice_query(decision, bid)
    out: dict = {
        "id": bid.bid_id,
        "impid": bid.imp_id,
        "price": bid.price,
        "nurl": f"{notice_base}/notice/win?{query}",
        "burl": f"{notice_base}/notice/bill?{query}",
        "lurl": f"{notice_base}/notice/loss?{query}&l=${{AUCTION_LOSS}}",
        "adomain": list(bid.adomain),
        "cid": bid.campaign_id,
        "crid": creative.id,
        "mtype": int(creative.format),
    }
    if creative.adm:
        out["adm"] = creative.adm
    if bid.cat:
        out["cat"] = list(bid.cat)
    if creative.format is MediaType.BANNER:
        out["w"] = creative.w
        out["h"] = creative.h
    elif creative.duration is not None:
        out["dur"] = creative.duration
    if bid.deal_id:
        out["dealid"] = bid.deal_id
    return out


def render(decision: Decision, *, seat: str, notice_base: str, nbr_in_response: bool = False) -> bytes:
    """The response body: a BidResponse, ``{"id", "nbr"}`` for a no-bid in nbr mode, else b"" (HTTP 204)."""
    if not decision.bids:
        if nbr_in_response:
            reason = decision.no_bid
            return _dumps({"id": decision.request_id, "nbr": reason.nbr if reason is not None else 0})
        return b""
    response = {
        "id": decision.request_id,
        "bidid": decision.bids[0].bid_id,
        "cur": decision.cur,
        "seatbid": [{"seat": seat, "bid": [_bid(decision, bid, notice_base) for bid in decision.bids]}],
    }
    if decision.versions:
        response["ext"] = {"cqs": decision.versions}
    return _dumps(response)
