"""Decode what TAFE reads of an IAB GPP string: the header's section ids and the US opt-outs.

A GPP string is ``header~section~section...``, one section per id in the header, in
the header's order. The header is web-safe base64 of: Type (6 bits, 3), Version (6,
1), then the section ids as a Fibonacci-coded range list (12-bit count; per entry a
range bit, then the offset from the previous id, and for a range the offset to its
end). US sections carry 2-bit fields where 1 means "opted out", 2 "did not", 0 "not
applicable"; their core segments start with Version (6 bits) and some notices before
the opt-outs read here (GPP spec, and iabgpp-es's ``UsNatCoreSegment`` etc.):

====  =======  ===================================================================
id    section  opt-out fields read (bit offset in the core segment)
====  =======  ===================================================================
6     uspv1    the plain US Privacy string ``1YNN``: its 3rd character
7     usnat    SaleOptOut 18, SharingOptOut 20, TargetedAdvertisingOptOut 22
8     usca     SaleOptOut 12, SharingOptOut 14 (CCPA "sharing" = cross-context ads)
9     usva     SaleOptOut 12, TargetedAdvertisingOptOut 14
10    usco     SaleOptOut 12, TargetedAdvertisingOptOut 14
11    usut     SaleOptOut 14, TargetedAdvertisingOptOut 16
12    usct     SaleOptOut 12, TargetedAdvertisingOptOut 14
====  =======  ===================================================================

Other state sections (13 and up) are not decoded: ``us_opt_out`` answers None for them.
"""

from __future__ import annotations

__all__ = ["DECODED_US_SECTIONS", "TCFEU_SECTION", "US_SECTIONS", "sections", "us_opt_out"]

TCFEU_SECTION = 2
US_SECTIONS = range(6, 23)  # uspv1, usnat and the state sections assigned so far
DECODED_US_SECTIONS = frozenset(range(6, 13))
MAX_HEADER_CHARS = 64  # ~20 section ids take a dozen characters
MAX_SECTIONS = 64

_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")}
_OPT_OUTS = {
    7: (18, 20, 22),
    8: (12, 14),
    9: (12, 14),
    10: (12, 14),
    11: (14, 16),
    12: (12, 14),
}


def _bitstring(text: str) -> str | None:
    try:
        return "".join([f"{_B64[c]:06b}" for c in text])
    except KeyError:
        return None


def _fibonacci(bits: str, pos: int) -> tuple[int, int]:
    """One Fibonacci-coded integer at ``pos`` (terminated by ``11``); IndexError if cut short."""
    value, a, b = 0, 1, 2
    prev = "0"
    while True:
        bit = bits[pos]
        pos += 1
        if bit == "1" and prev == "1":
            return value, pos
        if bit == "1":
            value += a
        a, b = b, a + b
        prev = bit


def _header_ids(header: str) -> tuple[int, ...] | None:
    if len(header) > MAX_HEADER_CHARS:
        return None
    bits = _bitstring(header)
    if bits is None or len(bits) < 24 or bits[:12] != "000011000001":  # Type 3, Version 1
        return None
    count = int(bits[12:24], 2)
    ids: list[int] = []
    pos, last = 24, 0
    try:
        for _ in range(count):
            is_range = bits[pos] == "1"
            offset, pos = _fibonacci(bits, pos + 1)
            start = last + offset
            if is_range:
                length, pos = _fibonacci(bits, pos)
                last = start + length
                ids.extend(range(start, last + 1))
            else:
                ids.append(start)
                last = start
            if len(ids) > MAX_SECTIONS:
                return None
    except IndexError:
        return None
    return tuple(ids)


def sections(gpp: str) -> dict[int, str] | None:
    """Section id -> its encoded text, or None when the header is invalid or disagrees with the body."""
    parts = gpp.split("~", MAX_SECTIONS + 1)
    ids = _header_ids(parts[0])
    if ids is None or len(ids) != len(parts) - 1:
        return None
    return dict(zip(ids, parts[1:]))


def us_opt_out(section_id: int, text: str) -> bool | None:
    """Whether a US section says the user opted out of sale, sharing or targeted ads.

    None when the section is not one decoded here or its text is malformed.
    """
    if section_id == 6:
        if len(text) != 4 or text[0] != "1" or any(c not in "YN-" for c in text[1:]):
            return None
        return text[2] == "Y"
    offsets = _OPT_OUTS.get(section_id)
    if offsets is None:
        return None
    need = (offsets[-1] + 2 + 5) // 6  # characters holding the last field
    bits = _bitstring(text.split(".", 1)[0][:need])
    if bits is None or len(bits) < offsets[-1] + 2 or bits[:6] == "000000":
        return None
    return any(bits[o : o + 2] == "01" for o in offsets)
