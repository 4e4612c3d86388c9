"""Signed notice tokens: what a win, billing, loss, impression or click URL carries.

Every notice URL TAFE writes holds one token, ``<kid>.<payload>.<mac>``:

- ``kid``: the id of the key that signed it, so keys rotate without refusing notices
  already in flight (sign with the first key, verify with any key still listed);
- ``payload``: base64url of the bid's fields joined by ``\\x1f`` (request id, imp id,
  bid id, campaign, creative, user hash, our price in CPM micros, unix time of the bid,
  model version, deal id, exchange profile name, auction type ``at``, shading context,
  our value before shading in CPM micros), in that order. Older tokens still read: one of
  ten fields (from before the exchange was named) as the default exchange, one of ten or
  eleven (from before shading was learned) with auction type 0, no context and value 0;
- ``mac``: the first 16 bytes of HMAC-SHA256(key, ``kid.payload``), base64url.

The token is the whole state of a bid: nothing is kept per bid to make sense of a notice,
and a notice whose token does not verify changes nothing. ``verify`` answers the bid's
fields or the reason it refuses them (``unsigned``, ``bad_token``, ``expired``): reasons
are counted in /metrics. Pure functions: no clock is read (``now`` is passed in).

Cost: one one-shot ``hmac.digest`` (OpenSSL, ~1 us) per bid when rendering, one per notice.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass

__all__ = ["Keys", "NoticeFields", "sign", "verify"]

_SEP = "\x1f"
_N_FIELDS = 14
_OLDER = (10, 11)  # field counts of tokens signed by earlier versions, still read
_MAC_BYTES = 16
_FUTURE_SKEW_S = 300  # a token dated later than this ahead of our clock was not made by us


@dataclass(frozen=True, slots=True)
class NoticeFields:
    """What a notice token binds: the bid, as TAFE made it."""

    request_id: str
    imp_id: str
    bid_id: str
    campaign: str
    creative: str
    user: str  # hash of the user key the bid was for ("" when unknown or not usable)
    price_micros: int  # our bid price, CPM micros of the bid currency
    ts: int  # unix seconds when the bid was made
    model: str = ""
    deal: str = ""
    exchange: str = ""  # the profile the bid was made under ("" for the defaults): its keys and spend_on apply
    auction: int = 0  # the request's ``at`` (1 first price, 2 second price; 0 in older tokens)
    context: str = ""  # first-price open-auction bids: the shading context (tafe.core.shading)
    value_micros: int = 0  # our value of the imp before shading, CPM micros


@dataclass(frozen=True, slots=True)
class Keys:
    """Signing keys by id; ``current`` signs, every listed key verifies (rotation)."""

    current: str
    secrets: dict[str, bytes]

    def __post_init__(self) -> None:
        if self.current not in self.secrets:
            raise ValueError(f"notice key id {self.current!r} has no secret")
        for kid in self.secrets:
            if not kid or not kid.isalnum() or len(kid) > 16:
                raise ValueError(f"notice key id {kid!r}: expected 1-16 letters or digits")

    @classmethod
    def parse(cls, text: str) -> Keys:
        """``kid:secret[,kid:secret...]``; the first pair signs. Secrets of 16+ characters."""
        secrets: dict[str, bytes] = {}
        first = ""
        for item in text.replace("\n", ",").split(","):
            item = item.strip()
            if not item:
                continue
            kid, sep, secret = item.partition(":")
            if not sep or len(secret) < 16:
                raise ValueError("notice keys: expected 'kid:secret' pairs, secrets of at least 16 characters")
            secrets[kid.strip()] = secret.strip().encode()
            first = first or kid.strip()
        if not secrets:
            raise ValueError("notice keys: no 'kid:secret' pair found")
        return cls(first, secrets)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: bytes, signed: str) -> str:
    return _b64(hmac.digest(secret, signed.encode("ascii"), "sha256")[:_MAC_BYTES])


def sign(fields: NoticeFields, keys: Keys) -> str:
    """The token for a bid's notice URLs (URL-safe: base64url and dots)."""
    f = fields
    raw = _SEP.join(
        (
            f.request_id, f.imp_id, f.bid_id, f.campaign, f.creative, f.user, str(f.price_micros), str(f.ts), f.model,
            f.deal, f.exchange, str(f.auction), f.context, str(f.value_micros),
        )  # fmt: skip
    )
    signed = f"{keys.current}.{_b64(raw.encode())}"
    return f"{signed}.{_mac(keys.secrets[keys.current], signed)}"


def verify(token: str, keys: Keys, now: float, ttl_s: int) -> NoticeFields | str:
    """The bid's fields, or why the token is refused: ``unsigned``, ``bad_token`` or ``expired``."""
    if not token:
        return "unsigned"
    if len(token) > 2048 or token.count(".") != 2:
        return "bad_token"
    signed, _, mac = token.rpartition(".")
    kid = signed.partition(".")[0]
    secret = keys.secrets.get(kid)
    if secret is None or not hmac.compare_digest(_mac(secret, signed), mac):
        return "bad_token"
    try:
        parts = _unb64(signed.partition(".")[2]).decode().split(_SEP)
        if len(parts) in _OLDER:
            parts += ["", "0", "", "0"][len(parts) - _N_FIELDS :]
        if len(parts) != _N_FIELDS:
            return "bad_token"
        price, ts, auction, value = int(parts[6]), int(parts[7]), int(parts[11]), int(parts[13])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        return "bad_token"  # signed by us but unreadable: a bug or an old format, never spend
    if now - ts > ttl_s or ts - now > _FUTURE_SKEW_S:
        return "expired"
    return NoticeFields(
        parts[0], parts[1], parts[2], parts[3], parts[4], parts[5], price, ts, parts[8], parts[9], parts[10], auction, parts[12],
        value,
    )  # fmt: skip
