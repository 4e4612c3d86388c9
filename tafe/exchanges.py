"""Exchange profiles: what differs by exchange, keyed by the name in ``/openrtb2/bid/{exchange}``.

The ``exchanges`` setting names a JSON file, one object per exchange::

    {"adx":   {"seat": "4711", "spend_on": "win", "encryption_key": "<base64>", "integrity_key": "<base64>"},
     "openx": {"seat": "tafe-ox", "notice_base_url": "https://notices.example", "network_margin_ms": 25, "gzip": false}}

- ``seat``: the seat id that exchange knows us by: matched against ``wseat``/``bseat`` and
  deal ``wseat``, and sent as ``seatbid.seat``;
- ``spend_on``: which of its notices counts as spend, ``bill`` (burl) or ``win`` (nurl);
- ``encryption_key``, ``integrity_key``: its price keys, base64 as the exchange gives them
  (both or neither): its encrypted ``${AUCTION_PRICE}`` is decrypted and spent;
- ``notice_base_url``: the base of the notice URLs in bids to it;
- ``network_margin_ms``: time kept back from its ``tmax`` for the round trip;
- ``gzip``: false never gzips responses to it, whatever its ``Accept-Encoding`` says.

A field left out, a request on the bare ``/openrtb2/bid``, and an exchange not in the file
take the global settings of the same name. ``tafe serve``/``tafe up`` refuse a bad file in
one line; ``tafe exchanges validate FILE`` prints every error with its JSON path and exits 1.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tafe.core.campaigns import _Check, _is_url, _key
from tafe.money.price_crypto import PriceKeys, decode_key
from tafe.settings import Settings, SettingsError

__all__ = ["Exchanges", "ExchangesError", "Profile", "load", "read", "validate"]

NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")  # the names /openrtb2/bid/{exchange} can carry
_RESERVED = ("default", "other")  # metric labels of the bare path and of unlisted names
_FIELDS = {"seat", "spend_on", "encryption_key", "integrity_key", "notice_base_url", "network_margin_ms", "gzip"}


class ExchangesError(SettingsError):
    """The exchanges file cannot be used: one line naming the file and its first error."""


@dataclass(frozen=True, slots=True)
class Profile:
    """How TAFE bids to one exchange and reads its notices."""

    name: str  # "" for the defaults (the bare bid path, and exchanges not in the file)
    seat: str
    spend_on: str
    notice_base_url: str
    network_margin_ms: int
    gzip: bool = True
    price_keys: PriceKeys | None = None  # None: its encrypted prices are logged, not spent


@dataclass(frozen=True, slots=True)
class Exchanges:
    """The profiles by name, and the defaults for every other request."""

    default: Profile
    by_name: Mapping[str, Profile] = field(default_factory=dict)

    def of(self, name: str) -> Profile:
        return self.by_name.get(name, self.default)


def defaults(settings: Settings) -> Profile:
    """The profile the global settings make."""
    return Profile(
        "", settings.seat, settings.spend_on, settings.notice_base_url.rstrip("/"), settings.network_margin_ms
    )


def _price_keys(p: dict[str, Any], path: str, check: _Check) -> PriceKeys | None:
    given = [k for k in ("encryption_key", "integrity_key") if k in p]
    if len(given) == 1:
        other = "integrity_key" if given[0] == "encryption_key" else "encryption_key"
        check.need(False, path, f"required with {given[0]} (an exchange gives both keys)", other)
        return None
    keys = []
    for k in given:
        try:
            keys.append(decode_key(p[k]) if isinstance(p[k], str) else None)
        except ValueError:
            keys.append(None)
        check.need(keys[-1] is not None, path, "expected the key in base64, as the exchange gave it", k)
    return PriceKeys(keys[0], keys[1]) if len(keys) == 2 and None not in keys else None  # type: ignore[arg-type]


def _profile(name: str, p: Any, path: str, base: Profile, check: _Check) -> Profile | None:
    before = len(check.errors)
    if not check.object(p, path, _FIELDS):
        return None
    seat = p.get("seat", base.seat)
    check.need(isinstance(seat, str) and 0 < len(seat) <= 64, path, "expected a seat id, 1-64 characters", "seat")
    spend_on = p.get("spend_on", base.spend_on)
    check.need(spend_on in ("bill", "win"), path, 'expected "bill" or "win"', "spend_on")
    keys = _price_keys(p, path, check)
    notice_base = p.get("notice_base_url", base.notice_base_url)
    if "notice_base_url" in p:
        check.need(_is_url(notice_base), path, "expected an absolute http or https URL", "notice_base_url")
    margin = p.get("network_margin_ms", base.network_margin_ms)
    check.need(type(margin) is int and margin >= 0, path, "expected an integer >= 0 (milliseconds)", "network_margin_ms")
    gzip = p.get("gzip", True)
    check.need(isinstance(gzip, bool), path, "expected true or false", "gzip")
    if len(check.errors) > before:
        return None
    return Profile(name, seat, spend_on, notice_base.rstrip("/"), margin, gzip, keys)


def validate(data: Any, settings: Settings) -> tuple[Exchanges | None, list[str]]:
    """The profiles of a decoded exchanges document, or None and every error as ``json.path: message``."""
    check = _Check()
    base = defaults(settings)
    if not check.need(isinstance(data, dict), "", "expected an object of exchange name -> profile"):
        return None, check.errors
    profiles = {}
    for name, p in data.items():
        path = _key("", name)
        ok = check.need(bool(NAME.fullmatch(name)), path, "exchange name: expected 1-40 of A-Z a-z 0-9 . _ -")
        if ok:
            check.need(name not in _RESERVED, path, f"exchange name: {' and '.join(_RESERVED)} are reserved")
        profile = _profile(name, p, path, base, check)
        if profile is not None:
            profiles[name] = profile
    if check.errors:
        return None, check.errors
    return Exchanges(base, profiles), []


def read(path: str | Path) -> Any:
    """The decoded JSON of an exchanges file; ``ExchangesError`` if it cannot be read or decoded."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ExchangesError(f"exchanges file {path}: {exc}") from None


def load(settings: Settings) -> Exchanges:
    """The profiles the settings name (none: every exchange gets the defaults); ``ExchangesError`` in one line."""
    if not settings.exchanges:
        return Exchanges(defaults(settings))
    found, errors = validate(read(settings.exchanges), settings)
    if found is None:
        more = len(errors) - 1
        tail = f" (and {more} more error{'s' * (more > 1)}: tafe exchanges validate lists them all)" if more else ""
        raise ExchangesError(f"exchanges file {settings.exchanges}: {errors[0]}{tail}")
    return found


# --- tafe exchanges validate [FILE] -------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    from tafe.cli import add_settings_options

    subs = parser.add_subparsers(dest="exchanges_command", metavar="SUBCOMMAND", required=True)
    p = subs.add_parser(
        "validate",
        help="print every error of an exchanges file as json.path: message (exit 1), or a one-line summary (exit 0)",
    )
    p.add_argument("file", nargs="?", metavar="FILE", help="exchanges file (default: the exchanges setting)")
    add_settings_options(p, "exchanges")


def run(args: argparse.Namespace) -> int:
    """Every error of the file, one per line (exit 1), or ``FILE: N exchanges OK`` (exit 0)."""
    from tafe.cli import settings_from_args

    settings = settings_from_args(args)
    path = args.file or settings.exchanges
    if not path:
        print("no exchanges file: give FILE, or set exchanges (--exchanges, TAFE_EXCHANGES)")
        return 1
    try:
        data = read(path)
    except ExchangesError as exc:
        print(exc)
        return 1
    found, errors = validate(data, settings)
    for error in errors:
        print(error)
    if found is None:
        return 1
    n = len(found.by_name)
    print(f"{path}: {n} exchange{'s' * (n != 1)} OK")
    return 0
