"""``render(decision, ...) -> bytes``: the OpenRTB BidResponse body (or the empty no-bid body).

Markup (``adm``) is sent as the campaign wrote it, OpenRTB macros included (the
exchange substitutes them), except TAFE's own two: ``${TAFE_IMP_URL}`` and
``${TAFE_CLICK_URL}`` become this bid's ``/track/imp`` and ``/track/click`` URLs. Banner
markup without ``${TAFE_IMP_URL}`` gets a 1x1 pixel appended, VAST markup an
``<Impression>`` element, so every impression can be counted.

``nurl``/``burl``/``lurl`` and the tracking URLs carry one signed token each
(``tafe.money.token``, made by the caller: signing needs the node's key): it holds the
whole bid, so no server-side state is kept per bid to understand a notice.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import orjson

from tafe.core.types import Bid, Creative, Decision, MediaType

__all__ = ["CLICK_MACRO", "IMP_MACRO", "markup", "render"]

IMP_MACRO = "${TAFE_IMP_URL}"
CLICK_MACRO = "${TAFE_CLICK_URL}"
_VAST_AD = re.compile(r"<(InLine|Wrapper)\b[^>]*>")

_dumps = orjson.dumps


@lru_cache(maxsize=4096)
def _template(adm: str, fmt: MediaType) -> tuple[str, ...]:
    """The markup split around TAFE's macros: text, macro, text, macro, ..., text.

    Built once per creative (the cache is bounded by the campaign file's size in
    practice); rendering then only joins strings.
    """
    if IMP_MACRO not in adm:
        if fmt is MediaType.BANNER:
            adm += f'<img src="{IMP_MACRO}" width="1" height="1" style="display:none" alt="">'
        elif "<VAST" in adm:
            adm = _VAST_AD.sub(lambda m: f"{m.group(0)}<Impression><![CDATA[{IMP_MACRO}]]></Impression>", adm, count=1)
    return tuple(re.split(r"(\$\{TAFE_IMP_URL\}|\$\{TAFE_CLICK_URL\})", adm))


def markup(creative: Creative, imp_url: str, click_url: str) -> str:
    """The creative's markup for one bid: its tracking macros replaced, a pixel added where needed."""
    parts = _template(creative.adm, creative.format)
    if len(parts) == 1:
        return parts[0]
    return "".join(imp_url if p == IMP_MACRO else click_url if p == CLICK_MACRO else p for p in parts)


def _bid(decision: Decision, bid: Bid, notice_base: str, token: str) -> dict[str, Any]:
    creative = bid.creative
    out: dict[str, Any] = {
        "id": bid.bid_id,
        "impid": bid.imp_id,
        "price": bid.price,
        "nurl": f"{notice_base}/notice/win?t={token}&p=${{AUCTION_PRICE}}&cur=${{AUCTION_CURRENCY}}&mtw=${{AUCTION_MIN_TO_WIN}}",
        "burl": f"{notice_base}/notice/bill?t={token}&p=${{AUCTION_PRICE}}&cur=${{AUCTION_CURRENCY}}",
        "lurl": f"{notice_base}/notice/loss?t={token}&l=${{AUCTION_LOSS}}&mtw=${{AUCTION_MIN_TO_WIN}}",
        "adomain": list(bid.adomain),
        "cid": bid.campaign_id,
        "crid": creative.id,
        "mtype": int(creative.format),
    }
    if creative.adm:
        # Markup for a secure imp must load over https: so must its pixel (the node is
        # then expected behind TLS, as Nginx or a load balancer usually provides).
        base = "https://" + notice_base[7:] if bid.secure and notice_base.startswith("http://") else notice_base
        out["adm"] = markup(creative, f"{base}/track/imp?t={token}", f"{base}/track/click?t={token}")
    if bid.cat:
        out["cat"] = list(bid.cat)
        out["cattax"] = bid.cattax
    if creative.attr:
        out["attr"] = list(creative.attr)
    if bid.bundle:
        out["bundle"] = bid.bundle
    if creative.language:
        out["language"] = creative.language
    if creative.format is MediaType.BANNER:
        out["w"] = creative.w
        out["h"] = creative.h
    elif creative.duration is not None:
        out["dur"] = creative.duration
    if bid.deal_id:
        out["dealid"] = bid.deal_id
    if bid.dsa is not None:
        dsa = bid.dsa
        out["ext"] = {"dsa": {"behalf": dsa.behalf, "paid": dsa.paid, "adrender": dsa.adrender}}
    return out


def render(
    decision: Decision, *, seat: str, notice_base: str, tokens: Sequence[str] = (), nbr_in_response: bool = False
) -> bytes:
    """The response body: a BidResponse, ``{"id", "nbr"}`` for a no-bid in nbr mode, else b"" (HTTP 204).

    ``tokens[i]`` is the signed notice token of ``decision.bids[i]`` (none: unsigned URLs,
    whose notices TAFE refuses; for tests of the body alone).
    """
    if not decision.bids:
        if nbr_in_response:
            reason = decision.no_bid
            return _dumps({"id": decision.request_id, "nbr": reason.nbr if reason is not None else 0})
        return b""
    response: dict[str, Any] = {
        "id": decision.request_id,
        "bidid": decision.bids[0].bid_id,
        "cur": decision.cur,
        "seatbid": [{"seat": seat, "bid": [
            _bid(decision, bid, notice_base, tokens[i] if tokens else "") for i, bid in enumerate(decision.bids)
        ]}],
    }
    if decision.versions:
        response["ext"] = {"cqs": decision.versions}
    return _dumps(response)
