"""The pure bidding core: ``parse`` bytes into a request, ``decide`` what to bid, ``render`` the answer.

Deterministic given its inputs; imports neither gevent nor prometheus, so it can be
tested, benchmarked and reused without a server.
"""

from tafe.core.campaigns import Campaigns, CampaignsError
from tafe.core.campaigns import load as load_campaigns
from tafe.core.decide import decide, no_bid
from tafe.core.render import render
from tafe.core.request import BadRequest, parse

__all__ = ["BadRequest", "Campaigns", "CampaignsError", "decide", "load_campaigns", "no_bid", "parse", "render"]
