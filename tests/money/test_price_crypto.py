"""Encrypted prices: the vectors the exchange publishes, and refusals of anything else."""

from __future__ import annotations

import base64

import pytest

from tafe.money.price_crypto import PriceError, PriceKeys, decode_key, decrypt, encrypt

# Google's documentation, "Decrypt Price Confirmations", example keys and the three sample
# ciphertexts with their plaintext micros:
# https://developers.google.com/authorized-buyers/rtb/response-guide/decrypt-price
GOOGLE_KEYS = PriceKeys(
    decode_key("skU7Ax_NL5pPAFyKdkfZjZz2-VhIN8bjj1rVFOaJ_5o="), decode_key("arO23ykdNqUQ5LEoQ0FVmPkBd7xB5CO89PDZlSjpFxo=")
)
GOOGLE_VECTORS = [
    ("YWJjMTIzZGVmNDU2Z2hpN7fhCuPemCce_6msaw", 100),
    ("YWJjMTIzZGVmNDU2Z2hpN7fhCuPemCAWJRxOgA", 1900),
    ("YWJjMTIzZGVmNDU2Z2hpN7fhCuPemC32prpWWw", 2700),
]
# google/openrtb-doubleclick, doubleclick-core/src/test/java/com/google/doubleclick/crypto/
# DoubleClickCryptoTest.java: KEYS, INITV, CIPHER_PRICE (padded) for PLAIN_PRICE 1.2.
OPENRTB_DC_KEYS = PriceKeys(
    decode_key("sIxwz7yw62yrfoLGt12lIHKuYrK_S5kLuApI2BQe7Ac="), decode_key("v3fsVcMBMMHYzRhi7SpM0sdqwzvAxM6KPTu9OtVod5I=")
)
OPENRTB_DC_IV = bytes.fromhex("E679B0BE000CD1400123456789ABCDEF")
OPENRTB_DC_CIPHER = "5nmwvgAM0UABI0VniavN72_sy3T6V9ohlpvOpA=="


@pytest.mark.parametrize(("cipher", "micros"), GOOGLE_VECTORS)
def test_googles_published_prices_decrypt(cipher, micros):
    assert decrypt(cipher, GOOGLE_KEYS) == micros


def test_the_reference_implementations_vector_decrypts_and_encrypts_back():
    assert decrypt(OPENRTB_DC_CIPHER, OPENRTB_DC_KEYS) == 1_200_000
    assert encrypt(1_200_000, OPENRTB_DC_KEYS, OPENRTB_DC_IV) == OPENRTB_DC_CIPHER.rstrip("=")


def test_the_keys_swapped_fail_the_signature():
    swapped = PriceKeys(OPENRTB_DC_KEYS.integrity, OPENRTB_DC_KEYS.encryption)
    with pytest.raises(PriceError) as err:
        decrypt(OPENRTB_DC_CIPHER, swapped)
    assert err.value.reason == "bad_signature"


@pytest.mark.parametrize("where", [0, 15, 16, 23, 24, 27])  # the iv, the price, the signature
def test_any_tampered_byte_is_refused(where):
    raw = bytearray(base64.urlsafe_b64decode(GOOGLE_VECTORS[0][0] + "=="))
    raw[where] ^= 0x01
    tampered = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    with pytest.raises(PriceError) as err:
        decrypt(tampered, GOOGLE_KEYS)
    assert err.value.reason == "bad_signature"


@pytest.mark.parametrize("text", ["", "garbage", "YWJjMTIzZGVmNDU2Z2hpN7fhCuPemCce_6msawAA", "!" * 38, "A" * 100])
def test_what_is_not_28_bytes_of_base64_is_no_price(text):
    with pytest.raises(PriceError) as err:
        decrypt(text, GOOGLE_KEYS)
    assert err.value.reason == "bad_price"


def test_keys_are_read_in_either_base64_alphabet_and_anything_else_refused():
    assert decode_key("skU7Ax_NL5pPAFyKdkfZjZz2-VhIN8bjj1rVFOaJ_5o") == decode_key("skU7Ax/NL5pPAFyKdkfZjZz2+VhIN8bjj1rVFOaJ/5o=")
    for bad in ("", "not base64!", "a", "ab=c"):
        with pytest.raises(ValueError):
            decode_key(bad)
