"""Notice tokens: round trip, tampering, expiry, key rotation."""

from __future__ import annotations

import pytest

from tafe.money.token import Keys, NoticeFields, sign, verify

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
