"""``render(decision, ...) -> bytes``: the OpenRTB BidResponse body (or the empty no-bid body).

Markup (``adm``) is sent as the campaign wrote it, OpenRTB macros included: the
exchange substitutes them. ``nurl``/``burl``/``lurl`` point at TAFE's own notice
endpoints and carry all the state needed to join a notice with the bid log (request,
imp and bid ids, campaign, creative, model version, our price) so that no server-side
state is kept per bid. A creative without ``adm`` is served by the win notice.
"""

from __future__ import annotations

from urllib.parse import quote

import orjson

from tafe.core.types import Bid, Decision, MediaType

__all__ = ["notice_query", "render"]

_dumps = orjson.dumps


def notice_query(decision: Decision, bid: Bid) -> str:
    """The query string shared by a bid's win, billing and loss notices."""
    return (
        f"r={quote(decision.request_id, safe='')}&i={quote(bid.imp_id, safe='')}&b={bid.bid_id}"
        f"&c={quote(bid.campaign_id, safe='')}&cr={quote(bid.creative.id, safe='')}"
        f"&m={quote(decision.versions.get('model', ''), safe='')}&bp={bid.price}"
        + (f"&d={quote(bid.deal_id, safe='')}" if bid.deal_id else "")
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
