"""Encrypted clearing prices: the scheme of Google's exchanges (and OpenX's, the same).

An exchange that encrypts fills ``${AUCTION_PRICE}`` with websafe base64 (unpadded) of
28 bytes: a 16-byte initialisation vector, the 8-byte encrypted price and a 4-byte
signature. With the two keys the exchange gave us (``encryption_key``, ``integrity_key``):

- pad = HMAC-SHA1(encryption_key, iv)[:8]; price = ciphertext XOR pad, a big-endian
  unsigned 64-bit count of micros (CPM micros, like every price TAFE handles);
- signature = HMAC-SHA1(integrity_key, price bytes + iv)[:4] must match, or the price
  was forged, altered, or encrypted with other keys: it is refused, never spent.

See https://developers.google.com/authorized-buyers/rtb/response-guide/decrypt-price.
Pure functions; ``encrypt`` exists for tests and for exchange simulators.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass

__all__ = ["PriceError", "PriceKeys", "decode_key", "decrypt", "encrypt"]

_IV, _PRICE, _SIG = 16, 8, 4
_SIZE = _IV + _PRICE + _SIG


class PriceError(ValueError):
    """Why an encrypted price is refused: ``reason`` is ``bad_price`` (not a price at all) or
    ``bad_signature`` (well formed, but not signed with the exchange's integrity key)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PriceKeys:
    """An exchange's two price keys, as raw bytes."""

    encryption: bytes
    integrity: bytes


def decode_key(text: str) -> bytes:
    """A key as exchanges hand them out: base64, websafe or not, padded or not (ValueError if not)."""
    text = text.strip().replace("+", "-").replace("/", "_")
    try:
        key = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("expected base64 (websafe or standard)") from None
    if not key or base64.urlsafe_b64encode(key).rstrip(b"=") != text.rstrip("=").encode():
        raise ValueError("expected base64 (websafe or standard)")
    return key


def _pad(keys: PriceKeys, iv: bytes) -> bytes:
    return hmac.digest(keys.encryption, iv, "sha1")[:_PRICE]


def _signature(keys: PriceKeys, price: bytes, iv: bytes) -> bytes:
    return hmac.digest(keys.integrity, price + iv, "sha1")[:_SIG]


def decrypt(text: str, keys: PriceKeys) -> int:
    """The price in CPM micros; ``PriceError`` if ``text`` is not one signed with ``keys``."""
    if len(text) > 64:
        raise PriceError("bad_price")
    try:
        raw = base64.urlsafe_b64decode(text.rstrip("=") + "=" * (-len(text.rstrip("=")) % 4))
    except (binascii.Error, ValueError):
        raise PriceError("bad_price") from None
    if len(raw) != _SIZE:
        raise PriceError("bad_price")
    iv, enc, sig = raw[:_IV], raw[_IV : _IV + _PRICE], raw[_IV + _PRICE :]
    price = bytes(a ^ b for a, b in zip(enc, _pad(keys, iv), strict=True))
    if not hmac.compare_digest(_signature(keys, price, iv), sig):
        raise PriceError("bad_signature")
    return int.from_bytes(price, "big")


def encrypt(micros: int, keys: PriceKeys, iv: bytes) -> str:
    """``micros`` encrypted as an exchange would send it (unpadded websafe base64)."""
    if len(iv) != _IV:
        raise ValueError(f"iv: expected {_IV} bytes")
    price = micros.to_bytes(_PRICE, "big")
    enc = bytes(a ^ b for a, b in zip(price, _pad(keys, iv), strict=True))
    return base64.urlsafe_b64encode(iv + enc + _signature(keys, price, iv)).rstrip(b"=").decode("ascii")
