"""The I/O-bound bid handler every server in this benchmark runs: a plain WSGI app.

Per request it parses the OpenRTB body, asks a user-data service on loopback for the
user's segments (the service answers after a few ms: the I/O wait that threads and
greenlets handle so differently), then scores a set of campaigns on hashed features and
answers a BidResponse, or 204.

The CPU part is modest and the same file runs in every server: parsing ~15 us, scoring
~30 us; about two thirds of the handler's CPU is ``http.client`` asking the user-data
service (header parsing included), kept because a real lookup client costs CPU too.

Stdlib only on purpose: Apache's mod_wsgi (Debian's libapache2-mod-wsgi-py3) embeds
Debian's /usr/bin/python3, not the project's virtualenv, and must import this file as is.
Under gevent, ``socket`` and ``queue`` are monkey-patched, so the same code yields while
it waits; under threads it blocks one thread.

Settings come from the environment: ``TVG_UPSTREAM`` (host:port of the user-data
service, required: without the wait this would be a different benchmark),
``TVG_CAMPAIGNS`` (how many campaigns are scored: the CPU part).
"""

import http.client
import json
import math
import os
import queue
import zlib

UPSTREAM = os.environ["TVG_UPSTREAM"]
N_CAMPAIGNS = int(os.environ.get("TVG_CAMPAIGNS", "40"))
DIM = 1 << 12
SIZES = ((300, 250), (728, 90), (320, 50), (300, 600), (160, 600))


def _weights(seed, n):
    """Deterministic pseudo-random weights in [-1, 1) (no numpy, no random state)."""
    out, x = [], seed
    for _ in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        out.append(((x >> 33) / float(1 << 31)) - 1.0)
    return out


CAMPAIGNS = [
    {"id": "c%d" % i, "size": SIZES[i % len(SIZES)], "value": 0.5 + (i % 7) * 0.35, "w": _weights(i + 1, DIM)}
    for i in range(N_CAMPAIGNS)
]
_pool = queue.LifoQueue()  # keep-alive connections to the user-data service


def _upstream_user(uid):
    """GET /user/<uid> from the user-data service over a pooled keep-alive connection."""
    try:
        conn = _pool.get_nowait()
    except queue.Empty:
        host, _, port = UPSTREAM.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=2.0)
    try:
        conn.request("GET", "/user/" + uid)
        resp = conn.getresponse()
        data = resp.read()
    except Exception:
        conn.close()
        raise
    _pool.put(conn)
    return json.loads(data)


def _features(req, imp, user):
    site = req.get("site") or req.get("app") or {}
    device = req.get("device") or {}
    geo = device.get("geo") or {}
    names = [
        "dom=" + str(site.get("domain") or site.get("bundle") or ""),
        "pub=" + str((site.get("publisher") or {}).get("id", "")),
        "country=" + str(geo.get("country", "")),
        "os=" + str(device.get("os", "")),
        "dt=" + str(device.get("devicetype", "")),
        "ua=" + str(device.get("ua", ""))[:40],
        "tag=" + str(imp.get("tagid", "")),
        "recency=" + str(user.get("recency", -1)),
    ]
    names += ["cat=" + str(c) for c in site.get("cat") or ()]
    names += ["seg=" + str(s) for s in user.get("segments") or ()]
    return [zlib.crc32(n.encode()) & (DIM - 1) for n in names]


def _sizes(imp):
    banner = imp.get("banner") or {}
    sizes = [(f.get("w"), f.get("h")) for f in banner.get("format") or ()]
    if banner.get("w") and banner.get("h"):
        sizes.append((banner["w"], banner["h"]))
    return sizes


def decide(req, user, host):
    """One bid per banner imp whose best campaign's price clears the floor."""
    bids = []
    for imp in req.get("imp") or ():
        sizes = _sizes(imp)
        if not sizes or (imp.get("pmp") or {}).get("private_auction") == 1:
            continue
        feats = _features(req, imp, user)
        best = None
        for c in CAMPAIGNS:
            if c["size"] not in sizes:
                continue
            w = c["w"]
            z = sum(w[f] for f in feats) * 0.3
            price = round(c["value"] / (1.0 + math.exp(-z)), 4)
            if best is None or price > best[0]:
                best = (price, c)
        floor = float(imp.get("bidfloor") or 0.0)
        if best is None or best[0] < floor or best[0] <= 0:
            continue
        price, c = best
        bids.append(
            {
                "id": "%s-%s" % (req["id"], imp["id"]),
                "impid": imp["id"],
                "price": price,
                "adm": "<a href='https://example.com/c/%s'><img src='https://example.com/%dx%d.png'></a>" % ((c["id"],) + c["size"]),
                "nurl": "http://%s/notice/win?auction=${AUCTION_ID}&imp=${AUCTION_IMP_ID}&price=${AUCTION_PRICE}" % host,
                "adomain": ["example.com"],
                "crid": c["id"] + "-cr",
                "cid": c["id"],
                "w": c["size"][0],
                "h": c["size"][1],
                "mtype": 1,
            }
        )
    return bids


def application(environ, start_response):
    path = environ.get("PATH_INFO", "")
    if path.startswith("/notice/") or path == "/ping":
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "4")])
        return [b"pong" if path == "/ping" else b"ok\r\n"]
    try:
        size = int(environ.get("CONTENT_LENGTH") or 0)
        req = json.loads(environ["wsgi.input"].read(size))
        user_id = str(((req.get("user") or {}).get("buyeruid")) or "anonymous")
    except (ValueError, TypeError, AttributeError):
        start_response("400 Bad Request", [("Content-Length", "0")])
        return [b""]
    user = _upstream_user(user_id)
    bids = decide(req, user, environ.get("HTTP_HOST", "127.0.0.1"))
    if not bids:
        start_response("204 No Content", [])
        return [b""]
    body = json.dumps({"id": req["id"], "cur": "USD", "seatbid": [{"seat": "bench", "bid": bids}]}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
