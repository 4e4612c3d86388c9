"""Bounds on what one bid request may make TAFE do, each with the reason for its value.

Beyond a bound a request is refused (``BadRequest("too_many_...")``, ``id_too_long``);
values read best effort (user keys, ``ext`` fields) are read only in part or ignored
instead. ``tafe.core.wire`` applies ``MAX_VALUES`` before decoding, ``tafe.core.request``
the others while reading.
"""

# The body size cap alone allows ~25,000 one-line imps; real exchanges send a few, rarely more than ~50.
MAX_IMPS = 100
# Bounds the decode itself: every array element and object member but the last is
# followed by a comma, so this caps how many values msgspec can build, counted in one
# C scan before decoding (arrays are decoded whole before their length is checked).
# 100,000 ext keys took 40-70 ms to decode as a dict; at this cap the worst body found
# (thousands of eids) costs ~3 ms to inflate and parse. The largest corpus request
# (deals-at-request-limit) has 2,030 commas.
MAX_VALUES = 5_000
MAX_DEALS = 100  # per imp: every deal is tried against every fitting campaign
# Per request: 100 imps of 100 deals, each imp fitting every media type, held one worker's
# loop 50-80 ms; at this cap parse + decide of 10 imps x 100 deals (the corpus case
# deals-at-request-limit, demo campaigns) take ~2 ms.
MAX_REQUEST_DEALS = 1000
MAX_USER_KEYS = 8  # keys to look the user up by: thousands of eids must not become thousands of lookups
MAX_UIDS = 64  # eids uid entries looked at for those keys (10,000 repeating one id took ~25 ms)
MAX_GPP_SIDS = 64  # section ids assigned so far: under 30
MAX_ID_CHARS = 256  # request, imp and deal ids are echoed in the response and in three notice URLs per bid
