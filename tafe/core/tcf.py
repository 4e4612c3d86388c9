"""Decode the core segment of an IAB TCF v2 consent string (v2.0 to v2.2 share the layout).

Only what the privacy rules read is kept: the purpose consent and legitimate-interest
bits, Purpose One Treatment, the policy version, and the vendor consent and
legitimate-interest sections (bit field or ranges, answered per vendor id without
building a set). Publisher restrictions and the optional segments (disclosed/allowed
vendors, publisher purposes) follow the core and are not read.

The core segment is web-safe base64 (``-``/``_``, padding optional); bit fields are
most significant bit first. A string that is not version 2, holds a character outside
the alphabet, or ends before the vendor sections do, decodes to ``None``: the caller
then treats it as no consent.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Any

__all__ = ["TCString", "decode"]

MAX_CORE_CHARS = 4096  # a full GVL bit field is ~200 bytes; anything far larger is not a consent string

# Bit offsets in the core segment (TCF v2 "TC String Format", core segment table).
_POLICY_VERSION = 132  # 6 bits
_PURPOSES_CONSENT = 152  # 24 bits, purpose 1 first
_PURPOSES_LI = 176  # 24 bits
_PURPOSE_ONE_TREATMENT = 200  # 1 bit
_VENDOR_CONSENTS = 213  # MaxVendorId(16) IsRangeEncoding(1) then a bit field or ranges

_TO_STD = str.maketrans("-_", "+/")

# A vendor section: ("bits", max_vendor_id, first bit offset) or ("ranges", ((start, end), ...)).
_Vendors = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class TCString:
    """The decoded core of one consent string: purpose bits as masks (bit ``i-1`` = purpose ``i``)."""

    policy_version: int
    purposes_consent: int
    purposes_li: int
    purpose_one_treatment: bool
    _data: bytes
    _consents: _Vendors
    _li: _Vendors

    def purpose_consent(self, purpose: int) -> bool:
        return bool(self.purposes_consent >> (purpose - 1) & 1)

    def purpose_li(self, purpose: int) -> bool:
        return bool(self.purposes_li >> (purpose - 1) & 1)

    def vendor_consent(self, vendor_id: int) -> bool:
        return _has(self._data, self._consents, vendor_id)

    def vendor_li(self, vendor_id: int) -> bool:
        return _has(self._data, self._li, vendor_id)


def _bits(data: bytes, pos: int, n: int) -> int:
    """``n`` bits from bit ``pos``; IndexError past the end (a truncated string)."""
    end = pos + n
    if end > len(data) * 8:
        raise IndexError(pos)
    first, last = pos >> 3, (end + 7) >> 3
    chunk = int.from_bytes(data[first:last], "big")
    return (chunk >> ((last << 3) - end)) & ((1 << n) - 1)


def _vendor_section(data: bytes, pos: int) -> tuple[_Vendors, int]:
    """Read one vendor section at ``pos``; return it and the offset just after it."""
    max_id = _bits(data, pos, 16)
    if not _bits(data, pos + 16, 1):
        if pos + 17 + max_id > len(data) * 8:
            raise IndexError(pos)  # the bit field is cut short
        return ("bits", max_id, pos + 17), pos + 17 + max_id
    count = _bits(data, pos + 17, 12)
    pos += 29
    ranges = []
    for _ in range(count):
        is_range = _bits(data, pos, 1)
        start = _bits(data, pos + 1, 16)
        if is_range:
            end = _bits(data, pos + 17, 16)
            pos += 33
        else:
            end = start
            pos += 17
        ranges.append((start, end))
    return ("ranges", tuple(ranges)), pos


def _has(data: bytes, section: _Vendors, vendor_id: int) -> bool:
    if vendor_id <= 0:
        return False
    if section[0] == "bits":
        _, max_id, first = section
        return vendor_id <= max_id and bool(_bits(data, first + vendor_id - 1, 1))
    return any(start <= vendor_id <= end for start, end in section[1])


def decode(consent: str) -> TCString | None:
    """The core segment of ``consent``, or None when it is not a decodable TCF v2 string."""
    core = consent.split(".", 1)[0].rstrip("=")
    if not core or len(core) > MAX_CORE_CHARS:
        return None
    try:
        data = binascii.a2b_base64((core + "=" * (-len(core) % 4)).translate(_TO_STD), strict_mode=True)
        if _bits(data, 0, 6) != 2:
            return None
        consents, pos = _vendor_section(data, _VENDOR_CONSENTS)
        li, _ = _vendor_section(data, pos)
        return TCString(
            policy_version=_bits(data, _POLICY_VERSION, 6),
            purposes_consent=int(f"{_bits(data, _PURPOSES_CONSENT, 24):024b}"[::-1], 2),
            purposes_li=int(f"{_bits(data, _PURPOSES_LI, 24):024b}"[::-1], 2),
            purpose_one_treatment=bool(_bits(data, _PURPOSE_ONE_TREATMENT, 1)),
            _data=data,
            _consents=consents,
            _li=li,
        )
    except (binascii.Error, IndexError, ValueError):
        return None
