"""The one place that answers two questions per bid request: may TAFE bid, may it use the user's history?

``may_bid(request, vendor_id)`` and ``may_use_history(request, vendor_id)`` return None
for yes, else a short reason label for /metrics. ``vendor_id`` is TAFE's IAB Global
Vendor List id (setting ``gvl_vendor_id``); passing it keeps these functions pure.

The rules
---------
1. No privacy signal at all (the common case): bid, use history.
2. GDPR applies when ``regs.gdpr`` (or 2.5 ``regs.ext.gdpr``) is 1, or ``regs.gpp_sid``
   lists section 2 (TCF EU). The TCF v2 string is ``user.consent`` (2.5
   ``user.ext.consent``), else the GPP string's section 2. When GDPR applies:

   - no string: no bid, no history (``gdpr_no_consent``). TCF gives a vendor no legal
     basis for any purpose without a TC string, and purpose 2 (basic ads) processes
     personal data (the IP address, the device) too; "contextual without a string"
     is a common practice, not what the policy grants, so the conservative reading
     is not to bid.
   - a string that does not decode (not base64url, not version 2, cut short) counts
     as no consent: no bid, no history (``gdpr_bad_consent``).
   - bid (contextually) only with purpose 1 (store/access on the device) consented,
     unless the string sets Purpose One Treatment (purpose 1 not disclosed, the
     publisher's country rules apply) (``gdpr_no_purpose1``); and purpose 2 (basic
     ads) allowed by consent, or by legitimate interest, which TCF permits for
     purpose 2 (``gdpr_no_purpose2``). Our vendor bit is not needed for that: a
     contextual bid uses nothing of the user's.
   - ``vendor_id`` 0 means "not registered in the GVL": no string can carry consent
     for TAFE, so where GDPR applies TAFE bids contextually (by the rule above) and
     never uses history (``gdpr_no_vendor_id``). Register and set ``gvl_vendor_id``
     to use history on GDPR traffic.
   - use history only if bidding is allowed and purposes 1 (no Purpose One Treatment
     exception: reading a stored id is device access), 3 (create a personalised ads
     profile) and 4 (use it to select ads) are consented (``gdpr_no_purpose3``...),
     and the vendor consent bit for ``vendor_id`` is set (``gdpr_no_vendor``). TCF
     v2.2 removed legitimate interest for purposes 3 and 4, so only consent counts,
     whatever the string's policy version.
   Publisher restrictions are not read (they only ever narrow what is allowed; a
   restriction that forbids TAFE a purpose is not honoured yet).
3. Never use history, but still bid contextually, when: ``regs.coppa`` is 1
   (``coppa``); ``device.lmt`` is 1 (``lmt``); ``regs.us_privacy`` (2.5
   ``regs.ext.us_privacy``) says the user opted out of sale, ``1?Y?``
   (``us_privacy_opt_out``), or is not a valid ``1[YN-]{3}`` string
   (``us_privacy_bad``); a US section of ``regs.gpp`` says the user opted out of sale,
   sharing or targeted ads (``gpp_opt_out``, layouts in ``tafe.core.gpp``). The US
   GPP sections checked are those ``regs.gpp_sid`` lists, or all US sections in the
   string when ``gpp_sid`` is absent. A GPP string whose header does not decode, or
   lacks a listed section, or a listed US section that does not decode, counts as an
   opt-out (``gpp_bad``); a state section TAFE does not decode (13 and up) likewise
   (``gpp_unsupported_section``): opting out is the user's right, and an unreadable
   signal cannot show they did not.

Cost: every rule but 1 needs a decoded string. Exchanges send the same few strings
over and over, so each verdict is cached (bounded LRU, keyed by the string); a
hostile stream of unique strings only evicts, and each decode is bounded by the
string-length caps in ``tcf`` and ``gpp``.
"""

from __future__ import annotations

from functools import lru_cache

from tafe.core import gpp as gpp_mod
from tafe.core import tcf
from tafe.core.types import BidRequest

__all__ = ["may_bid", "may_use_history"]

_CACHE = 512  # distinct strings kept; a few dozen are typical per exchange


def may_bid(request: BidRequest, vendor_id: int) -> str | None:
    """None if TAFE may bid on this request at all, else why not."""
    if not (request.gdpr or request.gpp_sid) or not _gdpr_applies(request):
        return None
    return _tcf_verdict(_consent(request), vendor_id)[0]


def may_use_history(request: BidRequest, vendor_id: int) -> str | None:
    """None if TAFE may look the user up and score them from their history, else why not."""
    if not (request.gdpr or request.coppa or request.lmt or request.us_privacy or request.gpp or request.gpp_sid):
        return None
    if request.coppa:
        return "coppa"
    if request.lmt:
        return "lmt"
    if _gdpr_applies(request):
        reason = _tcf_verdict(_consent(request), vendor_id)[1]
        if reason is not None:
            return reason
    if request.us_privacy:
        reason = _us_privacy(request.us_privacy)
        if reason is not None:
            return reason
    if request.gpp or request.gpp_sid:
        return _gpp_verdict(request.gpp, request.gpp_sid)
    return None


def _gdpr_applies(request: BidRequest) -> bool:
    return request.gdpr or gpp_mod.TCFEU_SECTION in request.gpp_sid


def _consent(request: BidRequest) -> str:
    if request.consent or not request.gpp:
        return request.consent
    return _gpp_tcf(request.gpp)


@lru_cache(maxsize=_CACHE)
def _tcf_verdict(consent: str, vendor_id: int) -> tuple[str | None, str | None]:
    """(may_bid reason, may_use_history reason) for one TC string, by rule 2."""
    if not consent:
        return "gdpr_no_consent", "gdpr_no_consent"
    tc = tcf.decode(consent)
    if tc is None:
        return "gdpr_bad_consent", "gdpr_bad_consent"
    if not (tc.purpose_one_treatment or tc.purpose_consent(1)):
        return "gdpr_no_purpose1", "gdpr_no_purpose1"
    if not (tc.purpose_consent(2) or tc.purpose_li(2)):
        return "gdpr_no_purpose2", "gdpr_no_purpose2"
    if vendor_id <= 0:
        return None, "gdpr_no_vendor_id"
    for purpose in (1, 3, 4):
        if not tc.purpose_consent(purpose):
            return None, f"gdpr_no_purpose{purpose}"
    return None, None if tc.vendor_consent(vendor_id) else "gdpr_no_vendor"


@lru_cache(maxsize=_CACHE)
def _gpp_tcf(gpp: str) -> str:
    """The TCF EU section of a GPP string, or ""."""
    found = gpp_mod.sections(gpp)
    return (found or {}).get(gpp_mod.TCFEU_SECTION, "")


# Every valid US Privacy string (version 1; notice, opt-out of sale, LSPA each Y, N or -)
# mapped to its history reason: one dict lookup per request.
_US_PRIVACY = {
    f"1{notice}{sale}{lspa}": "us_privacy_opt_out" if sale == "Y" else None
    for notice in "YN-"
    for sale in "YN-"
    for lspa in "YN-"
}


def _us_privacy(value: str) -> str | None:
    return _US_PRIVACY.get(value.upper(), "us_privacy_bad")


@lru_cache(maxsize=_CACHE)
def _gpp_verdict(gpp: str, gpp_sid: tuple[int, ...]) -> str | None:
    """The history reason from the US sections of a GPP string, by rule 3."""
    wanted = [sid for sid in gpp_sid if sid in gpp_mod.US_SECTIONS]
    if gpp_sid and not wanted:
        return None  # the exchange says no US section applies
    if not gpp:
        return "gpp_bad" if wanted else None
    found = gpp_mod.sections(gpp)
    if found is None:
        return "gpp_bad"
    if not wanted:
        wanted = [sid for sid in found if sid in gpp_mod.US_SECTIONS]
    for sid in wanted:
        text = found.get(sid)
        if text is None:
            return "gpp_bad"
        opted_out = gpp_mod.us_opt_out(sid, text)
        if opted_out is None:
            return "gpp_unsupported_section" if sid not in gpp_mod.DECODED_US_SECTIONS else "gpp_bad"
        if opted_out:
            return "gpp_opt_out"
    return None
