"""parse(): what it reads, from where (2.5 ext and 2.6 locations), and in which order."""

from __future__ import annotations

import json

import pytest

from tafe.core.limits import MAX_UIDS, MAX_VALUES
from tafe.core.request import BadRequest, parse


def p(**fields):
    body = {"id": "r", "imp": [{"id": "1"}]}
    body.update(fields)
    return parse(json.dumps(body).encode())


def test_minimal():
    r = parse(b'{"id":"r","imp":[{"id":"1"}]}')
    assert r.id == "r" and [i.id for i in r.imps] == ["1"]
    assert r.channel == "" and r.at == 2 and r.tmax is None and r.cur == () and r.user_keys == ()
    imp = r.imps[0]
    assert imp.bidfloor == 0.0 and imp.bidfloorcur == "USD" and not imp.has_banner and imp.video is None


def test_user_keys_order_buyeruid_eids_ifa_userid():
    r = p(
        user={"id": "uid", "buyeruid": "buyer", "eids": [{"source": "a", "uids": [{"id": "e1"}, {"id": "e2"}]}, {"source": "b", "uids": [{"id": "e3"}]}]},
        device={"ifa": "ifa-1"},
    )
    assert r.user_keys == ("buyer", "e1", "e2", "e3", "ifa-1", "uid")


def test_user_keys_skip_ifa_when_lmt_and_dedupe():
    r = p(user={"id": "same", "buyeruid": "same", "ext": {"eids": [{"uids": [{"id": "x"}]}]}}, device={"ifa": "ifa-1", "lmt": 1})
    assert r.user_keys == ("same", "x")
    assert r.lmt and r.ifa == "ifa-1"


def test_eids_26_location_wins_over_ext():
    r = p(user={"eids": [{"uids": [{"id": "new"}]}], "ext": {"eids": [{"uids": [{"id": "old"}]}]}})
    assert r.user_keys == ("new",)


def test_ext_eids_garbage_is_ignored_not_refused():
    assert p(user={"ext": {"eids": "nope"}}).user_keys == ()
    assert p(user={"ext": {"eids": [1, {"uids": "x"}, {"uids": [{"id": 5}, {"id": "ok"}]}]}}).user_keys == ("ok",)


@pytest.mark.parametrize(
    "regs,user,want",
    [
        ({"gdpr": 1, "us_privacy": "1YNN", "gpp": "G"}, {"consent": "C"}, (True, "C", "1YNN", "G")),
        ({"ext": {"gdpr": 1, "us_privacy": "1YNN", "gpp": "G"}}, {"ext": {"consent": "C"}}, (True, "C", "1YNN", "G")),
        ({"gdpr": 0, "ext": {"gdpr": 1}}, {"consent": "new", "ext": {"consent": "old"}}, (False, "new", "", "")),
        ({"ext": {"gdpr": "1"}}, {}, (True, "", "", "")),
        ({}, {}, (False, "", "", "")),
    ],
)
def test_privacy_both_locations(regs, user, want):
    r = p(regs=regs, user=user)
    assert (r.gdpr, r.consent, r.us_privacy, r.gpp) == want


def test_coppa():
    assert p(regs={"coppa": 1}).coppa and not p(regs={"coppa": 0}).coppa


def test_site_fields():
    r = p(site={"page": "https://WWW.News.example:8443/a?b", "cat": ["IAB1"], "sectioncat": ["IAB2"], "pagecat": ["IAB3"], "publisher": {"id": "pub"}})
    assert (r.channel, r.domain, r.publisher_id, r.inventory_cats) == ("site", "www.news.example", "pub", ("IAB1", "IAB2", "IAB3"))
    assert p(site={"domain": "A.example", "page": "https://b.example/"}).domain == "a.example"
    assert p(site={"page": "http://[bad"}).domain == ""


def test_app_and_dooh():
    r = p(app={"bundle": "com.x", "domain": "x.example", "publisher": {"id": "p"}})
    assert (r.channel, r.bundle, r.domain, r.publisher_id) == ("app", "com.x", "x.example", "p")
    assert p(dooh={"id": "d"}).channel == "dooh"


def test_device():
    r = p(device={"devicetype": 4, "os": "iOS", "ifa": "i", "lmt": 0, "dnt": 1, "geo": {"country": "usa", "region": "CA"}})
    assert (r.devicetype, r.os, r.country, r.region, r.ifa, r.lmt, r.dnt) == (4, "ios", "USA", "CA", "i", False, True)


def test_auction_fields():
    r = p(tmax=120, at=1, cur=["EUR", "USD"], bcat=["IAB25"], badv=["Apple.com"], bapp=["com.a"], wseat=["s"], bseat=["b"], test=1)
    assert (r.tmax, r.at, r.cur, r.bcat, r.badv, r.bapp, r.wseat, r.bseat, r.test) == (
        120, 1, ("EUR", "USD"), ("IAB25",), ("apple.com",), ("com.a",), ("s",), ("b",), True)
    assert p(at=500).at == 2  # exchange-specific auction types: treated as second price
    assert p(tmax=0).tmax is None


def test_banner_sizes_from_format_then_w_h_without_duplicates():
    r = p(imp=[{"id": "1", "banner": {"w": 300, "h": 250, "format": [{"w": 728, "h": 90}, {"w": 300, "h": 250}, {"wratio": 1, "hratio": 1}]}}])
    assert r.imps[0].banner_sizes == ((728, 90), (300, 250)) and r.imps[0].has_banner
    assert p(imp=[{"id": "1", "banner": {"w": 0, "h": 0}}]).imps[0].banner_sizes == ()


def test_video_plcmt_preferred_over_placement():
    v = p(imp=[{"id": "1", "video": {"mimes": ["video/mp4"], "placement": 3, "plcmt": 4, "rqddurs": [15], "protocols": [2]}}]).imps[0].video
    assert (v.placement, v.mimes, v.rqddurs, v.protocols) == (4, ("video/mp4",), (15,), (2,))
    assert p(imp=[{"id": "1", "video": {"placement": 1}}]).imps[0].video.placement == 1


@pytest.mark.parametrize(
    "imp,rewarded",
    [
        ({"rwdd": 1}, True),
        ({"ext": {"prebid": {"is_rewarded_inventory": 1}}}, True),
        ({"video": {"ext": {"rewarded": 1}}}, True),
        ({"rwdd": 0, "video": {"ext": {"rewarded": 0}}}, False),
        ({}, False),
    ],
)
def test_rewarded(imp, rewarded):
    assert p(imp=[{"id": "1", **imp}]).imps[0].rewarded is rewarded


@pytest.mark.parametrize("request_", ['{"ver":"1.2"}', {"ver": "1.2"}])
def test_native_request_string_or_object(request_):
    assert p(imp=[{"id": "1", "native": {"request": request_}}]).imps[0].native
    assert not p(imp=[{"id": "1", "native": {"request": ""}}]).imps[0].native


def test_pmp():
    imp = p(imp=[{"id": "1", "pmp": {"private_auction": 1, "deals": [{"id": "D", "bidfloor": 2, "bidfloorcur": "EUR", "wseat": ["s"], "wadomain": ["A.example"]}]}}]).imps[0]
    assert imp.private_auction
    (deal,) = imp.deals
    assert (deal.id, deal.bidfloor, deal.bidfloorcur, deal.wseat, deal.wadomain) == ("D", 2.0, "EUR", ("s",), ("a.example",))


def test_imp_fields():
    imp = p(imp=[{"id": "1", "bidfloor": 1, "bidfloorcur": "EUR", "secure": 1, "instl": 1, "tagid": "t"}]).imps[0]
    assert (imp.bidfloor, imp.bidfloorcur, imp.secure, imp.instl, imp.tagid) == (1.0, "EUR", True, True, "t")


def test_unknown_fields_and_non_object_ext_are_ignored():
    r = p(ext="x", imp=[{"id": "1", "ext": 5, "whatever": {"deep": [1]}}], regs={"ext": []}, user={"ext": "s"}, source={"schain": {}, "ext": "e"})
    assert r.id == "r"


def test_bad_request_reason_attribute():
    with pytest.raises(BadRequest) as info:
        parse(b"{")
    assert info.value.reason == "not_json" and str(info.value) == "not_json"


def test_hostile_sizes_stay_linear():
    """2,000 banner formats (near the most the value cap lets through) dedupe in one pass."""
    formats = [{"w": 300 + i % 50, "h": 250} for i in range(2_000)]
    imp = p(imp=[{"id": "1", "banner": {"format": formats}}]).imps[0]
    assert len(imp.banner_sizes) == 50 and imp.banner_sizes[0] == (300, 250)


def test_user_keys_are_bounded():
    uids = [{"id": f"e{i}"} for i in range(2_000)]
    r = p(user={"buyeruid": "b", "eids": [{"source": "x", "uids": uids}]}, device={"ifa": "i"})
    assert r.user_keys == ("b", "e0", "e1", "e2", "e3", "e4", "e5", "e6")


def test_imp_count_is_bounded():
    assert len(p(imp=[{"id": str(i)} for i in range(100)]).imps) == 100
    with pytest.raises(BadRequest, match="too_many_imps"):
        p(imp=[{"id": str(i)} for i in range(101)])


def _keys(n: int) -> str:
    return ",".join(f'"k{i}":0' for i in range(n))


@pytest.mark.parametrize(
    "where",
    [
        '"imp":[{"id":"1","native":{"request":{%s}}}]',
        '"imp":[{"id":"1","banner":{"w":1,"h":1}}],"user":{"ext":{"eids":[{"source":"a","uids":[{"id":"u"}]}],%s}}',
    ],
)
def test_a_body_of_100000_keys_is_refused_before_decoding(where):
    body = ('{"id":"r",' + where % _keys(100_000) + "}").encode()
    with pytest.raises(BadRequest, match="too_many_values"):
        parse(body)


@pytest.mark.parametrize(
    "where",
    [
        '"imp":[{"id":"1","native":{"request":{%s}}}]',
        '"imp":[{"id":"1","banner":{"w":1,"h":1}}],"user":{"ext":{"eids":[{"source":"a","uids":[{"id":"u"}]}],%s}}',
        '"imp":[{"id":"1","banner":{"w":1,"h":1},"ext":{"prebid":{%s}}}],"regs":{"ext":{%s}}',
    ],
)
def test_keys_under_the_value_cap_that_tafe_does_not_read_are_never_built(where):
    """Work counted as memory: 4,000 unread keys decoded into a dict take ~400 KB."""
    import tracemalloc

    body = ('{"id":"r",' + where.replace("%s", _keys(MAX_VALUES // 2 - 50)) + "}").encode()
    tracemalloc.start()
    try:
        request = parse(body)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert request.imps[0].id == "1"
    assert peak < 64 * 1024, peak


def test_eid_uids_looked_at_are_bounded():
    """Thousands of uid entries repeating one id: only the first MAX_UIDS are looked at."""
    eids = [{"source": "a", "uids": [{"id": "same"}]}] * 2000 + [{"source": "b", "uids": [{"id": "late"}]}]
    assert p(user={"eids": eids}).user_keys == ("same",)
    assert p(user={"ext": {"eids": eids}}).user_keys == ("same",)
    assert p(user={"eids": eids[:MAX_UIDS - 1] + eids[-1:]}).user_keys == ("same", "late")


def test_native_request_types():
    for request_, has in (('""', False), ("{ }", False), ("null", False), ('"{}"', True), ('{"ver":"1.2"}', True)):
        body = '{"id":"r","imp":[{"id":"1","native":{"request":%s}}]}' % request_
        assert parse(body.encode()).imps[0].native is has, request_
    with pytest.raises(BadRequest, match="wrong_type:imp.native.request"):
        parse(b'{"id":"r","imp":[{"id":"1","native":{"request":[1]}}]}')


@pytest.mark.parametrize(
    "regs, want",
    [
        ({}, 0),
        ({"ext": {"dsa": {"dsarequired": 2, "pubrender": 0}}}, 2),  # the DSA extension's place
        ({"dsa": {"dsarequired": 3}}, 3),  # where some exchanges put it
        ({"dsa": {"dsarequired": 1}, "ext": {"dsa": {"dsarequired": 3}}}, 1),
        ({"ext": {"dsa": {"dsarequired": 9}}}, 0),  # not a value the extension defines
        ({"ext": {"dsa": {"dsarequired": "2"}}}, 0),  # ext garbage is ignored, not refused
        ({"ext": {"dsa": "required"}}, 0),
    ],
)
def test_dsa_required(regs, want):
    assert p(regs=regs).dsa_required == want


def test_dsa_wrong_type_in_regs_is_refused():
    with pytest.raises(BadRequest) as info:
        p(regs={"dsa": {"dsarequired": "2"}})
    assert info.value.reason == "wrong_type:regs.dsa.dsarequired"


def test_battr_per_media_object():
    r = p(imp=[{"id": "1", "banner": {"w": 1, "h": 1, "battr": [1, 2]}, "video": {"battr": [16]}, "audio": {"battr": [3]}}])
    imp = r.imps[0]
    assert (imp.banner_battr, imp.video.battr, imp.audio.battr) == ((1, 2), (16,), (3,))
    assert p().imps[0].banner_battr == ()
    with pytest.raises(BadRequest) as info:
        p(imp=[{"id": "1", "banner": {"battr": ["1"]}}])
    assert info.value.reason == "wrong_type:imp.banner.battr"
