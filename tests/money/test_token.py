"""Notice tokens: round trip, tampering, expiry, key rotation."""

from __future__ import annotations

import pytest

from tafe.money.token import Keys, NoticeFields, _b64, _mac, sign, verify

FIELDS = NoticeFields("req 1&x", "i/1", "b1", "c1", "cr1", "u1", 1_234_500, 1_700_000_000, "m-1", "DEAL-1")
KEYS = Keys.parse("k1:0123456789abcdef0123")


def test_round_trip_keeps_every_field():
    token = sign(FIELDS, KEYS)
    assert token.startswith("k1.") and all(c.isalnum() or c in "-_." for c in token)
    assert verify(token, KEYS, FIELDS.ts + 10, ttl_s=3600) == FIELDS


@pytest.mark.parametrize("where", [3, 10, -3])
def test_any_altered_byte_is_refused(where):
    token = sign(FIELDS, KEYS)
    flipped = token[:where] + ("A" if token[where] != "A" else "B") + token[where + 1 :]
    assert verify(flipped, KEYS, FIELDS.ts, ttl_s=3600) == "bad_token"


def test_a_forged_payload_with_the_old_mac_is_refused():
    other = sign(NoticeFields(*[*vars_of(FIELDS)[:6], 999_000_000, *vars_of(FIELDS)[7:]]), Keys.parse("k1:another-secret-of-16+"))
    assert verify(other, KEYS, FIELDS.ts, ttl_s=3600) == "bad_token"


def vars_of(f: NoticeFields) -> list:
    return [getattr(f, name) for name in f.__slots__]


def test_expired_unsigned_and_future_tokens():
    token = sign(FIELDS, KEYS)
    assert verify(token, KEYS, FIELDS.ts + 3601, ttl_s=3600) == "expired"
    assert verify(token, KEYS, FIELDS.ts - 3600, ttl_s=3600) == "expired"  # dated well ahead of our clock
    assert verify("", KEYS, FIELDS.ts, ttl_s=3600) == "unsigned"
    assert verify("x.y", KEYS, FIELDS.ts, ttl_s=3600) == "bad_token"


def test_rotation_old_key_verifies_new_key_signs():
    old = sign(FIELDS, KEYS)
    rotated = Keys.parse("k2:fedcba9876543210fedc,k1:0123456789abcdef0123")
    assert verify(old, rotated, FIELDS.ts, ttl_s=3600) == FIELDS
    assert sign(FIELDS, rotated).startswith("k2.")
    assert verify(sign(FIELDS, rotated), KEYS, FIELDS.ts, ttl_s=3600) == "bad_token"  # k2 unknown there


@pytest.mark.parametrize("text", ["", "k1", "k1:short", "k 1:0123456789abcdef", ":0123456789abcdef0"])
def test_bad_key_text_is_refused(text):
    with pytest.raises(ValueError):
        Keys.parse(text)


def _older(fields: list[str], keys: Keys) -> str:
    """A token as an earlier version signed it: fewer fields, same scheme."""
    signed = f"{keys.current}.{_b64(chr(0x1F).join(fields).encode())}"
    return f"{signed}.{_mac(keys.secrets[keys.current], signed)}"


def test_first_price_fields_round_trip_and_older_tokens_still_read():
    first = NoticeFields("r", "1", "b", "c", "cr", "u", 850_000, 1_700_000_000, "m", "", "ex", 1, "ex|pub-1|300x250", 1_000_000)
    assert verify(sign(first, KEYS), KEYS, first.ts, ttl_s=3600) == first
    base = ["r", "1", "b", "c", "cr", "u", "850000", "1700000000", "m", ""]
    ten = verify(_older(base, KEYS), KEYS, first.ts, ttl_s=3600)
    eleven = verify(_older([*base, "ex"], KEYS), KEYS, first.ts, ttl_s=3600)
    assert isinstance(ten, NoticeFields) and isinstance(eleven, NoticeFields)
    assert (ten.exchange, eleven.exchange) == ("", "ex")
    assert all((f.auction, f.context, f.value_micros) == (0, "", 0) for f in (ten, eleven))
    assert verify(_older([*base, "ex", "1"], KEYS), KEYS, first.ts, ttl_s=3600) == "bad_token"  # twelve: never signed
