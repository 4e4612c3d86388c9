"""may_bid / may_use_history on real consent strings from public test suites (source next to each)."""

from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
import sys

import pytest

from tafe.core import gpp, privacy, tcf
from tafe.core.privacy import may_bid, may_use_history
from tafe.core.request import BadRequest, parse
from tafe.core.types import BidRequest, Imp

# --- TCF v2 strings ------------------------------------------------------------------------
# prebid/prebid-server gdpr/impl_test.go: "full consents to purposes and vendors 2, 6, 8"
# (decoded: consent 1-10, LI 2-10, vendor consent and LI 2, 6, 8).
FULL_2_6_8 = "COzTVhaOzTVhaGvAAAENAiCIAP_AAH_AAAAAAEEUACCKAAA"
# prebid/prebid-server gdpr/impl_test.go: vendor2AndPurpose1Consent (purpose 1 only, vendor 2).
P1_V2 = "CPGWbY_PGWbY_GYAAAENABCAAIAAAAAAAAAAACEAAAAA"
# prebid/prebid-server gdpr/impl_test.go: vendor2AndPurpose2Consent (purpose 2 only, vendor 2).
P2_V2 = "CPGWbY_PGWbY_GYAAAENABCAAEAAAAAAAAAAACEAAAAA"
# prebid/prebid-server gdpr/impl_test.go: vendor2NoPurpose1Consent (no purpose, vendor 2).
NONE_V2 = "CPGWkCaPGWkCaApAAAENABCAAAAAAAAAAAAAABEAAAAA"
# prebid/prebid-server gdpr/impl_test.go: purpose1NoVendorConsent (purpose 1, no vendor).
P1_NO_VENDOR = "CPGWkCaPGWkCaApAAAENABCAAIAAAAAAAAAAABAAAAAA"
# InteractiveAdvertisingBureau/iabtcf-java iabtcf-decoder/src/test/java/com/iabtcf/decoder/TCStringV2Test.java
# testConstructConsentsFromBitFields: purposes 3-9 consented, vendor consent 23 37 47 48 53 65 98,
# vendor LI 37 47 48 53 65 98 129 (no purpose 1 or 2).
P3_9 = "COrEAV4OrXx94ACABBENAHCIAD-AAAAAAACAAxAAAAgAIAwgAgAAAAEAgQAAAAAEAYQAQAAAACAAAABAAA"
# Same file, testCanConstructTCModelFromBase64String: consent 2, 10; LI 2, 9; Purpose One Treatment.
P2_P1T = "COtybn4PA_zT4KjACBENAPCIAEBAAECAAIAAAAAAAAAA"
# Same file, testRange: vendor consent by range encoding, 702-703 (no purposes).
RANGE_702_703 = "COwBOpCOwBOpCLqAAAENAPCAAAAAAAAAAAAAFfwAYFfAV-BVkAGBVYFWAAA.IFoEUQQgAIQwgIwQABAEAAAAOIAACAIAAAAQAIAgEAACEAAAAAgAQBAAAAAAAGBAAgAAAAAAAFAAECAAAgAAQARAEQAAAAAJAAIAAgAAAYQEAAAQmAgBC3ZAYzUw"
# Same file, testPurposesConsent: purposes 1 and 2, no vendors.
P1_P2_NO_VENDOR = "COwxsONOwxsONKpAAAENAdCAAMAAAAAAAAAAAAAAAAAA"
# prebid/prebid-server gdpr/impl_test.go TestMalformedConsent, and a TCF v1 string
# (InteractiveAdvertisingBureau/iabtcf-java TCStringV1Test style "BO..." prefix: version 1).
MALFORMED = "BON"

# --- GPP strings -----------------------------------------------------------------------------
# IABTechLab/iabgpp-es modules/cmpapi/test/GppModel.test.ts ("should encode uspv1 section"): 1YNN.
GPP_USP_NO_OPT_OUT = "DBABTA~1YNN"
# Same file ("should default all sections"): sections 2, 5-12, every US field 0 (not applicable).
GPP_ALL_DEFAULT = (
    "DBACOaw~CPSG_8APSG_8AAAAAAENAACAAAAAAAAAAAAAAAAAAAAA.QAAA.IAAA~CPSG_8APSG_8AAAAAAENAACAAAAAAAAAAAAAAAAA."
    "YAAAAAAAAAA~1---~BAAAAAAAAAA.QA~BAAAAAAA.QA~BAAAAAA~BAAAAAA.QA~BAAAAAAA~BAAAAAAA.QA"
)
# Same file ("should encode uspv1 and tcfeuv2 sections"): TCF EU section with no consent + 1YNN.
GPP_TCF_AND_USP = "DBACNYA~CPSG_8APSG_8ANwAAAENAwCAAAAAAAAAAAAAAAAAAAAA.QAAA.IAAA~1YNN"
# LiveRamp/iabconsent gpp_parsed_consent_fixture_test.go: usnat, sale/sharing/targeted "NotOptedOut".
GPP_USNAT_NOT_OPTED_OUT = "DBABL~BVVqAAEABAA.QA"
# Header DBABL (section 7) as above; section from IABTechLab/iabgpp-es
# modules/cmpapi/test/encoder/section/UsNat.test.ts: sale, sharing, targeted opt-outs all 1.
GPP_USNAT_OPTED_OUT = "DBABL~BVVVkkkkkpFY.YA"
# iabgpp-es test/encoder/section/*.test.ts "should encode to ...": every opt-out field set to 1.
USCA_OPTED_OUT = "BVWSSSVY.YA"  # UsCa.test.ts: SaleOptOut 1, SharingOptOut 1
USVA_OPTED_OUT = "BVWSSVY"  # UsVa.test.ts: SaleOptOut 1, TargetedAdvertisingOptOut 1
USCO_OPTED_OUT = "BVWSSVg.Y"  # UsCo.test.ts
USUT_OPTED_OUT = "BVVkklW"  # UsUt.test.ts
USCT_OPTED_OUT = "BVWSSZFg.YA"  # UsCt.test.ts
# UsNat.test.ts "should decode BVQqAAAACg": notices given, sale/sharing/targeted 2 (did not opt out).
USNAT_NOT_OPTED_OUT = "BVQqAAAACg"

VENDOR = 2  # the vendor id the Prebid Server strings were made for


def req(**fields) -> BidRequest:
    return BidRequest(id="r", imps=(Imp(id="1"),), **fields)


# --- the common case ----------------------------------------------------------------------------


def test_no_signal_bids_and_uses_history():
    r = req()
    assert may_bid(r, VENDOR) is None
    assert may_use_history(r, VENDOR) is None
    assert may_bid(r, 0) is None and may_use_history(r, 0) is None


# --- GDPR / TCF ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "consent, vendor, bid, history",
    [
        (FULL_2_6_8, 2, None, None),
        (FULL_2_6_8, 6, None, None),
        (FULL_2_6_8, 3, None, "gdpr_no_vendor"),  # purposes fine, not our vendor: contextual only
        (FULL_2_6_8, 0, None, "gdpr_no_vendor_id"),  # gvl_vendor_id not set: contextual only
        (P1_V2, 2, "gdpr_no_purpose2", "gdpr_no_purpose2"),  # basic ads refused
        (P2_V2, 2, "gdpr_no_purpose1", "gdpr_no_purpose1"),  # no storage/access
        (NONE_V2, 2, "gdpr_no_purpose1", "gdpr_no_purpose1"),
        (P1_NO_VENDOR, 2, "gdpr_no_purpose2", "gdpr_no_purpose2"),
        (P1_P2_NO_VENDOR, 2, None, "gdpr_no_purpose3"),  # purposes 1+2 only: contextual
        (P1_P2_NO_VENDOR, 0, None, "gdpr_no_vendor_id"),
        (P3_9, 23, "gdpr_no_purpose1", "gdpr_no_purpose1"),  # personalisation allowed, basics not
        (P2_P1T, 2, None, "gdpr_no_purpose1"),  # Purpose One Treatment, purpose 2: contextual only
        (RANGE_702_703, 703, "gdpr_no_purpose1", "gdpr_no_purpose1"),
        (MALFORMED, 2, "gdpr_bad_consent", "gdpr_bad_consent"),
        ("BOEFEAyOEFEAyAHABDENAI4AAAB9vABAASA", 2, "gdpr_bad_consent", "gdpr_bad_consent"),  # TCF v1
        ("", 2, "gdpr_no_consent", "gdpr_no_consent"),
    ],
)
def test_tcf(consent, vendor, bid, history):
    r = req(gdpr=True, consent=consent)
    assert may_bid(r, vendor) == bid
    assert may_use_history(r, vendor) == history


def test_basic_ads_consent_without_personalisation_bids_without_history():
    """The issue's case: purposes 1 and 2 allowed, 3/4 refused -> contextual bid only."""
    tc = tcf.decode(FULL_2_6_8)
    assert tc is not None
    # FULL_2_6_8 with purposes 3 and 4 cleared in its consent bits (offsets 154 and 155):
    # the same real string, one user decision apart.
    data = bytearray(tc._data)
    for bit in (152 + 2, 152 + 3):
        data[bit // 8] &= ~(0x80 >> (bit % 8))
    refused = base64.urlsafe_b64encode(bytes(data)).decode().rstrip("=")
    r = req(gdpr=True, consent=refused)
    assert may_bid(r, VENDOR) is None
    assert may_use_history(r, VENDOR) == "gdpr_no_purpose3"


def test_consent_is_ignored_when_gdpr_does_not_apply():
    r = req(gdpr=False, consent=MALFORMED)
    assert may_bid(r, VENDOR) is None and may_use_history(r, VENDOR) is None


def test_tcf_decoder_matches_the_reference_values():
    tc = tcf.decode(P3_9)
    assert [p for p in range(1, 25) if tc.purpose_consent(p)] == [3, 4, 5, 6, 7, 8, 9]
    assert [v for v in range(1, 200) if tc.vendor_consent(v)] == [23, 37, 47, 48, 53, 65, 98]
    assert [v for v in range(1, 200) if tc.vendor_li(v)] == [37, 47, 48, 53, 65, 98, 129]
    tc = tcf.decode(P2_P1T)
    assert tc.purpose_one_treatment and tc.purpose_consent(2) and tc.purpose_li(9) and not tc.purpose_consent(1)
    assert [v for v in range(1, 800) if tcf.decode(RANGE_702_703).vendor_consent(v)] == [702, 703]


@pytest.mark.parametrize("junk", ["C", "C*", "CO" * 3000, "COzTVhaOzTVhaGvAAAENAiCIAP_AAH", "\u00e9\u00e9\u00e9\u00e9", "===="])
def test_tcf_junk_is_bad_consent(junk):
    assert tcf.decode(junk) is None
    assert may_bid(req(gdpr=True, consent=junk), VENDOR) == "gdpr_bad_consent"


def test_tcf_string_from_gpp_section_2_when_user_consent_is_absent():
    r = req(gdpr=True, gpp=GPP_TCF_AND_USP, gpp_sid=(2, 6))
    assert may_bid(r, VENDOR) == "gdpr_no_purpose1"  # that section consents to nothing
    r = req(gpp=GPP_TCF_AND_USP, gpp_sid=(2,))  # gpp_sid 2 alone says GDPR applies
    assert may_bid(r, VENDOR) == "gdpr_no_purpose1"


# --- US ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"coppa": True}, "coppa"),
        ({"lmt": True}, "lmt"),
        ({"us_privacy": "1YYN"}, "us_privacy_opt_out"),
        ({"us_privacy": "1NYY"}, "us_privacy_opt_out"),
        ({"us_privacy": "1YNN"}, None),
        ({"us_privacy": "1---"}, None),
        ({"us_privacy": "1yyn"}, "us_privacy_opt_out"),
        ({"us_privacy": "2YYN"}, "us_privacy_bad"),
        ({"us_privacy": "junk"}, "us_privacy_bad"),
        ({"gpp": GPP_USP_NO_OPT_OUT, "gpp_sid": (6,)}, None),
        ({"gpp": GPP_ALL_DEFAULT}, None),
        ({"gpp": GPP_ALL_DEFAULT, "gpp_sid": (7, 8, 9, 10, 11, 12)}, None),
        ({"gpp": GPP_USNAT_NOT_OPTED_OUT, "gpp_sid": (7,)}, None),
        ({"gpp": GPP_USNAT_OPTED_OUT, "gpp_sid": (7,)}, "gpp_opt_out"),
        ({"gpp": GPP_USNAT_OPTED_OUT}, "gpp_opt_out"),  # no gpp_sid: every US section counts
        ({"gpp": GPP_USNAT_OPTED_OUT, "gpp_sid": (2,)}, "gdpr_no_consent"),  # only TCF EU applies, and it is absent
        ({"gpp": GPP_USNAT_OPTED_OUT, "gpp_sid": (8,)}, "gpp_bad"),  # listed section missing
        ({"gpp": "DBABL~z", "gpp_sid": (7,)}, "gpp_bad"),
        ({"gpp": "junk", "gpp_sid": (7,)}, "gpp_bad"),
        ({"gpp": "DBABL~section1~section2"}, "gpp_bad"),  # prebid-server: more sections than the header
        ({"gpp": "", "gpp_sid": (7,)}, "gpp_bad"),
        ({"gpp": "DBABMA~" + FULL_2_6_8, "gpp_sid": (2,)}, None),  # TCF EU in GPP, full consent; US opt-out ignored
    ],
)
def test_us_signals_stop_history_not_bids(fields, reason):
    r = req(**fields)
    assert may_use_history(r, VENDOR) == reason
    if "gpp_sid" not in fields or 2 not in fields["gpp_sid"]:
        assert may_bid(r, VENDOR) is None


@pytest.mark.parametrize(
    "sid, text, opted_out",
    [
        (7, "BVVVkkkkkpFY.YA", True),
        (7, USNAT_NOT_OPTED_OUT, False),
        (8, USCA_OPTED_OUT, True),
        (8, "BAAAAABA.QA", False),  # UsCa.test.ts default
        (9, USVA_OPTED_OUT, True),
        (9, "BAAAABA", False),  # UsVa.test.ts default
        (10, USCO_OPTED_OUT, True),
        (10, "BAAAAEA.Q", False),  # UsCo.test.ts default
        (11, USUT_OPTED_OUT, True),
        (11, "BAAAAAQ", False),  # UsUt.test.ts default
        (12, USCT_OPTED_OUT, True),
        (12, "BAAAAAEA.QA", False),  # UsCt.test.ts default
        (6, "1YYN", True),
        (6, "1YNN", False),
        (7, "z", None),  # UsNat.test.ts "should throw Error on garbage"
        (13, "BAAAAAAA", None),  # a state section not decoded here
    ],
)
def test_gpp_us_sections(sid, text, opted_out):
    assert gpp.us_opt_out(sid, text) is opted_out


def test_gpp_section_for_a_state_not_decoded_stops_history():
    # header for section 13 alone: Type 3, Version 1, one id, Fibonacci 13 = "000001" + "1"
    header = "DBAB"  # 000011 000001 000000 000001
    bits = "0" + "000001" + "1"
    bits += "0" * (-len(bits) % 6)
    header += "".join("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[int(bits[i : i + 6], 2)] for i in range(0, len(bits), 6))
    assert gpp.sections(header + "~BAAAAAAA") == {13: "BAAAAAAA"}
    assert may_use_history(req(gpp=header + "~BAAAAAAA", gpp_sid=(13,)), VENDOR) == "gpp_unsupported_section"


def test_gpp_header_section_ids():
    # IABTechLab/iabgpp-es modules/cmpapi/test/encoder/section/HeaderV1.test.ts and GppModel.test.ts
    assert gpp.sections("DBAA") == {}
    assert list(gpp.sections("DBACNYA~a~b")) == [2, 6]
    assert list(gpp.sections(GPP_ALL_DEFAULT)) == [2, 5, 6, 7, 8, 9, 10, 11, 12]  # a range entry
    assert gpp.sections("DBAC") is None  # cut short
    assert gpp.sections("D" * 100) is None


def test_history_reasons_take_coppa_before_gdpr():
    r = req(coppa=True, gdpr=True, consent=MALFORMED)
    assert may_use_history(r, VENDOR) == "coppa"
    assert may_bid(r, VENDOR) == "gdpr_bad_consent"


def test_verdicts_are_cached_by_string():
    privacy._tcf_verdict.cache_clear()
    r = req(gdpr=True, consent=FULL_2_6_8)
    for _ in range(5):
        may_bid(r, VENDOR)
        may_use_history(r, VENDOR)
    info = privacy._tcf_verdict.cache_info()
    assert info.misses == 1 and info.hits == 9


# --- parse keeps the raw signals ------------------------------------------------------------


def body(regs) -> bytes:
    return json.dumps({"id": "r", "imp": [{"id": "1", "banner": {"w": 1, "h": 1}}], "regs": regs}).encode()


def test_parse_keeps_gpp_sid():
    assert parse(body({"gpp": GPP_USNAT_OPTED_OUT, "gpp_sid": [7]})).gpp_sid == (7,)
    assert parse(body({"ext": {"gpp": GPP_USNAT_OPTED_OUT, "gpp_sid": [7, "x"]}})).gpp_sid == (7,)
    assert parse(body({"gpp_sid": [6], "ext": {"gpp_sid": [7]}})).gpp_sid == (6,)
    assert parse(body({})).gpp_sid == ()


@pytest.mark.parametrize("regs, reason", [({"gpp_sid": ["7"]}, "wrong_type:regs.gpp_sid"), ({"gpp_sid": list(range(65))}, "too_many_gpp_sids")])
def test_parse_refuses_bad_gpp_sid(regs, reason):
    with pytest.raises(BadRequest) as info:
        parse(body(regs))
    assert info.value.reason == reason


def test_end_to_end_from_json():
    r = parse(body({"gdpr": 1, "gpp": GPP_USNAT_OPTED_OUT, "gpp_sid": [7]}))
    r = dataclasses.replace(r, consent=FULL_2_6_8)
    assert may_bid(r, VENDOR) is None
    assert may_use_history(r, VENDOR) == "gpp_opt_out"


def test_privacy_modules_stay_pure():
    code = (
        "import sys, tafe.core.privacy\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('gevent', 'prometheus_client', 'greenlet'))\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
